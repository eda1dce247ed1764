"""Header form checks at the end of DATA (seed 004 check (4); Postfix ``header_checks``).

The header block (everything before the first empty line) is unfolded
(RFC 5322 2.2.3) and checked: a size cap, ``From:`` must parse as one or
more addresses (RFC 5322 3.6.2), ``Message-ID:`` must contain ``@`` (RFC
5322 3.6.4, optional), and operator rules: a regular expression per header
name that rejects or tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

from appliance.mail.gate.verdict import Verdict, accept, reject, tag
from appliance.mail.interfaces import Reply


@dataclass(frozen=True)
class HeaderRule:
    """``pattern`` (a Python regular expression, searched case-insensitively) on header ``name``.

    ``action`` is ``reject`` (550 5.7.1 ``text``) or ``tag`` (adds
    ``X-Header-Check: text``).
    """

    name: str
    pattern: str
    action: str = "reject"
    text: str = "Message content rejected"

    def __post_init__(self) -> None:
        if self.action not in ("reject", "tag"):
            raise ValueError(f"header rule {self.name}: action must be reject or tag")
        re.compile(self.pattern)


@dataclass(frozen=True)
class HeaderSettings:
    """The header checks; ``max_header_bytes`` caps the whole header block."""

    rules: tuple[HeaderRule, ...] = ()
    require_message_id_at: bool = False
    require_from: bool = True
    max_header_bytes: int = 256 * 1024


def split_headers(block: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) pairs of a header block; lines that are not headers are skipped."""
    text = block.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    end = text.find("\n\n")
    if end >= 0:
        text = text[:end]
    fields: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if colon and name and " " not in name and "\t" not in name:
            fields.append((name.strip(), value.strip()))
    return fields


def _from_parses(value: str) -> bool:
    if not value.strip():
        return False
    pairs = getaddresses([value])
    if not pairs:
        return False
    for _, address in pairs:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or " " in address:
            return False
    return True


class HeaderCheck:
    """Judges one message's header block."""

    name = "headers"

    def __init__(self, settings: HeaderSettings) -> None:
        self.settings = settings
        self._rules = [(rule, re.compile(rule.pattern, re.IGNORECASE)) for rule in settings.rules]

    def check(self, block: bytes) -> Verdict:
        """Reject, tag or accept the header block (bytes as received, CRLF line ends)."""
        if len(block) > self.settings.max_header_bytes:
            return reject(
                Reply(552, "5.3.4", "Message header size exceeds limit"),
                self.name,
                f"header block {len(block)} bytes > {self.settings.max_header_bytes}",
            )
        fields = split_headers(block)
        by_name: dict[str, list[str]] = {}
        for name, value in fields:
            by_name.setdefault(name.lower(), []).append(value)
        if self.settings.require_from:
            froms = by_name.get("from", [])
            if len(froms) != 1 or not _from_parses(froms[0]):
                reason = (
                    "no From header"
                    if not froms
                    else (
                        "more than one From header"
                        if len(froms) > 1
                        else f"From does not parse: {froms[0][:80]!r}"
                    )
                )
                return reject(
                    Reply(550, "5.6.0", "Message header From is missing or malformed"),
                    self.name,
                    reason,
                )
        if self.settings.require_message_id_at:
            for value in by_name.get("message-id", []):
                if "@" not in value:
                    return reject(
                        Reply(550, "5.6.0", "Message-ID without @"),
                        self.name,
                        f"Message-ID {value[:80]!r}",
                    )
        tags: list[str] = []
        reasons: list[str] = []
        for rule, regex in self._rules:
            for value in by_name.get(rule.name.lower(), []):
                if regex.search(value) is None:
                    continue
                reason = f"{rule.name}: matched {rule.pattern!r}"
                if rule.action == "reject":
                    return reject(Reply(550, "5.7.1", rule.text), self.name, reason)
                tags.append(f"X-Header-Check: {rule.text}")
                reasons.append(reason)
                break
        if tags:
            return tag(tuple(tags), self.name, "; ".join(reasons))
        return accept(self.name, "headers well formed")
