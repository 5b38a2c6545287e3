"""Header-only inspection of an image: format, declared size and EXIF orientation.

The API calls :func:`probe` to decide whether to scale; the pipeline calls :func:`open_image`
to refuse bad input before any pixel is decoded. Formats are decided by the bytes (Pillow's
openers with an explicit allowlist), never by a file name or a declared content type.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import struct
import warnings
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageFile

from processor.errors import InvalidInput, TooLarge

# Pillow opener names we accept, and the name we report for each decoded format. MPO
# (multi-picture JPEG, e.g. from phone cameras) comes through the JPEG opener.
OPENERS = ("JPEG", "PNG", "WEBP", "GIF")
FORMAT_NAMES = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
UNSUPPORTED = "unsupported or unrecognised image format; accepted: JPEG, PNG, WebP, GIF"

_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_ORIENTATION_TAG = 0x0112
_SHORT = 3
# JPEG start-of-frame markers carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# Between its bomb limit and twice that, Pillow only warns: in a server, a non-JSON line on
# stderr about an image that is refused anyway (--max-pixels is at most that limit).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# Structure budgets. Pillow parses JPEG segments, PNG chunks and GIF blocks one Python step
# at a time, and libjpeg re-walks every coefficient for each progressive scan, so a small
# file made of millions of empty segments or thousands of scans costs seconds to minutes of
# CPU (measured: 1 MB of empty JPEG comments 1.3 s to open; 20 KB of extra scans 1.6 s to
# decode). Each compressed PNG chunk may inflate to 1 MB. Real files stay far below these.
MAX_JPEG_SCANS = 100
MAX_JPEG_HEADER_STEPS = 4096  # segments, fill and junk bytes before the first scan
MAX_PNG_CHUNKS = 65_536
MAX_PNG_COMPRESSED_CHUNKS = 8
MAX_GIF_BLOCKS = 65_536  # extension sub-blocks before the first frame
_PNG_COMPRESSED = frozenset({b"iCCP", b"zTXt", b"iTXt"})
_SOS = re.compile(rb"\xff\xda")  # start of scan
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


@dataclass(frozen=True)
class Header:
    """What the header declares: size as stored, and the EXIF orientation (1-8)."""

    format: str  # "jpeg", "png", "webp" or "gif"
    width: int
    height: int
    orientation: int = 1

    @property
    def oriented_size(self) -> tuple[int, int]:
        """Size once EXIF orientation is applied (orientations 5-8 swap the axes)."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe(data: bytes, max_bytes: int, max_pixels: int) -> Header:
    """Inspect ``data`` without decoding pixels; raise InvalidInput or TooLarge to refuse it."""
    image, header = open_image(data, max_bytes, max_pixels, decoding=False)
    image.close()
    return header


def open_image(
    data: bytes, max_bytes: int, max_pixels: int, *, decoding: bool = True
) -> tuple[ImageFile.ImageFile, Header]:
    """Like :func:`probe`, but hand back the lazily opened image for the caller to decode."""
    if not data:
        raise InvalidInput("empty image")
    if len(data) > max_bytes:
        raise TooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    check_structure(data, decoding=decoding)
    declared = declared_size(data)
    if declared is not None:
        _check_pixels(*declared, max_pixels)
    image = _open(data, max_pixels)
    try:
        _check_pixels(image.width, image.height, max_pixels)
        header = Header(
            FORMAT_NAMES[image.format or ""], image.width, image.height, _orientation(image)
        )
    except BaseException:
        image.close()
        raise
    return image, header


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Image.open with the allowlist; every Pillow failure becomes a one-line domain error."""
    try:
        return Image.open(BytesIO(data), formats=list(OPENERS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(_bomb_message(str(exc), max_pixels)) from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidInput(_unopenable(data) if _signature(data) else UNSUPPORTED) from exc
    except Exception as exc:  # Pillow raises many types on hostile headers; none may escape.
        raise InvalidInput(_unopenable(data)) from exc


def _unopenable(data: bytes) -> str:
    """Why Pillow could not open the header: a valid JPEG it cannot decode, or damage."""
    with contextlib.suppress(struct.error):
        frame = _jpeg_frame(data) if data.startswith(b"\xff\xd8") else None
        if frame and frame[0] != 8:
            return f"JPEG with {frame[0]}-bit samples is not supported (8-bit only)"
    return f"corrupt {_signature(data) or 'image'} header"


def _signature(data: bytes) -> str | None:
    """The allowed format whose magic bytes ``data`` starts with, if any."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return "WebP" if _is_webp(data) else None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        size, limit = _sizes(pixels, max_pixels)
        raise TooLarge(f"image is {width}x{height} ({size}); the limit is {limit}")


def _bomb_message(pillow_message: str, max_pixels: int) -> str:
    match = _BOMB_PIXELS.search(pillow_message)
    if not match:
        return f"image declares too many pixels; the limit is {_mp(max_pixels)} MP"
    size, limit = _sizes(int(match.group(1)), max_pixels)
    return f"image declares {size}; the limit is {limit}"


def _sizes(pixels: int, max_pixels: int) -> tuple[str, str]:
    """Both in megapixels, or in pixels where rounding would show them equal (64 MP vs 64)."""
    size, limit = _mp(pixels), _mp(max_pixels)
    if size == limit:
        return f"{pixels:,} pixels", f"{max_pixels:,} pixels"
    return f"{size} MP", f"{limit} MP"


def _mp(pixels: int) -> str:
    value = pixels / 1e6
    return (f"{value:.1f}" if value >= 1 else f"{value:.2g}").removesuffix(".0")


def _orientation(image: Image.Image) -> int:
    """EXIF orientation from the header (PNG eXIf after IDAT is ignored: spec says before)."""
    raw = image.info.get("exif")
    return exif_orientation(raw) if isinstance(raw, bytes) else 1


def exif_orientation(raw: bytes) -> int:
    """Read tag 0x0112 from IFD0 of an EXIF block; 1 when absent, malformed or out of range.

    A few lines of struct instead of Pillow's TIFF tag parser: hostile EXIF must not reach a
    TIFF decoder, and a broken EXIF block should not cost the caller an otherwise good image.
    """
    tiff = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, entry)
        if tag == _ORIENTATION_TAG:
            return value if kind == _SHORT and 1 <= value <= 8 else 1
    return 1


def declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height straight from the header bytes, or None when not sure.

    Lets us refuse a decompression bomb with its real dimensions before Pillow runs, and
    before Pillow's WebP opener allocates the whole canvas. Pillow's own size stays
    authoritative: this is only an early refusal.
    """
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack_from(">II", data, 16)
            return width, height
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack_from("<HH", data, 6)
            return width, height
        if _is_webp(data):
            return _webp_size(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def check_structure(data: bytes, *, decoding: bool = True) -> None:
    """Refuse (TooLarge) files whose structure alone would cost far more than their pixels.

    Counting a JPEG's scans means searching the whole file (0.8 ms for 12 MP). Without
    ``decoding`` (the API's probe) only progressive files are searched: a baseline file's
    extra scans cost nothing to open, and the processor counts them before it decodes.
    """
    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data, decoding)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data)


def _check_jpeg(data: bytes, decoding: bool) -> None:
    steps, progressive = _jpeg_header_steps(data)
    if steps > MAX_JPEG_HEADER_STEPS:
        raise TooLarge(f"JPEG has over {MAX_JPEG_HEADER_STEPS} segments before its image data")
    if not (decoding or progressive):
        return
    # 0xFF 0xDA is always a marker: entropy-coded data stuffs every 0xFF with 0x00.
    scans = itertools.islice(_SOS.finditer(data), MAX_JPEG_SCANS + 1)
    if sum(1 for _ in scans) > MAX_JPEG_SCANS:
        raise TooLarge(f"JPEG has over {MAX_JPEG_SCANS} scans (progressive passes)")


def _jpeg_header_steps(data: bytes) -> tuple[int, bool]:
    """Steps a parser takes from SOI to the first scan, counted up to just past the budget,
    and whether a progressive frame header (SOF2, 6, 10, 14) came on the way."""
    pos, steps, progressive = 2, 0, False
    while pos + 1 < len(data) and steps <= MAX_JPEG_HEADER_STEPS:
        if data[pos] != 0xFF:  # junk between segments: Pillow skips it byte by byte
            found = data.find(b"\xff", pos)
            end = len(data) if found < 0 else found
            steps, pos = steps + end - pos, end
            continue
        marker, steps = data[pos + 1], steps + 1
        progressive |= marker in _PROGRESSIVE_SOF
        if marker == 0xDA:
            break
        if marker == 0xFF:
            pos += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD9 or pos + 4 > len(data):
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return steps, progressive


def _check_png(data: bytes) -> None:
    pos, chunks, compressed = 8, 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        compressed += kind in _PNG_COMPRESSED
        if chunks > MAX_PNG_CHUNKS:
            raise TooLarge(f"PNG has over {MAX_PNG_CHUNKS} chunks")
        if compressed > MAX_PNG_COMPRESSED_CHUNKS:
            raise TooLarge(
                f"PNG has over {MAX_PNG_COMPRESSED_CHUNKS} compressed metadata chunks "
                "(iCCP, zTXt, iTXt)"
            )
        if kind == b"IEND":
            return
        pos += 12 + length


def _check_gif(data: bytes) -> None:
    """Walk the extension blocks before the first image descriptor."""
    flags = data[10] if len(data) > 10 else 0
    colour_table = 3 << ((flags & 7) + 1) if flags & 0x80 else 0
    pos, blocks = 13 + colour_table, 0
    while pos + 1 < len(data) and data[pos] == 0x21:  # extension: label, then sub-blocks
        pos += 2
        while True:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise TooLarge(f"GIF has over {MAX_GIF_BLOCKS} blocks before its first frame")
            if pos >= len(data) or not data[pos]:
                break
            pos += 1 + data[pos]
        pos += 1


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size of a simple (VP8/VP8L) or extended (VP8X) WebP file."""
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return (width, height) if len(data) >= 30 else None
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = _jpeg_frame(data)
    return frame[1:] if frame else None


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """Sample precision, width and height: walk the marker segments to the first frame."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers carry no length
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            precision, height, width = struct.unpack_from(">BHH", data, pos + 4)
            return precision, width, height
        pos += 2 + length
    return None
