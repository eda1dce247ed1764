"""SPF, RFC 7208: may this client send mail for the envelope sender's (or HELO) domain?

:class:`SPFEvaluator` implements ``check_host()`` (RFC 7208 section 4) over
the MailResolver: records selected per 4.5, mechanisms all, include, a, mx,
ptr, ip4, ip6 and exists (section 5), the redirect and exp modifiers
(section 6), macros (section 7), the limit of 10 DNS-querying terms and of 2
void lookups (4.6.4).  :class:`SPFCheck` turns the result into a gate
verdict and an Authentication-Results header line (RFC 8601 2.7.2).

A lookup that fails is ``temperror``, which the gate answers with 451 or lets
through (setting), never with 5xx (MISSION R-1, R-3).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns.lookup import MailResolver, NoSuchDomain, TemporaryFailure
from appliance.mail.gate.verdict import (
    Verdict,
    parse_ip,
    reject,
    tag,
    tempfail,
    with_deadline,
)
from appliance.mail.interfaces import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

log = Logger(namespace="appliance.mail.gate.spf")


class SPFResult(enum.Enum):
    """The seven results of RFC 7208 section 2.6."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True)
class SPFOutcome:
    """A check_host() result, the domain it was for, and why (the explanation on ``fail``)."""

    result: SPFResult
    domain: str
    reason: str = ""
    explanation: str = ""


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


_QUALIFIERS = {
    "+": SPFResult.PASS,
    "-": SPFResult.FAIL,
    "~": SPFResult.SOFTFAIL,
    "?": SPFResult.NEUTRAL,
}
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_MODIFIER_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.\-]*)=(.*)$", re.S)
_MECH_RE = re.compile(r"^([+\-~?]?)([A-Za-z][A-Za-z0-9_.\-]*)(.*)$", re.S)
_CIDR_RE = re.compile(r"^(.*?)(?:/(0|[1-9]\d{0,2}))?(?://(0|[1-9]\d{0,2}))?$", re.S)
_MACRO_RE = re.compile(r"%(?:\{([A-Za-z])(\d*)(r?)([.\-+,/_=]*)\}|(.))", re.S)
_TOPLABEL_RE = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?$")
_MACRO_LETTERS = frozenset("slodiphv")
_EXP_LETTERS = frozenset("slodiphvcrt")


@dataclass(frozen=True)
class _Term:
    qualifier: SPFResult
    name: str
    argument: str | None
    cidr4: int
    cidr6: int
    text: str


@dataclass(frozen=True)
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None
    exp: str | None


@dataclass
class _State:
    ip: IPAddress
    sender: str
    local: str
    sender_domain: str
    helo: str
    lookups: int = 0
    voids: int = 0
    validated: dict[str, str] = field(default_factory=dict)


def _check_macro_string(text: str, exp: bool = False) -> None:
    """Raise _PermError when ``text`` is not a valid macro-string (RFC 7208 7.1)."""
    allowed = _EXP_LETTERS if exp else _MACRO_LETTERS
    for match in _MACRO_RE.finditer(text):
        letter, digits, _, _, other = match.groups()
        if other is not None:
            if other not in "%_-":
                raise _PermError(f"invalid macro %{other}")
            continue
        if letter.lower() not in allowed:
            raise _PermError(f"invalid macro letter {letter!r}")
        if digits and int(digits) == 0:
            raise _PermError("macro transformer 0")
    stripped = _MACRO_RE.sub("", text)
    if "%" in stripped:
        raise _PermError("stray % in macro string")
    low = 0x20 if exp else 0x21  # explain-string allows SP (RFC 7208 6.2)
    for ch in stripped:
        if not low <= ord(ch) <= 0x7E:
            raise _PermError("invalid character in domain-spec")


def _check_domain_spec(spec: str) -> None:
    """Raise _PermError when ``spec`` is not a domain-spec (RFC 7208 7.1: macro-string domain-end)."""
    if not spec:
        raise _PermError("empty domain-spec")
    _check_macro_string(spec)
    body = spec[:-1] if spec.endswith(".") else spec
    if body.endswith("}"):
        return
    if "." not in body:
        raise _PermError(f"domain-spec {spec!r} has no top label")
    top = body.rsplit(".", 1)[1]
    if not _TOPLABEL_RE.match(top):
        raise _PermError(f"domain-spec {spec!r} has an invalid top label")


def _valid_domain(domain: str) -> bool:
    """A multi-label name with labels of 1..63 octets (RFC 7208 4.3)."""
    domain = domain.rstrip(".")
    if not domain or len(domain) > 253 or domain.startswith("["):
        return False
    labels = domain.split(".")
    return len(labels) >= 2 and all(0 < len(label) <= 63 for label in labels)


def _truncate(domain: str) -> str:
    """RFC 7208 7.3: drop left-hand labels until the name fits in 253 octets."""
    domain = domain.rstrip(".")
    while len(domain) > 253 and "." in domain:
        domain = domain.split(".", 1)[1]
    return domain


def parse_record(text: str) -> _Record:
    """Parse one ``v=spf1`` record; raise _PermError on any syntax error (RFC 7208 4.6)."""
    terms: list[_Term] = []
    redirect: str | None = None
    exp: str | None = None
    for word in text.split(" ")[1:]:
        if not word:
            continue
        modifier = _MODIFIER_RE.match(word)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name == "redirect":
                if redirect is not None:
                    raise _PermError("more than one redirect")
                _check_domain_spec(value)
                redirect = value
            elif name == "exp":
                if exp is not None:
                    raise _PermError("more than one exp")
                _check_domain_spec(value)
                exp = value
            else:
                _check_macro_string(value)
            continue
        mechanism = _MECH_RE.match(word)
        if mechanism is None:
            raise _PermError(f"unknown term {word!r}")
        qualifier, name, rest = mechanism.group(1), mechanism.group(2).lower(), mechanism.group(3)
        if name not in _MECHANISMS:
            raise _PermError(f"unknown mechanism {name!r}")
        terms.append(_parse_mechanism(_QUALIFIERS[qualifier or "+"], name, rest, word))
    return _Record(tuple(terms), redirect, exp)


def _parse_mechanism(qualifier: SPFResult, name: str, rest: str, word: str) -> _Term:
    if rest and rest[0] not in ":/":
        raise _PermError(f"unknown mechanism {word!r}")
    if name == "all":
        if rest:
            raise _PermError(f"'all' takes no argument: {word!r}")
        return _Term(qualifier, name, None, 32, 128, word)
    if name in ("include", "exists", "ptr"):
        if rest.startswith("/"):
            raise _PermError(f"{name} takes no CIDR length: {word!r}")
        argument = rest[1:] if rest else None
        if argument is None and name != "ptr":
            raise _PermError(f"{name} needs a domain: {word!r}")
        if argument is not None:
            _check_domain_spec(argument)
        return _Term(qualifier, name, argument, 32, 128, word)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs an address: {word!r}")
        value = rest[1:]
        address, _, length = value.partition("/")
        try:
            if name == "ip4":
                ip4 = ipaddress.IPv4Address(address)
                if (length and not re.fullmatch(r"0|[1-9]\d?", length)) or (
                    length and int(length) > 32
                ):
                    raise _PermError(f"bad ip4 prefix length: {word!r}")
                return _Term(qualifier, name, str(ip4), int(length) if length else 32, 128, word)
            ip6 = ipaddress.IPv6Address(address)
            if (length and not re.fullmatch(r"0|[1-9]\d{0,2}", length)) or (
                length and int(length) > 128
            ):
                raise _PermError(f"bad ip6 prefix length: {word!r}")
            return _Term(qualifier, name, str(ip6), 32, int(length) if length else 128, word)
        except ValueError as error:
            raise _PermError(f"bad address in {word!r}: {error}") from None
    # a and mx: [":" domain-spec] [dual-cidr-length]
    match = _CIDR_RE.match(rest)
    if match is None:  # pragma: no cover - the pattern matches every string
        raise _PermError(f"bad term {word!r}")
    spec, cidr4_text, cidr6_text = match.groups()
    cidr4 = int(cidr4_text) if cidr4_text is not None else 32
    cidr6 = int(cidr6_text) if cidr6_text is not None else 128
    if cidr4 > 32 or cidr6 > 128:
        raise _PermError(f"bad prefix length in {word!r}")
    if spec and not spec.startswith(":"):
        raise _PermError(f"bad term {word!r}")
    argument = spec[1:] if spec else None
    if spec == ":":
        raise _PermError(f"empty domain in {word!r}")
    if argument is not None:
        _check_domain_spec(argument)
    return _Term(qualifier, name, argument, cidr4, cidr6, word)


def select_record(records: list[bytes]) -> str | None:
    """The one SPF record among TXT records (RFC 7208 4.5); None when none; _PermError when several."""
    found: list[str] = []
    for raw in records:
        lowered = raw.lower()
        if lowered == b"v=spf1" or lowered.startswith(b"v=spf1 "):
            try:
                found.append(raw.decode("ascii"))
            except UnicodeDecodeError:
                raise _PermError("non-ASCII SPF record") from None
    if len(found) > 1:
        raise _PermError("more than one SPF record")
    return found[0] if found else None


class SPFEvaluator:
    """``check_host()`` over a MailResolver, each query bounded by ``timeout`` seconds."""

    def __init__(
        self,
        resolver: MailResolver,
        clock: IReactorTime,
        timeout: float = 20.0,
        receiver: str = "localhost",
        lookup_limit: int = 10,
        void_limit: int = 2,
    ) -> None:
        self.resolver = resolver
        self.clock: Any = clock
        self.timeout = timeout
        self.receiver = receiver
        self.lookup_limit = lookup_limit
        self.void_limit = void_limit

    def check_host(self, ip: str, domain: str, sender: str, helo: str = "") -> Deferred[SPFOutcome]:
        """Evaluate SPF for ``sender`` (``local@domain``; ``domain`` is where to start). Never fails."""
        address = parse_ip(ip)
        domain = domain.lower().rstrip(".")
        if address is None:
            return succeed(SPFOutcome(SPFResult.PERMERROR, domain, f"bad client address {ip!r}"))
        local, at, sender_domain = sender.rpartition("@")
        if not at:
            local, sender_domain = "postmaster", sender or domain
        state = _State(
            address,
            f"{local or 'postmaster'}@{sender_domain}",
            local or "postmaster",
            sender_domain.lower(),
            helo,
        )
        d = self._check_host(state, domain)

        def failed(failure: Failure) -> SPFOutcome:
            if failure.check(_PermError):
                return SPFOutcome(SPFResult.PERMERROR, domain, failure.getErrorMessage())
            if failure.check(_TempError, TemporaryFailure):
                return SPFOutcome(SPFResult.TEMPERROR, domain, failure.getErrorMessage())
            log.failure("SPF evaluation for {domain} crashed", failure, domain=domain)
            return SPFOutcome(
                SPFResult.TEMPERROR, domain, f"internal error: {failure.getErrorMessage()}"
            )

        d.addErrback(failed)
        return d

    # ------------------------------------------------------------------ DNS

    def _dns(self, d: Deferred[Any]) -> Deferred[Any]:
        """Bounded query: NXDOMAIN becomes None; timeouts/SERVFAIL raise _TempError."""
        d = with_deadline(d, self.timeout, self.clock)

        def failed(failure: Failure) -> None:
            if failure.check(NoSuchDomain):
                return None
            raise _TempError(f"DNS lookup failed: {failure.getErrorMessage()}")

        d.addErrback(failed)
        return d

    def _count(self, state: _State) -> None:
        state.lookups += 1
        if state.lookups > self.lookup_limit:
            raise _PermError(f"more than {self.lookup_limit} DNS lookups")

    def _void(self, state: _State) -> None:
        state.voids += 1
        if state.voids > self.void_limit:
            raise _PermError(f"more than {self.void_limit} void lookups")

    # ------------------------------------------------------------------ evaluation

    @inlineCallbacks
    def _check_host(self, state: _State, domain: str) -> Generator[Deferred[Any], Any, SPFOutcome]:
        if not _valid_domain(domain):
            return SPFOutcome(SPFResult.NONE, domain, f"{domain!r} is not a usable domain")
        records = yield self._dns(self.resolver.txt(domain))
        if records is None:
            return SPFOutcome(SPFResult.NONE, domain, "no such domain")
        text = select_record(records)
        if text is None:
            return SPFOutcome(SPFResult.NONE, domain, "no SPF record")
        record = parse_record(text)
        for term in record.terms:
            matched = yield self._match(state, domain, term)
            if matched:
                result = term.qualifier
                explanation = ""
                if result is SPFResult.FAIL:
                    explanation = yield self._explain(state, domain, record)
                return SPFOutcome(result, domain, f"matched {term.text}", explanation)
        if record.redirect is not None:
            self._count(state)
            target = yield self._expand_domain(state, domain, record.redirect)
            if not _valid_domain(target):
                raise _PermError(f"redirect to invalid domain {target!r}")
            outcome: SPFOutcome = yield self._check_host(state, target)
            if outcome.result is SPFResult.NONE:
                raise _PermError(f"redirect to {target} which has no SPF record")
            return outcome
        return SPFOutcome(SPFResult.NEUTRAL, domain, "no mechanism matched")

    @inlineCallbacks
    def _match(
        self, state: _State, domain: str, term: _Term
    ) -> Generator[Deferred[Any], Any, bool]:
        ip = state.ip
        if term.name == "all":
            return True
        if term.name == "ip4":
            assert term.argument is not None
            return ip.version == 4 and ip in ipaddress.ip_network(
                f"{term.argument}/{term.cidr4}", strict=False
            )
        if term.name == "ip6":
            assert term.argument is not None
            return ip.version == 6 and ip in ipaddress.ip_network(
                f"{term.argument}/{term.cidr6}", strict=False
            )
        self._count(state)
        target = domain
        if term.argument is not None:
            target = yield self._expand_domain(state, domain, term.argument)
        if term.name == "include":
            if not _valid_domain(target):
                raise _PermError(f"include of invalid domain {target!r}")
            outcome: SPFOutcome = yield self._check_host(state, target)
            if outcome.result is SPFResult.PASS:
                return True
            if outcome.result in (SPFResult.FAIL, SPFResult.SOFTFAIL, SPFResult.NEUTRAL):
                return False
            if outcome.result is SPFResult.TEMPERROR:
                raise _TempError(f"include:{target}: {outcome.reason}")
            raise _PermError(f"include:{target}: {outcome.result.value} ({outcome.reason})")
        if not _valid_domain(target):
            return False
        if term.name == "a":
            found = yield self._addresses(state, target)
            return self._in(ip, found, term)
        if term.name == "mx":
            exchanges = yield self._dns(self.resolver.mx(target))
            if not exchanges:
                self._void(state)
                return False
            if len(exchanges) > 10:
                raise _PermError(f"more than 10 MX records for {target}")
            for _, exchange in sorted(exchanges):
                if not exchange or exchange == ".":
                    continue
                found = yield self._dns(self.resolver.addresses(exchange))
                if self._in(ip, found or [], term):
                    return True
            return False
        if term.name == "exists":
            found = yield self._dns(self.resolver.addresses(target))
            v4 = [a for a in found or [] if (p := parse_ip(a)) is not None and p.version == 4]
            if not v4:
                self._void(state)
            return bool(v4)
        if term.name == "ptr":
            names = yield self._validated_names(state)
            target = target.lower()
            return any(name == target or name.endswith("." + target) for name in names)
        raise _PermError(
            f"unknown mechanism {term.name}"
        )  # pragma: no cover - parse_record refuses it

    @inlineCallbacks
    def _addresses(self, state: _State, host: str) -> Generator[Deferred[Any], Any, list[str]]:
        found = yield self._dns(self.resolver.addresses(host))
        family = [
            a
            for a in found or []
            if (p := parse_ip(a)) is not None and p.version == state.ip.version
        ]
        if not family:
            self._void(state)
        return family

    @staticmethod
    def _in(ip: IPAddress, addresses: list[str], term: _Term) -> bool:
        for text in addresses:
            other = parse_ip(text)
            if other is None or other.version != ip.version:
                continue
            length = term.cidr4 if ip.version == 4 else term.cidr6
            if ip in ipaddress.ip_network(f"{other}/{length}", strict=False):
                return True
        return False

    @inlineCallbacks
    def _validated_names(self, state: _State) -> Generator[Deferred[Any], Any, list[str]]:
        """RFC 7208 5.5: PTR names (at most 10) whose addresses include the client; errors match nothing."""
        key = "names"
        if key in state.validated:
            return state.validated[key].split() if state.validated[key] else []
        try:
            names = yield self._dns(self.resolver.ptr(str(state.ip)))
        except _TempError:
            names = None
        if not names:
            self._void(state)
            names = []
        validated: list[str] = []
        for name in names[:10]:
            try:
                found = yield self._dns(self.resolver.addresses(name))
            except _TempError:
                continue
            if any(parse_ip(a) == state.ip for a in found or []):
                validated.append(name.lower().rstrip("."))
        state.validated[key] = " ".join(validated)
        return validated

    # ------------------------------------------------------------------ macros

    @inlineCallbacks
    def _expand_domain(
        self, state: _State, domain: str, spec: str
    ) -> Generator[Deferred[Any], Any, str]:
        text = yield self._expand(state, domain, spec, exp=False)
        return _truncate(text).lower()

    @inlineCallbacks
    def _expand(
        self, state: _State, domain: str, spec: str, exp: bool
    ) -> Generator[Deferred[Any], Any, str]:
        """RFC 7208 7.3 macro expansion; %{p} needs the validated PTR name, looked up on demand."""
        validated = "unknown"
        if re.search(r"%\{p", spec, re.I):
            names = yield self._validated_names(state)
            validated = _pick_validated(names, domain)
        _check_macro_string(spec, exp=exp)
        ip = state.ip
        values = {
            "s": state.sender,
            "l": state.local,
            "o": state.sender_domain,
            "d": domain,
            "i": str(ip) if ip.version == 4 else ".".join(ip.exploded.replace(":", "")),
            "p": validated,
            "v": "in-addr" if ip.version == 4 else "ip6",
            "h": state.helo or "unknown",
            "c": str(ip),
            "r": self.receiver,
            "t": str(int(self.clock.seconds())),
        }

        def replace(match: re.Match[str]) -> str:
            letter, digits, reverse, delimiters, other = match.groups()
            if other is not None:
                return {"%": "%", "_": " ", "-": "%20"}[other]
            value = values[letter.lower()]
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            result = ".".join(parts)
            if letter.isupper():
                result = urllib.parse.quote(result, safe="-._~")
            return result

        return _MACRO_RE.sub(replace, spec)

    @inlineCallbacks
    def _explain(
        self, state: _State, domain: str, record: _Record
    ) -> Generator[Deferred[Any], Any, str]:
        """The exp= text (RFC 7208 6.2), or "" on any error; it does not count as a lookup."""
        if record.exp is None:
            return ""
        try:
            target = yield self._expand_domain(state, domain, record.exp)
            if not _valid_domain(target):
                return ""
            records = yield self._dns(self.resolver.txt(target))
            if not records or len(records) != 1:
                return ""
            text = records[0].decode("ascii")
            expanded: str = yield self._expand(state, domain, text, exp=True)
            return "".join(ch for ch in expanded if 32 <= ord(ch) < 127)[:300]
        except (_PermError, _TempError, UnicodeDecodeError):
            return ""


def _pick_validated(names: list[str], domain: str) -> str:
    for name in names:
        if name == domain or name.endswith("." + domain):
            return name
    return names[0] if names else "unknown"


@dataclass(frozen=True)
class SPFSettings:
    """How SPF results become verdicts.

    ``fail_action``: ``reject`` (550 5.7.23, RFC 7372) or ``tag``;
    ``softfail_action``: ``tag`` or ``reject``; ``temperror_action``:
    ``tempfail`` (451 4.7.24) or ``accept``.  permerror, neutral and none
    only tag.  ``total_timeout`` bounds the whole evaluation.
    """

    enabled: bool = True
    fail_action: str = "reject"
    softfail_action: str = "tag"
    temperror_action: str = "tempfail"
    timeout: float = 20.0
    total_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.fail_action not in ("reject", "tag") or self.softfail_action not in (
            "reject",
            "tag",
        ):
            raise ValueError("SPF fail_action/softfail_action must be reject or tag")
        if self.temperror_action not in ("tempfail", "accept"):
            raise ValueError("SPF temperror_action must be tempfail or accept")


class SPFCheck:
    """SPF on the envelope sender, or on the HELO name for ``<>`` (RFC 7208 2.4), as a verdict."""

    name = "spf"

    def __init__(
        self, settings: SPFSettings, resolver: MailResolver, clock: IReactorTime, authserv_id: str
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.authserv_id = authserv_id
        self.evaluator = SPFEvaluator(
            resolver, clock, timeout=settings.timeout, receiver=authserv_id
        )

    def check(self, client_ip: str, sender: str, helo: str) -> Deferred[tuple[Verdict, SPFOutcome]]:
        """(verdict, outcome); the verdict always carries the Authentication-Results line if it tags."""
        if sender:
            domain = sender.rpartition("@")[2]
            identity = f"smtp.mailfrom={_ar_value(sender)}"
        else:
            domain = helo
            sender = f"postmaster@{helo}"
            identity = f"smtp.helo={_ar_value(helo)}"
        d = with_deadline(
            self.evaluator.check_host(client_ip, domain, sender, helo),
            self.settings.total_timeout,
            self.clock,
        )

        def too_slow(failure: Failure) -> SPFOutcome:
            return SPFOutcome(
                SPFResult.TEMPERROR,
                domain.lower(),
                f"evaluation failed: {failure.getErrorMessage()}",
            )

        d.addErrback(too_slow)
        return d.addCallback(self._verdict, identity)

    def _verdict(self, outcome: SPFOutcome, identity: str) -> tuple[Verdict, SPFOutcome]:
        reason = f"{outcome.result.value} for {outcome.domain}: {outcome.reason}"
        comment = "".join(ch for ch in outcome.reason if ch not in "()\\" and 32 <= ord(ch) < 127)[
            :120
        ]
        header = f"Authentication-Results: {self.authserv_id}; spf={outcome.result.value} ({comment}) {identity}"
        result = outcome.result
        if result is SPFResult.FAIL and self.settings.fail_action == "reject":
            text = outcome.explanation or f"SPF check failed for {outcome.domain}"
            return reject(Reply(550, "5.7.23", text), self.name, reason), outcome
        if result is SPFResult.SOFTFAIL and self.settings.softfail_action == "reject":
            return reject(
                Reply(550, "5.7.23", f"SPF softfail for {outcome.domain}"), self.name, reason
            ), outcome
        if result is SPFResult.TEMPERROR and self.settings.temperror_action == "tempfail":
            return (
                tempfail(
                    Reply(
                        451, "4.7.24", f"SPF lookup for {outcome.domain} failed, try again later"
                    ),
                    self.name,
                    reason,
                ),
                outcome,
            )
        return tag((header,), self.name, reason), outcome


def _ar_value(value: str) -> str:
    """An RFC 8601 pvalue: quoted when it holds characters outside the token set."""
    if re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~@]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
