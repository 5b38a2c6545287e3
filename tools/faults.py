"""``python -m tools.faults SCENARIO``: break one thing under load and measure what clients see.

Each scenario starts the whole stack as subprocesses on loopback (processors and the API with
mutual TLS and JWT, plus Redis or a storage emulator when it needs them), drives open-loop load
with :mod:`tools.loadgen`'s machinery, injects its fault on a fixed timeline and prints the
outcome: status counts and latency before, during and after the fault, the time to recover, and
whether the promise of ``docs/reliability.md`` held. ``tests/faults`` runs CI-sized versions.

    python -m tools.faults list
    python -m tools.faults redis-down --rate 40 --duration 20
    python -m tools.faults all --json > faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from api.pb import imagescaler_pb2 as pb
from auth import keys
from auth.tokens import mint
from tools import certs, loadgen
from tools.bench import closed_loop

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "seed-sample.jpg"
TENANT = "load"
OTHER_TENANT = "bystander"
STARTUP_LIMIT = 60.0  # seconds for any server to report its port
TENANTS = f"""\
tenants:
  - id: {TENANT}
    scopes: [scale:content, scale:url, results:store]
    rate_limit: 100000/second
    pixel_limit: 100000000/minute
    storage: {{storage}}
  - id: {OTHER_TENANT}
    scopes: [scale:content]
    rate_limit: 100000/second
    pixel_limit: 100000000/minute
"""


# --- ports and processes -------------------------------------------------------------------


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that cannot report theirs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a live process (Linux), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def wait_for(check: Callable[[], bool], limit: float, what: str, every: float = 0.05) -> None:
    """Poll ``check`` until true; bounded in time (readiness polling, not synchronisation)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise TimeoutError(f"{what}: not ready after {limit:g} s")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Server:
    """One server subprocess; ``restart()`` brings it back on the port it had."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ready: Callable[[Server], int] | None = None
    log_offset: int = 0  # where this run's lines start in the (appended) log

    def start(self) -> Server:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=log
            )
        return self

    def wait_ready(self) -> Server:
        assert self.ready is not None
        self.port = self.ready(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int | None:
        return rss_bytes(self.pid) if self.alive() else None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: the process dies mid-whatever, as on a node failure or OOM kill."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, limit: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            return None

    def restart(self) -> Server:
        """Start again on the same port (the address the API was configured with)."""
        return self.restart_begin().wait_ready()

    def restart_begin(self) -> Server:
        self.argv = [a.replace("127.0.0.1:0", f"127.0.0.1:{self.port}") for a in self.argv]
        return self.start()

    def stop(self) -> None:
        if self.alive():
            self.kill()

    def log_lines(self, everything: bool = False) -> list[dict[str, Any]]:
        """JSON log lines of the current run (or all runs); other lines (gRPC core) skipped."""
        with self.log.open("rb") as f:
            f.seek(0 if everything else self.log_offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out


def port_from_log(server: Server) -> int:
    """The port our servers log in their ``serving`` line (they listen on port 0)."""

    def logged() -> int | None:
        for entry in server.log_lines():
            if entry.get("message") == "serving" and entry.get("port"):
                return int(entry["port"])
        return None

    found: list[int] = []

    def check() -> bool:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited during startup; see {server.log}")
        port = logged() if server.port == 0 else (server.port if accepts(server.port) else None)
        if port:
            found.append(port)
        return bool(found)

    wait_for(check, STARTUP_LIMIT, server.name)
    return found[-1]


def port_when_accepting(server: Server) -> int:
    """For servers started on a chosen port (Redis, the storage emulator)."""

    def check() -> bool:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited during startup; see {server.log}")
        return accepts(server.port)

    wait_for(check, STARTUP_LIMIT, server.name)
    return server.port


def metric_sum(port: int, name: str) -> float:
    """Sum of every sample of one metric on a ``/metrics`` endpoint (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


# --- the stack -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StackSpec:
    """What to run. Extra arguments are passed to every processor / the API as given."""

    processors: int = 2
    processor_workers: int = 2
    processor_queue: int = 8
    processor_args: tuple[str, ...] = ()
    apis: int = 1
    api_args: tuple[str, ...] = ()
    redis: bool = False
    storage: bool = False  # a GCS emulator, results stored (tenant storage: require)
    log_level: str = "info"


@dataclass
class Credentials:
    """Development PKI, JWKS, tenant registry and a token for each tenant, in one directory."""

    directory: Path
    pki: certs.Pki
    jwks: Path
    tenants: Path
    tokens: dict[str, str]
    service_account: Path | None = None

    @classmethod
    def create(cls, directory: Path, storage: bool = False) -> Credentials:
        pki = certs.create_dev_pki(directory / "certs", overwrite=True)
        key = keys.generate_private_key()
        jwks = directory / "jwks.json"
        jwks.write_text(json.dumps({"keys": [keys.public_jwk(key, "faults")]}))
        tenants = directory / "tenants.yaml"
        tenants.write_text(TENANTS.format(storage="require" if storage else "forbid"))
        scopes = {TENANT: ["scale:content", "scale:url", "results:store"]}
        tokens = {
            tenant: mint(key, "faults", tenant=tenant, scopes=scopes.get(tenant, ["scale:content"]))
            for tenant in (TENANT, OTHER_TENANT)
        }
        account = write_service_account(directory / "sa.json") if storage else None
        return cls(directory, pki, jwks, tenants, tokens, account)


def write_service_account(path: Path) -> Path:
    """A throwaway service-account key: V4 signing works offline (the emulator ignores it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    info = {
        "type": "service_account",
        "project_id": "faults",
        "private_key_id": "faults-1",
        "private_key": pem.decode(),
        "client_email": "faults@faults.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


BUCKET = "faults-results"


class Stack:
    """Processors, API(s) and their dependencies as subprocesses; ``close()`` kills them all."""

    def __init__(self, spec: StackSpec, directory: Path) -> None:
        self.spec, self.dir = spec, directory
        self.creds = Credentials.create(directory, spec.storage)
        self.env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1"}
        self.redis: Server | None = None
        self.storage: Server | None = None
        self.processors: list[Server] = []
        self.apis: list[Server] = []
        self.redis_via = self.storage_via = 0  # the ports the API dials (proxies may sit there)

    # -- lifecycle

    def start(self, prepare: Callable[[Stack], None] | None = None) -> Stack:
        """Dependencies first, then ``prepare`` (e.g. a proxy in front of one), then servers."""
        if self.spec.redis:
            self.redis = self._redis().start().wait_ready()
            self.redis_via = self.redis.port
        if self.spec.storage:
            self.storage = self._emulator().start().wait_ready()
            self.storage_via = self.storage.port
        if prepare is not None:
            prepare(self)
        if self.storage is not None:
            self.env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{self.storage_via}"
        self.processors = [self._processor(i).start() for i in range(self.spec.processors)]
        for p in self.processors:
            p.wait_ready()
        self.apis = [self._api(i).start() for i in range(self.spec.apis)]
        for a in self.apis:
            a.wait_ready()
        return self

    def close(self) -> None:
        for server in [*self.apis, *self.processors, self.redis, self.storage]:
            if server is not None:
                server.stop()

    def servers(self) -> list[Server]:
        """The service's own processes (what RSS and crash checks look at)."""
        return [*self.apis, *self.processors]

    # -- addresses

    @property
    def api(self) -> Server:
        return self.apis[0]

    def api_target(self) -> str:
        """One API's address, or all of them for a client-side pick."""
        if len(self.apis) == 1:
            return f"127.0.0.1:{self.api.port}"
        return "ipv4:" + ",".join(f"127.0.0.1:{a.port}" for a in self.apis)

    def processor_target(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{p.port}" for p in self.processors)

    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_via}/0"

    def target(self, tenant: str = TENANT, **overrides: Any) -> loadgen.Target:
        """A load generator target on the API(s) with this tenant's token."""
        values: dict[str, Any] = {
            "server": self.api_target(),
            "token": self.creds.tokens[tenant],
            "connections": 4,
            "max_in_flight": 512,
            "timeout": 10.0,
            "served_by_key": "ratelimit-limit",
            **overrides,
        }
        return loadgen.Target(**values)

    # -- how each server is started

    def _python(self, name: str, module: str, args: Sequence[str]) -> Server:
        argv = [sys.executable, "-m", module, *args]
        return Server(name, argv, self.dir / f"{name}.log", self.env, ready=port_from_log)

    def _processor(self, index: int) -> Server:
        pki, metrics = self.creds.pki, free_port()
        args = [
            "--listen", "127.0.0.1:0",
            "--tls-cert", str(pki.processor_cert),
            "--tls-key", str(pki.processor_key),
            "--tls-client-ca", str(pki.ca_cert),
            "--allow-client", certs.API_IDENTITY,
            "--metrics-port", str(metrics),
            "--workers", str(self.spec.processor_workers),
            "--queue", str(self.spec.processor_queue),
            "--log-level", self.spec.log_level,
            *self.spec.processor_args,
        ]  # fmt: skip
        server = self._python(f"processor{index}", "processor.server", args)
        server.metrics_port = metrics
        return server

    def _api(self, index: int) -> Server:
        pki, c, metrics = self.creds.pki, self.creds, free_port()
        args = [
            "--listen", "127.0.0.1:0",
            "--processor", self.processor_target(),
            "--processor-ca", str(pki.ca_cert),
            "--processor-cert", str(pki.api_cert),
            "--processor-key", str(pki.api_key),
            "--processor-server-name", "localhost",
            "--jwks", str(c.jwks),
            "--tenants", str(c.tenants),
            "--metrics-port", str(metrics),
            "--log-level", self.spec.log_level,
            *self._api_dependencies(),
            *self.spec.api_args,
        ]  # fmt: skip
        server = self._python(f"api{index}", "api.server", args)
        server.metrics_port = metrics
        return server

    def _api_dependencies(self) -> list[str]:
        args = []
        if self.redis is not None:
            args += ["--ratelimit-storage", self.redis_url()]
        if self.storage is not None:
            assert self.creds.service_account is not None
            args += ["--result-store", f"gs://{BUCKET}/results"]
            args += ["--result-signing-key", str(self.creds.service_account)]
        return args

    def _redis(self) -> Server:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.dir)]
        server = Server("redis", argv, self.dir / "redis.log", self.env, port=port)
        server.ready = port_when_accepting
        return server

    def _emulator(self) -> Server:
        port = free_port()
        binary = Path(sys.executable).parent / "gcp-storage-emulator"
        argv = [str(binary), "start", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--in-memory", "--default-bucket", BUCKET, "--quiet"]
        server = Server("storage", argv, self.dir / "storage.log", self.env, port=port)
        server.ready = port_when_accepting
        return server


@contextmanager
def running(
    spec: StackSpec,
    directory: Path | None = None,
    prepare: Callable[[Stack], None] | None = None,
) -> Iterator[Stack]:
    """A started stack in ``directory`` (a temporary one by default), killed on exit."""
    with ExitStack() as cleanup:
        if directory is None:
            directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="faults-")))
        directory.mkdir(parents=True, exist_ok=True)
        stack = Stack(spec, directory)
        cleanup.callback(stack.close)
        yield stack.start(prepare)


# --- load with a fault timeline ------------------------------------------------------------


class Event(NamedTuple):
    """One finished request; times in seconds from the start of the load."""

    sent: float
    done: float
    code: str
    latency: float  # from the scheduled start, as loadgen reports it
    quota: str | None  # the reply's ratelimit-limit (None: no limiter verdict)


@dataclass
class Timeline(loadgen.Stats):
    """loadgen's statistics plus every request's times and code, to cut into phases."""

    origin: float = field(default_factory=time.monotonic)
    events: list[Event] = field(default_factory=list)

    def finished(self, code: str, scheduled: float, sent: float, replica: str | None) -> None:
        super().finished(code, scheduled, sent, replica)
        now = time.monotonic()
        event = Event(sent - self.origin, now - self.origin, code, now - scheduled, replica)
        with self.lock:
            self.events.append(event)

    def snapshot(self) -> list[Event]:
        with self.lock:
            return list(self.events)


class Action(NamedTuple):
    """Something done to the stack ``at`` seconds into the load (``name`` marks the moment)."""

    at: float
    name: str
    do: Callable[[], object]


class FaultClock(threading.Thread):
    """Runs the actions at their times; records when each began and ended (load seconds)."""

    def __init__(self, actions: Sequence[Action], origin: float, stop: threading.Event) -> None:
        super().__init__(name="faults", daemon=True)
        self.actions = sorted(actions, key=lambda a: a.at)
        self.origin, self.stop = origin, stop
        self.marks: dict[str, tuple[float, float]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        for action in self.actions:
            if self.stop.wait(max(0.0, self.origin + action.at - time.monotonic())):
                return  # the load ended first
            began = time.monotonic() - self.origin
            try:
                action.do()
            except BaseException as exc:  # reported by drive(), which stops the load
                self.error = exc
                self.stop.set()
                return
            self.marks[action.name] = (began, time.monotonic() - self.origin)


@dataclass
class Run:
    """What one load run saw: the requests, the fault marks, loadgen's report; times are
    seconds from ``origin`` (``time.monotonic()`` when the load began)."""

    events: list[Event]
    marks: dict[str, tuple[float, float]]
    report: loadgen.Report
    origin: float


def drive(
    target: loadgen.Target,
    profile: loadgen.Profile,
    actions: Sequence[Action] = (),
    requests: Sequence[pb.ScaleImageRequest] | None = None,
    images: Sequence[bytes] | None = None,
    follow_health: bool = False,
) -> Run:
    """Open-loop load per ``profile`` while ``actions`` run on their own timeline."""
    stats = Timeline()
    if follow_health:
        target = replace(target, service_config=FOLLOW_HEALTH)
    runner = loadgen.Runner(target, images or [SAMPLE.read_bytes()], stats)
    if requests is not None:
        runner.requests = [r.SerializeToString() for r in requests]
    clock = FaultClock(actions, time.monotonic(), runner.stop)
    stats.origin = clock.origin
    clock.start()
    try:
        runner.run(loadgen.arrivals(profile), lambda: None)
        dispatch = time.monotonic() - clock.origin
        runner.drain(lambda: None)
    finally:
        runner.stop.set()
        clock.join(60)
        runner.close()
    if clock.error is not None:
        raise RuntimeError(f"fault action failed: {clock.error!r}") from clock.error
    total = time.monotonic() - clock.origin
    report = loadgen.build_report(profile, target, stats, dispatch, total, False)
    return Run(stats.snapshot(), clock.marks, report, clock.origin)


# What a load balancer that honours readiness does, and what the API does towards processors:
# round_robin with client-side health checking, so a server reporting NOT_SERVING (draining)
# gets no new calls from this client.
FOLLOW_HEALTH = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {
            "serviceName": pb.DESCRIPTOR.services_by_name["ImageScaler"].full_name
        },
    }
)


def in_parallel(*jobs: Callable[[], Run]) -> list[Run]:
    """Several load runs at once (e.g. a victim tenant and a bystander)."""
    results: list[Run | BaseException | None] = [None] * len(jobs)

    def work(i: int, job: Callable[[], Run]) -> None:
        try:
            results[i] = job()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if isinstance(r, Run)]


# --- what the clients saw ------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """Requests sent in one window: status counts and latency (ms, from the scheduled start)."""

    requests: int
    codes: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    p99_ms_by_code: dict[str, float]

    def failed(self) -> int:
        return self.requests - self.codes.get("OK", 0)


def phase(events: Sequence[Event], start: float = 0.0, end: float = float("inf")) -> Phase:
    """The requests *sent* in ``[start, end)``."""
    return summarize([e for e in events if start <= e.sent < end])


def summarize(chosen: Sequence[Event]) -> Phase:
    ms = sorted(e.latency * 1000 for e in chosen)
    by_code: dict[str, list[float]] = {}
    for e in chosen:
        by_code.setdefault(e.code, []).append(e.latency * 1000)
    return Phase(
        requests=len(chosen),
        codes=dict(Counter(e.code for e in chosen).most_common()),
        p50_ms=round(loadgen.percentile(ms, 0.50), 1),
        p99_ms=round(loadgen.percentile(ms, 0.99), 1),
        max_ms=round(ms[-1], 1) if ms else 0.0,
        p99_ms_by_code={
            k: round(loadgen.percentile(sorted(v), 0.99), 1) for k, v in by_code.items()
        },
    )


def recovery(
    events: Sequence[Event], since: float, good: Callable[[Event], bool] = lambda e: e.code == "OK"
) -> float | None:
    """Seconds from ``since`` to the first request sent after it from which on all were good.

    None if the last request was still bad (not recovered within the run).
    """
    later = sorted((e for e in events if e.sent >= since), key=lambda e: e.sent)
    bad = [i for i, e in enumerate(later) if not good(e)]
    if not bad:
        return 0.0 if later else None
    if bad[-1] + 1 >= len(later):
        return None
    return round(later[bad[-1] + 1].sent - since, 3)


def in_flight_at(events: Sequence[Event], moment: float) -> list[Event]:
    """Requests sent before ``moment`` that had not finished by then."""
    return [e for e in events if e.sent < moment < e.done]


@dataclass
class Result:
    """One scenario's measured outcome and whether the promise held (``problems`` empty)."""

    scenario: str
    promise: str
    phases: dict[str, Phase] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def text(self) -> str:
        lines = [f"== {self.scenario}", f"promise   {self.promise}"]
        for name, (began, ended) in self.marks.items():
            lines.append(f"at {began:6.2f}-{ended:6.2f} s  {name}")
        for name, p in self.phases.items():
            codes = ", ".join(f"{k} {v}" for k, v in p.codes.items()) or "none"
            by_code = ", ".join(f"{k} {v:.0f}" for k, v in p.p99_ms_by_code.items())
            lines.append(
                f"{name:<9} {p.requests} requests: {codes}; p50 {p.p50_ms:.0f} ms, "
                f"p99 {p.p99_ms:.0f} ms, max {p.max_ms:.0f} ms (p99 by code: {by_code})"
            )
        lines += [f"measured  {k}: {v}" for k, v in self.measured.items()]
        verdict = "HELD" if not self.problems else "BROKEN: " + "; ".join(self.problems)
        lines.append(f"verdict   {verdict}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- network faults ------------------------------------------------------------------------


class BlackHole:
    """A listener that accepts connections and never answers (nor closes) until closed."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = int(self._sock.getsockname()[1])
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="blackhole", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    @property
    def connections(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for conn in self._held:
            conn.close()


class DelayProxy:
    """A TCP proxy that holds each chunk from the server for ``delay`` seconds.

    ``delay`` may change at any time (the fault); ``None`` black-holes: bytes from the client
    still go up, answers never come back. One thread per direction per connection; all end
    when the proxy closes.
    """

    def __init__(self, upstream_port: int, delay: float | None = 0.0) -> None:
        self.upstream, self.delay = upstream_port, delay
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns += [client, server]
        for src, dst, delayed in ((client, server, False), (server, client, True)):
            threading.Thread(target=self._pump, args=(src, dst, delayed), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        src.settimeout(0.1)
        while not self._stop.is_set():
            try:
                chunk = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk or not self._hold(delayed):
                break
            try:
                dst.sendall(chunk)
            except OSError:
                break
        for s in (src, dst):
            s.close()

    def _hold(self, delayed: bool) -> bool:
        """Wait out the current delay (False if the proxy closed meanwhile)."""
        while delayed and self.delay is None:
            if self._stop.wait(0.1):
                return False
        return not (delayed and self._stop.wait(self.delay or 0.0))

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            for s in self._conns:
                s.close()


# --- scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """How hard and how long: ``rate`` requests/s for ``duration`` s (faults at fixed
    fractions of it). ``api_args``/``processor_args`` try a knob without editing defaults."""

    rate: float = 20.0
    duration: float = 15.0
    api_args: tuple[str, ...] = ()
    processor_args: tuple[str, ...] = ()
    capacity: float | None = None  # overload: a capacity measured before (skips measuring)
    probe: int = 0  # overload: instead, a 2 s closed loop with this many calls in flight

    def at(self, fraction: float) -> float:
        return round(self.duration * fraction, 3)

    def profile(self, rate: float | None = None) -> loadgen.Profile:
        return loadgen.Profile("constant", rate or self.rate, self.duration)

    def spec(self, **values: Any) -> StackSpec:
        api = (*values.pop("api_args", ()), *self.api_args)
        processor = (*values.pop("processor_args", ()), *self.processor_args)
        return StackSpec(api_args=api, processor_args=processor, **values)


def three_phases(result: Result, run: Run, fault: str, repair: str) -> None:
    """before (finished before the fault), hit (in flight when it began), during, repairing
    (while the repair ran) and after: cut where the fault began and the repair ended."""
    began, (mending, ended) = run.marks[fault][0], run.marks[repair]
    result.phases = {
        "before": summarize([e for e in run.events if e.done < began]),
        "hit": summarize(in_flight_at(run.events, began)),
        "during": phase(run.events, began, mending),
        "repairing": phase(run.events, mending, ended),
        "after": phase(run.events, ended),
    }
    for name in ("hit", "repairing"):
        if not result.phases[name].requests:
            del result.phases[name]
    result.marks = run.marks


def redis_down(scale: Scale, workdir: Path | None = None, policy: str = "open") -> Result:
    """Redis (rate-limit counters) killed, then restarted on its port."""
    promise = (
        "fail-open: every request served, storage errors counted; recovers when Redis returns"
        if policy == "open"
        else "fail-closed: UNAVAILABLE fast (p99 < 250 ms) while Redis is down; recovers"
    )
    result = Result(f"redis-down-{policy}", promise)
    spec = scale.spec(redis=True, api_args=("--ratelimit-failure", policy))
    with running(spec, workdir) as stack:
        assert stack.redis is not None
        errors = "imagescaler_ratelimit_storage_errors_total"
        counted = metric_sum(stack.api.metrics_port, errors)
        actions = [
            Action(scale.at(0.3), "redis killed", stack.redis.kill),
            Action(scale.at(0.6), "redis restarted", stack.redis.restart),
        ]
        run = drive(stack.target(), scale.profile(), actions)
        counted = metric_sum(stack.api.metrics_port, errors) - counted
    three_phases(result, run, "redis killed", "redis restarted")
    restarted = run.marks["redis restarted"][1]
    limited = recovery(run.events, restarted, lambda e: e.code == "OK" and e.quota is not None)
    result.measured = {
        "storage errors counted": counted,
        "served without a limiter verdict": sum(e.quota is None for e in run.events),
        "recovered (limiter verdicts again) after Redis returned, s": limited,
    }
    during, after = result.phases["during"], result.phases["after"]
    result.expect(result.phases["before"].failed() == 0, "failures before the fault")
    result.expect(limited is not None and limited < 5, "limiter did not recover within 5 s")
    if policy == "open":
        result.expect(during.failed() == 0 and after.failed() == 0, "requests failed")
        result.expect(counted > 0, "storage failures were not counted")
    else:
        unavailable = during.codes.get("UNAVAILABLE", 0)
        result.expect(unavailable > 0.8 * during.requests, "not refused while Redis was down")
        fast = during.p99_ms_by_code.get("UNAVAILABLE", 0) < 250
        result.expect(fast, "UNAVAILABLE was not fast (p99 >= 250 ms)")
    return result


def redis_down_closed(scale: Scale, workdir: Path | None = None) -> Result:
    """Redis killed and restarted, with --ratelimit-failure closed."""
    return redis_down(scale, workdir, policy="closed")


def redis_slow(
    scale: Scale, workdir: Path | None = None, delays: Sequence[float] = (0.05, 0.5)
) -> Result:
    """Redis behind a proxy that holds its answers: none, then each of ``delays`` in turn."""
    timeout = 0.1  # --ratelimit-timeout's default, set explicitly below
    result = Result(
        "redis-slow",
        f"every request served; a slow Redis adds at most about one limiter timeout "
        f"({timeout * 1000:.0f} ms, one budget for all of a request's Redis calls) to a request "
        "(fail-open)",
    )
    spec = scale.spec(redis=True, api_args=("--ratelimit-timeout", str(timeout)))
    names = [f"{d * 1000:.0f} ms" for d in delays]
    with ExitStack() as cleanup:

        def proxy_redis(stack: Stack) -> None:
            proxies.append(cleanup.enter_context(closing(DelayProxy(stack.redis_via))))
            stack.redis_via = proxies[0].port

        proxies: list[DelayProxy] = []
        stack = cleanup.enter_context(running(spec, workdir, proxy_redis))
        step = 1 / (len(delays) + 1)
        actions = [
            Action(scale.at(step * (k + 1)), name, partial(setattr, proxies[0], "delay", delay))
            for k, (name, delay) in enumerate(zip(names, delays, strict=True))
        ]
        run = drive(stack.target(), scale.profile(), actions)
        counted = metric_sum(stack.api.metrics_port, "imagescaler_ratelimit_storage_errors_total")
    cuts = [0.0, *(run.marks[n][0] for n in names), float("inf")]
    result.marks = run.marks
    result.phases = {
        name: phase(run.events, a, b)
        for name, a, b in zip(["no delay", *names], cuts[:-1], cuts[1:], strict=True)
    }
    base = result.phases["no delay"].p50_ms
    added = {n: round(result.phases[n].p50_ms - base, 1) for n in names}
    result.measured = {
        "storage errors counted": counted,
        "p50 added by each delay, ms": added,
        "served without a limiter verdict": sum(e.quota is None for e in run.events),
    }
    result.expect(all(p.failed() == 0 for p in result.phases.values()), "requests failed")
    for name in names:
        slow = added[name] >= 1.5 * timeout * 1000
        result.expect(not slow, f"Redis answering in {name} delayed requests by {added[name]} ms")
    return result


def when_busy(server: Server, act: Callable[[], object], limit: float = 3.0) -> Callable[[], bool]:
    """Do ``act`` as soon as ``server``'s metrics show a call in progress (or after ``limit``
    seconds); the returned action says whether one was in progress."""

    def busy() -> bool:
        return metric_sum(server.metrics_port, "grpc_server_in_flight") > 0

    def action() -> bool:
        deadline, caught = time.monotonic() + limit, False
        while not caught and time.monotonic() < deadline:
            caught = busy()
        act()
        return caught

    return action


def replica_killed(scale: Scale, workdir: Path | None = None) -> Result:
    """One of two processors SIGKILLed while it works on a request."""
    result = Result(
        "replica-killed",
        "zero client failures: calls on the killed replica are retried on the other one",
    )
    killed: list[float] = []
    caught: list[bool] = []
    with running(scale.spec(processors=2), workdir) as stack:
        victim = stack.processors[0]

        def kill() -> None:
            killed.append(time.monotonic())
            victim.kill()

        act = when_busy(victim, kill)
        actions = [Action(scale.at(0.4), "processor0 killed", lambda: caught.append(act()))]
        run = drive(stack.target(), scale.profile(), actions)
    moment = killed[0] - run.origin
    result.marks = run.marks
    result.phases = {"before": phase(run.events, 0, moment), "after": phase(run.events, moment)}
    hit = in_flight_at(run.events, moment)
    result.measured = {
        "processor0 was serving a call when killed": caught[0],
        "client requests in flight at the kill": len(hit),
        "of which failed": sum(e.code != "OK" for e in hit),
        "failed codes overall": {k: v for k, v in run.report.codes.items() if k != "OK"},
    }
    result.expect(caught[0], "could not catch processor0 mid-request")
    result.expect(run.report.codes.get("OK", 0) == run.report.completed, "client requests failed")
    return result


def kill_all(servers: Sequence[Server]) -> None:
    for server in servers:
        server.kill()


def restart_all(servers: Sequence[Server]) -> None:
    """Start them all, then wait for each (they come up in parallel)."""
    for server in servers:
        server.restart_begin()
    for server in servers:
        server.wait_ready()


def processors_down(
    scale: Scale, workdir: Path | None = None, at: tuple[float, float] = (0.3, 0.6)
) -> Result:
    """Every processor killed, then restarted on its port (at these fractions of the run)."""
    result = Result(
        "processors-down",
        "UNAVAILABLE fast (p99 < 500 ms) while no processor runs; OK again within 5 s of return",
    )
    with running(scale.spec(processors=2), workdir) as stack:
        actions = [
            Action(scale.at(at[0]), "processors killed", partial(kill_all, stack.processors)),
            Action(scale.at(at[1]), "processors restarted", partial(restart_all, stack.processors)),
        ]
        run = drive(stack.target(), scale.profile(), actions)
    three_phases(result, run, "processors killed", "processors restarted")
    back = recovery(run.events, run.marks["processors restarted"][1])
    during = result.phases["during"]
    # Calls already at a processor when it died are judged by replica-killed, not here.
    settled = phase(
        run.events, run.marks["processors killed"][1] + 0.5, run.marks["processors restarted"][0]
    )
    result.measured = {
        "recovered after the processors returned, s": back,
        "UNAVAILABLE p99 once settled, ms": settled.p99_ms_by_code.get("UNAVAILABLE"),
    }
    result.expect(result.phases["before"].failed() == 0, "failures before the fault")
    result.expect(settled.codes.get("UNAVAILABLE", 0) == settled.requests, "not UNAVAILABLE")
    result.expect(settled.p99_ms < 500, "UNAVAILABLE was not fast (p99 >= 500 ms)")
    result.expect(back is not None and back < 5, "not recovered within 5 s")
    result.expect(during.requests > 0, "no requests during the outage")
    return result


def storage_down(scale: Scale, workdir: Path | None = None, fallback: bool = False) -> Result:
    """The result store (GCS emulator) killed, then restarted; results stored by policy."""
    promise = (
        "every request served inline (storage_fallback) while storage is down"
        if fallback
        else "UNAVAILABLE within the deadline while storage is down; OK again after"
    )
    result = Result("storage-down" + ("-fallback" if fallback else ""), promise)
    extra = ("--result-fallback-inline",) if fallback else ()
    with running(scale.spec(storage=True, processors=1, api_args=extra), workdir) as stack:
        assert stack.storage is not None
        actions = [
            Action(scale.at(0.3), "storage killed", stack.storage.kill),
            Action(scale.at(0.6), "storage restarted", stack.storage.restart),
        ]
        # Callers that ask for a URL: one that asks only for the bytes gets them either way.
        asking = pb.ScaleImageRequest(
            image=pb.Image(content=SAMPLE.read_bytes()), delivery=pb.DELIVERY_URL_AND_INLINE
        )
        run = drive(stack.target(timeout=10), scale.profile(), actions, requests=[asking])
        inline = sum(e.get("storage") == "fallback-inline" for e in stack.api.log_lines())
    three_phases(result, run, "storage killed", "storage restarted")
    during = result.phases["during"]
    back = recovery(run.events, run.marks["storage restarted"][1])
    result.measured = {"delivered inline instead": inline, "recovered after, s": back}
    result.expect(result.phases["before"].failed() == 0, "failures before the fault")
    result.expect(back is not None and back < 5, "not OK again within 5 s")
    if fallback:
        result.expect(during.failed() == 0, "requests failed despite the fallback")
        result.expect(inline > 0, "no fallback recorded")
    else:
        result.expect(during.codes.get("UNAVAILABLE", 0) > 0, "no UNAVAILABLE during the outage")
        result.expect(during.max_ms < 10_000, "a request outlived its deadline")
    return result


def storage_down_fallback(scale: Scale, workdir: Path | None = None) -> Result:
    """The result store killed and restarted, with --result-fallback-inline."""
    return storage_down(scale, workdir, fallback=True)


def url_requests(port: int) -> list[pb.ScaleImageRequest]:
    source = pb.ImageSource(http_uri=f"http://127.0.0.1:{port}/photo.jpg")
    return [pb.ScaleImageRequest(image=pb.Image(source=source))]


def origin_blackholed(scale: Scale, workdir: Path | None = None) -> Result:
    """URL sources on an origin that accepts and never answers; a second tenant meanwhile."""
    budget = 2.0
    result = Result(
        "origin-blackholed",
        f"DEADLINE_EXCEEDED within the fetch budget ({budget:g} s); the excess over the "
        "tenant's in-flight cap refused fast; another tenant unaffected",
    )
    args = ("--allow-source-cidr", "127.0.0.0/8", "--fetch-timeout", str(budget))
    with closing(BlackHole()) as hole, running(scale.spec(api_args=args), workdir) as stack:
        victim = partial(
            drive, stack.target(timeout=30), scale.profile(), requests=url_requests(hole.port)
        )
        other = partial(drive, stack.target(OTHER_TENANT), scale.profile(scale.rate / 2))
        bad, good = in_parallel(victim, other)
        held = hole.connections
    result.phases = {"blackholed": phase(bad.events), "bystander": phase(good.events)}
    deadline_ms = result.phases["blackholed"].p99_ms_by_code.get("DEADLINE_EXCEEDED", 0)
    result.measured = {
        "connections the origin held": held,
        "DEADLINE_EXCEEDED p99 vs budget, ms": f"{deadline_ms:.0f} vs {budget * 1000:.0f}",
    }
    codes = result.phases["blackholed"].codes
    result.expect(set(codes) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, f"codes {codes}")
    result.expect(0 < deadline_ms < budget * 1000 + 500, "DEADLINE_EXCEEDED not within budget")
    refused = result.phases["blackholed"].p99_ms_by_code.get("RESOURCE_EXHAUSTED", 0)
    result.expect(refused < 250, "the excess was not refused fast")
    result.expect(result.phases["bystander"].failed() == 0, "the other tenant saw failures")
    return result


def api_replicas(scale: Scale, workdir: Path | None = None) -> Result:
    """Two API replicas sharing two processors, both loaded at once (no fault injected)."""
    result = Result("api-replicas", "both API replicas serve every request")
    half = scale.profile(scale.rate / 2)
    with running(scale.spec(apis=2), workdir) as stack:
        targets = [stack.target(server=f"127.0.0.1:{a.port}", timeout=2) for a in stack.apis]
        jobs = [partial(drive, target, half) for target in targets]
        runs = in_parallel(*jobs)
        names = [a.name for a in stack.apis]
    result.phases = {name: phase(run.events) for name, run in zip(names, runs, strict=True)}
    for name, p in result.phases.items():
        result.expect(p.failed() == 0, f"{name}: {p.codes}")
    return result


def terminate(server: Server, record: dict[str, Any]) -> Callable[[], None]:
    """SIGTERM, then wait for the exit (bounded: the grace period is 25 s); notes the moment
    of the signal (monotonic), the exit code and the seconds it took."""

    def act() -> None:
        record["signalled"] = time.monotonic()
        server.signal(signal.SIGTERM)
        record["exit code"] = server.wait(40)
        record["seconds to exit"] = round(time.monotonic() - record["signalled"], 2)

    return act


def sigterm(
    scale: Scale, workdir: Path | None, which: str, client: str = "follows health"
) -> Result:
    """SIGTERM to one of two APIs or one of two processors while it serves a call.

    ``client`` "plain" is pick_first connections that ignore health: they keep sending
    to the draining API until the GOAWAY, and gRPC core cancels what arrives at the instant
    of the stop (docs/reliability.md, finding 3), so only requests in flight at the SIGTERM
    are promised to it.
    """
    plain = client == "plain"
    result = Result(
        f"sigterm-{which}" + ("-plain" if plain else ""),
        "zero failed requests in flight at the SIGTERM; the process drains and exits 0"
        if plain
        else "zero failed requests (in flight or new); the process drains and exits 0",
    )
    record: dict[str, Any] = {}
    caught: list[bool] = []
    with running(scale.spec(apis=2 if which == "api" else 1), workdir) as stack:
        victim = stack.apis[0] if which == "api" else stack.processors[0]
        act = when_busy(victim, terminate(victim, record))
        name = f"SIGTERM {victim.name}"
        actions = [Action(scale.at(0.4), name, lambda: caught.append(act()))]
        follow = which == "api" and not plain  # the processors' client, the API, always does
        run = drive(stack.target(), scale.profile(), actions, follow_health=follow)
    signalled = record["signalled"] - run.origin
    result.marks = run.marks
    result.phases = {
        "before": phase(run.events, 0, signalled),
        "after": phase(run.events, signalled),
    }
    hit = in_flight_at(run.events, signalled)
    late = [e for e in run.events if e.sent >= signalled and e.code != "OK"]
    result.measured = {
        "client": "the API, which follows health" if which == "processor" else client,
        f"{victim.name} was serving a call when signalled": caught[0],
        "client requests in flight at SIGTERM": len(hit),
        "of which failed": sum(e.code != "OK" for e in hit),
        "failed requests sent after it (s after the SIGTERM, code)": [
            (round(e.sent - signalled, 3), e.code) for e in late
        ],
        "exit code": record["exit code"],
        "seconds to exit": record["seconds to exit"],
    }
    if plain:
        failed = result.measured["of which failed"]
        result.expect(failed == 0, "requests in flight at the SIGTERM failed")
    else:
        result.expect(run.report.codes.get("OK", 0) == run.report.completed, "requests failed")
    result.expect(record["exit code"] == 0, f"{victim.name} exited with {record['exit code']}")
    result.expect(caught[0], f"could not catch {victim.name} serving a call")
    return result


def sigterm_api(scale: Scale, workdir: Path | None = None) -> Result:
    """SIGTERM to the API a client is using, with a second API; the client follows health."""
    return sigterm(scale, workdir, "api")


def sigterm_api_plain(scale: Scale, workdir: Path | None = None) -> Result:
    """The same with a plain client (pick_first connections, no health checking)."""
    return sigterm(scale, workdir, "api", client="plain")


def sigterm_processor(scale: Scale, workdir: Path | None = None) -> Result:
    """SIGTERM to one of two processors while it serves a call."""
    return sigterm(scale, workdir, "processor")


class Rollover:
    """A CA rollover on disk in three steps, as an operator (or cert-manager) would do it."""

    def __init__(self, pki: certs.Pki) -> None:
        self.pki = pki
        self.old = certs.load_authority(pki.ca_cert, pki.ca_key)
        self.new = certs.new_authority("imagescaler development CA (next)")

    def trust_both(self) -> None:
        bundle = self.old.cert_pem() + self.new.cert_pem()
        certs.write_atomic(self.pki.ca_cert, bundle, 0o644)

    def reissue(self) -> None:
        """Processor first, then the API: both already trust the new CA."""
        names = certs.processor_names(())
        processor = certs.issue(self.new, "processor", purpose="server", names=names)
        processor.write(self.pki.processor_cert, self.pki.processor_key)
        api = certs.issue(
            self.new, certs.API_IDENTITY, purpose="client", names=[certs.API_IDENTITY]
        )
        api.write(self.pki.api_cert, self.pki.api_key)

    def trust_new_only(self) -> None:
        self.new.write(self.pki.ca_cert, self.pki.ca_key)


def cert_rotation(scale: Scale, workdir: Path | None = None) -> Result:
    """A CA rollover (trust both, new leaves, drop the old CA) with connections recycling."""
    result = Result(
        "cert-rotation",
        "zero failed requests while certificate files are replaced mid-load; the new ones are used",
    )
    age = ("--max-connection-age", str(max(1.0, scale.duration / 8)))
    with running(scale.spec(processor_args=age), workdir) as stack:
        roll = Rollover(stack.creds.pki)
        actions = [
            Action(scale.at(0.25), "trust old+new CA", roll.trust_both),
            Action(scale.at(0.5), "new leaf certificates", roll.reissue),
            Action(scale.at(0.75), "trust new CA only", roll.trust_new_only),
        ]
        run = drive(stack.target(), scale.profile(), actions)
        reloads = {s.name: tls_reloads(s) for s in stack.servers()}
    result.marks = run.marks
    result.phases = {"all": phase(run.events)}
    result.measured = {"TLS reloads logged": reloads}
    result.expect(result.phases["all"].failed() == 0, "requests failed")
    result.expect(all(n >= 3 for n in reloads.values()), "a server did not load every step")
    return result


def tls_reloads(server: Server) -> int:
    return sum("TLS files reloaded" in str(e.get("message")) for e in server.log_lines())


@dataclass(frozen=True)
class Capacity:
    """The highest offered rate served with >= 99 % OK and a median under ``p50_limit_ms``.

    The median, not p99: on a shared machine one stall decides a p99 over a few seconds.
    """

    rate: float
    ok_rate: float
    steps: list[dict[str, float]]


def measure_capacity(
    stack: Stack, start: float, step_seconds: float = 5.0, p50_limit_ms: float = 200.0
) -> Capacity:
    """Offer ``start`` req/s, then 25 % more per step, until a step misses the bar (<= 12)."""
    rate, best, steps = start, None, []
    for _ in range(12):
        run = drive(stack.target(), loadgen.Profile("constant", rate, step_seconds))
        p = phase(run.events)
        ok = p.codes.get("OK", 0) >= 0.99 * max(p.requests, 1) and p.p50_ms <= p50_limit_ms
        steps.append({"offered": rate, "ok_rate": run.report.ok_rate, "p50_ms": p.p50_ms})
        if not ok:
            break
        best = Capacity(rate, run.report.ok_rate, steps)
        rate = round(rate * 1.25, 1)
    if best is None:
        raise RuntimeError(f"not even {start} req/s was served well: {steps}")
    return Capacity(best.rate, best.ok_rate, steps)


def probe_capacity(stack: Stack, concurrency: int, seconds: float = 2.0) -> Capacity:
    """OK/s of a closed loop keeping ``concurrency`` calls in flight: what the stack serves with
    that many workers busy, in seconds rather than :func:`measure_capacity`'s minute.

    A fixed number stands in badly: 25 req/s was a third of what one machine served.
    """
    runner = loadgen.Runner(stack.target(connections=1), [SAMPLE.read_bytes()], loadgen.Stats())
    call, request = runner.calls[0], runner.requests[0]
    try:
        loop = closed_loop(
            lambda: call(request, timeout=runner.target.timeout, metadata=runner.metadata),
            concurrency,
            seconds,
        )
    finally:
        runner.close()
    ok_rate = round(len(loop.latencies_ms) / loop.seconds, 1)
    return Capacity(ok_rate, ok_rate, [{"closed_loop": concurrency, "errors": loop.errors}])


def rss_mb(stack: Stack) -> dict[str, float | None]:
    return {
        s.name: round((s.rss() or 0) / 2**20, 1) if s.alive() else None for s in stack.servers()
    }


@dataclass(frozen=True)
class Bounds:
    """What "bounded" and "fast" mean for the overload promise (p99s, milliseconds)."""

    accepted_ms: float = 1000.0
    refused_ms: float = 250.0
    trends: bool = True  # RSS flat, accepted p99 not growing: for a long run, not a CI test


def overload(scale: Scale, workdir: Path | None = None, bounds: Bounds = Bounds()) -> Result:
    """Capacity first, then three times that for ``duration`` seconds."""
    result = Result(
        "overload",
        f"at 3x capacity: accepted p99 bounded (< {bounds.accepted_ms:.0f} ms, not growing), "
        f"the excess refused fast (p99 < {bounds.refused_ms:.0f} ms), RSS flat (second half "
        "< +10 %), no crash and no other codes",
    )
    with running(scale.spec(processors=2), workdir) as stack:
        if scale.capacity:
            capacity = Capacity(scale.capacity, scale.capacity, [])
        elif scale.probe:
            capacity = probe_capacity(stack, scale.probe)
        else:
            capacity = measure_capacity(stack, start=scale.rate)
        rate = round(3 * capacity.rate, 1)
        mid: list[dict[str, float | None]] = []
        actions = [Action(scale.at(0.5), "half-time RSS", lambda: mid.append(rss_mb(stack)))]
        before = rss_mb(stack)
        run = drive(stack.target(), scale.profile(rate), actions)
        after, alive = rss_mb(stack), all(s.alive() for s in stack.servers())
    third = scale.duration / 3
    result.marks = run.marks
    result.phases = {
        "first 1/3": phase(run.events, 0, third),
        "last 1/3": phase(run.events, 2 * third),
        "all": phase(run.events),
    }
    result.measured = {
        "capacity, req/s offered (OK/s)": f"{capacity.rate} ({capacity.ok_rate})",
        "capacity steps": capacity.steps,
        "offered, req/s": rate,
        "OK/s under overload": run.report.ok_rate,
        "RSS MB before / half-time / end": (before, mid[0] if mid else None, after),
        "all servers alive": alive,
    }
    judge_overload(result, bounds, (mid[0] if mid else before, after), alive)
    return result


def judge_overload(
    result: Result, bounds: Bounds, rss: tuple[dict[str, float | None], ...], alive: bool
) -> None:
    """``rss``: MB per server at half-time and at the end."""
    everything, first, last = (result.phases[k] for k in ("all", "first 1/3", "last 1/3"))
    ok_p99 = everything.p99_ms_by_code.get("OK", float("inf"))
    result.expect(set(everything.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"{everything.codes}")
    result.expect(ok_p99 < bounds.accepted_ms, f"accepted p99 {ok_p99:.0f} ms")
    refused = everything.p99_ms_by_code.get("RESOURCE_EXHAUSTED", 0)
    result.expect(refused < bounds.refused_ms, f"refusals p99 {refused:.0f} ms")
    result.expect(alive, "a server died")
    if not bounds.trends:
        return
    growing = last.p99_ms_by_code.get("OK", 0) > 1.5 * first.p99_ms_by_code.get("OK", 0) + 100
    result.expect(not growing, "accepted p99 grew over the run")
    mid, end = rss
    for name, mb in end.items():
        half = mid.get(name) or 0
        result.expect(mb is not None and mb <= 1.1 * half, f"{name} RSS {half} -> {mb} MB")


# --- command line --------------------------------------------------------------------------


class Scenario(NamedTuple):
    name: str
    run: Callable[[Scale, Path | None], Result]
    rate: float
    duration: float


SCENARIOS = (
    Scenario("redis-down", redis_down, 10, 15),
    Scenario("redis-down-closed", redis_down_closed, 10, 15),
    Scenario("redis-slow", redis_slow, 10, 15),
    Scenario("replica-killed", replica_killed, 10, 10),
    Scenario("processors-down", processors_down, 10, 15),
    Scenario("storage-down", storage_down, 10, 15),
    Scenario("storage-down-fallback", storage_down_fallback, 10, 15),
    Scenario("origin-blackholed", origin_blackholed, 10, 10),
    Scenario("sigterm-api", sigterm_api, 10, 10),
    Scenario("sigterm-api-plain", sigterm_api_plain, 10, 10),
    Scenario("sigterm-processor", sigterm_processor, 10, 10),
    Scenario("cert-rotation", cert_rotation, 10, 16),
    Scenario("api-replicas", api_replicas, 10, 6),
    Scenario("overload", overload, 10, 30),
)


def find(name: str) -> Scenario:
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario
    raise KeyError(name)


def parser() -> argparse.ArgumentParser:
    names = ", ".join(s.name for s in SCENARIOS)
    p = argparse.ArgumentParser(
        prog="python -m tools.faults",
        description="Run the stack on loopback, inject a fault under load, print the outcome.",
        epilog=f"scenarios: {names}. Knobs: --api-arg=--max-concurrent-rpcs=16 (one "
        "argument each, with '=').",
    )
    p.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="a scenario, all, or list")
    p.add_argument("--rate", type=float, help="requests per second (default: per scenario)")
    p.add_argument("--duration", type=float, help="seconds of load (default: per scenario)")
    p.add_argument("--api-arg", action="append", default=[], help="extra imagescaler-api flag")
    p.add_argument("--processor-arg", action="append", default=[], help="extra processor flag")
    p.add_argument("--capacity", type=float, help="overload: req/s measured before (skip it)")
    p.add_argument("--workdir", type=Path, help="keep configs and server logs here")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.scenarios == ["list"]:
        print("\n".join(f"{s.name:<22} {s.run.__doc__ or ''}".rstrip() for s in SCENARIOS))
        return 0
    names = [s.name for s in SCENARIOS] if args.scenarios == ["all"] else args.scenarios
    try:
        chosen = [find(n) for n in names]
    except KeyError as exc:
        parser().error(f"unknown scenario {exc}; try: list")
    results = []
    for s in chosen:
        scale = Scale(
            args.rate or s.rate,
            args.duration or s.duration,
            tuple(args.api_arg),
            tuple(args.processor_arg),
            args.capacity,
        )
        workdir = args.workdir / s.name if args.workdir else None
        results.append(s.run(scale, workdir))
        if not args.json:
            print(results[-1].text(), flush=True)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    return 0 if all(not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
