"""Fixtures for URL-source tests: scriptable origins on loopback and an outbound-connect guard."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# A route writes the whole response; it gets the handler and an event set at teardown.
Route = Callable[[BaseHTTPRequestHandler, threading.Event], None]


class _Handler(BaseHTTPRequestHandler):
    server: _OriginServer

    def do_GET(self) -> None:
        origin = self.server.origin
        origin.requests.append((self.path, dict(self.headers.items())))
        route = origin.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(404)
        else:
            route(self, origin.stop)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: clients abort on purpose in these tests."""


class _OriginServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, origin: Origin, host: str) -> None:
        version = ipaddress.ip_address(host).version
        self.address_family = socket.AF_INET6 if version == 6 else socket.AF_INET
        self.origin = origin
        super().__init__((host, 0), _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.origin.lock:
            self.origin.connections += 1
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Broken pipes from clients that stop reading are expected here."""


@dataclass
class Origin:
    """A real HTTP server on loopback; ``routes`` maps paths to response writers."""

    host: str = "127.0.0.1"
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    connections: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    scheme: str = "http"

    def start(self, tls: ssl.SSLContext | None = None) -> Origin:
        self._server = _OriginServer(self, self.host)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def close(self) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "/img", host: str | None = None) -> str:
        host = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{self.scheme}://{host}:{self.port}{path}"


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def make_origin() -> Iterator[Callable[..., Origin]]:
    """Start origins on demand (``make_origin("127.0.0.2")``); all stopped at teardown."""
    started: list[Origin] = []

    def make(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Origin:
        origin = Origin(host=host).start(tls)
        started.append(origin)
        return origin

    yield make
    for origin in started:
        origin.close()


@pytest.fixture
def origin(make_origin: Callable[..., Origin]) -> Origin:
    return make_origin()


class OutboundRefused(RuntimeError):
    """Raised by the audit hook: a test tried to connect outside loopback."""


@dataclass
class ConnectLog:
    """Every TCP connect the test's own thread attempts while active (another test's
    straggler thread is not the test's to count); non-loopback ones are refused, not sent,
    whichever thread tries."""

    active: bool = False
    thread: int = 0
    attempts: list[tuple[str, int]] = field(default_factory=list)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event != "socket.connect" or not isinstance(args[1], tuple):
            return
        host, port = str(args[1][0]), int(args[1][1])
        if threading.get_ident() == self.thread:
            self.attempts.append((host, port))
        if not _is_loopback(host):
            raise OutboundRefused(f"test tried to connect to {host}:{port}")


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.fixture(scope="session")
def _connect_log_hook() -> ConnectLog:
    """Audit hooks cannot be removed, so install one per session and switch it per test."""
    log = ConnectLog()
    sys.addaudithook(log.hook)
    return log


@pytest.fixture
def connect_log(_connect_log_hook: ConnectLog) -> Iterator[ConnectLog]:
    log = _connect_log_hook
    log.attempts.clear()
    log.thread = threading.get_ident()
    log.active = True
    yield log
    log.active = False


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server: ssl.SSLContext


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA and a server certificate for the name ``img.test`` only."""
    directory = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fetch test CA")])
    ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.test")])
    leaf = _certificate(leaf_name, ca_name, leaf_key.public_key(), ca_key, ca=False)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "leaf.pem", directory / "leaf.key")
    return TLSFiles(ca=directory / "ca.pem", server=server)


def _certificate(
    subject: x509.Name, issuer: x509.Name, public: Any, signer: Any, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("img.test")]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())
