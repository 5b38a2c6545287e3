"""``imagescaler-loadgen``: open-loop load against the public API (capacity tests, HPA demos).

Open loop: every request's start time is fixed in advance by the profile, whatever the server
does. A slow server therefore shows up as latency and as requests in flight, the way real
clients see it; a closed loop (send the next request when the last one returns) slows down
with the server and hides exactly that. Latency is measured from the scheduled start, so time
spent waiting for a free in-flight slot counts too, and starts later than scheduled are
reported as late.

Profiles (``--rate`` is the peak, ``--duration`` the length):

* ``constant``: ``--rate`` throughout;
* ``ramp``: linear from ``--start-rate`` (default 0) to ``--rate``;
* ``step``: ``--steps`` equal steps up to ``--rate``;
* ``day``: a day compressed into ``--duration``: ``--start-rate`` at night (default a tenth
  of the peak), the peak at midday, night again at the end; enough to watch an autoscaler
  scale out and back in.

Example::

    imagescaler-loadgen --server 203.0.113.7:50051 --token-file token --profile day \\
        --rate 200 --duration 1800 --connections 8 photos/*.jpg
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from api.pb import imagescaler_pb2 as pb
from tools.cli import reader_may_leave
from tools.client import MAX_MESSAGE, token_from

PROFILES = ("constant", "ramp", "step", "day")
SCALE_IMAGE = f"/{pb.DESCRIPTOR.services_by_name['ImageScaler'].full_name}/ScaleImage"
LATE_AFTER = 0.010  # seconds behind schedule before a start counts as late
MAX_DURATION = 7 * 24 * 3600.0


# --- the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Arrival rate over time; ``rate`` is the peak in requests per second."""

    kind: str
    rate: float
    duration: float
    start_rate: float | None = None
    steps: int = 4

    def __post_init__(self) -> None:
        if self.kind not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.kind!r}")
        if not (self.rate > 0 and 0 < self.duration <= MAX_DURATION and self.steps >= 1):
            raise ValueError("rate and duration must be positive, steps at least 1")
        if not 0 <= self.low <= self.rate:
            raise ValueError("--start-rate must be between 0 and --rate")

    @property
    def low(self) -> float:
        """The starting (ramp) or night-time (day) rate."""
        if self.start_rate is not None:
            return self.start_rate
        return self.rate / 10 if self.kind == "day" else 0.0

    def rate_at(self, t: float) -> float:
        """Requests per second at ``t`` seconds into the run."""
        t = min(max(t, 0.0), self.duration)
        if self.kind == "ramp":
            return self.low + (self.rate - self.low) * t / self.duration
        if self.kind == "step":
            return self.rate * (self._step_index(t) + 1) / self.steps
        if self.kind == "day":
            return self.low + (self.rate - self.low) * math.sin(math.pi * t / self.duration) ** 2
        return self.rate

    def expected(self, t: float) -> float:
        """Arrivals expected by ``t``: the integral of :meth:`rate_at` from 0."""
        t = min(max(t, 0.0), self.duration)
        big_t, low, swing = self.duration, self.low, self.rate - self.low
        if self.kind == "ramp":
            return low * t + swing * t * t / (2 * big_t)
        if self.kind == "step":
            width, k = big_t / self.steps, self._step_index(t)
            return self.rate / self.steps * (width * k * (k + 1) / 2 + (k + 1) * (t - k * width))
        if self.kind == "day":
            wave = t / 2 - big_t / (4 * math.pi) * math.sin(2 * math.pi * t / big_t)
            return low * t + swing * wave
        return self.rate * t

    def _step_index(self, t: float) -> int:
        return min(int(t * self.steps / self.duration), self.steps - 1)

    def describe(self) -> str:
        if self.kind == "constant":
            return f"constant {self.rate:g}/s for {self.duration:g} s"
        if self.kind == "step":
            return f"{self.steps} steps up to {self.rate:g}/s over {self.duration:g} s"
        if self.kind == "day":
            low, peak = f"{self.low:g}/s", f"{self.rate:g}/s"
            return f"day curve {low} -> {peak} -> {low} over {self.duration:g} s"
        return f"ramp {self.low:g}/s -> {self.rate:g}/s over {self.duration:g} s"


def arrivals(profile: Profile, poisson: bool = False, seed: int | None = None) -> Iterator[float]:
    """Start times (seconds from the beginning), in order, until the profile ends.

    Uniform arrivals put the k-th request where ``expected(t) = k + 1/2``; Poisson arrivals
    put them at exponential gaps of the expected count (a non-homogeneous Poisson process).
    """
    rng = random.Random(seed)
    total = profile.expected(profile.duration)
    target = rng.expovariate(1.0) if poisson else 0.5
    t = 0.0
    while target <= total:
        t = _invert(profile, target, t)
        yield t
        target += rng.expovariate(1.0) if poisson else 1.0


def _invert(profile: Profile, target: float, lo: float) -> float:
    """The time at which ``expected`` reaches ``target`` (bisection to a microsecond; it never
    decreases). About 30 cheap steps per request, spread over the run by the lazy caller."""
    hi = profile.duration
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if profile.expected(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


# --- recording -----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(math.ceil(fraction * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    points = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
    out = {name: round(percentile(ordered, q) * 1000, 2) for name, q in points.items()}
    out["max"] = round(ordered[-1] * 1000, 2) if ordered else 0.0
    out["mean"] = round(sum(ordered) / len(ordered) * 1000, 2) if ordered else 0.0
    return out


@dataclass
class Stats:
    """What the completed calls reported; callbacks from gRPC threads write under the lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    service_latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    served_by: Counter[str] = field(default_factory=Counter)
    scheduled: int = 0
    sent: int = 0
    late: int = 0
    max_late: float = 0.0

    def due(self) -> None:
        with self.lock:
            self.scheduled += 1

    def started(self, lateness: float) -> None:
        with self.lock:
            self.sent += 1
            if lateness > LATE_AFTER:
                self.late += 1
            self.max_late = max(self.max_late, lateness)

    def finished(self, code: str, scheduled: float, sent: float, replica: str | None) -> None:
        now = time.monotonic()
        with self.lock:
            self.codes[code] += 1
            self.latencies.append(now - scheduled)
            self.service_latencies.append(now - sent)
            if replica:
                self.served_by[replica] += 1

    @property
    def completed(self) -> int:
        return sum(self.codes.values())


# --- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where and how to send: the API address, credentials and client-side limits."""

    server: str
    token: str | None = None
    ca: bytes | None = None
    tls: bool = False
    connections: int = 1
    max_in_flight: int = 64
    timeout: float = 30.0
    served_by_key: str = "x-served-by"
    service_config: str | None = None  # JSON, e.g. round_robin with client-side health checks


def open_channel(target: Target) -> grpc.Channel:
    """A channel with its own TCP connection (channels otherwise share subchannels)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if target.service_config:
        options.append(("grpc.service_config", target.service_config))
    if target.tls or target.ca:
        creds = grpc.ssl_channel_credentials(root_certificates=target.ca)
        return grpc.secure_channel(target.server, creds, options=options)
    return grpc.insecure_channel(target.server, options=options)


def scale_image(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """ScaleImage taking a request already serialized (see :func:`encoded_request`)."""
    return channel.unary_unary(
        SCALE_IMAGE, response_deserializer=pb.ScaleImageReply.FromString, _registered_method=True
    )


def encoded_request(data: bytes) -> bytes:
    """A request for ``data``, serialized once: a load generator sends the same bytes again and
    again, and encoding a 2.45 MB photo per call copies it twice more on cores it shares with
    the servers it measures (~1 ms of CPU per call, docs/benchmarks.md)."""
    return pb.ScaleImageRequest(image=pb.Image(content=data)).SerializeToString()


def served_by(call: Any, key: str) -> str | None:
    for k, v in (*(call.initial_metadata() or ()), *(call.trailing_metadata() or ())):
        if k == key and isinstance(v, str):
            return v
    return None


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the collector off what exists now while measuring (see
    ``processor.serving.freeze_startup_heap``): a full collection of a client that has
    imported gRPC, Pillow and numpy holds the GIL for ~20 ms, and every start due meanwhile
    would count it as the service's latency."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Runner:
    """Starts each request at its scheduled time on one of N channels, at most M in flight."""

    def __init__(self, target: Target, images: Sequence[bytes], stats: Stats) -> None:
        self.target, self.stats = target, stats
        self.channels = [open_channel(target) for _ in range(target.connections)]
        self.calls = [scale_image(c) for c in self.channels]
        self.requests = [encoded_request(data) for data in images]  # serialized once
        self.metadata = (("authorization", f"Bearer {target.token}"),) if target.token else ()
        self.slots = threading.BoundedSemaphore(target.max_in_flight)
        self.stop = threading.Event()

    def run(self, schedule: Iterator[float], tick: Callable[[], None]) -> None:
        """Send each request at its time (seconds from now); ``tick`` runs while waiting."""
        start = time.monotonic()
        for index, offset in enumerate(schedule):
            if not self._sleep_until(start + offset, tick):
                return
            self.stats.due()
            if not self._take_slot(tick):
                return
            self._send(index, start + offset)

    def _sleep_until(self, when: float, tick: Callable[[], None]) -> bool:
        """False if stopped first. Timed waits are the schedule itself, not synchronisation."""
        while not self.stop.is_set():
            tick()
            remaining = when - time.monotonic()
            if remaining <= 0:
                return True
            self.stop.wait(min(remaining, 0.25))
        return False

    def _take_slot(self, tick: Callable[[], None]) -> bool:
        """Wait for a free in-flight slot (the start is late meanwhile); False if stopped."""
        while not self.stop.is_set():
            if self.slots.acquire(timeout=0.25):
                return True
            tick()
        return False

    def _send(self, index: int, scheduled: float) -> None:
        sent = time.monotonic()
        self.stats.started(sent - scheduled)
        call = self.calls[index % len(self.calls)]
        request = self.requests[index % len(self.requests)]
        future = call.future(request, timeout=self.target.timeout, metadata=self.metadata)
        future.add_done_callback(lambda call: self._done(call, scheduled, sent))

    def _done(self, call: Any, scheduled: float, sent: float) -> None:
        try:
            replica = served_by(call, self.target.served_by_key)
            self.stats.finished(call.code().name, scheduled, sent, replica)
        finally:
            self.slots.release()

    def drain(self, tick: Callable[[], None]) -> None:
        """Wait for every request in flight (each ends by its deadline)."""
        taken = 0
        while taken < self.target.max_in_flight:
            tick()
            if self.slots.acquire(timeout=0.25):
                taken += 1
        for _ in range(taken):
            self.slots.release()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


# --- reporting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    profile: dict[str, Any]
    connections: int
    stopped_early: bool
    scheduled: int
    sent: int
    completed: int
    late: int
    max_late_ms: float
    seconds: float
    target_rate: float
    achieved_rate: float
    ok_rate: float
    latency_ms: dict[str, float]
    service_latency_ms: dict[str, float]
    codes: dict[str, int]
    served_by: dict[str, int]


def build_report(
    profile: Profile, target: Target, stats: Stats, dispatch: float, total: float, stopped: bool
) -> Report:
    """``achieved_rate``: requests sent per second of the schedule (``dispatch`` seconds, the
    whole profile unless stopped early); ``ok_rate``: successes per second of the whole run,
    including waiting for the last replies (``total`` seconds)."""
    window = dispatch if stopped else max(dispatch, profile.duration)
    with stats.lock:
        return Report(
            profile={**asdict(profile), "low": profile.low},
            connections=target.connections,
            stopped_early=stopped,
            scheduled=stats.scheduled,
            sent=stats.sent,
            completed=stats.completed,
            late=stats.late,
            max_late_ms=round(stats.max_late * 1000, 2),
            seconds=round(total, 3),
            target_rate=round(profile.expected(profile.duration) / profile.duration, 3),
            achieved_rate=round(stats.sent / max(window, 1e-9), 3),
            ok_rate=round(stats.codes.get("OK", 0) / max(total, 1e-9), 3),
            latency_ms=summary_ms(stats.latencies),
            service_latency_ms=summary_ms(stats.service_latencies),
            codes=dict(stats.codes.most_common()),
            served_by=dict(sorted(stats.served_by.items())),
        )


def describe(report: Report, profile: Profile) -> str:
    lat = report.latency_ms
    lines = [
        f"profile    {profile.describe()}, {report.connections} connection(s)",
        f"requests   scheduled {report.scheduled}, sent {report.sent}, completed "
        f"{report.completed}, late {report.late} (max {report.max_late_ms:.1f} ms behind)",
        f"rate       target {report.target_rate:.1f}/s, achieved {report.achieved_rate:.1f}/s, "
        f"OK {report.ok_rate:.1f}/s",
        f"latency    p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, "
        f"max {lat['max']:.1f} ms (from the scheduled start)",
        "codes      " + ", ".join(f"{k} {v}" for k, v in report.codes.items()),
    ]
    if report.served_by:
        total = sum(report.served_by.values())
        spread = ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in report.served_by.items())
        lines.append(f"replicas   {spread}")
    return "\n".join(lines)


class Progress:
    """A status line on stderr: rewritten in place on a terminal, every 5 s otherwise."""

    def __init__(self, out: TextIO | None, profile: Profile, stats: Stats) -> None:
        self.out, self.profile, self.stats = out, profile, stats
        self.tty = bool(out and out.isatty())
        self.every = 0.5 if self.tty else 5.0
        self.start = time.monotonic()
        self.next = self.start + self.every

    def __call__(self) -> None:
        now = time.monotonic()
        if self.out is None or now < self.next:
            return
        self.next = now + self.every
        line = self.line(now - self.start)
        self.out.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.out.flush()

    def line(self, elapsed: float) -> str:
        s = self.stats
        with s.lock:
            ok, done, sent, late = s.codes.get("OK", 0), s.completed, s.sent, s.late
            recent = sorted(s.latencies[-200:])
        return (
            f"{elapsed:7.1f}/{self.profile.duration:g} s  target "
            f"{self.profile.rate_at(elapsed):7.1f}/s  sent {sent}  ok {ok}  err {done - ok}  "
            f"in flight {sent - done}  late {late}  p50 {percentile(recent, 0.5) * 1000:.0f} ms"
        )

    def finish(self) -> None:
        if self.out and self.tty:
            self.out.write("\n")
            self.out.flush()


# --- command line ----------------------------------------------------------------------------

EPILOG = """profiles (--rate is the peak):
  constant  --rate throughout
  ramp      linear from --start-rate (default 0) to --rate
  step      --steps equal steps up to --rate
  day       --start-rate at night (default rate/10), --rate at midday, night again

The report gives the achieved rate, latency percentiles from each request's scheduled start,
status codes and, when replies carry --served-by-key, the spread over replicas.
Exit status 1 when no request succeeded (bad token, wrong address)."""


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagescaler-loadgen",
        description="Open-loop load against the imagescaler API: requests start on a fixed "
        "timeline whatever the server does, so overload shows up as latency.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="images to send, in turn")
    p.add_argument(
        "--server",
        default=environ.get("IMAGESCALER_SERVER", "127.0.0.1:50051"),
        help="API address (env IMAGESCALER_SERVER)",
    )
    p.add_argument("--token", help="bearer token (env IMAGESCALER_TOKEN)")
    p.add_argument("--token-file", help="file holding the token (env IMAGESCALER_TOKEN_FILE)")
    p.add_argument("--ca", help="CA certificate of a TLS listener (env IMAGESCALER_CA)")
    p.add_argument("--tls", action="store_true", help="TLS with the system roots")
    p.add_argument("--profile", choices=PROFILES, default="constant")
    p.add_argument("--rate", type=float, required=True, help="peak requests per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of load")
    p.add_argument("--start-rate", type=float, help="ramp start / day-curve night rate")
    p.add_argument("--steps", type=int, default=4, help="steps of the step profile")
    p.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    p.add_argument("--seed", type=int, help="random seed for Poisson arrivals")
    p.add_argument("--connections", type=int, default=4, help="channels (TCP connections)")
    p.add_argument("--max-in-flight", type=int, default=256, help="cap on requests in flight")
    p.add_argument("--max-requests", type=int, help="stop scheduling after this many")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request (s)")
    p.add_argument(
        "--served-by-key",
        default="x-served-by",
        help="reply metadata key naming the replica, counted when present",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def settings(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Profile, Target, bool]:
    profile = Profile(args.profile, args.rate, args.duration, args.start_rate, args.steps)
    if args.connections < 1 or args.max_in_flight < 1 or args.timeout <= 0:
        raise ValueError("--connections, --max-in-flight and --timeout must be positive")
    ca_path = args.ca or environ.get("IMAGESCALER_CA")
    target = Target(
        server=args.server,
        token=token_from(args, environ),
        ca=Path(ca_path).read_bytes() if ca_path else None,
        tls=args.tls,
        connections=args.connections,
        max_in_flight=args.max_in_flight,
        timeout=args.timeout,
        served_by_key=args.served_by_key,
    )
    return profile, target, args.arrivals == "poisson"


def run(
    profile: Profile,
    target: Target,
    images: Sequence[bytes],
    schedule: Iterable[float],
    progress_out: TextIO | None = None,
) -> Report:
    """Run one load test to completion (or Ctrl-C) and report it."""
    stats = Stats()
    progress = Progress(progress_out, profile, stats)
    runner = Runner(target, images, stats)
    start = time.monotonic()
    dispatch, stopped = 0.0, False
    try:
        with frozen_heap():
            runner.run(iter(schedule), progress)
            dispatch = time.monotonic() - start
            runner.drain(progress)
    except KeyboardInterrupt:
        runner.stop.set()
        dispatch, stopped = dispatch or time.monotonic() - start, True
    finally:
        progress.finish()
        runner.close()
    total = time.monotonic() - start
    return build_report(profile, target, stats, dispatch, total, stopped)


@reader_may_leave
def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    p = parser(environ)
    args = p.parse_args(argv)
    try:
        profile, target, poisson = settings(args, environ)
        images = [Path(f).read_bytes() for f in args.files]
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    schedule = itertools.islice(arrivals(profile, poisson, args.seed), args.max_requests)
    report = run(profile, target, images, schedule, None if args.quiet else sys.stderr)
    print(json.dumps(asdict(report), indent=2) if args.json else describe(report, profile))
    return 0 if report.codes.get("OK") else 1


if __name__ == "__main__":
    sys.exit(main())
