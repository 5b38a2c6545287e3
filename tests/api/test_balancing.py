"""Balancing the API's calls over processor replicas, through the real servers, over mutual TLS.

Replicas listen on 127.0.0.2, .3 and .4 with one port number, like pods behind a headless
Service; each replica's Prometheus registry tells how many calls it served. The numbers these
tests measure are quoted in docs/load-balancing.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # refused handshakes are expected here

import datetime
import io
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client import CollectorRegistry

from api import forwarding
from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
from processor import imaging, serving
from processor import server as processor_server
from processor.config import ProcessorSettings
from processor.metrics import PipelineMetrics
from processor.pb import processor_pb2 as ppb
from processor.service import ProcessorService, Received, add_to_server
from processor.tls import ClientTls, ReloadingChannel
from tests.stack import dev_api_settings
from tools import certs
from tools.certs import API_IDENTITY, CertifiedKey, Pki

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SERVER_NAME = "localhost"  # the dev processor certificate names 127.0.0.1, not .2-.4
PROCESS = {"grpc_service": forwarding.SERVICE, "grpc_method": "Process"}
TIMEOUT = 10.0


def jpeg(size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 60, 30)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def served(replica: processor_server.Running) -> int:
    """Process calls the replica completed with OK."""
    labels = {**PROCESS, "grpc_type": "unary", "grpc_code": "OK"}
    return int(replica.registry.get_sample_value("grpc_server_handled_total", labels) or 0)


def in_flight(replica: processor_server.Running) -> int:
    return int(replica.registry.get_sample_value("grpc_server_in_flight", PROCESS) or 0)


def shared_port() -> int:
    """A port number free on every replica address (bind 127.0.0.2:0, check the others)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = int(s.getsockname()[1])
        if all(_bindable(host, port) for host in HOSTS[1:]):
            return port
    raise RuntimeError("no port number free on all replica addresses")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def ipv4_target(hosts: tuple[str, ...], port: int) -> str:
    return "ipv4:" + ",".join(f"{h}:{port}" for h in hosts)


# --- load -------------------------------------------------------------------------------------


class Load:
    """Public callers of one API: ``run`` sends calls in parallel and keeps every failure."""

    def __init__(self, api_port: int, image: bytes) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{api_port}")
        self.stub = imagescaler_pb2_grpc.ImageScalerStub(self.channel)
        self.request = pb.ScaleImageRequest(image=pb.Image(content=image))

    def call(self) -> tuple[str, str] | None:
        try:
            self.stub.ScaleImage(self.request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
        return None

    def run(
        self, calls: int, parallel: int = 8, midway: Callable[[], None] | None = None
    ) -> list[tuple[str, str]]:
        """``midway`` runs once a third of the calls have completed, while the rest go on."""
        third, done, lock = threading.Event(), [0], threading.Lock()

        def count(_: futures.Future[Any]) -> None:
            with lock:
                done[0] += 1
                if done[0] >= calls // 3:
                    third.set()

        with futures.ThreadPoolExecutor(parallel) as pool:
            pending = [pool.submit(self.call) for _ in range(calls)]
            for f in pending:
                f.add_done_callback(count)
            if midway is not None:
                assert third.wait(60)
                midway()
            return [r for f in pending if (r := f.result()) is not None]

    def close(self) -> None:
        self.channel.close()


def shares(replicas: list[processor_server.Running]) -> list[float]:
    counts = [served(r) for r in replicas]
    return [c / sum(counts) for c in counts]


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    """A dev PKI, processor replicas with mutual TLS, and APIs in front of them."""

    pki: Pki
    ca: CertifiedKey
    tmp: Path
    port: int
    start_processor: Callable[..., processor_server.Running]
    start_api: Callable[..., Any]
    stack: ExitStack
    image: bytes = field(default_factory=jpeg)

    def overrides(self, host: str, **overrides: Any) -> dict[str, Any]:
        """Processor settings for a replica on ``host`` (see the ``start_processor`` fixture)."""
        return {
            "listen": f"{host}:{self.port}",
            "insecure": False,
            "tls_cert": str(self.pki.processor_cert),
            "tls_key": str(self.pki.processor_key),
            "tls_client_ca": str(self.pki.ca_cert),
            "allow_client": (API_IDENTITY,),
            "workers": 2,
            "metrics_port": 0,
            **overrides,
        }

    def settings(self, host: str, **overrides: Any) -> ProcessorSettings:
        return ProcessorSettings(**self.overrides(host, **overrides))

    def replica(self, host: str, **overrides: Any) -> processor_server.Running:
        return self.start_processor(**self.overrides(host, **overrides))

    def replicas(self, hosts: tuple[str, ...] = HOSTS, **kw: Any) -> list[processor_server.Running]:
        return [self.replica(h, **kw) for h in hosts]

    def api(self, target: str, **overrides: Any) -> Load:
        settings = {
            "processor_insecure": False,
            "processor_ca": str(self.pki.ca_cert),
            "processor_cert": str(self.pki.api_cert),
            "processor_key": str(self.pki.api_key),
            "processor_server_name": SERVER_NAME,
            # The load here is one tenant's: lift its limits out of the way.
            "ratelimit_default": "100000/second",
            "pixel_limit_default": "1000000/minute",
            "max_concurrent_per_tenant": 1000,
            **overrides,
        }
        load = Load(self.start_api(dev_api_settings(target, **settings)).port, self.image)
        self.stack.callback(load.close)
        return load

    def client_tls(self) -> ClientTls:
        return ClientTls(self.pki.ca_cert, self.pki.api_cert, self.pki.api_key, SERVER_NAME)

    def client_cert(self, name: str = API_IDENTITY, **kw: Any) -> CertifiedKey:
        return certs.issue(kw.pop("ca", self.ca), name, purpose="client", names=[name], **kw)


@pytest.fixture
def cluster(
    tmp_path: Path,
    start_processor: Callable[..., processor_server.Running],
    start_api: Callable[..., Any],
) -> Iterator[Cluster]:
    pki = certs.create_dev_pki(tmp_path / "pki")
    ca = certs.load_authority(pki.ca_cert, pki.ca_key)
    with ExitStack() as stack:
        yield Cluster(pki, ca, tmp_path, shared_port(), start_processor, start_api, stack)


# --- spreading calls ----------------------------------------------------------------------------


def test_round_robin_spreads_calls_over_every_replica(cluster: Cluster) -> None:
    replicas = cluster.replicas()
    load = cluster.api(ipv4_target(HOSTS, cluster.port))
    assert load.run(300) == []
    assert sum(served(r) for r in replicas) == 300
    assert min(shares(replicas)) >= 0.20, shares(replicas)


def test_pick_first_sends_every_call_to_one_replica(cluster: Cluster) -> None:
    """gRPC's default policy: one connection, to the first address that answers, for all calls."""
    replicas = cluster.replicas()
    options = forwarding.channel_options(1 << 20, forwarding.service_config_for("pick_first"))
    channel = ReloadingChannel(ipv4_target(HOSTS, cluster.port), cluster.client_tls(), options)
    cluster.stack.callback(channel.close)
    client = forwarding.ProcessorClient(channel)
    job = ppb.ProcessRequest()

    def send(_: int) -> ppb.ProcessReply:
        return client.process(job, forwarding.Body(cluster.image), TIMEOUT)

    with futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(300)))
    assert sorted(served(r) for r in replicas) == [0, 0, 300]


class ConnectionBalancer:
    """An L4 balancer like a ClusterIP Service: it picks a backend per TCP connection."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends, self.connections = backends, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                backend = self.backends[self.connections % len(self.backends)]
                self.connections += 1
                self.sockets.append(client)
                try:
                    upstream = socket.create_connection(backend)
                except OSError:
                    client.close()  # like a Service with a dead endpoint: the client retries
                    continue
                self.sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the other side or close() ended the connection


def test_connection_level_balancer_pins_each_api_to_one_replica(cluster: Cluster) -> None:
    """Even with round_robin, one address means one connection: the L4 balancer decides once."""
    replicas = cluster.replicas()
    balancer = ConnectionBalancer([(h, cluster.port) for h in HOSTS])
    cluster.stack.callback(balancer.close)
    apis = [cluster.api(f"127.0.0.1:{balancer.port}") for _ in range(2)]
    counts = []
    for load in apis:
        before = [served(r) for r in replicas]
        assert load.run(60) == []
        counts.append(sorted(served(r) - b for r, b in zip(replicas, before, strict=True)))
    assert counts == [[0, 0, 60], [0, 0, 60]]
    assert sorted(served(r) for r in replicas) == [0, 60, 60]  # one replica idles


# --- replicas leaving ---------------------------------------------------------------------------


def test_replica_stopped_mid_call_costs_no_caller_a_failure(cluster: Cluster) -> None:
    """``server.stop(0)`` while a call runs on it: gRPC retries it elsewhere (UNAVAILABLE or
    CANCELLED), or, if response headers had already arrived, the API issues it once more."""
    replicas = cluster.replicas()
    load = cluster.api(ipv4_target(HOSTS, cluster.port))
    victim = replicas[0]

    def kill() -> None:
        wait_for(lambda: in_flight(victim) >= 1, "a call running on the victim")
        victim.server.stop(0)

    assert load.run(150, midway=kill) == []
    assert served(victim) >= 1
    assert served(replicas[1]) + served(replicas[2]) >= 100


def test_replica_killed_with_sigkill_costs_no_caller_a_failure(cluster: Cluster) -> None:
    """A real process killed outright: its connections reset, calls on them are re-sent."""
    replicas = cluster.replicas(HOSTS[1:])
    victim = ProcessorProcess(cluster.settings(HOSTS[0]))
    cluster.stack.callback(victim.stop)
    victim.wait_ready(cluster.client_tls())
    load = cluster.api(ipv4_target(HOSTS, cluster.port))
    assert load.run(150, midway=victim.kill) == []
    assert sum(served(r) for r in replicas) < 150  # the victim did serve some before it died


class ProcessorProcess:
    """``imagescaler-processor`` in its own process, so it can be killed with SIGKILL."""

    def __init__(self, settings: ProcessorSettings) -> None:
        args = [
            sys.executable,
            "-c",
            "from processor.server import main; main()",
            *("--listen", settings.listen, "--workers", str(settings.workers)),
            *("--tls-cert", str(settings.tls_cert), "--tls-key", str(settings.tls_key)),
            *("--tls-client-ca", str(settings.tls_client_ca), "--allow-client", API_IDENTITY),
            *("--metrics-port", "0", "--log-level", "error"),
        ]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        self.address = settings.listen
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)

    def wait_ready(self, tls: ClientTls) -> None:
        with ReloadingChannel(self.address, tls) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            reply = check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT, wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def test_draining_replica_gets_no_new_calls(cluster: Cluster) -> None:
    """Health checking: once a replica reports NOT_SERVING the balancer stops picking it."""
    replicas = cluster.replicas()
    load = cluster.api(ipv4_target(HOSTS, cluster.port))
    assert load.run(30) == []
    draining = replicas[0]
    draining.health.enter_graceful_shutdown()  # what a SIGTERM does first (processor.serving)
    streak = calls = 0
    while streak < 30 and calls < 300:
        before = served(draining)
        assert load.call() is None
        calls += 1
        streak = streak + 1 if served(draining) == before else 0
    assert streak == 30, "the draining replica kept receiving calls"
    before = served(draining)
    assert load.run(60) == []
    assert served(draining) == before
    draining.stop(grace=5)
    assert load.run(30) == []


# --- replicas arriving --------------------------------------------------------------------------


class FakeDns:
    """A DNS server on loopback answering every A query with ``addresses`` (TTL 0).

    gRPC's resolver takes the server from the target: ``dns://127.0.0.1:PORT/name:port``, so
    a resolution that changes, as a headless Service's does, needs nothing outside loopback.
    """

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.sock.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        end = 12
        while query[end]:
            end += query[end] + 1
        question = query[12 : end + 5]
        qtype = struct.unpack(">H", query[end + 1 : end + 3])[0]
        addresses = self.addresses if qtype == 1 else []  # A records only; AAAA: none
        records = b"".join(
            struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(a) for a in addresses
        )
        header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, len(addresses), 0, 0)
        return header + question + records

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def test_new_replica_gets_traffic_within_the_connection_age(cluster: Cluster) -> None:
    """Scale-out: the processor's max connection age makes the API reconnect and re-resolve.

    The age is the API's re-resolution interval here: a shorter age would wait for that.
    """
    age = forwarding.MIN_RESOLUTION_INTERVAL_MS / 1000
    cluster.replicas(HOSTS[:2], max_connection_age=age, grace=1.0)
    dns = FakeDns(list(HOSTS[:2]))
    cluster.stack.callback(dns.close)
    load = cluster.api(f"dns://127.0.0.1:{dns.port}/processor.test:{cluster.port}")
    assert load.run(30) == []

    added = cluster.replica(HOSTS[2], max_connection_age=age, grace=1.0)
    dns.addresses = list(HOSTS)
    started = time.monotonic()
    while served(added) == 0 and time.monotonic() - started < 3 * age:
        assert load.call() is None
    waited = time.monotonic() - started
    assert served(added) > 0, f"the new replica got no call in {waited:.1f} s"
    assert waited < age * 1.1 + 1.5  # gRPC jitters the age by up to 10%; then one handshake
    before = served(added)
    assert load.run(150) == []
    assert served(added) - before >= 30  # its share from now on


# --- certificate rotation -------------------------------------------------------------------


class ClientSerials(ProcessorService):
    """The real servicer, noting the serial of the client certificate behind each call."""

    def __init__(self, limits: imaging.Limits, metrics: PipelineMetrics) -> None:
        super().__init__(limits, metrics)
        self.seen: list[int] = []

    def Process(self, request: Received, context: grpc.ServicerContext) -> Any:
        pem = context.auth_context()["x509_pem_cert"][0]
        self.seen.append(x509.load_pem_x509_certificate(pem).serial_number)
        return super().Process(request, context)


def recording_replica(settings: ProcessorSettings, stack: ExitStack) -> ClientSerials:
    """A replica assembled like ``processor.server.build_server``, with :class:`ClientSerials`."""
    registry = CollectorRegistry()
    server = processor_server.grpc_server(settings, serving.InFlight(), registry)
    limits = imaging.Limits(max_bytes=settings.max_input_bytes, max_pixels=settings.max_pixels)
    service = ClientSerials(limits, PipelineMetrics(registry))
    add_to_server(service, server)
    serving.add_health_and_reflection(server, [processor_server.SERVICE_NAME])
    serving.bind(server, settings.listen, processor_server.credentials(settings))
    server.start()
    stack.callback(server.stop, None)
    return service


def served_serial(host: str, port: int, pki: Pki) -> int:
    """Serial of the certificate a replica presents to a new TLS connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only looking at what is presented
    context.load_cert_chain(pki.api_cert, pki.api_key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=TIMEOUT) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificates_rotated_mid_load(cluster: Cluster) -> None:
    replicas = cluster.replicas(HOSTS[:2])
    recorder = recording_replica(cluster.settings(HOSTS[2]), cluster.stack)
    load = cluster.api(ipv4_target(HOSTS, cluster.port))
    old_client = cluster.pki.api_cert.read_bytes()
    server_cert = certs.issue(cluster.ca, "processor", purpose="server", names=[SERVER_NAME])
    client_cert = cluster.client_cert()

    def rotate() -> None:
        server_cert.write(cluster.pki.processor_cert, cluster.pki.processor_key)
        client_cert.write(cluster.pki.api_cert, cluster.pki.api_key)

    assert load.run(300, midway=rotate) == []
    assert min(served(r) for r in replicas) >= 50
    for host in HOSTS:
        assert served_serial(host, cluster.port, cluster.pki) == server_cert.cert.serial_number
    old_serial = x509.load_pem_x509_certificate(old_client).serial_number
    assert recorder.seen[0] == old_serial
    assert recorder.seen[-1] == client_cert.cert.serial_number
    assert set(recorder.seen) == {old_serial, client_cert.cert.serial_number}


# --- refusals -------------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)
HANDSHAKE = "no connection or TLS handshake failed"
IDENTITY = "the API's identity"  # refused by the servicer, or by the health check first


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda c: {"cert": c.client_cert(ca=certs.new_authority("other CA"))},
            HANDSHAKE,
            id="other-ca",
        ),
        pytest.param(
            lambda c: {"cert": c.client_cert(not_before=NOW - datetime.timedelta(days=10), days=9)},
            HANDSHAKE,
            id="expired",
        ),
        pytest.param(
            lambda c: {"cert": c.client_cert("imagescaler-loadgen")},
            IDENTITY,
            id="disallowed-identity",
        ),
        pytest.param(lambda c: {"plaintext": True}, HANDSHAKE, id="plaintext"),
    ],
)
def test_refused_api_identity_reaches_caller_as_unavailable(
    cluster: Cluster, make: Callable[[Cluster], dict[str, Any]], message: str
) -> None:
    """Refusals stay quick and clear despite retries over three replicas, none of which runs."""
    replicas = cluster.replicas()
    setup = make(cluster)
    target = ipv4_target(HOSTS, cluster.port)
    if setup.get("plaintext"):
        plain = dict.fromkeys(("processor_ca", "processor_cert", "processor_key"))
        load = cluster.api(target, processor_insecure=True, **plain)
    else:
        paths = cluster.tmp / "api.crt", cluster.tmp / "api.key"
        setup["cert"].write(*paths)
        load = cluster.api(target, processor_cert=str(paths[0]), processor_key=str(paths[1]))
    started = time.monotonic()
    failure = load.call()
    assert failure is not None and failure[0] == "UNAVAILABLE"
    assert message in failure[1]
    assert time.monotonic() - started < 3
    assert sum(served(r) for r in replicas) == 0


# --- settings that must agree --------------------------------------------------------------


def test_client_keepalive_respects_the_processor_ping_policy() -> None:
    """A client pinging more often than the server permits is sent GOAWAY too_many_pings."""
    client: dict[str, Any] = dict(forwarding.channel_options(1 << 20))
    server: dict[str, Any] = dict(processor_server.server_options(ProcessorSettings(insecure=True)))
    assert (
        client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    )
    assert (
        client["grpc.keepalive_permit_without_calls"]
        <= server["grpc.keepalive_permit_without_calls"]
    )
    assert server["grpc.max_connection_age_grace_ms"] > 0


def test_retry_buffer_holds_the_largest_request() -> None:
    """gRPC commits (stops retrying) a call whose request outgrows the buffer: 256 KiB default."""
    limit = 32 * 1024 * 1024
    options = dict(forwarding.channel_options(limit))
    assert options["grpc.per_rpc_retry_buffer_size"] >= options["grpc.max_send_message_length"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll a condition the test cannot be notified of (a server-side gauge)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)
