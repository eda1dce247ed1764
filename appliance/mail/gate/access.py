"""The access map (the idea of sendmail's ``access_db`` and Postfix ``check_*_access``).

A text file of ``key action`` lines; ``#`` starts a comment.  Keys:

- ``192.0.2.7``, ``192.0.2.0/24``, ``2001:db8::/32`` (or with ``Connect:``):
  the client address; the most specific match wins.
- ``Connect:host.example.com``: the client's verified host name, and every
  host under it (``Connect:example.com`` also matches ``mx.example.com``).
- ``From:user@example.com``, ``From:example.com`` (the domain and its
  subdomains), ``From:user@`` (that local part at any domain), ``From:<>``
  (the null sender).
- ``To:`` the same forms, for a recipient.

Actions: ``OK`` (accept and skip the later anti-spam checks), ``RELAY`` (as
OK; for a client or recipient it also permits relaying), ``REJECT``,
``DISCARD`` (accept and drop the message), ``TEMPFAIL``, and
``ERROR:5xx x.y.z text`` / ``ERROR:4xx x.y.z text`` for a chosen reply.

Lookup order (first match wins): client address (longest prefix), then
client name (most specific domain first); for an address: the full address,
then the domain and its parents (most specific first), then ``local@``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from appliance.mail.gate.verdict import Action, parse_ip
from appliance.mail.interfaces import Reply

log = Logger(namespace="appliance.mail.gate.access")

_ERROR_RE = re.compile(
    r"^ERROR:\s*\"?([45])(\d\d)(?:\s+([45]\.\d{1,3}\.\d{1,3}))?\s*(.*?)\"?\s*$", re.I
)
_NAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_SIMPLE_ACTIONS = {
    "OK": Action.OK,
    "RELAY": Action.RELAY,
    "REJECT": Action.REJECT,
    "DISCARD": Action.DISCARD,
    "TEMPFAIL": Action.TEMPFAIL,
}


class AccessMapError(ValueError):
    """The file has errors; ``errors`` are ``file:line: reason`` texts for ``appliance check``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class AccessAction:
    """What a matching entry says; ``reply`` is set for ``ERROR:`` entries."""

    action: Action
    reply: Reply | None = None
    key: str = ""
    source: str = ""

    def reply_for(self, step: str) -> Reply | None:
        """The refusal for REJECT/TEMPFAIL/ERROR at ``step`` (connect, mail, rcpt), else None."""
        if self.reply is not None:
            return self.reply
        if self.action is Action.REJECT:
            return (
                Reply(554, "5.7.1", "Access denied")
                if step == "connect"
                else Reply(550, "5.7.1", "Access denied")
            )
        if self.action is Action.TEMPFAIL:
            return Reply(421 if step == "connect" else 451, "4.7.1", "Try again later")
        return None


@dataclass(frozen=True)
class AccessSettings:
    """``path`` of the access file; None means no access map."""

    path: str | None = None


class AccessMap:
    """The parsed access file; :meth:`reload` re-reads it and keeps the old map on errors."""

    name = "access"

    def __init__(self, path: str | None = None, text: str | None = None) -> None:
        self.path = path
        self._networks: list[
            tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, AccessAction]
        ] = []
        self._hosts: dict[str, AccessAction] = {}
        self._from: dict[str, AccessAction] = {}
        self._to: dict[str, AccessAction] = {}
        if text is not None:
            self._install(text, path or "<text>")
        elif path is not None:
            self._install(Path(path).read_text(encoding="utf-8"), path)

    @property
    def has_host_names(self) -> bool:
        """True when some key needs the client's host name (so the gate looks up its PTR)."""
        return bool(self._hosts)

    def reload(self) -> list[str]:
        """Re-read the file; on errors keep the current map and return the errors (also logged)."""
        if self.path is None:
            return []
        try:
            text = Path(self.path).read_text(encoding="utf-8")
            self._install(text, self.path)
        except AccessMapError as error:
            for message in error.errors:
                log.error("access map not reloaded: {error}", error=message)
            return error.errors
        except OSError as error:
            message = f"{self.path}: {error.strerror or error}"
            log.error("access map not reloaded: {error}", error=message)
            return [message]
        log.info("access map {path} reloaded", path=self.path)
        return []

    def _install(self, text: str, source: str) -> None:
        networks, hosts, senders, recipients, errors = parse_access(text, source)
        if errors:
            raise AccessMapError(errors)
        networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self._networks, self._hosts, self._from, self._to = networks, hosts, senders, recipients

    # ------------------------------------------------------------------ lookups

    def client(self, client_ip: str, client_name: str | None = None) -> AccessAction | None:
        """The entry for a client address, else for its verified host name and parents."""
        address = parse_ip(client_ip)
        if address is not None:
            for network, action in self._networks:
                if network.version == address.version and address in network:
                    return action
        if client_name:
            for candidate in _parents(client_name.lower().rstrip(".")):
                if candidate in self._hosts:
                    return self._hosts[candidate]
        return None

    def sender(self, address: str) -> AccessAction | None:
        """The ``From:`` entry for an envelope sender (``""`` is ``<>``)."""
        return _address_lookup(self._from, address)

    def recipient(self, address: str) -> AccessAction | None:
        """The ``To:`` entry for a recipient."""
        return _address_lookup(self._to, address)


def _parents(domain: str) -> list[str]:
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def _address_lookup(table: dict[str, AccessAction], address: str) -> AccessAction | None:
    if not table:
        return None
    address = address.lower()
    if address == "":
        return table.get("<>")
    if address in table:
        return table[address]
    local, _, domain = address.rpartition("@")
    if domain:
        for candidate in _parents(domain.rstrip(".")):
            if candidate in table:
                return table[candidate]
    if local:
        return table.get(local + "@")
    return None


def _parse_action(text: str, key: str, source: str) -> AccessAction | str:
    word = text.strip()
    simple = _SIMPLE_ACTIONS.get(word.upper())
    if simple is not None:
        return AccessAction(simple, key=key, source=source)
    match = _ERROR_RE.match(word)
    if match is None:
        if word.upper().startswith("ERROR"):
            return "ERROR needs a reply code: ERROR:5xx x.y.z text or ERROR:4xx x.y.z text"
        return f"unknown action {word!r} (OK, RELAY, REJECT, DISCARD, TEMPFAIL or ERROR:code text)"
    klass, rest, enhanced, message = match.groups()
    code = int(klass + rest)
    if enhanced is not None and enhanced[0] != klass:
        return f"enhanced code {enhanced} does not match reply code {code}"
    enhanced = enhanced or f"{klass}.7.1"
    message = message.strip() or "Access denied"
    action = Action.REJECT if klass == "5" else Action.TEMPFAIL
    return AccessAction(action, Reply(code, enhanced, message), key=key, source=source)


def _valid_domain(domain: str) -> bool:
    return len(domain) <= 253 and _NAME_RE.match(domain) is not None


def parse_access(
    text: str, source: str = "<text>"
) -> tuple[
    list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, AccessAction]],
    dict[str, AccessAction],
    dict[str, AccessAction],
    dict[str, AccessAction],
    list[str],
]:
    """Parse access-map text into (networks, host names, From:, To:, errors).

    Errors name the file and line; duplicate keys are errors too, since with
    "first match wins" the second line could never apply.
    """
    networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, AccessAction]] = []
    seen_networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    hosts: dict[str, AccessAction] = {}
    senders: dict[str, AccessAction] = {}
    recipients: dict[str, AccessAction] = {}
    errors: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        parts = line.split(None, 1)
        if len(parts) != 2:
            errors.append(f"{where}: expected 'key action', got {line!r}")
            continue
        key, action_text = parts
        action = _parse_action(action_text, key, where)
        if isinstance(action, str):
            errors.append(f"{where}: {action}")
            continue
        tag_name, colon, value = key.partition(":")
        if not colon or tag_name.lower() not in ("connect", "from", "to"):
            if parse_ip(key.split("/")[0]) is None:
                errors.append(
                    f"{where}: key {key!r} needs Connect:, From: or To: (or is an IP address/CIDR)"
                )
                continue
            tag_name, value = "connect", key
        tag_name = tag_name.lower()
        value = value.strip().lower()
        if not value:
            errors.append(f"{where}: empty key after {tag_name.capitalize()}:")
            continue
        if tag_name == "connect":
            if parse_ip(value.split("/")[0]) is not None:
                try:
                    network = ipaddress.ip_network(value.strip("[]"), strict=False)
                except ValueError as error:
                    errors.append(f"{where}: bad network {value!r}: {error}")
                    continue
                mapped = getattr(network, "network_address", None)
                if (
                    isinstance(mapped, ipaddress.IPv6Address)
                    and mapped.ipv4_mapped is not None
                    and network.prefixlen == 128
                ):
                    network = ipaddress.ip_network(str(mapped.ipv4_mapped))
                if network in seen_networks:
                    errors.append(f"{where}: duplicate key {key!r}")
                    continue
                seen_networks.add(network)
                networks.append((network, action))
                continue
            name = value.rstrip(".")
            if not _valid_domain(name):
                errors.append(f"{where}: bad host name {value!r}")
                continue
            if action.action is Action.DISCARD:
                errors.append(f"{where}: DISCARD is for From:/To: keys, not clients")
                continue
            if name in hosts:
                errors.append(f"{where}: duplicate key {key!r}")
                continue
            hosts[name] = action
            continue
        table = senders if tag_name == "from" else recipients
        if value == "<>" and tag_name == "from":
            entry = "<>"
        elif "@" in value:
            local, _, domain = value.rpartition("@")
            if not local or (domain and not _valid_domain(domain.rstrip("."))):
                errors.append(f"{where}: bad address {value!r}")
                continue
            entry = f"{local}@{domain.rstrip('.')}"
        else:
            entry = value.rstrip(".")
            if not _valid_domain(entry):
                errors.append(f"{where}: bad domain {value!r}")
                continue
        if entry in table:
            errors.append(f"{where}: duplicate key {key!r}")
            continue
        table[entry] = action
    return networks, hosts, senders, recipients, errors


def check_access_file(path: str) -> list[str]:
    """Errors in an access file as ``file:line: reason`` texts ([] when it is fine): ``appliance check``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [f"{path}: cannot read: {error}"]
    return parse_access(text, path)[4]
