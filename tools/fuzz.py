"""A long fuzz run over the four places hostile input meets our code (a tool, not a CI test).

    python -m tools.fuzz --minutes 10 [--targets header,pipeline,decision,url]
                         [--corpus photo.jpg ...] [--seed N] [--out DIR]

Random mutation (bit flips, byte sets, truncation, deletion, splices, repeats) of small
generated images and any ``--corpus`` files drives the header reader and the pipeline; random
sizes and margins drive the margin decision; random text, URL fragments and every notation of
random IPv4 addresses drive the URL validator. Anything but the documented outcome is a
finding: an exception other than InvalidInput/TooLarge, an output of the wrong size, a broken
property, or a call slower than ``--slow`` seconds. Each distinct finding is printed once and
its input saved under ``--out``; the exit status is 1 when there are findings.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import resource
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from io import BytesIO
from pathlib import Path

from PIL import Image

from api.decision import decide, within_margin
from api.fetch import address_allowed, parse_source_url
from processor import headers, imaging
from processor.errors import InvalidInput, TooLarge

MAX_BYTES = 8 << 20
MAX_PIXELS = 8_000_000
CLEAN = (InvalidInput, TooLarge)
JOBS = (
    imaging.Job(size=(64, 48)),
    imaging.Job(size=(40, 40), mode="fill", grayscale=False, format="png"),
    imaging.Job(size=(33, 21), mode="fit", grayscale=False, format="webp"),
    imaging.Job(size=(50, 20), mode="stretch"),
    imaging.Job(grayscale=True),
    imaging.Job(grayscale=False),
)
URL_PARTS = (
    "http://", "https://", "HTTP://", "ftp://", "//", "http:\\\\", "@", ":", "[", "]", "::",
    "%2e", "%00", "..", "/", "?", "#", "\t", "\u200b", "\uff0e", "0x7f", "127.1", "localhost",
    "metadata.google.internal", "xn--", ":80", ":0", ":65536", "::ffff:", "64:ff9b::",
)  # fmt: skip


@dataclass
class Findings:
    """Distinct unexpected outcomes, their counts, and where their first input went."""

    out: Path
    counts: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)

    def add(self, target: str, what: str, sample: bytes | str, detail: str = "") -> None:
        key = f"{target}: {what}"
        self.counts[key] += 1
        if self.counts[key] > 1:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        name = (
            self.out
            / f"{target}-{len(self.counts)}.{'bin' if isinstance(sample, bytes) else 'txt'}"
        )
        if isinstance(sample, bytes):
            name.write_bytes(sample)
        else:
            name.write_text(repr(sample) + "\n")
        print(f"FINDING {key} -> {name}\n{detail}", flush=True)


# --- images -------------------------------------------------------------------------------


def generated_seeds() -> list[bytes]:
    """Small images in every accepted format and the modes people send."""
    base = Image.effect_noise((48, 32), 60).convert("RGB")
    frames = [base.convert("P"), Image.new("P", (48, 32), 7)]
    specs: list[tuple[Image.Image, str, dict[str, object]]] = [
        (base, "JPEG", {"quality": 80}),
        (base, "JPEG", {"progressive": True}),
        (base.convert("CMYK"), "JPEG", {}),
        (base.convert("L"), "JPEG", {}),
        (base, "PNG", {}),
        (base.convert("RGBA"), "PNG", {}),
        (base.convert("P"), "PNG", {"transparency": 0}),
        (base.convert("I;16"), "PNG", {}),
        (frames[0], "GIF", {"save_all": True, "append_images": frames[1:]}),
        (base, "WEBP", {"quality": 70}),
        (base, "WEBP", {"lossless": True}),
        (base, "WEBP", {"save_all": True, "append_images": [base]}),
    ]
    seeds = []
    for image, fmt, params in specs:
        out = BytesIO()
        image.save(out, fmt, **params)
        seeds.append(out.getvalue())
    return seeds


def mutate(rng: random.Random, seeds: Sequence[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 5)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(6)
        if kind == 0 and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1 and at < len(data):
            data[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0xDA, 0xD9, 0x01, rng.randrange(256)))
        elif kind == 2:
            del data[at:]
        elif kind == 3:
            del data[at : at + rng.randint(1, 64)]
        elif kind == 4:
            donor = rng.choice(seeds)
            start = rng.randrange(len(donor))
            data[at:at] = donor[start : start + rng.randint(1, 256)]
        else:
            data[at:at] = data[at : at + rng.randint(1, 32)] * rng.randint(2, 50)
    return bytes(data)


def check_header(data: bytes) -> str | None:
    """None when the outcome is one the API may see; otherwise what was wrong."""
    try:
        header = headers.probe(data, MAX_BYTES, MAX_PIXELS)
    except CLEAN as exc:
        return None if str(exc) and "\n" not in str(exc) else f"bad message {exc!r}"
    if header.format not in ("jpeg", "png", "webp", "gif") or not 1 <= header.orientation <= 8:
        return f"odd header {header}"
    return None if 1 <= header.pixels <= MAX_PIXELS else f"pixels out of range {header}"


def check_pipeline(data: bytes, job: imaging.Job) -> str | None:
    try:
        result = imaging.process(data, job, imaging.Limits(MAX_BYTES, MAX_PIXELS))
    except CLEAN:
        return None
    g = result.geometry
    with Image.open(BytesIO(result.data)) as out:
        out.load()
        if (
            out.size != (g.output_width, g.output_height)
            or (out.format or "").lower() != job.format
        ):
            return f"output {out.format} {out.size} but geometry says {g}"
    if job.size is not None and job.mode != "fit" and out.size != job.size:
        return f"output {out.size} for a {job.mode} job of {job.size}"
    return None


# --- decision and URLs ----------------------------------------------------------------------


def check_decision(
    size: tuple[int, int], target: tuple[int, int], low: float, high: float
) -> str | None:
    """Symmetry, monotonicity in the margin, decide == not within_margin, exact boundary."""
    inside = within_margin(size, target, low)
    if within_margin(size[::-1], target[::-1], low) is not inside:
        return "not symmetric in the axes"
    if inside and not within_margin(size, target, high):
        return "not monotonic in the margin"
    if decide(size, target, low, True).scale is inside:
        return "decide disagrees with within_margin"
    per_mille = round(low * 1000)
    edge = (target[0] + per_mille * target[0] // 1000, target[1])
    if per_mille * target[0] % 1000 == 0 and not within_margin(edge, target, low):
        return "exact boundary is outside"
    return None


def random_url(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(0, 40)))
    return "".join(rng.choice(URL_PARTS) for _ in range(rng.randint(1, 8)))


def check_url(text: str) -> str | None:
    try:
        source = parse_source_url(text)
    except InvalidInput as exc:
        return "URL echoed in the message" if len(text) > 12 and text in str(exc) else None
    if source.scheme not in ("http", "https") or not source.host.isascii() or "@" in source.host:
        return f"accepted {source}"
    if not source.target.startswith("/") or not 0 < source.port < 65536:
        return f"accepted {source}"
    return None


def check_address(value: int) -> str | None:
    address = ipaddress.IPv4Address(value)
    for host in (str(value), hex(value), ".".join(f"0{o:o}" for o in address.packed)):
        source = parse_source_url(f"http://{host}/")
        if source.literal != address:
            return "a numeric notation parsed as another address"
    allowed = address_allowed(address)
    if allowed and not (address.is_global and not address.is_multicast):
        return "non-global address allowed"
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    if address_allowed(mapped) is not allowed:
        return "IPv4-mapped form judged differently"
    return None


# --- the run ------------------------------------------------------------------------------


Check = Callable[[], "str | None"]


def case(target: str, rng: random.Random, seeds: Sequence[bytes]) -> tuple[bytes | str, Check]:
    """One random input for ``target`` and the check that judges what the code does with it."""
    if target in ("header", "pipeline"):
        data = mutate(rng, seeds)
        if target == "header":
            return data, lambda: check_header(data)
        job = rng.choice(JOBS)
        return data, lambda: check_pipeline(data, job)
    if target == "decision":
        size = (rng.randint(1, 20_000), rng.randint(1, 20_000))
        box = (rng.randint(1, 20_000), rng.randint(1, 20_000))
        low, high = sorted(float(Fraction(rng.randint(0, 999), 1000)) for _ in range(2))
        return f"{size} {box} {low} {high}", lambda: check_decision(size, box, low, high)
    if rng.random() < 0.5:
        text = random_url(rng)
        return text, lambda: check_url(text)
    value = rng.getrandbits(32)
    return f"ipv4 {value}", lambda: check_address(value)


def run_one(
    target: str, rng: random.Random, seeds: Sequence[bytes], found: Findings, slow: float
) -> None:
    sample, check = case(target, rng, seeds)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            problem = check()
    except Exception as exc:
        detail = "".join(traceback.format_exception(exc, limit=-4))
        found.add(target, f"{type(exc).__name__}: {str(exc)[:80]}", sample, detail)
        return
    for warning in caught:
        found.warnings[f"{warning.category.__name__}: {str(warning.message)[:60]}"] += 1
    if problem:
        found.add(target, problem[:120], sample)
    elapsed = time.perf_counter() - started
    if elapsed > slow:
        found.add(target, f"slower than {slow} s", sample, f"{elapsed:.2f} s")


def fuzz(minutes: float, targets: Sequence[str], seeds: Sequence[bytes], seed: int,
         out: Path, slow: float) -> Findings:  # fmt: skip
    rng, found = random.Random(seed), Findings(out)
    deadline, runs, last = time.monotonic() + minutes * 60, Counter[str](), time.monotonic()
    while time.monotonic() < deadline:
        target = targets[sum(runs.values()) % len(targets)]
        run_one(target, rng, seeds, found, slow)
        runs[target] += 1
        if time.monotonic() - last > 30:
            last = time.monotonic()
            print(
                f"{dict(runs)} findings={sum(found.counts.values())} {peak_rss_mb()} MB", flush=True
            )
    print(f"runs: {dict(runs)}; peak RSS {peak_rss_mb()} MB")
    return found


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    parser.add_argument("--targets", default="header,pipeline,decision,url",
                        help="comma-separated: header, pipeline, decision, url")  # fmt: skip
    parser.add_argument("--corpus", nargs="*", default=[], type=Path, help="more seed images")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed if unset)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="findings dir")
    parser.add_argument("--slow", type=float, default=2.0, help="seconds that count as a hang")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"header", "pipeline", "decision", "url"}
    if unknown or not targets:
        parser.error(f"unknown targets: {', '.join(sorted(unknown)) or '(none)'}")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    seeds = generated_seeds() + [path.read_bytes() for path in args.corpus]
    print(f"fuzzing {', '.join(targets)} for {args.minutes} min, seed {seed}, {len(seeds)} seeds")
    found = fuzz(args.minutes, targets, seeds, seed, args.out, args.slow)
    for key, count in found.counts.most_common():
        print(f"{count:8d}  {key}")
    for key, count in found.warnings.most_common(10):
        print(f"{count:8d}  (warning) {key}")
    print("no findings" if not found.counts else f"{len(found.counts)} distinct findings")
    return 1 if found.counts else 0


if __name__ == "__main__":
    sys.exit(main())
