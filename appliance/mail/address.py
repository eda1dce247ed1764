"""Strict parsing of the MAIL FROM and RCPT TO arguments (RFC 5321 4.1.1.2, 4.1.1.3, 4.1.2).

The parser accepts exactly the RFC 5321 path grammar: angle brackets are
required, a source route (``<@a,@b:user@host>``) is accepted and dropped as
RFC 5321 Appendix C asks, the domain is lower-cased and the local part is kept
byte for byte (``%`` and ``!`` are ordinary local-part characters, never
routing).  Every refusal is a :class:`AddressError` that carries the SMTP
reply to send, so the protocol never has to guess a code.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from appliance.mail.interfaces import Reply

# RFC 5321 4.5.3.1: size limits for the parts of a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_STRING = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = "\" %d32-126
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# esmtp-value = 1*(%d33-60 / %d62-126)
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}\Z")


class AddressError(ValueError):
    """A MAIL/RCPT argument that must be refused, with the reply that says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply


@dataclass(frozen=True)
class Path:
    """A parsed reverse-path or forward-path with its ESMTP parameters.

    ``address`` is ``local@domain`` (``""`` for the null path ``<>``, and
    ``"postmaster"`` for the domain-less ``<Postmaster>`` of RFC 5321
    4.1.1.3, which the server completes with its own name); ``parameters``
    maps upper-cased keywords to their value (``""`` when the keyword had none).
    """

    address: str
    local_part: str
    domain: str
    parameters: dict[str, str] = field(default_factory=dict)


def parse_domain(text: str) -> str:
    """Validate a Domain or address-literal (RFC 5321 4.1.2, 4.1.3) and return it lower-cased.

    Raises ValueError when it is neither.  IPv6 literals come back as
    ``[IPv6:<compressed address>]``.
    """
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError("unterminated address literal")
        inner = text[1:-1]
        if inner[:5].lower() == "ipv6:":
            return "[IPv6:" + ipaddress.IPv6Address(inner[5:]).compressed + "]"
        if not re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", inner):
            raise ValueError("unsupported address literal")
        return "[" + str(ipaddress.IPv4Address(inner)) + "]"
    if len(text) > MAX_DOMAIN or not _DOMAIN.match(text):
        raise ValueError("invalid domain")
    return text.lower()


def _syntax(enhanced: str, text: str) -> AddressError:
    return AddressError(Reply(501, enhanced, text))


def _split_path(argument: str, keyword: str, enhanced: str) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into the bracketed path and the parameter text."""
    head, colon, rest = argument.partition(":")
    if not colon or head.lstrip(" ").upper() != keyword:
        raise _syntax(
            "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"
        )
    # RFC 5321 allows no space after the colon; nearly every MTA tolerates it,
    # and it cannot make an address ambiguous, so tolerate it too.
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise _syntax(enhanced, "Address must be enclosed in <>")
    end = _find_path_end(rest)
    if end < 0:
        raise _syntax(enhanced, "Unterminated address")
    path, params = rest[1:end], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise _syntax("5.5.4", "Syntax error after address")
    return path, params.strip(" ")


def _find_path_end(text: str) -> int:
    """Index of the ``>`` closing the path, honouring quoted local parts; -1 if none."""
    quoted = False
    escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _parse_mailbox(path: str, enhanced: str) -> tuple[str, str]:
    """Return (local part, lower-cased domain) of a Mailbox, dropping any source route."""
    if path.startswith("@"):
        route, colon, path = path.partition(":")
        if not colon:
            raise _syntax(enhanced, "Malformed source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise _syntax(enhanced, "Malformed source route")
            try:
                parse_domain(hop[1:])
            except ValueError:
                raise _syntax(enhanced, "Malformed source route") from None
    local, at, domain = path.rpartition("@")
    if not at or not local:
        raise _syntax(enhanced, "Address must be local-part@domain")
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        raise _syntax(enhanced, "Malformed local part")
    if len(local) > MAX_LOCAL_PART:
        raise AddressError(Reply(501, enhanced, "Local part too long"))
    try:
        domain = parse_domain(domain)
    except ValueError:
        raise _syntax(enhanced, "Malformed domain") from None
    if len(local) + 1 + len(domain) > MAX_PATH - 2:
        raise AddressError(Reply(501, enhanced, "Address too long"))
    return local, domain


def _parse_parameters(text: str) -> dict[str, str]:
    parameters: dict[str, str] = {}
    if not text:
        return parameters
    for item in text.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.match(keyword) or (equals and not _VALUE.match(value)):
            raise _syntax("5.5.4", f"Malformed parameter {item[:40]!r}")
        keyword = keyword.upper()
        if keyword in parameters:
            raise _syntax("5.5.4", f"Duplicate parameter {keyword}")
        parameters[keyword] = value
    return parameters


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_ascii(argument: str, enhanced: str) -> None:
    if not argument.isascii() or _CONTROL.search(argument):
        # RFC 6531 3.5: without SMTPUTF8 a non-ASCII address is refused with 553 5.6.7.
        if not argument.isascii():
            raise AddressError(Reply(553, "5.6.7", "Non-ASCII addresses are not supported"))
        raise _syntax(enhanced, "Control characters in address")


def parse_mail_from(argument: str, *, max_size: int | None = None) -> Path:
    """Parse the argument of MAIL (``FROM:<path> [params]``).

    Accepts SIZE (RFC 1870) and BODY=7BIT/8BITMIME (RFC 6152); any other
    parameter is refused with 555 5.5.4 (RFC 5321 4.1.1.11).  A SIZE above
    ``max_size`` is refused with 552 5.3.4 (RFC 1870 6.1).
    """
    _check_ascii(argument, "5.1.7")
    raw_path, raw_params = _split_path(argument, "FROM", "5.1.7")
    if raw_path == "":
        local, domain = "", ""
    else:
        local, domain = _parse_mailbox(raw_path, "5.1.7")
    parameters = _parse_parameters(raw_params)
    for keyword, value in parameters.items():
        if keyword == "SIZE":
            if not _SIZE_VALUE.match(value):
                raise _syntax("5.5.4", "Bad SIZE parameter")
            if max_size is not None and int(value) > max_size:
                raise AddressError(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
        elif keyword == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise AddressError(Reply(555, "5.5.4", "Unsupported BODY type"))
            parameters[keyword] = value.upper()
        else:
            raise AddressError(Reply(555, "5.5.4", f"Unsupported parameter {keyword}"))
    address = f"{local}@{domain}" if local else ""
    return Path(address, local, domain, parameters)


def parse_rcpt_to(argument: str) -> Path:
    """Parse the argument of RCPT (``TO:<path>``); no RCPT parameters are supported (555 5.5.4).

    ``<Postmaster>`` without a domain (case-insensitive, RFC 5321 4.1.1.3)
    comes back with address ``"postmaster"`` and an empty domain.
    """
    _check_ascii(argument, "5.1.3")
    raw_path, raw_params = _split_path(argument, "TO", "5.1.3")
    if raw_path.lower() == "postmaster":
        local, domain = "postmaster", ""
    else:
        if raw_path == "":
            raise _syntax("5.1.3", "Empty recipient address")
        local, domain = _parse_mailbox(raw_path, "5.1.3")
    parameters = _parse_parameters(raw_params)
    if parameters:
        raise AddressError(Reply(555, "5.5.4", f"Unsupported parameter {next(iter(parameters))}"))
    address = f"{local}@{domain}" if domain else local
    return Path(address, local, domain, parameters)


def domain_of(address: str) -> str:
    """The domain part of ``local@domain`` (after the last ``@``), or ``""``."""
    return address.rpartition("@")[2] if "@" in address else ""
