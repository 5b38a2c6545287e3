"""Hostile images through the real API and processor (both in this process, on loopback).

Every refusal must carry the precise status, come before the expensive work (the API refuses
from the header, so the processor never sees the call), start no external program, and leave
the process's memory where it was.
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from PIL import Image

from processor import headers
from tests.hardening.hostile import (
    PROCESSOR_LABELS,
    Client,
    SpawnLog,
    SpawnRefused,
    animated_gif,
    encode,
    gif_bomb,
    jpeg_bomb,
    photo,
    png_bomb,
    png_chunk,
    png_with_chunks,
    progressive_scan_bomb,
    rss_mb,
    webp_vp8_bomb,
    webp_vp8l_bomb,
    webp_vp8x_bomb,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FAST = 2.0  # seconds: generous for two noisy cores, far below any real decode of a bomb


@pytest.fixture(autouse=True)
def no_program_starts(spawn_log: SpawnLog) -> Iterator[SpawnLog]:
    """Every test here runs with the spawn guard on and must end with no attempt at all."""
    yield spawn_log
    assert spawn_log.attempts == []


def processor_calls(processor: Any) -> float:
    value = processor.registry.get_sample_value("grpc_server_started_total", PROCESSOR_LABELS)
    return value or 0.0


def refused_early(client: Client, processor: Any, data: bytes) -> grpc.RpcError:
    """The API's refusal, checked to be quick and to have cost the processor nothing."""
    before = processor_calls(processor)
    started = time.monotonic()
    error = client.refusal(data)
    assert time.monotonic() - started < FAST
    assert processor_calls(processor) == before
    return error


def test_the_spawn_guard_catches_a_program_start(spawn_log: SpawnLog) -> None:
    """Control: without this, 'no attempts' below would prove nothing."""
    with pytest.raises(SpawnRefused):
        subprocess.run(["true"], check=False)
    assert [event for event, _ in spawn_log.attempts] == ["subprocess.Popen"]
    spawn_log.attempts.clear()


# --- decompression bombs -----------------------------------------------------------------------

BOMBS: list[tuple[str, Callable[[int, int], bytes]]] = [
    ("png", png_bomb),
    ("jpeg", jpeg_bomb),
    ("gif", gif_bomb),
    ("webp-vp8x", webp_vp8x_bomb),
    ("webp-vp8l", webp_vp8l_bomb),
    ("webp-vp8", webp_vp8_bomb),
]


@pytest.mark.parametrize(("name", "make"), BOMBS, ids=[n for n, _ in BOMBS])
def test_decompression_bombs_refused_from_the_header(client, processor, name, make) -> None:
    data = make(16_000, 16_000)
    assert len(data) < 1024  # a few hundred bytes declaring 256 MP
    error = refused_early(client, processor, data)
    assert error.code() == EXHAUSTED
    assert error.details() == "image is 16000x16000 (256 MP); the limit is 64 MP"


def test_gif_with_ten_thousand_frames_decodes_only_the_first(client, processor) -> None:
    data = animated_gif(10_000)
    started = time.monotonic()
    reply = client.scale(data)
    assert time.monotonic() - started < FAST
    assert (reply.info.output_width, reply.info.output_height) == (1024, 768)
    assert (reply.info.original_width, reply.info.original_height) == (64, 48)
    with Image.open(io.BytesIO(reply.content)) as out:
        assert (out.format, out.size, getattr(out, "n_frames", 1)) == ("JPEG", (1024, 768), 1)


# --- structure bombs: cheap files that cost seconds in a parser ---------------------------------

STRUCTURE_BOMBS: list[tuple[str, Callable[[], bytes], str]] = [
    (
        "jpeg-progressive-scans",
        lambda: progressive_scan_bomb(150),
        "JPEG has over 100 scans (progressive passes)",
    ),
    (
        "jpeg-empty-comments",
        lambda: b"\xff\xd8" + b"\xff\xfe\x00\x02" * 250_000 + encode(photo(), "JPEG")[2:],
        "JPEG has over 4096 segments before its image data",
    ),
    (
        "jpeg-junk-bytes",
        lambda: b"\xff\xd8\xff\xe0\x00\x02" + b"\x00" * 1_000_000,
        "JPEG has over 4096 segments before its image data",
    ),
    (
        "png-iccp-inflating-to-1mb-each",
        lambda: png_with_chunks(
            png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"\x00" * 1_000_000, 9)) * 9
        ),
        "PNG has over 8 compressed metadata chunks (iCCP, zTXt, iTXt)",
    ),
    (
        "png-ztxt-after-idat",
        lambda: png_with_chunks(
            png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"\x00" * 1_000_000, 9)) * 9,
            after_idat=True,
        ),
        "PNG has over 8 compressed metadata chunks (iCCP, zTXt, iTXt)",
    ),
    (
        "png-empty-chunks",
        lambda: png_with_chunks(png_chunk(b"abCd", b"") * 70_000),
        "PNG has over 65536 chunks",
    ),
    (
        "gif-empty-extensions",
        lambda: gif_bomb(8, 8)[:13] + b"!\xfe\x00" * 70_000 + gif_bomb(8, 8)[13:],
        "GIF has over 65536 blocks before its first frame",
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "message"), STRUCTURE_BOMBS, ids=[n for n, _, _ in STRUCTURE_BOMBS]
)
def test_structure_bombs_refused_before_parsing(client, processor, name, make, message) -> None:
    """Regression: each of these took 0.5-60 s of CPU (in the API's probe) before the fix."""
    error = refused_early(client, processor, make())
    assert (error.code(), error.details()) == (EXHAUSTED, message)


def test_baseline_jpeg_with_extra_scans_is_refused_by_the_processor(client, processor) -> None:
    """The API's probe counts scans only in progressive files (the search costs 0.8 ms per
    12 MP image); the processor counts them in every file before it decodes."""
    data = encode(photo(), "JPEG")
    last = data.rindex(b"\xff\xda")
    bomb = data[:-2] + data[last:-2] * 150 + b"\xff\xd9"
    before = processor_calls(processor)
    started = time.monotonic()
    error = client.refusal(bomb)
    assert time.monotonic() - started < FAST
    assert (error.code(), error.details()) == (
        EXHAUSTED,
        "JPEG has over 100 scans (progressive passes)",
    )
    assert processor_calls(processor) == before + 1


def test_png_text_a_real_encoder_writes_is_still_accepted(client) -> None:
    """ImageMagick-style metadata (a profile and a few compressed text chunks) passes."""
    text = b"".join(
        png_chunk(b"zTXt", b"Raw profile type %d\x00\x00" % i + zlib.compress(b"x" * 5000))
        for i in range(4)
    )
    iccp = png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * 3000))
    reply = client.scale(png_with_chunks(iccp + text))
    assert reply.info.output_width == 1024


def test_progressive_jpeg_with_a_normal_scan_count_is_accepted(client) -> None:
    reply = client.scale(progressive_scan_bomb(0, size=(640, 480)))
    assert reply.info.original_width == 640


# --- truncated and corrupt data ---------------------------------------------------------------

SAMPLES = {
    "jpeg": lambda: encode(photo((320, 240)), "JPEG", quality=90),
    "progressive-jpeg": lambda: encode(photo((320, 240)), "JPEG", progressive=True),
    "png": lambda: encode(photo((320, 240)), "PNG"),
    "gif": lambda: encode(photo((320, 240)).convert("P"), "GIF"),
    "webp": lambda: encode(photo((320, 240)), "WEBP", quality=80),
    "webp-lossless": lambda: encode(photo((320, 240)), "WEBP", lossless=True),
}


@pytest.mark.parametrize("fmt", SAMPLES)
@pytest.mark.parametrize("keep", [0.02, 0.3, 0.7, 0.98])
def test_truncated_images_are_invalid_and_the_api_carries_on(client, fmt, keep) -> None:
    data = SAMPLES[fmt]()
    error = client.refusal(data[: int(len(data) * keep)])
    assert error.code() == INVALID, error.details()
    assert "\n" not in error.details() and len(error.details()) < 200
    assert client.scale(data).info.output_width == 1024


@pytest.mark.parametrize("fmt", SAMPLES)
def test_data_replaced_by_garbage_is_invalid(client, fmt) -> None:
    data = bytearray(SAMPLES[fmt]())
    middle = len(data) // 3
    data[middle : middle + 64] = b"\xff\x00\xa5" * 21 + b"\x5a"
    data[-32:] = b"\xa5" * 32
    try:
        reply = client.scale(bytes(data))
    except grpc.RpcError as error:
        assert error.code() == INVALID, error.details()
    else:  # some decoders conceal damage; then the output must still be a whole image
        with Image.open(io.BytesIO(reply.content)) as out:
            assert out.size == (1024, 768)


def test_corrupt_jpeg_that_needs_no_pixel_work_is_refused_too(client) -> None:
    """Regression (found by tools/fuzz.py): within the margin and already gray, a JPEG is passed
    through without re-encoding; a broken scan came back as a successful reply."""
    data = bytearray(encode(photo((1024, 768), "L"), "JPEG", quality=90))
    sos = data.index(b"\xff\xda")
    data[sos + 5] = 9  # the scan names a component the frame does not have
    error = client.refusal(bytes(data))
    assert (error.code(), error.details()) == (INVALID, "corrupt or truncated image data")


# --- polyglots: the bytes decide, and nothing of the other format comes back -------------------

HTML = b"<html><script>alert(document.cookie)</script></html>"


def zip_archive() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("index.html", HTML)
    return out.getvalue()


def jpeg_with_comment(image: Image.Image, comment: bytes) -> bytes:
    data = encode(image, "JPEG", quality=90)
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]


def assert_clean(content: bytes) -> None:
    for needle in (b"PK\x03\x04", b"<script", b"%PDF", b"<html"):
        assert needle not in content


def test_gif_that_is_also_a_zip(client) -> None:
    gif = encode(photo((200, 150)).convert("P"), "GIF")
    polyglot = gif + zip_archive()
    assert zipfile.is_zipfile(io.BytesIO(polyglot))
    reply = client.scale(polyglot)
    assert reply.info.original_width == 200
    assert_clean(reply.content)


def test_jpeg_that_is_also_html_and_zip(client) -> None:
    polyglot = jpeg_with_comment(photo((640, 480)), HTML) + HTML + zip_archive()
    reply = client.scale(polyglot)
    assert reply.info.scaled
    assert_clean(reply.content)


def test_passed_through_jpeg_drops_the_payload_after_its_end(client) -> None:
    """No pixel work (within the margin, already gray): the bytes are kept, but not the rest."""
    base = jpeg_with_comment(photo((1024, 768), "L"), HTML)
    reply = client.scale(base + b"%PDF-1.4\n" + HTML + zip_archive())
    assert reply.info.passthrough
    assert_clean(reply.content)
    assert reply.content.endswith(b"\xff\xd9")


def test_png_with_html_text_and_a_trailing_zip(client) -> None:
    data = png_with_chunks(png_chunk(b"tEXt", b"Comment\x00" + HTML)) + zip_archive()
    reply = client.scale(data)
    assert reply.info.original_width == 16
    assert_clean(reply.content)


def test_pdf_with_an_embedded_jpeg_is_refused(client) -> None:
    jpeg = encode(photo((64, 64)), "JPEG")
    pdf = b"%PDF-1.4\n1 0 obj << /Type /XObject /Filter /DCTDecode >> stream\n" + jpeg
    error = client.refusal(pdf + b"\nendstream endobj\n%%EOF\n")
    assert error.code() == INVALID
    assert error.details() == headers.UNSUPPORTED


# --- formats outside the allowlist --------------------------------------------------------------


def psd() -> bytes:
    pixels = bytes(32 * 32 * 3)
    return (
        b"8BPS"
        + struct.pack(">H6sHIIHH", 1, b"", 3, 32, 32, 8, 3)
        + struct.pack(">III", 0, 0, 0)
        + struct.pack(">H", 0)
        + pixels
    )


OUTSIDE = {
    "tiff": lambda: encode(photo((32, 32)), "TIFF"),
    "psd": psd,
    "eps": lambda: encode(photo((32, 32)), "EPS"),
    "bmp": lambda: encode(photo((32, 32)), "BMP"),
    "ico": lambda: encode(photo((32, 32)), "ICO"),
    "pdf": lambda: encode(photo((32, 32)), "PDF"),
    "jp2": lambda: encode(photo((32, 32)), "JPEG2000"),
    "j2k-codestream": lambda: encode(photo((32, 32)), "JPEG2000", no_jp2=True),
    "qoi": lambda: encode(photo((32, 32)), "QOI"),
    "svg": lambda: (
        b'<svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>'
    ),
}


@pytest.mark.parametrize("fmt", OUTSIDE)
def test_formats_outside_the_allowlist_are_refused_early(client, processor, fmt) -> None:
    error = refused_early(client, processor, OUTSIDE[fmt]())
    assert (error.code(), error.details()) == (INVALID, headers.UNSUPPORTED)


def test_eps_refused_even_with_a_jpeg_extension_of_its_own(client, processor) -> None:
    """A DOS EPS binary header wraps PostScript; Pillow would hand it to Ghostscript."""
    postscript = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(%pipe%id) run\n"
    header = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIIIH", 30, len(postscript), 0, 0, 0, 0, 0xFFFF)
    error = refused_early(client, processor, header + postscript)
    assert (error.code(), error.details()) == (INVALID, headers.UNSUPPORTED)


# --- memory -------------------------------------------------------------------------------------


def hostile_batch() -> list[bytes]:
    batch = [make(16_000, 16_000) for _, make in BOMBS]
    batch += [make() for _, make, _ in STRUCTURE_BOMBS]
    batch += [OUTSIDE[fmt]() for fmt in ("tiff", "eps", "pdf")]
    sample = SAMPLES["png"]()
    batch += [sample[: len(sample) // 2], animated_gif(2_000)]
    return batch


def test_memory_returns_to_baseline_after_bombs(client) -> None:
    batch = hostile_batch()
    outcomes = []

    def run_batch() -> None:
        for data in batch:
            try:
                client.scale(data)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                outcomes.append(error.code())

    run_batch()  # warm up: first-use allocations (codecs, thread stacks, gRPC buffers)
    baseline = rss_mb()
    for _ in range(3):
        run_batch()
    grown = rss_mb() - baseline
    assert grown < 48, f"RSS grew by {grown:.0f} MB over three batches of hostile inputs"
    assert set(outcomes) <= {grpc.StatusCode.OK, INVALID, EXHAUSTED}
    assert not re.search(r"UNKNOWN|INTERNAL", str(outcomes))
