"""``imagescaler-bench``: where every millisecond goes, measured against the in-process limit.

Modes (each reports images/s, p50/p90/p99 latency, CPU ms per image of every process that did
work, and peak RSS):

* ``engine``: ``processor.imaging.process`` called in this process from N threads: the limit
  the service can approach;
* ``naive``: plain Pillow (open, convert("L"), LANCZOS resize at full resolution, save JPEG
  q85) from the same N threads: the reference;
* ``e2e``: the real stack, started here as separate processes (redis-server, the processor
  over mutual TLS, the API with JWT authentication and Redis rate limiting whose limits never
  bite), loaded by a closed loop at ``--concurrency``, then by an open loop at ``--rate``
  (default: 70% of the closed loop's throughput). A second API (``--auth none``, in-memory
  rate limits) in front of the same processor is called in strict alternation with the first
  at concurrency 1: the p50 difference is what authentication plus rate limiting cost. A bare
  pass-through (``tools/floorproxy.py``) joins the alternation: what one Python gRPC hop
  costs before any of the API's own code runs.

Each ``--duration`` is cut into ``--rounds`` slices and the modes of a workload take turns,
slice by slice: on a shared machine a noisy neighbour then slows every mode alike.

Ratio lines compare e2e with engine (throughput and CPU per image at the same concurrency)
and engine with naive; the PSNR of both outputs against a full-resolution LANCZOS reference
shows what the engine's shortcuts cost in quality.

Example::

    imagescaler-bench --workload all --mode all --duration 10 --markdown
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from api.pb import imagescaler_pb2 as pb
from processor import imaging
from tools import serverenv
from tools.cli import reader_may_leave
from tools.client import MAX_MESSAGE
from tools.loadgen import encoded_request, frozen_heap, scale_image

DATA_DIR = Path(__file__).parent / "benchdata"
TARGET = (1024, 768)
QUALITY = 85
MODES = ("engine", "naive", "e2e")
OPEN_LOOP_FRACTION = 0.7
START_TIMEOUT = 60.0
CALL_TIMEOUT = 120.0
# Limits that never bite; ``legacy`` is the tenant of the --auth none baseline API.
TENANTS_YAML = "tenants:\n" + "".join(
    f"  - id: {tenant}\n    scopes: [scale:content]\n    rate_limit: 100000/second\n"
    "    pixel_limit: 100000000/minute\n    max_concurrent: 1000\n"
    for tenant in ("bench", "legacy")
)


# --- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One input photo and what the API asks the processor to do with it."""

    name: str
    file: str
    description: str
    scale: bool = True  # False: inside the API's margin, so grayscale only

    def job(self) -> imaging.Job:
        """The job the API sends for this input (see api.service and api.decision)."""
        size = TARGET if self.scale else None
        return imaging.Job(size=size, mode="pad", grayscale=True, format="jpeg", quality=QUALITY)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("W1", "photo_12mp.jpg", "12 MP 4032x3024 JPEG -> 1024x768 gray JPEG q85"),
        Workload("W2", "photo_1080p.jpg", "1920x1080 JPEG -> 1024x768 (padded) gray JPEG q85"),
        Workload(
            "W3", "photo_1024x768.jpg", "1024x768 JPEG inside the margin: grayscale only", False
        ),
        Workload("W4", "photo_1080p.png", "1920x1080 PNG -> 1024x768 (padded) gray JPEG q85"),
    )
}


def naive(data: bytes, workload: Workload) -> bytes:
    """The plain Pillow pipeline: full decode, full-resolution LANCZOS, padding, save."""
    pixels = naive_pixels(data, workload)
    out = io.BytesIO()
    pixels.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def naive_pixels(data: bytes, workload: Workload) -> Image.Image:
    """What naive encodes; also the full-resolution LANCZOS reference for PSNR."""
    with Image.open(io.BytesIO(data)) as image:
        gray = image.convert("L")
    if not workload.scale:
        return gray
    content = imaging.fit_size(gray.size, TARGET)
    scaled = gray.resize(content, Image.Resampling.LANCZOS)
    if content == TARGET:
        return scaled
    canvas = Image.new("L", TARGET, 0)
    canvas.paste(scaled, ((TARGET[0] - content[0]) // 2, (TARGET[1] - content[1]) // 2))
    return canvas


def engine(data: bytes, workload: Workload) -> bytes:
    return imaging.process(data, workload.job(), imaging.Limits()).data


# --- quality ------------------------------------------------------------------------------------


def psnr(encoded: bytes, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio of an encoded gray image against reference pixels, in dB."""
    with Image.open(io.BytesIO(encoded)) as image:
        got = np.asarray(image.convert("L"), dtype=np.float64)
    want = np.asarray(reference, dtype=np.float64)
    if got.shape != want.shape:
        raise ValueError(f"output is {got.shape[::-1]}, reference {want.shape[::-1]}")
    mse = float(np.mean((got - want) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def quality(data: bytes, workload: Workload) -> dict[str, float]:
    """PSNR of the engine's and naive's outputs against the full-resolution reference."""
    reference = naive_pixels(data, workload)
    engine_db = psnr(engine(data, workload), reference)
    naive_db = psnr(naive(data, workload), reference)
    return {
        "engine_psnr_db": round(engine_db, 2),
        "naive_psnr_db": round(naive_db, 2),
        "difference_db": round(naive_db - engine_db, 2),
    }


# --- statistics and processes ------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (0.0 for no values)."""
    if not sorted_values:
        return 0.0
    position = fraction * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {f"p{p}": round(percentile(ordered, p / 100), 2) for p in (50, 90, 99)}


@dataclass(frozen=True)
class Proc:
    """A process whose CPU time and memory we read from /proc (Linux)."""

    name: str
    pid: int

    def cpu_seconds(self) -> float:
        """utime + stime: fields 14 and 15, counted after the parenthesised command name."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self, key: str) -> float:
        """``VmRSS`` or ``VmHWM`` in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        """Make VmHWM start again from the current RSS, so each phase has its own peak."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")


@dataclass
class Loop:
    """What one load loop saw."""

    latencies_ms: list[float] = field(default_factory=list)
    pipeline_ms: list[float] = field(default_factory=list)  # e2e: the processor's own time
    errors: int = 0
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0
    late: int = 0

    def failed(self, exc: BaseException) -> None:
        """Count a failed call under its gRPC status (or exception) name."""
        self.errors += 1
        code = exc.code() if isinstance(exc, grpc.RpcError) else None  # type: ignore[attr-defined]
        self.error_codes[code.name if code else type(exc).__name__] += 1


# --- load loops ---------------------------------------------------------------------------------


Inside = Callable[[Any], float]  # from a reply, the milliseconds its processor's pipeline took


def closed_loop(
    call: Callable[[], object],
    concurrency: int,
    duration: float,
    requests: int | None = None,
    inside: Inside | None = None,
) -> Loop:
    """``concurrency`` threads each send the next request when the last one returns, until
    ``duration`` is over or ``requests`` calls have been started."""
    loop, lock = Loop(), threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    budget = [math.inf if requests is None else requests, 0.0]  # calls left, stop time

    def take() -> bool:
        with lock:
            budget[0] -= 1
            return budget[0] >= 0 and time.perf_counter() < budget[1]

    def worker() -> None:
        barrier.wait()
        while take():
            started = time.perf_counter()
            try:
                reply = call()
            except Exception as exc:  # counted and reported; a benchmark keeps going
                with lock:
                    loop.failed(exc)
                continue
            with lock:
                loop.latencies_ms.append((time.perf_counter() - started) * 1000)
                if inside:
                    loop.pipeline_ms.append(inside(reply))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    budget[1] = started + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    loop.seconds = time.perf_counter() - started
    return loop


def open_loop(
    start: Callable[[], grpc.Future], rate: float, duration: float, inside: Inside | None = None
) -> Loop:
    """Starts fixed in advance (evenly spaced); latency counts from the scheduled start."""
    loop, done = Loop(), threading.Condition()
    pending = [0]

    def finished(future: grpc.Future, scheduled: float) -> None:
        with done:
            exc = future.exception()
            if exc is None:
                loop.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
                if inside:
                    loop.pipeline_ms.append(inside(future.result()))
            else:
                loop.failed(exc)
            pending[0] -= 1
            done.notify_all()

    began = time.perf_counter()
    for i in range(max(1, round(rate * duration))):
        scheduled = began + i / rate
        time.sleep(max(0.0, scheduled - time.perf_counter()))
        loop.late += time.perf_counter() - scheduled > 0.010
        with done:
            pending[0] += 1
        start().add_done_callback(lambda f, s=scheduled: finished(f, s))  # type: ignore[misc]
    with done:
        done.wait_for(lambda: pending[0] == 0, CALL_TIMEOUT)
    loop.seconds = time.perf_counter() - began
    return loop


@dataclass
class Tally:
    """One workload in one mode, measured over several slices interleaved with the other
    modes, so a noisy neighbour slows every mode alike instead of ruining one of them."""

    procs: Sequence[Proc]
    loop: Loop = field(default_factory=Loop)
    cpu_s: dict[str, float] = field(default_factory=dict)
    rss_before: dict[str, float] = field(default_factory=dict)
    rss_peak: dict[str, float] = field(default_factory=dict)

    def measure(self, run: Callable[[], Loop]) -> None:
        """Run one slice; CPU and wall time add up, the peak RSS is the highest slice's."""
        for proc in self.procs:
            proc.reset_peak()
            self.rss_before.setdefault(proc.name, proc.memory_mb("VmRSS"))
        before = {p.name: p.cpu_seconds() for p in self.procs}
        loop = run()
        for p in self.procs:
            self.cpu_s[p.name] = self.cpu_s.get(p.name, 0.0) + p.cpu_seconds() - before[p.name]
            self.rss_peak[p.name] = max(self.rss_peak.get(p.name, 0.0), p.memory_mb("VmHWM"))
        self.loop.latencies_ms += loop.latencies_ms
        self.loop.pipeline_ms += loop.pipeline_ms
        self.loop.errors += loop.errors
        self.loop.error_codes.update(loop.error_codes)
        self.loop.seconds += loop.seconds
        self.loop.late += loop.late

    def row(self, base: dict[str, Any]) -> dict[str, Any]:
        """Throughput, latency, CPU per image and peak RSS of every process watched."""
        images, seconds = len(self.loop.latencies_ms), self.loop.seconds
        row = {
            **base,
            "images": images,
            "errors": self.loop.errors,
            "error_codes": dict(self.loop.error_codes),
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 2) if seconds else 0.0,
            "latency_ms": latency_summary(self.loop.latencies_ms),
            "cpu_ms_per_image": {
                k: round(v * 1000 / max(images, 1), 2) for k, v in self.cpu_s.items()
            },
            "rss_mb": {
                k: {"before": round(self.rss_before[k], 1), "peak": round(v, 1)}
                for k, v in self.rss_peak.items()
            },
        }
        if self.loop.late:
            row["late_starts"] = self.loop.late
        if self.loop.pipeline_ms:
            row["call_split_ms"] = call_split(self.loop.latencies_ms, self.loop.pipeline_ms)
        return row


def call_split(latencies_ms: Sequence[float], pipeline_ms: Sequence[float]) -> dict[str, float]:
    """Where an e2e call's time went, on average: the processor's pipeline (as it reports it)
    and everything outside it (transfers, the API, Redis, queues, the client). Means, so the
    two parts add up to the whole."""
    call, pipeline = sum(latencies_ms) / len(latencies_ms), sum(pipeline_ms) / len(pipeline_ms)
    return {
        "call": round(call, 2),
        "pipeline": round(pipeline, 2),
        "outside_pipeline": round(call - pipeline, 2),
    }


def processing_ms(reply: pb.ScaleImageReply) -> float:
    return reply.info.processing_ms


# --- the real stack -----------------------------------------------------------------------------


@dataclass
class Server:
    """A server process we started, its log file and the port it reported."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def info(self, name: str) -> Proc:
        return Proc(name, self.proc.pid)


@dataclass
class Stack:
    redis: subprocess.Popen[bytes]
    processor: Server
    api: Server
    api_open: Server  # --auth none, in-memory rate limits: the baseline for the overhead
    floor: Server  # tools/floorproxy.py: a bare pass-through, what one Python hop costs
    redis_url: str
    token: str
    idle_rss_mb: dict[str, float]

    def procs(self) -> list[Proc]:
        return [
            self.processor.info("processor"),
            self.api.info("api"),
            Proc("redis", self.redis.pid),
            Proc("client", os.getpid()),
        ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("imagescaler-bench: e2e needs redis-server on PATH")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    proc = subprocess.Popen(
        [*command, "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"redis://127.0.0.1:{port}/0"


def wait_for_redis(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Poll until PING answers: readiness, not timing."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as c:
            c.sendall(b"PING\r\n")
            if c.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def spawn(module: str, args: list[str], log: Path, env: dict[str, str]) -> Server:
    """Start ``python -m module`` with its JSON log going to a file we read the port from."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Server(proc, log)


def wait_for_port(server: Server) -> None:
    """The bound port, from the server's "serving" log line (servers listen on port 0)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and server.proc.poll() is None:
        for line in server.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("message") == "serving":
                    server.port = int(entry["port"])
                    return
        time.sleep(0.05)
    tail = server.log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{server.proc.args!r} did not start:\n{tail}")


def write_credentials(directory: Path, redis_url: str) -> tuple[dict[str, str], str]:
    """Dev PKI, signing key, JWKS, tenant registry and a token for the tenant ``bench``."""
    from auth import keys, tokens
    from tools import certs

    certs.create_dev_pki(directory / "pki")
    key = keys.generate_private_key()
    (directory / "jwks.json").write_text(json.dumps({"keys": [keys.public_jwk(key, "bench")]}))
    (directory / "tenants.yaml").write_text(TENANTS_YAML)
    token = tokens.mint(key, "bench", tenant="bench", scopes=["scale:content"], ttl=3600)
    paths = {name: str(directory / name) for name in ("jwks.json", "tenants.yaml")}
    paths.update({p.name: str(p) for p in (directory / "pki").iterdir()})
    paths["redis"] = redis_url
    return paths, token


def processor_args(paths: dict[str, str], workers: int, queue: int) -> list[str]:
    return [
        "--listen", "127.0.0.1:0", "--metrics-port", "0",
        "--tls-cert", paths["processor.pem"], "--tls-key", paths["processor-key.pem"],
        "--tls-client-ca", paths["ca.pem"],
        "--workers", str(workers), "--queue", str(queue),
    ]  # fmt: skip


def processor_link(paths: dict[str, str], processor_port: int) -> list[str]:
    """Where the processor is and the API's mTLS identity (the API's and floorproxy's flags)."""
    return [
        "--processor", f"127.0.0.1:{processor_port}", "--processor-ca", paths["ca.pem"],
        "--processor-cert", paths["api.pem"], "--processor-key", paths["api-key.pem"],
    ]  # fmt: skip


def api_args(paths: dict[str, str], processor_port: int, secured: bool) -> list[str]:
    args = [
        "--listen", "127.0.0.1:0", "--metrics-port", "0",
        *processor_link(paths, processor_port),
        "--tenants", paths["tenants.yaml"], "--max-concurrent-rpcs", "1024",
    ]  # fmt: skip
    if not secured:
        return [*args, "--auth", "none", "--ratelimit-storage", "memory://"]
    return [
        *args, "--auth", "jwt", "--jwks", paths["jwks.json"],
        "--ratelimit-storage", paths["redis"], "--revocations", paths["redis"],
    ]  # fmt: skip


@contextlib.contextmanager
def running_stack(
    workers: int, queue: int, extra_env: Sequence[str], deployed: bool = True
) -> Iterator[Stack]:
    """Redis, processor (mTLS), secured API, baseline API and the bare pass-through; all
    stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="imagescaler-bench-") as tmp:
        directory = Path(tmp)
        redis, redis_url = start_redis(directory)
        started: list[Server] = []
        try:
            paths, token = write_credentials(directory, redis_url)
            env = serverenv.server_env(extra_env, deployed=deployed)
            processor = spawn(
                "processor.server", processor_args(paths, workers, queue), directory / "p.log", env
            )
            started.append(processor)
            wait_for_redis(redis_url, redis)
            wait_for_port(processor)
            for secured, name in ((True, "api.log"), (False, "api-open.log")):
                args = api_args(paths, processor.port, secured)
                started.append(spawn("api.server", args, directory / name, env))
            floor_args = processor_link(paths, processor.port)
            started.append(spawn("tools.floorproxy", floor_args, directory / "floor.log", env))
            for server in started[1:]:
                wait_for_port(server)
            idle = {"processor": Proc("p", processor.proc.pid).memory_mb("VmRSS")}
            idle["api"] = Proc("a", started[1].proc.pid).memory_mb("VmRSS")
            api, api_open, floor = started[1:4]
            yield Stack(redis, processor, api, api_open, floor, redis_url, token, idle)
        finally:
            stop_all([s.proc for s in started] + [redis])


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM everything at once (each drains), SIGKILL whatever is still there after 10 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Caller:
    """One channel (reused by every call) and one request, serialized once."""

    channel: grpc.Channel
    request: bytes
    metadata: tuple[tuple[str, str], ...]
    scale: grpc.UnaryUnaryMultiCallable = field(init=False)

    def __post_init__(self) -> None:
        self.scale = scale_image(self.channel)

    @classmethod
    def to(cls, port: int, data: bytes, token: str | None) -> Caller:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return cls(channel, encoded_request(data), metadata)

    def call(self) -> pb.ScaleImageReply:
        return self.scale(self.request, metadata=self.metadata, timeout=CALL_TIMEOUT)

    def start(self) -> grpc.Future:
        return self.scale.future(self.request, metadata=self.metadata, timeout=CALL_TIMEOUT)


SliceRunner = Callable[[float], Loop]


def phases(
    workload: Workload,
    data: bytes,
    args: argparse.Namespace,
    stack: Stack | None,
    caller: Caller | None,
) -> dict[str, tuple[Tally, SliceRunner]]:
    """Each mode asked for, warmed up: its tally and how to run one slice of it."""
    out: dict[str, tuple[Tally, SliceRunner]] = {}
    me = [Proc("bench", os.getpid())]
    for mode, pipeline in (("engine", engine), ("naive", naive)):
        if mode in args.mode:
            call = functools.partial(pipeline, data, workload)
            for _ in range(args.threads):
                call()  # first-use imports and allocations: not part of the numbers
            out[mode] = (Tally(me), functools.partial(closed_loop, call, args.threads))
    if stack and caller:
        for _ in range(2 * args.concurrency):
            caller.call()  # connections, TLS handshakes, first-use imports
        out["e2e"] = (
            Tally(stack.procs()),
            functools.partial(closed_loop, caller.call, args.concurrency, inside=processing_ms),
        )
    return out


def workload_rows(
    workload: Workload, data: bytes, args: argparse.Namespace, stack: Stack | None
) -> list[dict[str, Any]]:
    """Interleaved slices of every mode, then (e2e) the open loop at --rate or 70% of peak."""
    caller = Caller.to(stack.api.port, data, stack.token) if stack else None
    try:
        modes = phases(workload, data, args, stack, caller)
        _progress(f"{workload.name}: {', '.join(modes)} in {args.rounds} interleaved rounds")
        with frozen_heap():
            for _ in range(args.rounds):
                for tally, run_slice in modes.values():
                    tally.measure(functools.partial(run_slice, args.duration / args.rounds))
            rows = [
                _closed_row(workload, mode, tally, args, stack)
                for mode, (tally, _) in modes.items()
            ]
            if stack and caller:
                rows.append(_open_row(workload, rows[-1], caller, stack, args))
        return rows
    finally:
        if caller:
            caller.channel.close()


def _closed_row(
    workload: Workload, mode: str, tally: Tally, args: argparse.Namespace, stack: Stack | None
) -> dict[str, Any]:
    if mode != "e2e":
        return tally.row({"workload": workload.name, "mode": mode, "concurrency": args.threads})
    row = tally.row(
        {"workload": workload.name, "mode": mode, "loop": "closed", "concurrency": args.concurrency}
    )
    assert stack
    row["idle_rss_mb"] = {k: round(v, 1) for k, v in stack.idle_rss_mb.items()}
    return row


def _open_row(
    workload: Workload,
    closed: dict[str, Any],
    caller: Caller,
    stack: Stack,
    args: argparse.Namespace,
) -> dict[str, Any]:
    peak = closed["images_per_s"]
    rate = args.rate or peak * OPEN_LOOP_FRACTION
    _progress(f"{workload.name}: e2e open loop at {rate:.1f}/s")
    tally = Tally(stack.procs())
    tally.measure(lambda: open_loop(caller.start, rate, args.duration, processing_ms))
    base = {"workload": workload.name, "mode": "e2e", "loop": "open", "rate": round(rate, 2)}
    return tally.row({**base, "peak_fraction": round(rate / peak, 2) if peak else 0.0})


def auth_overhead(stack: Stack, data: bytes, duration: float) -> dict[str, Any]:
    """Secured API, baseline API and the bare pass-through called in strict alternation at
    concurrency 1 (same load, same processor, same moment), so drift on a noisy machine hits
    them alike."""
    callers = {
        "secured": Caller.to(stack.api.port, data, stack.token),
        "baseline": Caller.to(stack.api_open.port, data, None),
        "floor": Caller.to(stack.floor.port, data, None),
    }
    procs = [
        stack.api.info("secured"),
        stack.api_open.info("baseline"),
        stack.floor.info("floor"),
        Proc("redis", stack.redis.pid),
    ]
    timings: dict[str, list[float]] = {name: [] for name in callers}
    try:
        for caller in [*callers.values(), *callers.values()]:
            caller.call()
        cpu = {p.name: p.cpu_seconds() for p in procs}
        stop_at = time.perf_counter() + duration
        while time.perf_counter() < stop_at:
            for name, caller in callers.items():
                started = time.perf_counter()
                caller.call()
                timings[name].append((time.perf_counter() - started) * 1000)
        pairs = len(timings["secured"])
        cpu = {p.name: (p.cpu_seconds() - cpu[p.name]) * 1000 / max(pairs, 1) for p in procs}
    finally:
        for caller in callers.values():
            caller.channel.close()
    p50 = {k: latency_summary(v)["p50"] for k, v in timings.items()}
    return {
        "pairs": pairs,
        "secured_p50_ms": p50["secured"],
        "baseline_p50_ms": p50["baseline"],
        "added_p50_ms": round(p50["secured"] - p50["baseline"], 2),
        "floor_p50_ms": p50["floor"],
        "api_cpu_ms_per_request": {k: round(v, 2) for k, v in cpu.items()},
        "ratelimit_hit_us": _limiter_cost(stack),
    }


def _limiter_cost(stack: Stack) -> dict[str, float]:
    """The rate limiter alone (acquire + release against the same Redis), in microseconds."""
    from api.ratelimit import RateLimits, measure_overhead

    cost = measure_overhead(RateLimits(storage=stack.redis_url), samples=500)
    return {"p50": cost.p50_us, "p90": cost.p90_us, "p99": cost.p99_us}


def soak(stack: Stack, data: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    """Processor RSS after each tenth of ``requests`` closed-loop calls: growth shows a leak."""
    caller = Caller.to(stack.api.port, data, stack.token)
    processor = stack.processor.info("processor")
    samples, errors, step = [], 0, max(1, requests // 10)
    try:
        for done in range(step, requests + 1, step):
            errors += closed_loop(caller.call, concurrency, math.inf, step).errors
            samples.append({"requests": done, "rss_mb": round(processor.memory_mb("VmRSS"), 1)})
    finally:
        caller.channel.close()
    return {
        "requests": samples[-1]["requests"] if samples else 0,
        "errors": errors,
        "processor_rss": samples,
        "processor_peak_mb": round(processor.memory_mb("VmHWM"), 1),
    }


# --- report -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("Pillow", "simplejpeg", "grpcio", "protobuf", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg()[0],
    }


def _find(rows: Sequence[dict], workload: str, mode: str, loop: str | None = None) -> dict | None:
    for row in rows:
        if row["workload"] == workload and row["mode"] == mode and row.get("loop") == loop:
            return row
    return None


def server_cpu(row: dict[str, Any]) -> float:
    """CPU per image of every server process (engine: the bench process itself)."""
    cpu = row["cpu_ms_per_image"]
    return sum(v for k, v in cpu.items() if k != "client") if row["mode"] == "e2e" else cpu["bench"]


def ratios(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """e2e vs engine (throughput, server CPU per image) and engine vs naive, per workload."""
    out = []
    for name in WORKLOADS:
        eng, nai, e2e_row = _find(rows, name, "engine"), _find(rows, name, "naive"), None
        e2e_row = _find(rows, name, "e2e", "closed")
        if eng and nai and nai["images_per_s"]:
            speed = eng["images_per_s"] / nai["images_per_s"]
            cpu = server_cpu(nai) / max(server_cpu(eng), 1e-9)
            row = {"workload": name, "ratio": "engine/naive", "throughput": round(speed, 2)}
            out.append({**row, "cpu_saving": round(cpu, 2)})
        if eng and e2e_row and eng["images_per_s"]:
            speed = e2e_row["images_per_s"] / eng["images_per_s"]
            cpu = server_cpu(e2e_row) / max(server_cpu(eng), 1e-9)
            row = {"workload": name, "ratio": "e2e/engine", "throughput": round(speed, 2)}
            # throughput = ceiling x (e2e busy / engine busy): the CPU and the idle apart
            ceiling = server_cpu(eng) / max(sum(e2e_row["cpu_ms_per_image"].values()), 1e-9)
            out.append(
                {
                    **row,
                    "server_cpu": round(cpu, 2),
                    "cpu_ceiling": round(ceiling, 2),
                    "cores_busy": {"e2e": _busy(e2e_row), "engine": _busy(eng)},
                }
            )
    return out


def _busy(row: dict[str, Any]) -> float:
    """The fraction of the usable cores our processes kept busy (client included)."""
    cpu_s = row["images_per_s"] * sum(row["cpu_ms_per_image"].values()) / 1000
    return round(cpu_s / len(os.sched_getaffinity(0)), 3)


def _target(name: str, value: float, limit: float, higher_is_better: bool) -> dict[str, Any]:
    met = value >= limit if higher_is_better else value <= limit
    return {"target": name, "value": round(value, 2), "limit": limit, "met": met}


# (workload, ratio, field, limit, higher is better): the ratio targets.
RATIO_TARGETS = (
    ("W1", "engine/naive", "throughput", 3.5, True),
    ("W1", "e2e/engine", "throughput", 0.8, True),
    ("W1", "e2e/engine", "server_cpu", 1.3, False),
    ("W3", "e2e/engine", "throughput", 0.6, True),
)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the issue that this run has the numbers for."""
    by = {(r["workload"], r["ratio"]): r for r in report["ratios"]}
    out = [
        _target(f"{w} {ratio} {key}", by[w, ratio][key], limit, higher)
        for w, ratio, key, limit, higher in RATIO_TARGETS
        if (w, ratio) in by
    ]
    if "W1" in report["quality"]:
        diff = report["quality"]["W1"]["difference_db"]
        out.append(_target("W1 PSNR loss vs naive (dB)", diff, 1.5, False))
    out.extend(_latency_targets(report["results"]))
    out.extend(_memory_targets(report["results"]))
    if report.get("auth_overhead"):
        added = report["auth_overhead"]["added_p50_ms"]
        out.append(_target("auth + rate limiting added p50 (ms)", added, 1.0, False))
    return out


def _latency_targets(rows: Sequence[dict]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row.get("loop") == "open" and row["latency_ms"]["p50"]:
            p = row["latency_ms"]
            label = f"{row['workload']} p99/p50 at {row['peak_fraction']:.0%} of peak"
            out.append(_target(label, p["p99"] / p["p50"], 2.0, False))
    return out


def _memory_targets(rows: Sequence[dict]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row["workload"] == "W1" and row.get("loop") == "closed":
            grown = row["rss_mb"]["processor"]["peak"] - row["idle_rss_mb"]["processor"]
            label = f"W1 processor RSS growth MB per concurrent request (c={row['concurrency']})"
            out.append(_target(label, grown / row["concurrency"], 20.0, False))
    return out


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:g}" for k, v in values.items())


def _fmt_cpu(row: dict[str, Any]) -> str:
    return _fmt(row["cpu_ms_per_image"])


def _fmt_rss(row: dict[str, Any]) -> str:
    idle = row.get("idle_rss_mb", {})
    parts = []
    for name, mem in row["rss_mb"].items():
        if name in ("client", "redis"):
            continue
        start = f"{idle[name]:g}->" if name in idle else ""
        parts.append(f"{name} {start}{mem['peak']:g}")
    return " ".join(parts)


TABLE_HEAD = (
    "| workload | mode | load | images/s | p50 ms | p90 ms | p99 ms | CPU ms/image "
    "| RSS MB (idle->peak) |\n| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"
)


def _table_row(row: dict[str, Any]) -> str:
    load = f"{row['rate']:g}/s open" if row.get("loop") == "open" else f"c={row['concurrency']}"
    lat = row["latency_ms"]
    cells = [row["workload"], row["mode"], load, f"{row['images_per_s']:g}"]
    cells += [f"{lat[p]:g}" for p in ("p50", "p90", "p99")]
    return "| " + " | ".join([*cells, _fmt_cpu(row), _fmt_rss(row)]) + " |"


def _notes(report: dict[str, Any]) -> list[str]:
    lines = []
    for r in report["ratios"]:
        skip = ("workload", "ratio", "cores_busy")
        extra = ", ".join(f"{k} {v}x" for k, v in r.items() if k not in skip)
        if "cores_busy" in r:
            busy = r["cores_busy"]
            extra += f"; cores busy {busy['e2e']:.0%} (engine {busy['engine']:.0%})"
        lines.append(f"- {r['workload']} {r['ratio']}: {extra}")
    for name, q in report["quality"].items():
        lines.append(
            f"- {name} PSNR vs full-resolution LANCZOS: engine {q['engine_psnr_db']} dB, "
            f"naive {q['naive_psnr_db']} dB"
        )
    o = report.get("auth_overhead")
    if o:
        lines.append(
            f"- auth + rate limiting (W3, {o['pairs']} alternating pairs): p50 "
            f"{o['secured_p50_ms']} ms vs {o['baseline_p50_ms']} ms without, "
            f"+{o['added_p50_ms']} ms; CPU ms per request {_fmt(o['api_cpu_ms_per_request'])}; "
            f"Redis limiter alone p50 {o['ratelimit_hit_us']['p50']} us; a bare pass-through "
            f"(floor) p50 {o['floor_p50_ms']} ms"
        )
    for row in report["results"]:
        split = row.get("call_split_ms")
        if split:
            load = f"c={row['concurrency']}" if row.get("loop") == "closed" else "open loop"
            lines.append(
                f"- {row['workload']} e2e {load}: a call {split['call']} ms on average, "
                f"{split['pipeline']} in the processor's pipeline, {split['outside_pipeline']} "
                "outside it"
            )
    soaked = report.get("soak")
    if soaked:
        rss = ", ".join(f"{s['rss_mb']:g}" for s in soaked["processor_rss"])
        lines.append(
            f"- soak {soaked['workload']} {soaked['requests']} requests: processor RSS {rss}"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    rows = [_table_row(row) for row in report["results"]]
    checks = [
        f"- [{'x' if t['met'] else ' '}] {t['target']}: {t['value']} (limit {t['limit']})"
        for t in report["targets"]
    ]
    return "\n".join([TABLE_HEAD, *rows, "", *_notes(report), "", *checks])


# --- command line -------------------------------------------------------------------------------


def _names(text: str, choices: Sequence[str], what: str) -> list[str]:
    names = list(choices) if text == "all" else [n.strip() for n in text.split(",")]
    bad = [n for n in names if n not in choices]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {choices}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagescaler-bench",
        description="Where every millisecond goes, measured against the in-process limit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Workloads:\n"
        + "\n".join(f"  {w.name}  {w.description}" for w in WORKLOADS.values()),
    )
    _what_to_run(p)
    _load(p)
    _extras(p)
    return p


def _what_to_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        default="all",
        type=lambda t: _names(t, tuple(WORKLOADS), "workload"),
        help="W1..W4, a comma-separated list, or all (default)",
    )
    p.add_argument(
        "--mode",
        default="all",
        type=lambda t: _names(t, MODES, "mode"),
        help="engine, naive, e2e, a comma-separated list, or all (default)",
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds per mode and workload (default 10)"
    )


def _load(p: argparse.ArgumentParser) -> None:
    cores = len(os.sched_getaffinity(0))
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="slices each --duration is cut into, interleaved across modes (default 5)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=cores,
        help=f"engine/naive threads and processor workers (default {cores})",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="e2e closed-loop calls in flight (default: --threads)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="e2e open-loop requests/s (default: 70%% of the closed loop's)",
    )


def _extras(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the server processes, on top of the container image's "
        "(tools/serverenv.py), e.g. MALLOC_ARENA_MAX=4",
    )
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="start the servers without the container image's glibc allocator settings",
    )
    p.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="REQUESTS",
        help="e2e: then send this many requests of the first workload, sampling the "
        "processor's RSS every tenth (e.g. 10000)",
    )
    p.add_argument(
        "--data", type=Path, default=DATA_DIR, help="folder holding the benchmark photos"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--markdown", action="store_true", help="print a Markdown table (the default output)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase asked for; the report as one dict."""
    workloads = [WORKLOADS[name] for name in args.workload]
    inputs = {w.name: (args.data / w.file).read_bytes() for w in workloads}
    report: dict[str, Any] = {
        "machine": machine(),
        "command": "imagescaler-bench " + " ".join(args.argv),
    }
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as cleanup:
        stack = None
        if "e2e" in args.mode:
            queue = max(8, 4 * args.concurrency)
            stack = cleanup.enter_context(
                running_stack(args.threads, queue, args.server_env, not args.default_allocator)
            )
        for w in workloads:
            rows.extend(workload_rows(w, inputs[w.name], args, stack))
        if stack:
            report.update(_stack_extras(stack, workloads, inputs, args))
    report["results"] = rows
    report["quality"] = {
        w.name: quality(inputs[w.name], w) for w in workloads if w.scale and "engine" in args.mode
    }
    report["ratios"] = ratios(rows)
    report["targets"] = targets(report)
    return report


def _stack_extras(
    stack: Stack, workloads: Sequence[Workload], inputs: dict[str, bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """The auth + rate-limit overhead (always on W3) and the optional soak."""
    _progress(f"auth + rate-limit overhead, {args.duration:g} s")
    small = (args.data / WORKLOADS["W3"].file).read_bytes()
    extra: dict[str, Any] = {"auth_overhead": auth_overhead(stack, small, args.duration)}
    if args.soak:
        w = workloads[0]
        _progress(f"soak: {args.soak} {w.name} requests at concurrency {args.concurrency}")
        extra["soak"] = {
            "workload": w.name,
            **soak(stack, inputs[w.name], args.soak, args.concurrency),
        }
    return extra


def _progress(text: str) -> None:
    print(f"imagescaler-bench: {text}", file=sys.stderr, flush=True)


@reader_may_leave
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    args.concurrency = args.concurrency or args.threads
    if args.duration <= 0 or min(args.threads, args.concurrency, args.rounds) < 1:
        parser().error("--duration, --threads, --concurrency and --rounds must be positive")
    # SIGTERM (timeout, CI cancelling) unwinds like Ctrl-C, so the servers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    report = run(args)
    table = markdown(report)
    if args.json:
        if args.markdown:
            report["markdown"] = table
        print(json.dumps(report, indent=2))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
