"""Property-based tests (hypothesis) for the four places hostile input meets our code: the
header reader, the margin decision, the URL validator and the pixel pipeline.

Example counts are modest so the folder stays fast; ``tools/fuzz.py`` runs the long version.
Warnings are recorded, not raised: production does not run with -W error, and the property is
about what the caller gets.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from fractions import Fraction
from io import BytesIO
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from api.decision import decide, within_margin
from api.fetch import Fetcher, FetchPolicy, SourceURL, address_allowed, parse_source_url
from auth.tenants import TENANT_ID_PATTERN
from processor import headers, imaging
from processor.errors import InvalidInput, TooLarge
from tests.hardening.hostile import encode, photo, seed_sample

T = TypeVar("T")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_BYTES = 4 << 20
MAX_PIXELS = 4_000_000


def quietly(call: Callable[[], T]) -> T:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


# --- seeds and mutations --------------------------------------------------------------------


def _seeds() -> list[bytes]:
    small = photo((48, 32))
    frames = [small.convert("P"), Image.new("P", (48, 32), 7)]
    return [
        seed_sample(),
        encode(small, "JPEG", quality=80),
        encode(small, "JPEG", progressive=True),
        encode(small.convert("L"), "JPEG"),  # gray: passed through when no pixel work is asked
        encode(small.convert("CMYK"), "JPEG"),
        encode(small, "PNG"),
        encode(small.convert("RGBA"), "PNG"),
        encode(small.convert("P"), "PNG", transparency=0),
        encode(small.convert("I;16"), "PNG"),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(small, "WEBP", quality=70),
        encode(small, "WEBP", lossless=True),
        encode(small, "WEBP", save_all=True, append_images=[small], exif=b"Exif\x00\x00II*\x00"),
    ]


SEEDS = _seeds()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real image with a few bit flips, byte sets, truncations, deletions and splices."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "delete", "splice", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xDA, 0xD9, 0x01]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            donor = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(donor) - 1))
            data[at:at] = donor[start : start + draw(st.integers(1, 256))]
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 32))] * draw(st.integers(2, 50))
    return bytes(data)


def probe_outcome(data: bytes) -> headers.Header | Exception:
    try:
        return quietly(lambda: headers.probe(data, MAX_BYTES, MAX_PIXELS))
    except (InvalidInput, TooLarge) as exc:
        return exc


def check_probe(data: bytes) -> None:
    outcome = probe_outcome(data)
    if isinstance(outcome, headers.Header):
        assert outcome.format in ("jpeg", "png", "webp", "gif")
        assert 1 <= outcome.pixels <= MAX_PIXELS
        assert 1 <= outcome.orientation <= 8
    else:
        assert str(outcome) and "\n" not in str(outcome)


# --- the header reader ------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_probe_of_random_bytes(data: bytes) -> None:
    check_probe(data)


@FUZZ
@given(
    st.sampled_from(
        [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]
    ),
    st.binary(max_size=256),
)
def test_probe_of_random_bytes_behind_a_real_signature(signature: bytes, rest: bytes) -> None:
    check_probe(signature + rest)


@FUZZ
@given(mutated_images())
def test_probe_of_mutated_images(data: bytes) -> None:
    check_probe(data)


@FUZZ
@given(mutated_images())
def test_declared_size_never_raises(data: bytes) -> None:
    size = headers.declared_size(data)
    assert size is None or all(isinstance(side, int) and side >= 0 for side in size)


@FUZZ
@given(st.binary(max_size=256))
def test_exif_orientation_is_always_1_to_8(raw: bytes) -> None:
    assert 1 <= headers.exif_orientation(b"Exif\x00\x00" + raw) <= 8
    assert 1 <= headers.exif_orientation(raw) <= 8


# --- the pipeline --------------------------------------------------------------------------------

JOBS = [
    imaging.Job(size=(64, 48)),
    imaging.Job(size=(40, 40), mode="fill", grayscale=False, format="png"),
    imaging.Job(size=(33, 21), mode="fit", grayscale=False, format="webp"),
    imaging.Job(size=(50, 20), mode="stretch"),
    imaging.Job(grayscale=True),  # no pixel work: gray JPEGs pass through
    imaging.Job(grayscale=False),  # no pixel work: colour JPEGs pass through
]
LIMITS = imaging.Limits(max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


@settings(FUZZ, max_examples=80)
@given(mutated_images(), st.sampled_from(JOBS))
def test_process_of_mutated_images(data: bytes, job: imaging.Job) -> None:
    try:
        result = quietly(lambda: imaging.process(data, job, LIMITS))
    except (InvalidInput, TooLarge) as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    geometry = result.geometry
    with Image.open(BytesIO(result.data)) as out:
        out.load()
        assert out.format.lower() == job.format
        assert out.size == (geometry.output_width, geometry.output_height)
    if job.size is not None:
        expected = imaging.plan((geometry.original_width, geometry.original_height), job)
        assert out.size == (expected.output_width, expected.output_height)
        if job.mode != "fit":
            assert out.size == job.size


# --- the margin decision ---------------------------------------------------------------------

sides = st.integers(1, 20_000)
margins = st.one_of(
    st.sampled_from([0.0, 0.05, 0.1, 0.5, 0.999]),
    st.floats(0, 0.999, allow_nan=False, allow_infinity=False),
    st.fractions(0, Fraction(999, 1000), max_denominator=1000).map(float),
)


@FUZZ
@given(sides, sides, sides, sides, margins)
def test_margin_symmetric_in_axes_and_direction(w: int, h: int, tw: int, th: int, m: float):
    inside = within_margin((w, h), (tw, th), m)
    assert within_margin((h, w), (th, tw), m) is inside
    mirrored = (2 * tw - w, 2 * th - h)  # the same distance on the other side of the target
    if min(mirrored) >= 1:
        assert within_margin(mirrored, (tw, th), m) is inside


@FUZZ
@given(sides, sides, sides, sides, margins, margins)
def test_margin_is_monotonic(w: int, h: int, tw: int, th: int, a: float, b: float) -> None:
    low, high = sorted((a, b))
    if within_margin((w, h), (tw, th), low):
        assert within_margin((w, h), (tw, th), high)


@FUZZ
@given(st.integers(1, 200), st.integers(0, 99), st.integers(1, 200), st.booleans())
def test_margin_boundary_is_exact(unit: int, percent: int, other_unit: int, above: bool) -> None:
    """At exactly margin x target a side is inside; one pixel further it is out."""
    target = (100 * unit, 100 * other_unit)
    margin = percent / 100
    edge = target[0] + (1 if above else -1) * percent * unit
    assume(edge - (0 if above else 1) >= 1)
    assert within_margin((edge, target[1]), target, margin)
    beyond = edge + (1 if above else -1)
    assert not within_margin((beyond, target[1]), target, margin)


@FUZZ
@given(sides, sides, sides, sides, margins, st.booleans())
def test_decide_is_the_margin_and_the_configuration(w, h, tw, th, m, gray) -> None:
    decision = decide((w, h), (tw, th), m, gray)
    assert decision.scale is not within_margin((w, h), (tw, th), m)
    assert decision.grayscale is gray
    assert decide((tw, th), (tw, th), m, gray).scale is False


# --- the URL validator --------------------------------------------------------------------------

url_texts = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda scheme, middle, rest: f"{scheme}{middle}{rest}",
        st.sampled_from(["http://", "https://", "HTTP://", "http:/", "ftp://", "//", "http:\\\\"]),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
        st.sampled_from(["", "/", "/a?b=c", ":80/", ":0/", ":65536", "@evil/", "#frag", "%2f"]),
    ),
)


def check_source(url: str) -> SourceURL | None:
    try:
        source = parse_source_url(url)
    except InvalidInput as exc:
        assert str(exc) and not (len(url) > 12 and url in str(exc))  # never echoed
        return None
    assert source.scheme in ("http", "https")
    assert source.host.isascii() and source.host == source.host.lower() and source.host
    assert "@" not in source.host and 0 < source.port < 65536
    assert source.target.startswith("/") and source.target.isascii()
    assert not any(unicodedata.category(ch)[0] in "CZ" for ch in source.target)
    return source


@FUZZ
@given(url_texts)
def test_parse_source_url_on_random_text(url: str) -> None:
    check_source(url)


def ipv4_renderings(value: int) -> list[str]:
    """The notations inet_aton (and so the system resolver) reads as the same address."""
    octets = value.to_bytes(4, "big")
    a, b, c, d = octets
    return [
        ".".join(map(str, octets)),
        str(value),
        hex(value),
        f"0x{value:08X}",
        oct(value).replace("0o", "0"),
        ".".join(f"0{o:o}" for o in octets),
        ".".join(hex(o) for o in octets),
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{hex(a)}.{b}.0{c:o}.{d}",
        ".".join(map(str, octets)) + ".",
    ]


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_every_ipv4_notation_parses_to_the_same_checked_address(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    for host in ipv4_renderings(value):
        source = check_source(f"http://{host}/x")
        assert source is not None and source.literal == address, host
    allowed = address_allowed(address)
    if allowed:  # never more permissive than the standard library's idea of "global"
        assert address.is_global and not address.is_multicast
    if address.is_loopback or address.is_private or address.is_link_local:
        assert not allowed


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_ipv4_hidden_in_ipv6_is_judged_as_ipv4(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    expected = address_allowed(v4)
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value)
    for v6 in (mapped, nat64):
        assert address_allowed(v6) is expected
        for text in (str(v6), v6.exploded, f"::ffff:{v4}" if v6 is mapped else str(v6)):
            source = check_source(f"http://[{text}]/x")
            assert source is not None and source.literal == v6
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)
    if address_allowed(sixtofour):
        assert expected


@FUZZ
@given(st.integers(0, 2**128 - 1))
def test_ipv6_allowed_only_in_global_unicast(value: int) -> None:
    address = ipaddress.IPv6Address(value)
    if address_allowed(address):
        assert address in ipaddress.IPv6Network("2000::/3") or address.ipv4_mapped is not None
        assert not (address.is_loopback or address.is_link_local or address.is_site_local)
        assert not (address.is_private and address.ipv4_mapped is None)


class _Outbound(RuntimeError):
    """The fetcher tried to connect (raised by the audit hook instead of connecting)."""


@pytest.fixture(scope="module")
def connect_guard() -> Iterator[list[tuple[str, int]]]:
    """Every connect of this module's tests is recorded and refused: nothing leaves the
    process. Only the tests' own thread: another test's straggler is not theirs to count (nor
    to break: a refused connect is no OSError, so a library's socket leaks)."""
    import sys

    attempts: list[tuple[str, int]] = []
    state = {"on": True}
    mine = threading.get_ident()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if (
            state["on"]
            and threading.get_ident() == mine
            and event == "socket.connect"
            and isinstance(args[1], tuple)
        ):
            attempts.append((str(args[1][0]), int(args[1][1])))
            raise _Outbound(str(args[1]))

    sys.addaudithook(hook)
    yield attempts
    state["on"] = False


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    st.sampled_from(["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "fd00::1", "8.8.8.8"]).map(
        ipaddress.ip_address
    ),
)


@FUZZ
@given(st.lists(addresses, min_size=1, max_size=4))
def test_fetch_connects_only_when_every_resolved_address_is_allowed(
    connect_guard: list[tuple[str, int]], resolved: list[Any]
) -> None:
    fetcher = Fetcher(FetchPolicy(total_timeout=2.0), lambda host, port: [str(a) for a in resolved])
    connect_guard.clear()
    try:
        fetcher.fetch("http://img.test/photo.jpg", 2.0)
    except InvalidInput:
        assert not all(address_allowed(a) for a in resolved)
        assert connect_guard == []
        return
    except _Outbound:
        pass
    assert all(address_allowed(a) for a in resolved)
    ((host, port),) = connect_guard
    assert port == 80
    first = resolved[0]
    mapped = getattr(first, "ipv4_mapped", None)
    assert ipaddress.ip_address(host) == (mapped or first)
    assert socket.AF_INET  # the guard refused the connect before any packet was sent


# --- tenant ids -----------------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=70))
def test_accepted_tenant_ids_are_canonical(text: str) -> None:
    """Two ids that differ by case, width or invisible characters cannot both be accepted."""
    if TENANT_ID_PATTERN.fullmatch(text):
        assert text == unicodedata.normalize("NFKC", text).casefold()
        assert text.isascii() and text.isprintable() and not any(c in text for c in "/:. ")


# --- the long-run tool ----------------------------------------------------------------------


def test_fuzz_tool_runs_and_reports(tmp_path, capsys) -> None:
    """A second of tools/fuzz.py with a fixed seed, so the tool itself cannot rot."""
    from tools import fuzz

    assert fuzz.main(["--minutes", "0.02", "--seed", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 3" in out and "no findings" in out
    assert not any(tmp_path.iterdir())
