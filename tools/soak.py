"""``python -m tools.soak``: hours of steady load; throughput, latency and RSS over time.

Runs the stack as subprocesses (as :mod:`tools.faults` does) or targets a running one, drives
open-loop load with :mod:`tools.loadgen`'s machinery, and every ``--interval`` seconds writes
one CSV row: requests sent and completed, OK and error rates, p50/p99 latency of the requests
that completed in the interval, and the resident memory of each server process. At the end it
draws the three series as a PNG (with Pillow: no plotting library needed) and prints the
memory trend, so a leak is visible at a glance.

    python -m tools.soak --duration 3600 --rate 20 --out soak/
    python -m tools.soak --server 127.0.0.1:50051 --token-file .run/token \\
        --pid api=$(pgrep -f api.server) --duration 600 --rate 10 --out soak/
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, ImageDraw, ImageFont

from tools import faults, loadgen

WARMUP_FRACTION = 0.2  # samples before this share of the run do not count for the trend


# --- sampling ------------------------------------------------------------------------------


@dataclass
class Window(loadgen.Stats):
    """Counts for the whole run, latencies only since the last :meth:`take` (bounded memory
    over hours, unlike loadgen's Stats, which keeps every latency for its report)."""

    recent: list[tuple[str, float]] = field(default_factory=list)

    def finished(self, code: str, scheduled: float, sent: float, replica: str | None) -> None:
        latency = time.monotonic() - scheduled
        with self.lock:
            self.codes[code] += 1
            self.recent.append((code, latency))

    def take(self) -> list[tuple[str, float]]:
        with self.lock:
            taken, self.recent = self.recent, []
        return taken


@dataclass(frozen=True)
class Process:
    """A server process whose RSS is sampled."""

    name: str
    rss: Callable[[], int | None]


def pid_process(name: str, pid: int) -> Process:
    return Process(name, lambda: faults.rss_bytes(pid))


class Sampler:
    """Called from the load loop (loadgen's ``tick``); writes a row every ``interval`` s."""

    def __init__(
        self, stats: Window, processes: Sequence[Process], interval: float, out: TextIO
    ) -> None:
        self.stats, self.processes, self.interval = stats, list(processes), interval
        self.start = self.last = time.monotonic()
        self.rows: list[dict[str, float]] = []
        self.completed = 0
        columns = ["elapsed_s", "sent", "completed", "ok_per_s", "errors_per_s", "p50_ms"]
        columns += ["p99_ms", *(f"rss_{p.name}_mb" for p in self.processes)]
        self.writer = csv.DictWriter(out, columns)
        self.writer.writeheader()
        self.out = out

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.sample(now)

    def sample(self, now: float) -> dict[str, float]:
        window, seconds = self.stats.take(), max(now - self.last, 1e-9)
        self.last = now
        latencies = sorted(ms * 1000 for _, ms in window)
        ok = sum(code == "OK" for code, _ in window)
        with self.stats.lock:
            sent, self.completed = self.stats.sent, self.stats.completed
        row = {
            "elapsed_s": round(now - self.start, 1),
            "sent": sent,
            "completed": self.completed,
            "ok_per_s": round(ok / seconds, 2),
            "errors_per_s": round((len(window) - ok) / seconds, 2),
            "p50_ms": round(loadgen.percentile(latencies, 0.5), 1),
            "p99_ms": round(loadgen.percentile(latencies, 0.99), 1),
        }
        for p in self.processes:
            rss = p.rss()
            row[f"rss_{p.name}_mb"] = round(rss / 2**20, 1) if rss is not None else float("nan")
        self.rows.append(row)
        self.writer.writerow(row)
        self.out.flush()
        return row


def soak(
    target: loadgen.Target,
    profile: loadgen.Profile,
    images: Sequence[bytes],
    processes: Sequence[Process],
    interval: float,
    out: TextIO,
) -> tuple[list[dict[str, float]], dict[str, int]]:
    """Run the load to the end (or Ctrl-C), sampling; returns the rows and the status counts."""
    stats = Window()
    sampler = Sampler(stats, processes, interval, out)
    runner = loadgen.Runner(target, images, stats)
    try:
        runner.run(loadgen.arrivals(profile), sampler)
        runner.drain(sampler)
    except KeyboardInterrupt:
        runner.stop.set()
    finally:
        runner.close()
    sampler.sample(time.monotonic())
    return sampler.rows, dict(stats.codes.most_common())


# --- the memory trend ----------------------------------------------------------------------


def slope_per_hour(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (seconds), scaled to one hour."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 3600


def trend(rows: Sequence[Mapping[str, float]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per process: RSS after warm-up, at the end, and the fitted growth in MB per hour."""
    if not rows:
        return {}
    cut = rows[-1]["elapsed_s"] * WARMUP_FRACTION
    steady = [r for r in rows if r["elapsed_s"] >= cut] or list(rows)
    out = {}
    for name in names:
        key = f"rss_{name}_mb"
        points = [(r["elapsed_s"], r[key]) for r in steady if r[key] == r[key]]  # not NaN
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        out[name] = {
            "after_warmup_mb": ys[0],
            "end_mb": ys[-1],
            "max_mb": max(ys),
            "growth_mb_per_hour": round(slope_per_hour(xs, ys), 1),
        }
    return out


# --- the plot ------------------------------------------------------------------------------

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    series: dict[str, list[float]]


def panels(rows: Sequence[Mapping[str, float]], names: Sequence[str]) -> list[Panel]:
    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    return [
        Panel("throughput", "req/s", {"OK": col("ok_per_s"), "errors": col("errors_per_s")}),
        Panel("latency", "ms", {"p50": col("p50_ms"), "p99": col("p99_ms")}),
        Panel("resident memory", "MB", {n: col(f"rss_{n}_mb") for n in names}),
    ]


def nice_top(value: float) -> float:
    """A round axis maximum at or above ``value``: 1, 2 or 5 times a power of ten."""
    if not value > 0 or math.isinf(value):
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= value)


class Chart:
    """Line charts stacked vertically, drawn with ImageDraw."""

    def __init__(self, width: int = 1200, panel_height: int = 260) -> None:
        self.width, self.panel_height = width, panel_height
        self.left, self.right, self.top, self.bottom = 70, 20, 30, 30
        self.font = ImageFont.load_default()

    def draw(self, xs: Sequence[float], chart: Sequence[Panel], title: str) -> Image.Image:
        height = 40 + self.panel_height * len(chart)
        image = Image.new("RGB", (self.width, height), "white")
        d = ImageDraw.Draw(image)
        d.text((self.left, 12), title, fill="black", font=self.font)
        for i, panel in enumerate(chart):
            self._panel(d, xs, panel, 40 + i * self.panel_height)
        return image

    def _panel(self, d: ImageDraw.ImageDraw, xs: Sequence[float], panel: Panel, y0: int) -> None:
        x1, y1 = self.width - self.right, y0 + self.panel_height - self.bottom
        left, top = self.left, y0 + self.top
        values = [v for s in panel.series.values() for v in s if v == v]
        ymax, xmax = nice_top(max(values, default=1.0)), max(xs[-1] if xs else 1.0, 1.0)
        d.rectangle((left, top, x1, y1), outline="#888888")
        for k in range(5):  # grid and labels
            y = y1 - (y1 - top) * k / 4
            d.line((left, y, x1, y), fill="#e0e0e0")
            d.text((4, y - 6), f"{ymax * k / 4:g}", fill="black", font=self.font)
            x = left + (x1 - left) * k / 4
            d.text((x - 10, y1 + 6), f"{xmax * k / 4:.0f} s", fill="black", font=self.font)
        d.text((left, y0 + 8), f"{panel.title} ({panel.unit})", fill="black", font=self.font)

        def point(x: float, y: float) -> tuple[float, float]:
            return left + (x1 - left) * x / xmax, y1 - (y1 - top) * min(y, ymax) / ymax

        for n, (name, series) in enumerate(panel.series.items()):
            colour = COLOURS[n % len(COLOURS)]
            line = [point(x, y) for x, y in zip(xs, series, strict=True) if y == y]
            if len(line) > 1:
                d.line(line, fill=colour, width=2)
            lx = left + 220 + 110 * n  # the legend runs along the panel's title line
            d.rectangle((lx, y0 + 10, lx + 14, y0 + 18), fill=colour)
            d.text((lx + 20, y0 + 8), name, fill="black", font=self.font)


def plot(rows: Sequence[Mapping[str, float]], names: Sequence[str], path: Path, title: str) -> None:
    xs = [r["elapsed_s"] for r in rows]
    Chart().draw(xs, panels(rows, names), title).save(path)


# --- command line --------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.soak",
        description="Steady open-loop load for a long time; CSV and PNG of throughput, "
        "latency and server RSS over time.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="images to send (default: sample)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--out", type=Path, default=Path("soak"), help="output directory")
    p.add_argument("--processors", type=int, default=2, help="processors to start")
    p.add_argument("--api-arg", action="append", default=[], help="extra API flag (with =)")
    p.add_argument("--processor-arg", action="append", default=[], help="extra processor flag")
    p.add_argument("--server", help="target a running API instead of starting one")
    p.add_argument("--token-file", help="with --server: the bearer token")
    p.add_argument("--ca", help="with --server: CA of a TLS listener")
    p.add_argument("--pid", action="append", default=[], help="with --server: NAME=PID to sample")
    p.add_argument("--connections", type=int, default=4, help="channels to the API")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per request (s)")
    return p


def named_pids(specs: Sequence[str]) -> list[Process]:
    out = []
    for spec in specs:
        name, sep, pid = spec.partition("=")
        if not sep or not pid.isdigit() or not name.isidentifier():
            raise ValueError(f"--pid wants NAME=PID, got {spec!r}")
        out.append(pid_process(name, int(pid)))
    return out


def external(args: argparse.Namespace) -> tuple[loadgen.Target, list[Process]]:
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    target = loadgen.Target(
        server=args.server,
        token=token,
        ca=Path(args.ca).read_bytes() if args.ca else None,
        connections=args.connections,
        max_in_flight=1024,
        timeout=args.timeout,
    )
    return target, named_pids(args.pid)


def started(args: argparse.Namespace, cleanup: ExitStack) -> tuple[loadgen.Target, list[Process]]:
    spec = faults.StackSpec(
        processors=args.processors,
        api_args=tuple(args.api_arg),
        processor_args=tuple(args.processor_arg),
    )
    stack = cleanup.enter_context(faults.running(spec, args.out / "stack"))
    target = stack.target(connections=args.connections, timeout=args.timeout)
    return target, [Process(s.name, s.rss) for s in stack.servers()]


def summary(
    rows: Sequence[Mapping[str, float]], codes: Mapping[str, int], names: Sequence[str]
) -> dict[str, Any]:
    p99s = sorted(r["p99_ms"] for r in rows if r["completed"])
    return {
        "samples": len(rows),
        "seconds": rows[-1]["elapsed_s"] if rows else 0,
        "codes": dict(codes),
        "worst_interval_p99_ms": p99s[-1] if p99s else 0.0,
        "median_interval_p99_ms": loadgen.percentile(p99s, 0.5),
        "rss": trend(rows, names),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0 or args.interval <= 0:
        p.error("--duration, --rate and --interval must be positive")
    files = args.files or [str(faults.SAMPLE)]
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:
        try:
            target, processes = external(args) if args.server else started(args, cleanup)
        except (ValueError, OSError) as exc:
            p.error(str(exc))
        images = [Path(f).read_bytes() for f in files]
        profile = loadgen.Profile("constant", args.rate, args.duration)
        with (args.out / "soak.csv").open("w", newline="") as out:
            rows, codes = soak(target, profile, images, processes, args.interval, out)
    names = [proc.name for proc in processes]
    title = (
        f"imagescaler soak: {args.rate:g} req/s for {args.duration:g} s, every {args.interval:g} s"
    )
    plot(rows, names, args.out / "soak.png", title)
    result = summary(rows, codes, names)
    (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'soak.csv'}, {args.out / 'soak.png'}", file=sys.stderr)
    return 0 if codes.get("OK") else 1


if __name__ == "__main__":
    sys.exit(main())
