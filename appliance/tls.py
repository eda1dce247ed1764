"""Certificates and TLS contexts: load the configured PEM files, or make a self-signed pair at first start.

The self-signed bootstrap exists for the demo and for a first boot; a
production box points ``tls.certificate`` and ``tls.key`` at real files.
Server contexts refuse anything older than TLS 1.2.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from appliance.config import Config, TLSConfig

log = Logger(namespace="appliance.tls")


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def make_self_signed(names: tuple[str, ...], days: int = 825) -> tuple[bytes, bytes]:
    """A new (certificate PEM, private key PEM) pair naming ``names`` in subjectAltName."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_certificate(
    certificate: Path, key: Path, names: tuple[str, ...], self_signed: bool
) -> bool:
    """Create a self-signed pair when both files are absent and that is allowed; True if created."""
    if certificate.exists() or key.exists() or not self_signed:
        return False
    cert_pem, key_pem = make_self_signed(names)
    _write_atomically(key, key_pem, 0o600)
    _write_atomically(certificate, cert_pem, 0o644)
    return True


def load_server_options(certificate: Path, key: Path) -> ssl.CertificateOptions:
    """A server context from PEM files: the first certificate is ours, any others are its chain."""
    try:
        cert_data = certificate.read_bytes()
    except OSError as e:
        raise TLSError(f"{certificate}: cannot read certificate: {e.strerror}") from e
    try:
        key_data = key.read_bytes()
    except OSError as e:
        raise TLSError(f"{key}: cannot read key: {e.strerror}") from e
    blocks = _PEM_CERT.findall(cert_data)
    try:
        if not blocks:
            raise ValueError("no CERTIFICATE block")
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
    except (ValueError, crypto.Error) as e:
        raise TLSError(f"{certificate}: not a PEM certificate ({e})") from e
    try:
        private = crypto.load_privatekey(crypto.FILETYPE_PEM, key_data)
    except crypto.Error as e:
        raise TLSError(f"{key}: not a PEM private key") from e
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(chain[0])
        context.use_privatekey(private)
        context.check_privatekey()
    except SSL.Error as e:
        raise TLSError(f"{key}: does not match the certificate {certificate}") from e
    return ssl.CertificateOptions(
        privateKey=private,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


@implementer(IOpenSSLContextFactory)
class TLSService(Service):
    """Holds the server TLS context: made (if allowed) and loaded at start, replaced on reload.

    Listeners are given this object itself as their context factory, so a
    reloaded certificate is used by the next connection without a restart.
    """

    name = "tls"

    def __init__(self, settings: TLSConfig, needed: bool = True) -> None:
        self.settings = settings
        #: False when no listener speaks TLS (a DNS-only box): nothing is loaded or made.
        self.needed = needed
        self.options: ssl.CertificateOptions | None = None

    def privilegedStartService(self) -> None:
        # Loaded here, before twistd drops privileges and before implicit-TLS
        # listeners bind: their TLS factory asks for a context when it is built.
        Service.privilegedStartService(self)
        self._load()

    def startService(self) -> None:
        Service.startService(self)
        if self.options is None:
            self._load()

    def _load(self) -> None:
        if not self.needed:
            return
        if ensure_certificate(
            self.settings.certificate,
            self.settings.key,
            self.settings.names,
            self.settings.self_signed,
        ):
            log.info(
                "tls: generated a self-signed certificate for {names} in {path}",
                names=", ".join(self.settings.names),
                path=str(self.settings.certificate),
            )
        self.options = load_server_options(self.settings.certificate, self.settings.key)

    def reconfigure(self, config: Config) -> None:
        if not self.needed:
            return
        options = load_server_options(config.tls.certificate, config.tls.key)
        self.settings, self.options = config.tls, options
        log.info("tls: certificate reloaded from {path}", path=str(config.tls.certificate))

    def getContext(self) -> SSL.Context:
        """The current server context (the IOpenSSLContextFactory interface)."""
        if self.options is None:
            raise TLSError("TLS is not loaded yet")
        return self.options.getContext()
