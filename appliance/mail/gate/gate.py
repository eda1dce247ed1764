"""The SMTP gate against spam (MISSION M-10): every check, in seed 004's order, at its step.

The protocol calls :class:`Gate` at each SMTP step; each call fires with one
:class:`~appliance.mail.gate.verdict.Verdict` and never fails.  Checks run
cheapest first, each at the earliest step that has what it needs:

- connect: access map (client address, then verified host name), DNSBL;
- HELO: records the name;
- MAIL: access map (``From:``), always-wrong sender domain, sender domain
  existence;
- RCPT: access map (``To:``), always-wrong recipient domain, recipient domain
  existence for relayed mail, recipient existence (optional), greylisting, SPF (once per transaction, after
  greylisting so that greylisted spam costs no SPF lookups: seed 004 order);
- end of DATA: header checks, then the collected tags.

Inside and authenticated clients, and clients the access map says OK or
RELAY for, skip DNSBL, domain existence of the sender, greylisting, SPF and
header checks; the access map and the always-wrong list apply to everyone.
A neighbour that fails never causes a 5xx (R-1, R-3).  Every decision is
logged with the check's name, the client and the reason.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns.lookup import MailResolver
from appliance.mail.gate.access import AccessAction, AccessMap, AccessSettings, check_access_file
from appliance.mail.gate.dnsbl import DNSBL, DNSBLSettings
from appliance.mail.gate.domains import DomainExistence, DomainSettings, Existence, read_domain_list
from appliance.mail.gate.greet import PREGREET_REPLY, GreetPause, GreetPauseSettings
from appliance.mail.gate.greylist import Greylist, GreylistSettings
from appliance.mail.gate.headers import HeaderCheck, HeaderSettings
from appliance.mail.gate.spf import SPFCheck, SPFSettings
from appliance.mail.gate.verdict import (
    Action,
    Session,
    Verdict,
    accept,
    parse_ip,
    reject,
    tag,
    tempfail,
    with_deadline,
)
from appliance.mail.interfaces import RecipientCheck, Reply

log = Logger(namespace="appliance.mail.gate")

INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, please try again later")


@dataclass(frozen=True)
class GateSettings:
    """All gate settings; the lead maps the ``[smtp.gate]`` config section onto this.

    ``authserv_id`` names this host in Authentication-Results (RFC 8601 2.5).
    ``ptr_timeout`` bounds the client host-name lookup the access map needs.
    """

    authserv_id: str = "localhost"
    greet: GreetPauseSettings = field(default_factory=GreetPauseSettings)
    dnsbl: DNSBLSettings = field(default_factory=DNSBLSettings)
    domains: DomainSettings = field(default_factory=DomainSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    headers: HeaderSettings = field(default_factory=HeaderSettings)
    greylist: GreylistSettings = field(default_factory=GreylistSettings)
    spf: SPFSettings = field(default_factory=SPFSettings)
    ptr_timeout: float = 10.0


CheckCall = Callable[[], "Deferred[Verdict] | Verdict | None"]
#: ``explain``'s hook for the protocol's own RCPT decisions: (rows, refusal or None).
BeforeRcpt = Callable[
    [Session, str], "Deferred[tuple[list[tuple[str, str, str, str]], Verdict | None]]"
]


class Gate:
    """The policy object the SMTP protocol consults; see the module docstring for the order.

    ``is_inside(ip)`` says whether a client is inside (inside networks,
    POP-before-SMTP: ``RelayPolicy.is_inside_client``); ``is_local_domain(d)``
    whether the box accepts mail for ``d`` (``RelayPolicy.accepts_for``), so
    that recipient domain existence is only checked for mail relayed out.
    ``recipients`` (optional) is the directory's RecipientCheck: given, the
    gate asks it for local recipients between the domain checks and
    greylisting, seed 004's order (5) before (6); then the protocol need not.
    Building it raises AccessMapError/OSError (access file) or sqlite3.Error
    (greylisting database) when the configuration is unusable.

    What the protocol does with a step's verdict: REJECT/TEMPFAIL send
    ``verdict.reply`` (at connect: then close); ACCEPT, TAG, OK and RELAY go
    on (RELAY at connect or RCPT also permits relaying for that client or
    recipient); DISCARD at MAIL/RCPT answers 250 as usual and the message is
    dropped after DATA, where :meth:`data` answers DISCARD again.  At the end
    of DATA a TAG verdict's ``headers`` are prepended to the message.
    """

    def __init__(
        self,
        settings: GateSettings,
        resolver: MailResolver,
        clock: IReactorTime,
        is_inside: Callable[[str], bool] = lambda ip: False,
        is_local_domain: Callable[[str], bool] = lambda domain: False,
        recipients: RecipientCheck | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self.is_inside = is_inside
        self.is_local_domain = is_local_domain
        self.recipients = recipients
        self.greet = GreetPause(settings.greet)
        self.dnsbl = DNSBL(settings.dnsbl, resolver, clock)
        self.domains = DomainExistence(settings.domains, resolver, clock)
        self.access = AccessMap(settings.access.path) if settings.access.path else None
        self.headers = HeaderCheck(settings.headers)
        self.greylist = Greylist(settings.greylist, clock) if settings.greylist.enabled else None
        self.spf = (
            SPFCheck(settings.spf, resolver, clock, settings.authserv_id)
            if settings.spf.enabled
            else None
        )

    # ------------------------------------------------------------------ life cycle

    def reload(self) -> list[str]:
        """Re-read the access map; returns its errors (the old map stays in force then)."""
        return self.access.reload() if self.access is not None else []

    def close(self) -> None:
        """Release the greylisting database."""
        if self.greylist is not None:
            self.greylist.close()

    def session(self, client_ip: str, listener: str, authenticated: bool = False) -> Session:
        """A new session for a connection; the protocol sets ``authenticated`` after AUTH."""
        try:
            inside = bool(self.is_inside(client_ip))
        except Exception:
            log.failure("is_inside failed for {client}", client=client_ip)
            inside = False
        return Session(
            client_ip=client_ip, listener=listener, inside=inside, authenticated=authenticated
        )

    def greet_delay(self, client_ip: str, listener: str) -> float:
        """Seconds to wait before the banner (0 for inside clients); see greet.py."""
        try:
            return self.greet.delay(client_ip, listener, bool(self.is_inside(client_ip)))
        except Exception:
            log.failure("greet_delay failed for {client}", client=client_ip)
            return 0.0

    def early_talker(self, session: Session) -> Verdict:
        """The verdict (554 5.5.0, logged) for a client that spoke before the banner."""
        verdict = reject(PREGREET_REPLY, "greet_pause", "client talked before the greeting")
        self._record(session, "connect", verdict)
        return verdict

    # ------------------------------------------------------------------ steps

    def connect(self, session: Session) -> Deferred[Verdict]:
        """Access map for the client, then DNSBL."""
        return self._run(session, "connect", [self._access_client, self._dnsbl])

    def helo(self, session: Session, name: str) -> Deferred[Verdict]:
        """Record the HELO/EHLO name (it starts a new transaction)."""
        session.helo = name
        session.reset_transaction()
        return self._run(session, "helo", [])

    def mail(self, session: Session, sender: str) -> Deferred[Verdict]:
        """``sender`` is the envelope reverse-path, ``""`` for ``<>``."""
        session.reset_transaction()
        session.sender = sender
        return self._run(
            session, "mail", [self._access_sender, self._sender_always_wrong, self._sender_domain]
        )

    def rcpt(self, session: Session, recipient: str) -> Deferred[Verdict]:
        """One recipient; call only after :meth:`mail` accepted the sender."""
        d = self._run(
            session,
            "rcpt",
            [
                lambda: self._access_recipient(session, recipient),
                lambda: self._recipient_always_wrong(session, recipient),
                lambda: self._recipient_domain(session, recipient),
                lambda: self._recipient_exists(session, recipient),
                lambda: self._greylist(session, recipient),
                lambda: self._spf(session),
            ],
            bind=False,
        )

        def remember(verdict: Verdict) -> Verdict:
            if not verdict.refused:
                session.recipients.append(recipient)
            return verdict

        d.addCallback(remember)
        return d

    def data(self, session: Session, header_block: bytes) -> Deferred[Verdict]:
        """Header checks; then DISCARD, or TAG with every collected header line, or ACCEPT."""
        d = self._run(
            session, "data", [lambda: self._header_check(session, header_block)], bind=False
        )

        def final(verdict: Verdict) -> Verdict:
            if verdict.refused:
                return verdict
            if session.discard:
                return Verdict(Action.DISCARD, check="access", reason="discarded by the access map")
            lines = tuple(session.connection_tags + session.tags)
            if lines:
                return tag(lines, "gate", "headers added")
            return accept("gate", "accepted")

        d.addCallback(final)
        return d

    def judge_headers(self, session: Session, header_block: bytes) -> Verdict:
        """:meth:`data` without a Deferred, for a protocol that streams the body.

        Header checks are pure computation, so the SMTP server can judge the
        header block the moment it is complete and put the TAG lines in front
        of it in the stored message.
        """
        try:
            verdict = self._header_check(session, header_block)
        except Exception:
            log.failure("gate data for {client} failed; answering 451", client=session.client_ip)
            return tempfail(INTERNAL_ERROR, "gate", "internal error in header checks")
        if verdict is not None:
            self._record(session, "data", verdict)
            if verdict.refused:
                return verdict
        if session.discard:
            return Verdict(Action.DISCARD, check="access", reason="discarded by the access map")
        lines = tuple(session.connection_tags + session.tags)
        if verdict is not None and verdict.action is Action.TAG:
            lines += verdict.headers
        if lines:
            return tag(lines, "gate", "headers added")
        return accept("gate", "accepted")

    # ------------------------------------------------------------------ driver

    def _run(
        self, session: Session, step: str, checks: list[Any], bind: bool = True
    ) -> Deferred[Verdict]:
        calls: list[CheckCall] = [functools.partial(c, session) if bind else c for c in checks]
        d = self._run_checks(session, step, calls)

        def crashed(failure: Failure) -> Verdict:
            log.failure(
                "gate {step} for {client} failed; answering 451",
                failure,
                step=step,
                client=session.client_ip,
            )
            return tempfail(INTERNAL_ERROR, "gate", f"internal error: {failure.getErrorMessage()}")

        d.addErrback(crashed)
        return d

    @inlineCallbacks
    def _run_checks(
        self, session: Session, step: str, checks: list[CheckCall]
    ) -> Generator[Any, Any, Verdict]:
        headers: list[str] = []
        for call in checks:
            verdict = call()
            if isinstance(verdict, Deferred):
                verdict = yield verdict
            if verdict is None:
                continue
            self._record(session, step, verdict)
            if verdict.final:
                return verdict
            if verdict.action is Action.TAG:
                headers.extend(verdict.headers)
                (session.connection_tags if step == "connect" else session.tags).extend(
                    verdict.headers
                )
        if headers:
            return tag(tuple(headers), "gate", f"{step} accepted with tags")
        return accept("gate", f"{step} accepted")

    def _record(self, session: Session, step: str, verdict: Verdict) -> None:
        if session.dry_run:
            session.trace.append((step, verdict))
            return
        # Formatted here, once: a one-field format is what makes a line per decision
        # affordable at hundreds of messages a second (twisted.logger re-parses formats).
        sender = session.sender if session.sender is not None else ""
        log.info(
            "{line}",
            line=f"gate {step} {verdict.check}: client={session.client_ip} "
            f"helo={session.helo or ''} sender=<{sender}> {verdict.describe()}; {verdict.reason}",
            step=step,
            check=verdict.check,
            client=session.client_ip,
        )

    # ------------------------------------------------------------------ connect

    def _access_verdict(self, entry: AccessAction | None, step: str, what: str) -> Verdict | None:
        if entry is None:
            return None
        reason = f"{what} matches {entry.key} ({entry.source})"
        if entry.action in (Action.OK, Action.RELAY):
            return Verdict(entry.action, check="access", reason=reason)
        if entry.action is Action.DISCARD:
            return Verdict(Action.DISCARD, check="access", reason=reason)
        reply = entry.reply_for(step)
        assert reply is not None
        if reply.permanent:
            return reject(reply, "access", reason)
        return tempfail(reply, "access", reason)

    @inlineCallbacks
    def _access_client(self, session: Session) -> Generator[Any, Any, Verdict | None]:
        if self.access is None:
            return None
        if self.access.has_host_names and session.client_name is None:
            session.client_name = yield self._client_name(session.client_ip)
        entry = self.access.client(session.client_ip, session.client_name)
        verdict = self._access_verdict(
            entry, "connect", f"client {session.client_ip} ({session.client_name or 'no name'})"
        )
        if verdict is not None and verdict.action in (Action.OK, Action.RELAY):
            session.access = verdict.action
            return Verdict(verdict.action, check="access", reason=verdict.reason)
        return verdict

    @inlineCallbacks
    def _client_name(self, client_ip: str) -> Generator[Any, Any, str]:
        """The forward-confirmed PTR name of the client, or "" (errors are logged, not fatal)."""
        address = parse_ip(client_ip)
        if address is None:
            return ""
        try:
            names = yield with_deadline(
                self.resolver.ptr(str(address)), self.settings.ptr_timeout, self.clock
            )
            for name in names[:5]:
                found = yield with_deadline(
                    self.resolver.addresses(name), self.settings.ptr_timeout, self.clock
                )
                if any(parse_ip(a) == address for a in found):
                    return str(name).lower().rstrip(".")
        except Exception as error:
            log.info(
                "no host name for {client}: {error}",
                client=client_ip,
                error=str(error) or type(error).__name__,
            )
        return ""

    def _dnsbl(self, session: Session) -> Deferred[Verdict] | None:
        if session.trusted or not self.settings.dnsbl.zones:
            return None
        return self.dnsbl.check(session.client_ip)

    # ------------------------------------------------------------------ MAIL

    def _access_sender(self, session: Session) -> Verdict | None:
        if self.access is None or session.sender is None:
            return None
        verdict = self._access_verdict(
            self.access.sender(session.sender), "mail", f"sender <{session.sender}>"
        )
        if verdict is not None:
            if verdict.action in (Action.OK, Action.RELAY):
                session.sender_access = Action.OK
            elif verdict.action is Action.DISCARD:
                session.discard = True
        return verdict

    def _sender_always_wrong(self, session: Session) -> Verdict | None:
        domain = (session.sender or "").rpartition("@")[2]
        if domain and self.domains.is_always_wrong(domain):
            return reject(
                Reply(553, "5.1.8", f"Sender address rejected: domain {domain} does not exist"),
                "domain",
                f"sender domain {domain} is in the always-wrong list",
            )
        return None

    def _sender_domain(self, session: Session) -> Deferred[Verdict] | None:
        settings = self.settings.domains
        domain = (session.sender or "").rpartition("@")[2]
        if (
            not settings.check_sender
            or not domain
            or session.trusted
            or session.sender_access is not None
        ):
            return None
        return self.domains.lookup(domain).addCallback(self._sender_existence, session, domain)

    def _sender_existence(self, existence: Existence, session: Session, domain: str) -> Verdict:
        reason = f"sender domain {domain}: {existence.value}"
        if existence is Existence.EXISTS:
            return accept("domain", reason)
        if existence is Existence.TEMPORARY:
            log.error(
                "sender domain {domain} of {client}: DNS lookup failed; answering 451",
                domain=domain,
                client=session.client_ip,
            )
            return tempfail(
                Reply(
                    451,
                    "4.4.3",
                    f"Sender address rejected: cannot resolve {domain} now, try again later",
                ),
                "domain",
                reason,
            )
        if existence is Existence.NULL_MX:
            return reject(
                Reply(
                    550, "5.7.27", f"Sender address rejected: {domain} accepts no mail (null MX)"
                ),
                "domain",
                reason,
            )
        return self._nxdomain(
            Reply(553, "5.1.8", f"Sender address rejected: domain {domain} not found"),
            Reply(
                451, "4.1.8", f"Sender address rejected: domain {domain} not found, try again later"
            ),
            f"X-Sender-Domain-Check: {domain} not found",
            reason,
        )

    def _nxdomain(self, permanent: Reply, temporary: Reply, header: str, reason: str) -> Verdict:
        action = self.settings.domains.nxdomain_action
        if action == "tempfail":
            return tempfail(temporary, "domain", reason)
        if action == "tag":
            return tag((header,), "domain", reason)
        return reject(permanent, "domain", reason)

    # ------------------------------------------------------------------ RCPT

    def _access_recipient(self, session: Session, recipient: str) -> Verdict | None:
        if self.access is None:
            return None
        verdict = self._access_verdict(
            self.access.recipient(recipient), "rcpt", f"recipient <{recipient}>"
        )
        if verdict is not None and verdict.action is Action.DISCARD:
            session.discard = True
        return verdict

    def _recipient_always_wrong(self, session: Session, recipient: str) -> Verdict | None:
        domain = recipient.rpartition("@")[2]
        if domain and self.domains.is_always_wrong(domain):
            return reject(
                Reply(550, "5.1.2", f"Recipient address rejected: domain {domain} does not exist"),
                "domain",
                f"recipient domain {domain} is in the always-wrong list",
            )
        return None

    def _recipient_domain(self, session: Session, recipient: str) -> Deferred[Verdict] | None:
        domain = recipient.rpartition("@")[2]
        if not self.settings.domains.check_recipients or not domain or self.is_local_domain(domain):
            return None
        if not (session.exempt or session.access is Action.RELAY):
            return None  # an outside client's non-local recipient is the relay policy's to refuse

        def judged(existence: Existence) -> Verdict:
            reason = f"recipient domain {domain}: {existence.value}"
            if existence is Existence.EXISTS:
                return accept("domain", reason)
            if existence is Existence.TEMPORARY:
                log.error(
                    "recipient domain {domain}: DNS lookup failed; answering 451", domain=domain
                )
                return tempfail(
                    Reply(
                        451,
                        "4.4.3",
                        f"Recipient address rejected: cannot resolve {domain} now, try again later",
                    ),
                    "domain",
                    reason,
                )
            if existence is Existence.NULL_MX:
                return reject(
                    Reply(
                        556,
                        "5.1.10",
                        f"Recipient address rejected: {domain} accepts no mail (null MX)",
                    ),
                    "domain",
                    reason,
                )
            return self._nxdomain(
                Reply(550, "5.1.2", f"Recipient address rejected: domain {domain} not found"),
                Reply(
                    451,
                    "4.1.2",
                    f"Recipient address rejected: domain {domain} not found, try again later",
                ),
                f"X-Recipient-Domain-Check: {domain} not found",
                reason,
            )

        return self.domains.lookup(domain).addCallback(judged)

    def _recipient_exists(self, session: Session, recipient: str) -> Deferred[Verdict] | None:
        domain = recipient.rpartition("@")[2]
        if self.recipients is None or not self.is_local_domain(domain):
            return None

        def judged(refusal: Reply | None) -> Verdict:
            if refusal is None:
                return accept("recipient", f"<{recipient}> exists")
            reason = f"<{recipient}>: {refusal.text}"
            if refusal.temporary:
                return tempfail(refusal, "recipient", reason)
            return reject(refusal, "recipient", reason)

        return self.recipients.check_recipient(recipient).addCallback(judged)

    def _greylist(self, session: Session, recipient: str) -> Verdict | None:
        if self.greylist is None or session.trusted or session.sender_access is not None:
            return None
        return self.greylist.check(
            session.client_ip, session.sender or "", recipient, dry_run=session.dry_run
        )

    def _spf(self, session: Session) -> Deferred[Verdict] | Verdict | None:
        if self.spf is None or session.trusted or session.sender_access is not None:
            return None
        if session.spf_verdict is not None:
            # Evaluated once per transaction; its tag is already collected.
            cached = session.spf_verdict
            return cached if cached.refused else None
        sender = session.sender or ""
        if not sender and not session.helo:
            return None
        d = self.spf.check(session.client_ip, sender, session.helo or "")

        def keep(result: tuple[Verdict, Any]) -> Verdict:
            verdict = result[0]
            if verdict.action is Action.TEMPFAIL:
                log.error(
                    "SPF for {client}: {reason}; answering 451",
                    client=session.client_ip,
                    reason=verdict.reason,
                )
            elif "temperror" in verdict.reason:
                log.error(
                    "SPF for {client}: {reason}; accepted",
                    client=session.client_ip,
                    reason=verdict.reason,
                )
            session.spf_verdict = verdict
            return verdict

        d.addCallback(keep)
        return d  # type: ignore[return-value]

    # ------------------------------------------------------------------ DATA

    def _header_check(self, session: Session, block: bytes) -> Verdict | None:
        if session.trusted:
            return None
        return self.headers.check(block)


def check_gate_settings(settings: GateSettings) -> list[str]:
    """Problems that would stop the gate from starting or working, as texts (``appliance check``).

    Covers the access file (``file:line: reason``), the always-wrong domain
    file, the greylisting database's directory and every DNSBL zone name.
    Settings dataclasses validate their own values when built.
    """
    problems: list[str] = []
    if settings.access.path:
        problems.extend(check_access_file(settings.access.path))
    wrong = settings.domains.always_wrong_file
    if wrong:
        try:
            read_domain_list(wrong)
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{wrong}: cannot read: {error}")
    grey = settings.greylist
    if grey.enabled and grey.path:
        directory = os.path.dirname(os.path.abspath(grey.path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            problems.append(f"{grey.path}: directory {directory} is missing or not writable")
    for zone in settings.dnsbl.zones:
        name = zone.zone.strip(".")
        if not name or any(not label or len(label) > 63 for label in name.split(".")):
            problems.append(f"DNSBL zone {zone.zone!r} is not a domain name")
    return problems


@inlineCallbacks
def explain(
    gate: Gate,
    client_ip: str,
    helo: str,
    sender: str,
    recipients: list[str] | tuple[str, ...],
    listener: str = "outside",
    authenticated: bool = False,
    before_rcpt: BeforeRcpt | None = None,
    header_block: bytes | None = None,
) -> Generator[Any, Any, list[tuple[str, str, str, str]]]:
    """Run a session without a client (``appliance policy test``, like ``exim -bh``).

    Fires with (step, check, verdict, reason) rows; greylisting is asked
    without recording anything.  Every recipient is tried, like a client
    that goes on after a refused RCPT.  ``before_rcpt(session, recipient)``
    runs what the protocol decides before the gate's RCPT checks (relaying,
    recipient existence): it fires with rows of its own and a refusal (a
    Verdict) or None; a refusal is that recipient's result.  ``header_block``
    is judged as at the end of DATA when some recipient was accepted.
    """
    session = gate.session(client_ip, listener, authenticated=authenticated)
    session.dry_run = True
    rows: list[tuple[str, str, str, str]] = []
    delay = gate.greet_delay(client_ip, listener)
    rows.append(("connect", "greet_pause", "delay", f"{delay:g}s before the banner"))

    def collect(step: str, final: Verdict) -> bool:
        for traced_step, verdict in session.trace:
            rows.append((traced_step, verdict.check, verdict.describe(), verdict.reason))
        session.trace.clear()
        rows.append((step, "result", final.describe(), final.reason))
        return final.refused

    verdict = yield gate.connect(session)
    if collect("connect", verdict):
        return rows
    verdict = yield gate.helo(session, helo)
    collect("helo", verdict)
    verdict = yield gate.mail(session, sender)
    if collect("mail", verdict):
        return rows
    accepted = 0
    for recipient in recipients:
        if before_rcpt is not None:
            own_rows, refusal = yield before_rcpt(session, recipient)
            rows.extend(own_rows)
            if refusal is not None:
                reason = refusal.reason
                if recipient not in reason:
                    reason = f"<{recipient}>: {reason}"
                rows.append(("rcpt", "result", refusal.describe(), reason))
                continue
        verdict = yield gate.rcpt(session, recipient)
        if not collect("rcpt", verdict):
            accepted += 1
    if header_block is not None and accepted:
        verdict = gate.judge_headers(session, header_block)
        collect("data", verdict)
    return rows


__all__ = ["Gate", "GateSettings", "check_gate_settings", "explain"]
