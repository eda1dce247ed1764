"""Construction: from a validated Config to the concrete service tree (no I/O happens here).

Order of the children is the start order: TLS material, directory, mail
storage (spool recovery), DNS zones, then one ListenerService per configured
socket.  Each listener is built by the function registered for its role.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from appliance.config import Config, Listener
from appliance.control import ControlService, socket_path
from appliance.directory.ldap import LDAPDirectoryService, settings_from_config
from appliance.directory.popbeforesmtp import PopBeforeSMTP
from appliance.directory.service import DirectoryService
from appliance.directory.throttle import (
    POP3_LOCKED_OUT,
    LockedOutGate,
    LoginThrottle,
    doubling_delays,
)
from appliance.dns.cache import DNSCache
from appliance.dns.client import DNSClient
from appliance.dns.listener import DNSDatagramProtocol, DNSServerCore, DNSStreamFactory
from appliance.dns.recursion import RecursiveView
from appliance.dns.resolver import MailResolverAdapter, Resolver
from appliance.dns.rr import Opcode
from appliance.dns.service import SERIAL_STATE_FILE, DNSService
from appliance.dns.zone import load_zone
from appliance.mail.service import MailService
from appliance.pop3.server import POP3ServerFactory
from appliance.service import ApplianceService, ListenerService, ThreadPoolService
from appliance.tls import TLSService


class Components:
    """The long-lived objects listeners are built around, in start order."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.threads = ThreadPoolService(reactor)
        self.tls = TLSService(config.tls, needed=any(lst.role != "dns" for lst in config.listeners))
        self.directory: DirectoryService | LDAPDirectoryService
        if config.directory.backend == "ldap" and config.directory.ldap is not None:
            settings = settings_from_config(config.directory.ldap)
            self.directory = LDAPDirectoryService(settings, reactor, self.threads.pool)
        else:
            self.directory = DirectoryService(config, reactor, self.threads.pool)
        throttle = config.login_throttle
        # One throttle for SMTP AUTH and POP3: failures on either count against the address.
        self.login_throttle = LoginThrottle(
            reactor,
            doubling_delays(throttle.max_delay),
            max_failures=throttle.max_failures,
            window=throttle.window,
            cooldown=throttle.cooldown,
        )
        self.pop_before_smtp = PopBeforeSMTP(reactor, config.pop3.pop_before_smtp)
        self.dns = DNSService(
            config.dns,
            lambda path, origin: load_zone(str(path), origin),
            reactor=reactor,
            # NOTIFY leaves from the side's own address (BIND's notify-source).
            sources={
                s.name: s.addresses[0] for s in (config.outside, config.inside) if s.addresses
            },
            serial_state=config.state_dir / SERIAL_STATE_FILE,
        )
        self.resolver = _inside_resolver(config, reactor)
        inside_view = self.dns.view("inside")
        self.mail = MailService(
            config,
            reactor,
            self.directory.directory,
            self.threads.run,
            resolver=MailResolverAdapter(self.resolver, inside_view),
            throttle=self.login_throttle,
            pop_before_smtp=self.pop_before_smtp,
        )
        # The operator tools' way in (O-2): mailq, flush, queue, route.
        self.control = ControlService(
            socket_path(config.state_dir), reactor, self.mail.control_handlers()
        )

    def services(self) -> tuple[Service, ...]:
        # Zones load before the mail runner starts: its lookups of inside names use them.
        return (self.threads, self.tls, self.directory, self.dns, self.mail, self.control)


def _inside_resolver(config: Config, reactor: Any) -> Resolver:
    """The caching resolver behind the inside view and the mail delivery (D-3, R-1)."""
    inside = config.dns.view("inside")
    client = DNSClient(reactor, reactor, (inside.query_source if inside else None) or "127.0.0.1")
    return Resolver(
        DNSCache(reactor),
        client,
        reactor,
        forwarders=inside.forwarders if inside else (),
        forward_only=inside.forward_only if inside else False,
        root_hints=str(inside.root_hints) if inside and inside.root_hints else (),
    )


def _tcp(
    components: Components, listener: Listener, factory: Factory
) -> Callable[[], IListeningPort]:
    reactor = components.reactor
    if listener.implicit_tls:

        def listen_tls() -> IListeningPort:
            wrapped = TLSMemoryBIOFactory(components.tls, False, factory)  # type: ignore[arg-type]
            return reactor.listenTCP(listener.port, wrapped, interface=listener.address)  # type: ignore[no-any-return]

        return listen_tls
    return lambda: reactor.listenTCP(listener.port, factory, interface=listener.address)


def _dns(components: Components, listener: Listener) -> Callable[[], IListeningPort]:
    view = components.dns.view(listener.side)
    responder: Any = view
    settings = components.config.dns.view(listener.side)
    if listener.side == "inside" and settings is not None:
        responder = RecursiveView(view, components.resolver, settings.allow_recursion)
    # NOTIFY reaches the view, which hands it to the secondary zone named (RFC 1996, D-6).
    core = DNSServerCore(
        responder,
        udp_size=components.config.dns.edns_buffer_size,
        opcodes=(Opcode.QUERY, Opcode.NOTIFY),
    )
    reactor = components.reactor
    if listener.transport == "udp":
        return lambda: reactor.listenUDP(
            listener.port, DNSDatagramProtocol(core), interface=listener.address
        )
    return _tcp(components, listener, DNSStreamFactory(core, reactor))


def _smtp(components: Components, listener: Listener) -> Callable[[], IListeningPort]:
    return _tcp(components, listener, components.mail.smtp_factory(listener, components.tls))


def _pop3(components: Components, listener: Listener) -> Callable[[], IListeningPort]:
    config = components.config
    factory = POP3ServerFactory(
        components.directory.directory,
        str(config.mail.mail_root),
        config.hostname,
        components.tls,
        config.inside.networks,
        config.pop3.allow_plaintext_inside,
        listener.implicit_tls,
        components.reactor,
        on_login=components.pop_before_smtp.on_login,
        on_auth_failure=components.login_throttle.on_auth_failure,
        failure_delay=components.login_throttle.failure_delay,
        run_io=components.threads.run,
    )
    gate = LockedOutGate(factory, components.login_throttle, POP3_LOCKED_OUT)
    return _tcp(components, listener, gate)


LISTENER_BUILDERS: dict[str, Callable[[Components, Listener], Callable[[], IListeningPort]]] = {
    "dns": _dns,
    "smtp": _smtp,
    "submission": _smtp,
    "smtps": _smtp,
    "pop3": _pop3,
    "pop3s": _pop3,
}


def build_service(config: Config, reactor: Any) -> ApplianceService:
    """The whole tree for ``config``; nothing is bound or read until it is started."""
    root = ApplianceService(config, reactor)
    components = Components(config, reactor)
    for child in components.services():
        child.setServiceParent(root)
    for listener in config.listeners:
        builder = LISTENER_BUILDERS.get(listener.role)
        if builder is None:
            continue
        ListenerService(
            listener.name + f" {listener.transport}",
            listener.describe(),
            builder(components, listener),
        ).setServiceParent(root)
    root.components = components  # type: ignore[attr-defined]
    return root
