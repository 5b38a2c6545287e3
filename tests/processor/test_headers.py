"""processor.headers: format allowlist, size limits and orientation, from the header alone."""

from __future__ import annotations

import re
import struct

import pytest
from PIL import Image

from processor.errors import InvalidInput, TooLarge
from processor.headers import (
    UNSUPPORTED,
    Header,
    check_structure,
    declared_size,
    exif_orientation,
    probe,
)
from tests.processor.outside_pytest import run_python

MB = 1024 * 1024
LIMIT_PIXELS = 64_000_000


def check(data: bytes, max_bytes: int = 32 * MB, max_pixels: int = LIMIT_PIXELS) -> Header:
    return probe(data, max_bytes, max_pixels)


@pytest.mark.parametrize(
    ("fmt", "name", "params"),
    [
        ("JPEG", "jpeg", {}),
        ("PNG", "png", {}),
        ("WEBP", "webp", {}),
        ("GIF", "gif", {}),
        ("JPEG", "jpeg", {"progressive": True}),
    ],
)
def test_accepted_formats_report_name_and_size(images, fmt, name, params):
    data = images.encode(images.photo((40, 30)), fmt, **params)
    header = check(data)
    assert header == Header(name, 40, 30, 1)
    assert header.pixels == 1200


def test_mpo_reports_jpeg(images):
    first, second = images.photo((40, 30)), Image.new("RGB", (40, 30), "blue")
    data = images.encode(first, "MPO", save_all=True, append_images=[second])
    assert check(data).format == "jpeg"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_and_oriented_size(images, orientation):
    data = images.encode(images.photo((40, 30)), "JPEG", exif=images.exif(orientation=orientation))
    header = check(data)
    assert header.orientation == orientation
    assert header.oriented_size == ((30, 40) if orientation >= 5 else (40, 30))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_orientation_from_png_and_webp_exif(images, fmt):
    data = images.encode(images.photo((40, 30)), fmt, exif=images.exif(orientation=6))
    assert check(data).orientation == 6


def test_exif_orientation_big_endian_and_malformed():
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, 8, 0)
    big_endian = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry
    assert exif_orientation(b"Exif\x00\x00" + big_endian) == 8
    assert exif_orientation(big_endian[:-6]) == 1  # entry cut short
    assert exif_orientation(b"Exif\x00\x00garbage") == 1
    assert exif_orientation(big_endian.replace(b"\x00\x08\x00\x00", b"\x00\x09\x00\x00")) == 1
    assert exif_orientation(b"II*\x00" + struct.pack("<I", 10**9)) == 1


def test_empty_is_invalid():
    with pytest.raises(InvalidInput, match=r"^empty image$"):
        check(b"")


def test_over_max_bytes_is_too_large(images):
    data = images.encode(images.photo((40, 30)), "PNG")
    with pytest.raises(TooLarge, match=f"^image is {len(data)} bytes; the limit is 100$"):
        check(data, max_bytes=100)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: f.png_header_only(30000, 30000), "image is 30000x30000 (900 MP)"),
        (lambda f: f.gif_header_only((65535, 65535), (1, 1)), "image is 65535x65535"),
        (lambda f: f.webp_vp8x_header(16383, 16383), "image is 16383x16383"),
        (lambda f: f.jpeg_header_only(65000, 65000), "image is 65000x65000"),
        (lambda f: f.png_header_only(10000, 7000), "image is 10000x7000 (70 MP)"),
    ],
)
def test_bombs_are_refused_from_the_header(images, make, message):
    with pytest.raises(TooLarge, match=rf"^{re.escape(message)}.*; the limit is 64 MP$"):
        check(make(images))


def test_a_size_just_over_the_limit_does_not_read_as_the_limit(images):
    """8001x8000 is 64.008 MP: 'image is ... (64 MP); the limit is 64 MP' said nothing."""
    with pytest.raises(TooLarge) as refused:
        check(images.png_header_only(8001, 8000))
    assert str(refused.value) == (
        "image is 8001x8000 (64,008,000 pixels); the limit is 64,000,000 pixels"
    )


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ((20000, 20000), "image declares 400 MP"),  # Pillow's DecompressionBombError
        ((10000, 10000), "image declares 100 MP"),  # Pillow's warning, made an error
        ((9000, 8000), "image is 9000x8000 (72 MP)"),  # under Pillow's limit, over ours
    ],
)
def test_gif_frame_larger_than_its_screen_is_refused(images, frame, message):
    with pytest.raises(TooLarge, match=f"^{re.escape(message)}; the limit is 64 MP$"):
        check(images.gif_header_only((1, 1), frame))


def test_pillows_bomb_warning_is_a_refusal_not_a_line_on_stderr(images):
    """Outside pytest (which makes every warning an error) Pillow printed a non-JSON warning."""
    data = images.gif_header_only((1, 1), (10000, 10000))
    code = (
        "import sys; from processor.headers import probe\n"
        "try: probe(bytes.fromhex(sys.argv[1]), 1 << 20, 64_000_000)\n"
        "except Exception as exc: print(type(exc).__name__, exc)"
    )
    done = run_python(code, data.hex())
    assert done.stdout == "TooLarge image declares 100 MP; the limit is 64 MP\n"
    assert done.stderr == ""


def test_pixel_limit_is_configurable(images):
    data = images.encode(images.photo((40, 30)), "PNG")
    with pytest.raises(TooLarge, match=r"^image is 40x30 \(0\.0012 MP\); the limit is 0\.001 MP$"):
        check(data, max_pixels=1000)


def _psd() -> bytes:
    return b"8BPS" + struct.pack(">H6sHIIHH", 1, b"", 3, 10, 10, 8, 3) + b"\x00" * 64


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "ICO", "EPS", "PDF", "JPEG2000", "PPM", "TGA"])
def test_formats_outside_the_allowlist_are_refused(images, fmt):
    data = images.encode(images.photo((32, 32)), fmt)
    with pytest.raises(InvalidInput, match=f"^{UNSUPPORTED}$"):
        check(data)


@pytest.mark.parametrize(
    "data",
    [
        _psd(),
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        bytes(range(256)) * 4,
        b"\x00",
        b"GIF",  # a prefix of a signature is not an image
    ],
    ids=["psd", "svg", "random", "one-byte", "gif-prefix"],
)
def test_non_images_are_refused(data):
    with pytest.raises(InvalidInput, match=f"^{UNSUPPORTED}$"):
        check(data)


def test_avif_is_refused_even_though_pillow_reads_it(images):
    data = images.encode(images.photo((32, 32)), "AVIF")
    assert Image.open(__import__("io").BytesIO(data)).format == "AVIF"
    with pytest.raises(InvalidInput, match=f"^{UNSUPPORTED}$"):
        check(data)


def test_name_does_not_matter_only_bytes(images):
    png = images.encode(images.photo((40, 30)), "PNG")
    assert check(png).format == "png"  # no name is ever consulted: bytes decide


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda f: f.png_header_only(40, 30)[:20], "corrupt PNG header"),
        (lambda f: f.png_header_only(40, 30).replace(b"IHDR", b"IHDX"), "corrupt PNG header"),
        (lambda f: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "corrupt JPEG header"),
        (lambda f: b"GIF89a\x01", "corrupt GIF header"),
        (lambda f: f.webp_vp8x_header(10, 10)[:20], "corrupt WebP header"),
    ],
)
def test_corrupt_headers_say_so(images, corrupt, message):
    with pytest.raises(InvalidInput, match=f"^{message}"):
        check(corrupt(images))


def test_bad_png_crc_is_invalid(images):
    data = bytearray(images.encode(images.photo((40, 30)), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    with pytest.raises(InvalidInput, match=r"^corrupt"):
        check(bytes(data))


def test_declared_size_reads_every_allowed_format(images):
    photo = images.photo((40, 30))
    for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        assert declared_size(images.encode(photo, fmt)) == (40, 30), fmt
    assert declared_size(images.encode(photo, "WEBP", lossless=True)) == (40, 30)
    assert declared_size(images.encode(photo, "WEBP", exif=images.exif(make="x"))) == (40, 30)
    assert declared_size(b"\xff\xd8\xff\xda") is None
    assert declared_size(b"RIFF\x00\x00\x00\x00WEBPVP8 ") is None


def _with_extra_scans(data: bytes, extra: int) -> bytes:
    """``data`` (ending in EOI) with its last scan repeated ``extra`` times."""
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra + b"\xff\xd9"


@pytest.mark.parametrize("progressive", [False, True])
def test_scan_count_is_checked_before_decoding(images, progressive):
    data = images.encode(images.photo((64, 48)), "JPEG", progressive=progressive)
    bomb = _with_extra_scans(data, 150)
    check_structure(data)
    with pytest.raises(TooLarge, match="over 100 scans"):
        check_structure(bomb)


def test_the_header_probe_searches_only_progressive_files_for_scans(images):
    """A baseline file's extra scans cost nothing to open (the processor refuses them before
    it decodes); a progressive file's are refused by the probe already."""
    baseline = _with_extra_scans(images.encode(images.photo((64, 48)), "JPEG"), 150)
    progressive = _with_extra_scans(
        images.encode(images.photo((64, 48)), "JPEG", progressive=True), 150
    )
    check_structure(baseline, decoding=False)
    assert check(baseline) == Header("jpeg", 64, 48, 1)
    with pytest.raises(TooLarge, match="over 100 scans"):
        check_structure(progressive, decoding=False)
    with pytest.raises(TooLarge, match="over 100 scans"):
        check(progressive)


def test_a_12_bit_jpeg_is_unsupported_not_corrupt(images):
    data = bytearray(images.encode(Image.new("L", (64, 48), 100), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 1], data[sof + 4] = 0xC1, 12  # extended sequential, 12-bit samples
    with pytest.raises(InvalidInput, match=r"^JPEG with 12-bit samples is not supported"):
        check(bytes(data))
    with pytest.raises(InvalidInput, match=r"^corrupt JPEG header$"):
        check(bytes(data[: sof + 4]))
