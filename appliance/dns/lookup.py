"""The in-process resolver as the mail code sees it: answers, or a clear kind of failure.

R-1: a DNS answer that did not come (timeout, SERVFAIL, refused) is a
temporary failure and must never be taken for "no such domain".  So the three
outcomes are distinct: records (possibly an empty list: the name exists but
has no such data), `NoSuchDomain` (an authoritative NXDOMAIN), and
`TemporaryFailure` (anything else).  Names are text, without the trailing dot,
lower-cased; CNAME chains are followed by the resolver (bounded).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred


class LookupFailure(Exception):
    """Base of the two ways a lookup can fail."""


class NoSuchDomain(LookupFailure):
    """The name does not exist (authoritative NXDOMAIN)."""


class TemporaryFailure(LookupFailure):
    """No usable answer came (timeout, SERVFAIL, REFUSED, malformed): try again later (R-1)."""


class MailResolver(Protocol):
    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        """(preference, exchange) pairs as published; [] when the domain has no MX (NODATA).

        A null MX (RFC 7505) comes back as ``[(0, "")]``.
        """

    def addresses(self, host: str) -> Deferred[list[str]]:
        """A and AAAA addresses of ``host`` (IPv4 first); [] when it has neither."""

    def txt(self, name: str) -> Deferred[list[bytes]]:
        """Each TXT record's strings joined, one bytes value per record."""

    def ptr(self, address: str) -> Deferred[list[str]]:
        """The names an address maps back to."""
