"""The shapes every gate check shares: the verdict it returns, the session it reads, DNS deadlines.

A check never raises into the protocol: it answers with a :class:`Verdict`.
Lookups through the MailResolver get a deadline here, so a neighbour that
never answers becomes a :class:`TemporaryFailure` like any other (R-1, R-3).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from appliance.dns.lookup import TemporaryFailure
from appliance.mail.interfaces import Reply

T = TypeVar("T")


class Action(enum.Enum):
    """What the protocol does with a command after the gate has judged it."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    TAG = "tag"
    OK = "ok"
    RELAY = "relay"


@dataclass(frozen=True)
class Verdict:
    """One check's (or one step's) answer.

    ``reply`` is set for REJECT and TEMPFAIL; ``headers`` are complete header
    lines (``Name: value``, no CRLF) for TAG; ``check`` and ``reason`` say who
    decided and why, for the log and for ``appliance policy test``.
    """

    action: Action
    reply: Reply | None = None
    headers: tuple[str, ...] = ()
    check: str = ""
    reason: str = ""

    @property
    def final(self) -> bool:
        """True when later checks must not run: refused, discarded or allowed by the access map."""
        return self.action in (
            Action.REJECT,
            Action.TEMPFAIL,
            Action.DISCARD,
            Action.OK,
            Action.RELAY,
        )

    @property
    def refused(self) -> bool:
        """True for REJECT and TEMPFAIL: the protocol sends ``reply`` and refuses the command."""
        return self.action in (Action.REJECT, Action.TEMPFAIL)

    def describe(self) -> str:
        """A short text for logs: ``reject 554 5.7.1 text`` or ``tag``."""
        if self.reply is not None:
            r = self.reply
            return f"{self.action.value} {r.code} {r.enhanced} {r.text}"
        return self.action.value


def accept(check: str = "", reason: str = "") -> Verdict:
    """Nothing against it; later checks still run."""
    return Verdict(Action.ACCEPT, check=check, reason=reason)


def reject(reply: Reply, check: str, reason: str) -> Verdict:
    """Refuse with a permanent (5xx) reply."""
    return Verdict(Action.REJECT, reply=reply, check=check, reason=reason)


def tempfail(reply: Reply, check: str, reason: str) -> Verdict:
    """Refuse with a temporary (4xx) reply: the sender keeps the message and retries."""
    return Verdict(Action.TEMPFAIL, reply=reply, check=check, reason=reason)


def tag(headers: tuple[str, ...], check: str, reason: str) -> Verdict:
    """Accept, but add these header lines to the message."""
    return Verdict(Action.TAG, headers=headers, check=check, reason=reason)


@dataclass
class Session:
    """What the gate knows about one SMTP session; the protocol creates it with ``Gate.session``.

    ``inside`` (inside network or POP-before-SMTP) and ``authenticated`` make
    a client exempt from greet pause and the anti-spam checks.  ``access`` is
    the access map's OK/RELAY for the client, which skips the later checks.
    ``connection_tags`` (DNSBL) and ``tags`` (this transaction) collect
    header lines added at the end of DATA; ``discard`` says
    the message is to be accepted and dropped.  ``dry_run`` (``explain``)
    keeps checks from writing state (greylisting).
    """

    client_ip: str
    listener: str
    inside: bool = False
    authenticated: bool = False
    helo: str | None = None
    client_name: str | None = None
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    connection_tags: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    access: Action | None = None
    sender_access: Action | None = None
    spf_verdict: Verdict | None = None
    discard: bool = False
    dry_run: bool = False
    trace: list[tuple[str, Verdict]] = field(default_factory=list)

    @property
    def exempt(self) -> bool:
        """Inside and authenticated clients skip greet pause, DNSBL, greylisting and SPF."""
        return self.inside or self.authenticated

    @property
    def trusted(self) -> bool:
        """Exempt, or allowed by an access map OK/RELAY for the client address or name."""
        return self.exempt or self.access in (Action.OK, Action.RELAY)

    def reset_transaction(self) -> None:
        """Forget the envelope (RSET, new MAIL, new HELO); the client facts stay."""
        self.sender = None
        self.recipients = []
        self.discard = False
        self.sender_access = None
        self.spf_verdict = None
        self.tags = []


def with_deadline(d: Deferred[T], seconds: float | None, clock: IReactorTime) -> Deferred[T]:
    """Fail ``d`` with :class:`TemporaryFailure` when it has not fired within ``seconds``."""
    if seconds is None or seconds <= 0:
        return d
    if d.called and not d.paused:
        # Already answered (a cache hit): no timer to schedule and cancel at once.
        return d

    def timed_out(failure: Failure) -> Failure:
        if failure.check(TimeoutError):
            return Failure(TemporaryFailure(f"no answer within {seconds:g}s"))
        return failure

    d.addTimeout(seconds, clock)
    d.addErrback(timed_out)
    return d


def network_of(client_ip: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The client's /24 (IPv4) or /64 (IPv6) as text: greylisting keys on it, not the host."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address (IPv4-mapped IPv6 as IPv4), or None when ``text`` is not one."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
