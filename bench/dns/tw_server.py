"""A plain twisted.names authoritative server for the comparison: BindAuthority + DNSServerFactory.

Run: ``python tw_server.py ZONEFILE ADDRESS PORT``.  The zone file's name is
its origin (BindAuthority's rule).  Needs Twisted >= 26.4 (BindAuthority
raises TypeError on 22.4, research/twisted-notes.md).  UDP and TCP, as a
stock deployment would listen.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.names import authority, dns, server

reactor: Any = _reactor


def main(zone_file: str, address: str, port: int) -> None:
    zone = authority.BindAuthority(zone_file.encode())
    factory = server.DNSServerFactory(authorities=[zone])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=address)
    reactor.listenTCP(port, factory, interface=address)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
