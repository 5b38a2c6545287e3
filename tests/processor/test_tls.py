"""Mutual TLS building blocks against real gRPC servers on loopback, health as the test RPC."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # handshake failures are expected here

import datetime
import logging
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from processor.tls import (
    AllowedPeers,
    ClientTls,
    PeerCheckInterceptor,
    ReloadingChannel,
    refuse_non_loopback,
    server_credentials,
    start_probe_server,
)
from tools import admin, certs
from tools.certs import API_IDENTITY, CertifiedKey, Pki

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TIMEOUT = 5.0
NOW = datetime.datetime.now(datetime.UTC)
API_ONLY = AllowedPeers(frozenset({API_IDENTITY}))


class RecordingHealth(health.HealthServicer):
    """The standard health servicer, remembering which client certificate called Check."""

    def __init__(self) -> None:
        super().__init__()
        self.client_serials: list[int] = []

    def Check(self, request, context):
        pem = context.auth_context().get("x509_pem_cert")
        if pem:
            self.client_serials.append(x509.load_pem_x509_certificate(pem[0]).serial_number)
        return super().Check(request, context)


@dataclass
class Setup:
    """A development PKI in tmp_path, its CA, and what the test has started."""

    pki: Pki
    ca: CertifiedKey
    stack: ExitStack
    health: RecordingHealth = field(default_factory=RecordingHealth)

    def serve(self, allowed: AllowedPeers | None = API_ONLY) -> int:
        """The processor's mTLS port: client certificates required, identities checked."""
        interceptors = [] if allowed is None else [PeerCheckInterceptor(allowed)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        creds = server_credentials(
            self.pki.processor_cert, self.pki.processor_key, self.pki.ca_cert
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        self.stack.callback(server.stop, None)
        return port

    def channel(
        self,
        port: int,
        client: CertifiedKey | None,
        ca: bytes | None = None,
        server_name: str | None = None,
    ) -> grpc.Channel:
        """A plain grpc secure channel on its own connection (no shared subchannel pool)."""
        ca = self.pki.ca_cert.read_bytes() if ca is None else ca
        pair = (None, None) if client is None else (client.key_pem(), client.cert_pem())
        creds = grpc.ssl_channel_credentials(ca, *pair)
        options = [("grpc.use_local_subchannel_pool", 1)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)
        self.stack.callback(channel.close)
        return channel

    def api(self) -> CertifiedKey:
        return certs.load_authority(self.pki.api_cert, self.pki.api_key)

    def client(
        self, name: str = API_IDENTITY, ca: CertifiedKey | None = None, **kw
    ) -> CertifiedKey:
        return certs.issue(ca or self.ca, name, purpose="client", names=[name], **kw)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    pki = certs.create_dev_pki(tmp_path / "pki", dns=["processor.test"])
    with ExitStack() as stack:
        yield Setup(pki, certs.load_authority(pki.ca_cert, pki.ca_key), stack)


def check(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest()
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT).status


def refusal(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        check(channel)
    return info.value.code()


def served_serial(port: int, setup: Setup) -> int:
    """Serial of the certificate the server presents to a new TLS connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only look at what is presented
    context.load_cert_chain(setup.pki.api_cert, setup.pki.api_key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# --- Handshake and identity ------------------------------------------------------------------


def test_mtls_call_reaches_servicer_with_client_certificate(setup: Setup) -> None:
    port = setup.serve()
    assert check(setup.channel(port, setup.api())) == SERVING
    assert setup.health.client_serials == [setup.api().cert.serial_number]


@pytest.mark.parametrize(
    "make_client",
    [
        pytest.param(lambda s: None, id="no-certificate"),
        pytest.param(lambda s: s.client(ca=certs.new_authority("other CA")), id="other-ca"),
        pytest.param(
            lambda s: s.client(not_before=NOW - datetime.timedelta(days=10), days=9),
            id="expired",
        ),
    ],
)
def test_handshake_refuses_untrusted_clients(
    setup: Setup, make_client: Callable[[Setup], CertifiedKey | None]
) -> None:
    port = setup.serve()
    assert refusal(setup.channel(port, make_client(setup))) == grpc.StatusCode.UNAVAILABLE
    assert setup.health.client_serials == []


def test_plaintext_client_refused(setup: Setup) -> None:
    port = setup.serve()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert refusal(channel) == grpc.StatusCode.UNAVAILABLE


def test_disallowed_identity_denied_before_servicer(setup: Setup) -> None:
    port = setup.serve()
    intruder = setup.channel(port, setup.client("imagescaler-loadgen"))
    with pytest.raises(grpc.RpcError) as info:
        check(intruder)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "imagescaler-loadgen" in info.value.details()
    assert setup.health.client_serials == []


def test_common_name_counts_only_without_sans(setup: Setup) -> None:
    """A certificate issued for other names is not the API's because its CN says so."""
    port = setup.serve()
    other = certs.issue(setup.ca, API_IDENTITY, purpose="client", names=["batch.example"])
    with pytest.raises(grpc.RpcError) as info:
        check(setup.channel(port, other))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "batch.example" in info.value.details()
    assert setup.health.client_serials == []
    cn_only = certs.issue(setup.ca, API_IDENTITY, purpose="client")
    assert check(setup.channel(port, cn_only)) == SERVING


def test_identity_may_come_from_any_san() -> None:
    allowed = AllowedPeers(frozenset({"spiffe://cluster.local/ns/img/sa/api"}))
    assert allowed.permits({"api.example", "spiffe://cluster.local/ns/img/sa/api"})
    assert not allowed.permits({"api.example"})
    with pytest.raises(ValueError):
        AllowedPeers(frozenset())


def test_server_name_override(setup: Setup) -> None:
    only_name = certs.issue(setup.ca, "processor", purpose="server", names=["processor.test"])
    only_name.write(setup.pki.processor_cert, setup.pki.processor_key)
    port = setup.serve()
    assert refusal(setup.channel(port, setup.api())) == grpc.StatusCode.UNAVAILABLE
    tls = ClientTls(setup.pki.ca_cert, setup.pki.api_cert, setup.pki.api_key, "processor.test")
    with ReloadingChannel(f"127.0.0.1:{port}", tls) as channel:
        assert check(channel) == SERVING


def test_unusable_files_fail_at_startup(setup: Setup) -> None:
    other = certs.issue(setup.ca, "processor", purpose="server")
    setup.pki.processor_key.write_bytes(other.key_pem())
    with pytest.raises(ValueError, match="does not match"):
        server_credentials(setup.pki.processor_cert, setup.pki.processor_key, setup.pki.ca_cert)


# --- Rotation ------------------------------------------------------------------------------


def test_server_rotation_reaches_new_connections_only(setup: Setup) -> None:
    port = setup.serve()
    old_trust = setup.channel(port, setup.api())
    assert check(old_trust) == SERVING
    new_ca = certs.new_authority("rotated CA")
    certs.issue(new_ca, "processor", purpose="server", names=["127.0.0.1"]).write(
        setup.pki.processor_cert, setup.pki.processor_key
    )
    assert refusal(setup.channel(port, setup.api())) == grpc.StatusCode.UNAVAILABLE
    assert check(setup.channel(port, setup.api(), ca=new_ca.cert_pem())) == SERVING
    assert check(old_trust) == SERVING  # the open connection keeps its handshake


def test_half_written_pair_keeps_previous_certificate(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    port = setup.serve()
    first = served_serial(port, setup)
    rotated = certs.issue(setup.ca, "processor", purpose="server", names=["127.0.0.1"])
    certs.write_atomic(setup.pki.processor_key, rotated.key_pem(), mode=0o600)
    with caplog.at_level(logging.WARNING, logger="processor.tls"):
        assert served_serial(port, setup) == first
    assert "does not match" in caplog.text
    assert check(setup.channel(port, setup.api())) == SERVING
    certs.write_atomic(setup.pki.processor_cert, rotated.cert_pem(), mode=0o644)
    assert served_serial(port, setup) == rotated.cert.serial_number


def test_client_rotation_through_reloading_channel(setup: Setup) -> None:
    port = setup.serve()
    tls = ClientTls(setup.pki.ca_cert, setup.pki.api_cert, setup.pki.api_key)
    channel = ReloadingChannel(f"127.0.0.1:{port}", tls, grace=60.0)
    setup.stack.callback(channel.close)
    stub = health_pb2_grpc.HealthStub(channel.get())
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert next(watch).status == SERVING  # an in-flight call on the first certificate

    rotated = setup.client()
    rotated.write(setup.pki.api_cert, setup.pki.api_key)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == SERVING
    assert setup.health.client_serials[-1] == rotated.cert.serial_number
    assert setup.health.client_serials[0] != rotated.cert.serial_number
    assert channel.retired_count() == 1

    setup.health.set("", NOT_SERVING)
    assert next(watch).status == NOT_SERVING  # the old connection was not dropped
    ended = threading.Event()
    watch.add_done_callback(lambda _: ended.set())  # runs after the channel's own callback
    watch.cancel()
    assert ended.wait(TIMEOUT)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == NOT_SERVING
    assert channel.retired_count() == 0  # closed once its call ended


def test_reloading_channel_closes_old_channel_after_grace(setup: Setup) -> None:
    port = setup.serve()
    tls = ClientTls(setup.pki.ca_cert, setup.pki.api_cert, setup.pki.api_key)
    with ReloadingChannel(f"127.0.0.1:{port}", tls, grace=0.0) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(watch).status == SERVING
        setup.client().write(setup.pki.api_cert, setup.pki.api_key)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == SERVING
        assert channel.retired_count() == 0
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() == grpc.StatusCode.CANCELLED


def test_reloading_channel_call_styles(setup: Setup) -> None:
    port = setup.serve()
    tls = ClientTls(setup.pki.ca_cert, setup.pki.api_cert, setup.pki.api_key)
    with ReloadingChannel(f"127.0.0.1:{port}", tls) as channel:
        check_rpc = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest()
        response, call = check_rpc.with_call(request, timeout=TIMEOUT)
        assert response.status == SERVING
        assert call.code() == grpc.StatusCode.OK
        assert check_rpc.future(request, timeout=TIMEOUT).result().status == SERVING
    with pytest.raises(ValueError, match="closed"):
        check_rpc(request, timeout=TIMEOUT)


# --- Probe port and plaintext guard ---------------------------------------------------------


def test_probe_port_serves_only_health_check(setup: Setup) -> None:
    port = setup.serve()
    probe, probe_port = start_probe_server("127.0.0.1:0", setup.health)
    setup.stack.callback(probe.stop, None)
    with ReloadingChannel(f"127.0.0.1:{probe_port}", tls=None) as plain:
        assert check(plain) == SERVING
        setup.health.set("", NOT_SERVING)  # shared with the mTLS port
        assert check(plain) == NOT_SERVING
        assert check(setup.channel(port, setup.api())) == NOT_SERVING
        for method in ("/grpc.health.v1.Health/Watch", "/imagescaler.processor.v1.Processor/X"):
            with pytest.raises(grpc.RpcError) as info:
                plain.unary_unary(method)(b"", timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:50052", "127.3.2.1:1", "[::1]:50052", "localhost:0", "[::ffff:127.0.0.1]:1"],
)
def test_plaintext_allowed_on_loopback(listen: str) -> None:
    refuse_non_loopback(listen)


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:50052",
        "[::]:50052",
        ":50052",
        "10.1.2.3:50052",
        "processor:50052",
        "[::ffff:10.0.0.1]:1",
        "unix:/tmp/processor.sock",
        "0177.0.0.1:1",
    ],
)
def test_plaintext_refused_elsewhere(listen: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        refuse_non_loopback(listen)


# --- certs command ---------------------------------------------------------------------------


def _certs_command(*argv: str) -> int:
    return admin.main(list(argv), environ={})


def _sans(cert: x509.Certificate) -> list[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def test_certs_command_writes_a_usable_pki(tmp_path: Path) -> None:
    dns = ["processor", "*.processor.ns.svc.cluster.local"]
    assert _certs_command("certs", "--out", str(tmp_path), "--dns", *dns, "--days", "30") == 0
    pki = Pki.in_dir(tmp_path)
    for key in (pki.ca_key, pki.processor_key, pki.api_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate(pki.processor_cert.read_bytes())
    assert _sans(server) == ["localhost", "127.0.0.1", "::1", *dns]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    life = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=30) <= life <= datetime.timedelta(days=31)
    client = x509.load_pem_x509_certificate(pki.api_cert.read_bytes())
    assert _sans(client) == [API_IDENTITY]
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_certs_command_keeps_existing_ca(tmp_path: Path) -> None:
    assert _certs_command("certs", "--out", str(tmp_path)) == 0
    ca = (tmp_path / "ca.pem").read_bytes()
    assert _certs_command("certs", "--out", str(tmp_path)) == 1
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert _certs_command("certs", "--out", str(tmp_path), "--force") == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca
