"""Greet pause (sendmail ``greet_pause``, Postfix postscreen "pregreet"): wait before the banner.

A client that talks before the banner does not follow RFC 5321 3.1 ("the
client waits for the greeting"); bulk senders often do.  This module only
says how long to wait for a client; the protocol waits, and refuses a client
that spoke first with :data:`PREGREET_REPLY`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance.mail.gate.verdict import parse_ip
from appliance.mail.interfaces import Reply

#: What a client that spoke before the banner gets (then the connection is closed).
PREGREET_REPLY = Reply(554, "5.5.0", "Protocol error: talking before the greeting")


@dataclass(frozen=True)
class GreetPauseSettings:
    """Seconds to wait per listener name (``outside``: 5.0); listeners not named wait ``default``.

    ``exempt_networks`` (CIDR text) never wait, besides inside clients.
    """

    per_listener: Mapping[str, float] = field(default_factory=dict)
    default: float = 0.0
    exempt_networks: tuple[str, ...] = ()


class GreetPause:
    """How long the protocol waits before the 220 banner for one client."""

    name = "greet_pause"

    def __init__(self, settings: GreetPauseSettings) -> None:
        self.settings = settings
        self._exempt = tuple(
            ipaddress.ip_network(n, strict=False) for n in settings.exempt_networks
        )

    def delay(self, client_ip: str, listener: str, inside: bool) -> float:
        """Seconds to wait; 0.0 for inside clients and exempt networks."""
        if inside:
            return 0.0
        address = parse_ip(client_ip)
        if address is not None and any(
            address.version == net.version and address in net for net in self._exempt
        ):
            return 0.0
        return max(0.0, float(self.settings.per_listener.get(listener, self.settings.default)))
