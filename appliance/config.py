"""The appliance's configuration: one TOML file read into frozen, typed objects.

The heart of the file is the two interfaces: which addresses are
``outside``, which are ``inside``, and which client networks count as
inside.  Every listening role (DNS, SMTP, submission, POP3 and their TLS
forms) then says on which sides and which port it listens.  Every problem in
the file is reported at once, each naming file, key and reason; a key that is
not declared here is an error.  Relative paths are taken from the config
file's directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.schema import Problem, Problems, Table, parse_duration, read_dataclass

if TYPE_CHECKING:
    from appliance.mail.smtp_client import Credentials

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SIDES = ("outside", "inside")

#: Listening roles, their transport and whether the socket speaks TLS from the first byte.
ROLES: dict[str, tuple[tuple[str, ...], bool]] = {
    "dns": (("udp", "tcp"), False),
    "smtp": (("tcp",), False),
    "submission": (("tcp",), False),
    "smtps": (("tcp",), True),
    "pop3": (("tcp",), False),
    "pop3s": (("tcp",), True),
}

DEFAULT_PATH = "/etc/appliance/appliance.toml"

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Side:
    """One side of the box: its own addresses and, for the inside, the client networks behind it."""

    name: str
    addresses: tuple[str, ...]
    networks: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Listener:
    """One listening socket: a role on one side's address."""

    role: str
    side: str
    address: str
    port: int
    transport: str
    implicit_tls: bool

    @property
    def name(self) -> str:
        return f"{self.role}/{self.side}"

    def describe(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.name} {self.transport} {host}:{self.port}"


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path
    key: Path
    self_signed: bool
    names: tuple[str, ...]


@dataclass(frozen=True)
class ZoneConfig:
    """A zone of one view: primary (loaded from ``file``) or secondary (transferred from ``masters``).

    A secondary zone keeps its transferred copy in ``file``, sends its SOA
    queries and transfers from ``transfer_source`` (None: the side's first
    address) and accepts NOTIFY from ``allow_notify`` (empty: the masters).
    """

    name: str
    file: Path
    allow_transfer: tuple[Network, ...] = ()
    also_notify: tuple[tuple[str, int], ...] = ()
    type: str = "primary"
    masters: tuple[tuple[str, int], ...] = ()
    transfer_source: str | None = None
    allow_notify: tuple[Network, ...] = ()


@dataclass(frozen=True)
class ViewConfig:
    """A DNS view, bound to the listeners of the side it is named after.

    Only the inside view resolves names outside its zones (D-2, D-3): for
    ``allow_recursion`` clients, through ``forwarders`` (only them when
    ``forward_only``) or by iteration from ``root_hints``, sending from
    ``query_source``.
    """

    side: str
    zones: tuple[ZoneConfig, ...]
    allow_query: tuple[Network, ...]
    allow_recursion: tuple[Network, ...] = ()
    forwarders: tuple[tuple[str, int], ...] = ()
    forward_only: bool = False
    root_hints: Path | None = None
    query_source: str | None = None


@dataclass(frozen=True)
class DNSConfig:
    views: tuple[ViewConfig, ...]
    edns_buffer_size: int = 1232

    def view(self, side: str) -> ViewConfig | None:
        for view in self.views:
            if view.side == side:
                return view
        return None


@dataclass(frozen=True)
class MailConfig:
    """Receiving, accepting as local and relaying are separate settings (seed 000)."""

    hostnames: tuple[str, ...]
    local_domains: tuple[str, ...]
    relay_domains: tuple[str, ...]
    aliases: Path | None
    spool: Path
    mail_root: Path
    max_message_size: int
    max_recipients: int
    extension_separators: str
    #: Sender masquerading (M-7): the organisation's domain, the inside names it hides
    #: (``host`` or ``*.suffix``) and the local parts left exposed.
    masquerade_as: str = ""
    masquerade_domains: tuple[str, ...] = ()
    masquerade_exceptions: tuple[str, ...] = ("root", "postmaster")
    #: Small messages for local mailboxes only go into them before the 250, unspooled
    #: (appliance.mail.direct); false: every message goes through the queue.
    direct_delivery: bool = True


@dataclass(frozen=True)
class DeliveryConfig:
    """How mail leaves the box (転送): routes, smart host, retries and lifetimes (M-5, M-6)."""

    static_routes: dict[str, str]
    smart_host: str | None
    fallback_relay: str | None
    self_is_best_mx: str
    opportunistic_tls: bool
    lifetime: float
    relay_lifetime: float
    retry_intervals: tuple[float, ...]
    concurrency: int
    destination_concurrency: int
    #: Seconds after arrival when the sender is told a message is still being retried (0: never).
    delay_warning: float = 0.0
    #: Whether postmaster gets a headers-only copy of every bounce (sendmail's PostMasterCopy).
    bounce_copy_to_postmaster: bool = False
    #: ``smart_host_auth_file`` and the login read from it at load (smart host AUTH, issue 7).
    smart_host_auth_file: Path | None = None
    smart_host_credentials: Credentials | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LDAPConfig:
    """``[directory.ldap]``: the fields of appliance.directory.ldap.LDAPSettings, same names."""

    servers: tuple[str, ...]
    base_dn: str
    bind_dn: str = ""
    bind_password: str = ""
    user_filter: str = "(|(mail={address})(mailLocalAddress={address}))"
    login_filter: str | None = None
    login_attribute: str = "mail"
    address_attributes: tuple[str, ...] = ("mail", "mailLocalAddress")
    mailbox_attribute: str | None = None
    starttls: bool = False
    ca_file: str | None = None
    verify: bool = True
    timeout: float = 5.0
    canary: str | None = None


@dataclass(frozen=True)
class DirectoryConfig:
    backend: str
    users: Path
    ldap: LDAPConfig | None = None


@dataclass(frozen=True)
class POP3Config:
    allow_plaintext_inside: bool
    #: Seconds a POP3 login lets that client address relay on port 25 (0: off; M-9).
    pop_before_smtp: float = 0.0


@dataclass(frozen=True)
class SubmissionConfig:
    """``[submission]``: SMTP AUTH and the policy for authenticated mail (M-8)."""

    auth_on_port_25: bool = False
    allow_any_sender: bool = False
    add_missing_headers: bool = True


@dataclass(frozen=True)
class LoginThrottleConfig:
    """``[login_throttle]``: failed-login throttling per client address, SMTP AUTH and POP3."""

    max_delay: float = 8.0
    max_failures: int = 10
    window: float = 900.0
    cooldown: float = 900.0


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    hostname: str
    state_dir: Path
    outside: Side
    inside: Side
    listeners: tuple[Listener, ...]
    tls: TLSConfig
    dns: DNSConfig
    mail: MailConfig
    delivery: DeliveryConfig
    directory: DirectoryConfig
    pop3: POP3Config
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    login_throttle: LoginThrottleConfig = field(default_factory=LoginThrottleConfig)
    #: The anti-spam gate on the port-25 listeners (appliance.mail.gate); None: no gate.
    gate: Any = None
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def side(self, name: str) -> Side:
        return self.outside if name == "outside" else self.inside

    def is_inside_client(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.inside.networks)


def load(path: str | Path) -> Config:
    """Read and validate the configuration file; raise ConfigError listing every problem."""
    config, problems = _read(Path(path))
    if problems or config is None:
        raise ConfigError(problems)
    return config


def check(path: str | Path) -> list[Problem]:
    """Every problem in the configuration file (an empty list when it is valid)."""
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[Config | None, list[Problem]]:
    problems = Problems(str(path))
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        problems.add("", f"cannot read the file: {e.strerror or e}")
        return None, problems.items
    except tomllib.TOMLDecodeError as e:
        problems.add("", f"not valid TOML: {e}")
        return None, problems.items
    top = Table(data, "", problems, path.parent.resolve())
    config = _build(path, top, problems)
    top.done()
    return (config if not problems.items else None), problems.items


def _hostname(table: Table, key: str, value: str) -> str:
    lowered = value.lower().rstrip(".")
    if value and not _HOSTNAME.match(lowered):
        table.error(key, f"{value!r} is not a valid host or domain name")
    return lowered


def _zone_name(table: Table, key: str, value: str) -> str:
    """A zone name: any DNS name (RFC 2317 zones such as ``0/25.2.0.192.in-addr.arpa`` included)."""
    from appliance.dns import names

    lowered = value.lower().rstrip(".")
    if value:
        try:
            names.from_text(lowered + ".")
        except ValueError as e:
            table.error(key, f"{value!r} is not a valid zone name ({e})")
    return lowered


def _hostnames(table: Table, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    values = table.strings(key, default)
    return tuple(_hostname(table, f"{key}[{i}]", v) for i, v in enumerate(values))


def _build(path: Path, top: Table, problems: Problems) -> Config:
    main = top.table("appliance", required=True)
    hostname = _hostname(main, "hostname", main.string("hostname"))
    state_dir = main.path("state_dir", "/var/lib/appliance")
    main.done()

    interfaces = top.table("interfaces", required=True)
    sides = {}
    for name in SIDES:
        t = interfaces.table(name, required=True)
        addresses = t.addresses("addresses")
        if not addresses and t.has("addresses"):
            t.error("addresses", "must list at least one address")
        networks = t.networks("networks", ()) if name == "inside" else ()
        sides[name] = Side(name, addresses, networks)
        t.done()
    interfaces.done()

    listeners = _listeners(top.table("listeners", required=True), sides)

    tls_t = top.table("tls")
    tls = TLSConfig(
        certificate=tls_t.path("certificate", str(state_dir / "tls" / "certificate.pem")),
        key=tls_t.path("key", str(state_dir / "tls" / "key.pem")),
        self_signed=tls_t.boolean("self_signed", False),
        names=_hostnames(tls_t, "names", (hostname,)),
    )
    if any(lst.implicit_tls or lst.role in ("smtp", "submission", "pop3") for lst in listeners):
        for key, p in (("certificate", tls.certificate), ("key", tls.key)):
            if not tls.self_signed and not p.exists():
                tls_t.error(key, f"{p} does not exist (and tls.self_signed is false)")
    tls_t.done()

    dns = _dns(top.table("dns"), sides, state_dir)
    mail = _mail(top.table("mail"), hostname, state_dir)
    delivery = _delivery(top.table("delivery"))
    directory = _directory(top.table("directory"))
    pop3_t = top.table("pop3")
    pop3 = POP3Config(
        allow_plaintext_inside=pop3_t.boolean("allow_plaintext_inside", False),
        pop_before_smtp=pop3_t.duration("pop_before_smtp", 0),
    )
    pop3_t.done()
    submission_t = top.table("submission")
    submission = SubmissionConfig(
        auth_on_port_25=submission_t.boolean("auth_on_port_25", False),
        allow_any_sender=submission_t.boolean("allow_any_sender", False),
        add_missing_headers=submission_t.boolean("add_missing_headers", True),
    )
    submission_t.done()
    gate = _gate(top, hostname, state_dir) if top.has("gate") else None
    throttle_t = top.table("login_throttle")
    login_throttle = LoginThrottleConfig(
        max_delay=throttle_t.duration("max_delay", 8),
        max_failures=throttle_t.integer("max_failures", 10, 1, 100000),
        window=throttle_t.duration("window", "15m"),
        cooldown=throttle_t.duration("cooldown", "15m"),
    )
    throttle_t.done()

    return Config(
        path=path,
        hostname=hostname,
        state_dir=state_dir,
        outside=sides["outside"],
        inside=sides["inside"],
        listeners=listeners,
        tls=tls,
        dns=dns,
        mail=mail,
        delivery=delivery,
        directory=directory,
        pop3=pop3,
        submission=submission,
        login_throttle=login_throttle,
        gate=gate,
    )


def _directory(table: Table) -> DirectoryConfig:
    backend = table.string("backend", "file", choices=("file", "ldap"))
    if backend == "ldap":
        users = table.path("users", "users")
        ldap_t = table.table("ldap", required=True)
        optional = ldap_t.string
        ldap = LDAPConfig(
            servers=ldap_t.strings("servers"),
            base_dn=ldap_t.string("base_dn"),
            bind_dn=ldap_t.string("bind_dn", ""),
            bind_password=ldap_t.string("bind_password", ""),
            user_filter=ldap_t.string("user_filter", LDAPConfig.user_filter),
            login_filter=optional("login_filter", "") or None,
            login_attribute=ldap_t.string("login_attribute", "mail"),
            address_attributes=ldap_t.strings("address_attributes", ("mail", "mailLocalAddress")),
            mailbox_attribute=optional("mailbox_attribute", "") or None,
            starttls=ldap_t.boolean("starttls", False),
            ca_file=str(ldap_t.path("ca_file", "", must_exist=True))
            if ldap_t.has("ca_file")
            else None,
            verify=ldap_t.boolean("verify", True),
            timeout=ldap_t.duration("timeout", 5),
            canary=optional("canary", "").lower() or None,
        )
        if not ldap.servers and ldap_t.has("servers"):
            ldap_t.error("servers", "must list at least one ldap:// or ldaps:// URI")
        for index, uri in enumerate(ldap.servers):
            if not uri.lower().startswith(("ldap://", "ldaps://")):
                ldap_t.error(f"servers[{index}]", f"{uri!r} is not an ldap:// or ldaps:// URI")
        for key, template in (
            ("user_filter", ldap.user_filter),
            ("login_filter", ldap.login_filter),
        ):
            if template is None:
                continue
            try:
                template.format(address="a@b", local="a", domain="b")
            except (KeyError, IndexError, ValueError):
                ldap_t.error(key, "may use only {address}, {local} and {domain} in braces")
                continue
            if "{address}" not in template and "{local}" not in template:
                ldap_t.error(key, "must contain {address} (or {local} and {domain})")
        if ldap.timeout <= 0:
            ldap_t.error("timeout", "must be more than 0")
        ldap_t.done()
        table.done()
        return DirectoryConfig(backend=backend, users=users, ldap=ldap)
    config = DirectoryConfig(backend=backend, users=table.path("users", "users", must_exist=True))
    table.done()
    return config


def _listeners(table: Table, sides: dict[str, Side]) -> tuple[Listener, ...]:
    out: list[Listener] = []
    taken: dict[tuple[str, str, int], str] = {}
    for role, t in table.subtables():
        if role not in ROLES:
            table.error(role, f"unknown listener role (known: {', '.join(ROLES)})")
            continue
        transports, implicit_tls = ROLES[role]
        listen_sides = t.strings("sides")
        port = t.port("port")
        t.done()
        for index, side in enumerate(listen_sides):
            if side not in SIDES:
                t.error(f"sides[{index}]", f"must be outside or inside, not {side!r}")
                continue
            for address in sides[side].addresses:
                for transport in transports:
                    slot = (transport, address, port)
                    if slot in taken:
                        t.error(
                            "port", f"{transport} {address}:{port} is already used by {taken[slot]}"
                        )
                        continue
                    taken[slot] = f"{role}/{side}"
                    out.append(Listener(role, side, address, port, transport, implicit_tls))
    return tuple(out)


def _endpoint(text: str) -> tuple[str, int]:
    """``address`` or ``address:port`` (``[v6]:port``) -> (address, port), port 53 by default."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":"))
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    if not 0 < port < 65536:
        raise ValueError("port out of range")
    return str(ipaddress.ip_address(host)), port


def _zone(z: Table, side: str, name: str, state_dir: Path) -> ZoneConfig:
    """One ``[[dns.SIDE.zones]]`` entry (D-6: ``type = "primary"`` or ``"secondary"``)."""
    kind = z.string("type", "primary", choices=("primary", "secondary"))
    allow_transfer = z.networks("allow_transfer", ())
    also_notify = z.each("also_notify", (), _endpoint, "an address or address:port")
    if kind != "secondary":
        return ZoneConfig(
            name=name,
            file=z.path("file", must_exist=True),
            allow_transfer=allow_transfer,
            also_notify=also_notify,
        )
    masters = z.each("masters", (), _endpoint, "an address or address:port")
    if not masters:
        z.error("masters", "a secondary zone needs at least one master")
    default_file = state_dir / "secondary" / side / f"{name or 'root'}.zone"
    file = z.path("file", str(default_file))
    source: str | None = z.string("transfer_source", "") or None
    if source is not None:
        try:
            source = str(ipaddress.ip_address(source))
        except ValueError:
            z.error("transfer_source", f"{source!r} is not an IP address")
    return ZoneConfig(
        name=name,
        file=file,
        allow_transfer=allow_transfer,
        also_notify=also_notify,
        type="secondary",
        masters=masters,
        transfer_source=source,
        allow_notify=z.networks("allow_notify", ()),
    )


def _dns(table: Table, sides: dict[str, Side], state_dir: Path) -> DNSConfig:
    views = []
    for side in SIDES:
        if not table.has(side):
            continue
        t = table.table(side)
        zones = []
        names: set[str] = set()
        for z in t.tables("zones"):
            name = _zone_name(z, "name", z.string("name"))
            if name in names:
                z.error("name", f"zone {name} is listed twice in this view")
            names.add(name)
            zones.append(_zone(z, side, name, state_dir))
            z.done()
        # BIND answers anyone by default; the inside view answers its own networks and this host.
        default_query: tuple[str, ...] = ()
        if side == "inside":
            default_query = (*(str(n) for n in sides["inside"].networks), "127.0.0.0/8", "::1/128")
        allow_query = t.networks("allow_query", default_query)
        if side == "inside":
            default_recursion = (
                *(str(n) for n in sides["inside"].networks),
                "127.0.0.0/8",
                "::1/128",
            )
            source = t.string("query_source", (sides["inside"].addresses or ("",))[0])
            if source:
                try:
                    source = str(ipaddress.ip_address(source))
                except ValueError:
                    t.error("query_source", f"{source!r} is not an IP address")
            hints = t.path("root_hints", must_exist=True) if t.has("root_hints") else None
            view = ViewConfig(
                side,
                tuple(zones),
                allow_query,
                allow_recursion=t.networks("allow_recursion", default_recursion),
                forwarders=t.each("forwarders", (), _endpoint, "an address or address:port"),
                forward_only=t.boolean("forward_only", False),
                root_hints=hints,
                query_source=source or None,
            )
        else:
            view = ViewConfig(side, tuple(zones), allow_query)
        views.append(view)
        t.done()
    buffer = table.integer("edns_buffer_size", 1232, 512, 4096)
    table.done()
    return DNSConfig(tuple(views), buffer)


def _mail(table: Table, hostname: str, state_dir: Path) -> MailConfig:
    local = _hostnames(table, "local_domains", ())
    relay = _hostnames(table, "relay_domains", ())
    for domain in set(local) & set(relay):
        table.error("relay_domains", f"{domain} is also a local domain")
    aliases = table.path("aliases", "", must_exist=True) if table.has("aliases") else None
    separators = table.string("extension_separators", "+-")
    if any(c.isalnum() or c in "@." for c in separators):
        table.error("extension_separators", "must not contain letters, digits, '@' or '.'")
    config = MailConfig(
        hostnames=_hostnames(table, "hostnames", (hostname,)),
        local_domains=local,
        relay_domains=relay,
        aliases=aliases,
        spool=table.path("spool", str(state_dir / "spool")),
        mail_root=table.path("mail_root", str(state_dir / "mail")),
        max_message_size=table.integer("max_message_size", 25 * 1024 * 1024, 1024, 2**31),
        max_recipients=table.integer("max_recipients", 100, 1, 100000),
        extension_separators=separators,
        masquerade_as=_hostname(table, "masquerade_as", table.string("masquerade_as", ""))
        if table.has("masquerade_as")
        else (local[0] if local else ""),
        masquerade_domains=_masquerade_domains(table),
        masquerade_exceptions=table.strings("masquerade_exceptions", ("root", "postmaster")),
        direct_delivery=table.boolean("direct_delivery", True),
    )
    table.done()
    return config


def _masquerade_domains(table: Table) -> tuple[str, ...]:
    """``masquerade_domains``: one pattern or a list; ``*.example.test`` or a host name."""
    key = "masquerade_domains"
    if table.has(key) and isinstance(table._data.get(key), str):
        patterns: tuple[str, ...] = (table.string(key),)
    else:
        patterns = table.strings(key, ())
    out = []
    for index, pattern in enumerate(patterns):
        name = pattern[2:] if pattern.startswith("*.") else pattern
        _hostname(table, f"{key}[{index}]", name)
        out.append(pattern.lower())
    return tuple(out)


def _route_target(table: Table, key: str, target: str) -> str:
    from appliance.mail.routing import RouteError, parse_target

    try:
        parse_target(target, key)
    except RouteError as e:
        table.error(key, str(e))
    return target


def _delivery(table: Table) -> DeliveryConfig:
    routes_table = table.table("static_routes")
    routes: dict[str, str] = {}
    for domain in routes_table.keys():
        target = routes_table.string(domain)
        routes[domain.lower()] = _route_target(routes_table, domain, target)
    smart = table.string("smart_host", "") or None
    if smart:
        _route_target(table, "smart_host", smart)
    fallback = table.string("fallback_relay", "") or None
    if fallback:
        _route_target(table, "fallback_relay", fallback)
    retry_raw = table.strings("retry_intervals", ("1m", "5m", "15m", "30m", "1h", "2h", "4h"))
    retry = []
    for index, item in enumerate(retry_raw):
        try:
            retry.append(parse_duration(item))
        except ValueError as e:
            table.error(f"retry_intervals[{index}]", str(e))
    config = DeliveryConfig(
        static_routes=routes,
        smart_host=smart,
        fallback_relay=fallback,
        self_is_best_mx=table.string("self_is_best_mx", "bounce", choices=("bounce", "addresses")),
        opportunistic_tls=table.boolean("opportunistic_tls", True),
        lifetime=table.duration("lifetime", "5d"),
        relay_lifetime=table.duration("relay_lifetime", "10d"),
        retry_intervals=tuple(retry),
        concurrency=table.integer("concurrency", 20, 1, 1000),
        destination_concurrency=table.integer("destination_concurrency", 20, 1, 1000),
        delay_warning=table.duration("delay_warning", 0),
        bounce_copy_to_postmaster=table.boolean("bounce_copy_to_postmaster", False),
    )
    if table.has("smart_host_auth_file"):
        auth_file = table.path("smart_host_auth_file")
        credentials = None
        if table._data.get("smart_host_auth_file") == "":
            table.error("smart_host_auth_file", "must name a file")
        elif isinstance(table._data.get("smart_host_auth_file"), str):
            credentials = _smart_host_credentials(table, "smart_host_auth_file", auth_file)
        if not smart:
            table.error(
                "smart_host_auth_file",
                "is set but smart_host is not (AUTH is only for the smart host)",
            )
        if not config.opportunistic_tls:
            table.error(
                "smart_host_auth_file",
                "the login is sent only after STARTTLS, which opportunistic_tls = false turns off",
            )
        config = dataclasses.replace(
            config, smart_host_auth_file=auth_file, smart_host_credentials=credentials
        )
    table.done()
    return config


def _smart_host_credentials(table: Table, key: str, path: Path) -> Credentials | None:
    """The one ``username password`` line of the smart host's AUTH file, or None after an error.

    Like an ssh private key, the file must not grant group or other any
    permission.  ``#`` comment lines and blank lines are ignored; the first
    run of white space ends the username, the rest of the line (stripped) is
    the password.  Errors never quote the password.
    """
    import stat

    from appliance.mail.smtp_client import Credentials

    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            table.error(key, f"{path} is not a regular file")
            return None
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            table.error(
                key,
                f"{path} has mode {mode:04o}: it holds a password, so it must not grant"
                " group or other any permission (chmod 600)",
            )
            return None
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        table.error(key, f"{path} does not exist")
        return None
    except OSError as e:
        table.error(key, f"cannot read {path}: {e.strerror or e}")
        return None
    except UnicodeDecodeError:
        table.error(key, f"{path} is not UTF-8 text")
        return None
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if len(lines) != 1:
        table.error(key, f"{path} must hold exactly one 'username password' line, not {len(lines)}")
        return None
    number, line = lines[0]
    parts = line.split(None, 1)
    if len(parts) != 2 or not parts[1].strip():
        table.error(key, f"{path} line {number} must be 'username password'")
        return None
    return Credentials(parts[0], parts[1].strip())


def _gate(top: Table, hostname: str, state_dir: Path) -> Any:
    """``[gate]``: GateSettings read key by key from its dataclasses (unknown keys are errors)."""
    from appliance.mail.gate import GateSettings
    from appliance.mail.gate.gate import check_gate_settings

    table = top.table("gate")
    try:
        settings = read_dataclass(table, GateSettings)
    except (TypeError, ValueError) as e:
        table.error("", f"invalid gate settings: {e}")
        return None
    if settings.authserv_id == "localhost":
        settings = dataclasses.replace(settings, authserv_id=hostname)
    checked = settings
    if settings.greylist.enabled and not settings.greylist.path:
        # The default lives in state_dir, which the service creates at start: nothing to check yet.
        checked = dataclasses.replace(
            settings, greylist=dataclasses.replace(settings.greylist, enabled=False)
        )
        settings = dataclasses.replace(
            settings,
            greylist=dataclasses.replace(
                settings.greylist, path=str(state_dir / "greylist.sqlite3")
            ),
        )
    for problem in check_gate_settings(checked):
        table.error("", problem)
    return settings
