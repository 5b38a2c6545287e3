"""Peak decode memory, estimated from the header, and the per-process budget it is held in.

Admission by count alone lets two big decodes exceed the pod's memory limit: a 16 MP WebP
peaks at about 250 MiB, a 48 MP one at about 740 MiB. :func:`estimate` bounds the peak RSS
growth of one :func:`processor.imaging.process` call before any pixel is decoded;
:class:`Budget` refuses calls whose estimate does not fit.

Where the constants come from: peak RSS growth (VmHWM after ``clear_refs`` minus VmRSS
before) of ``imaging.process``, one fresh process per case, Pillow 13.0 / libwebp 1.6 /
simplejpeg 1.9, 16 MP (4608x3456) and 48 MP (8000x6000) inputs to 1024x768, gray and
colour output (November 2026). Measured bytes per source pixel, 16 MP / 48 MP:

=====================================  =============  ==========
input                                  measured       constant
=====================================  =============  ==========
WebP (lossy, lossless, animated)       16.7 / 16.6    17.5
RGBA PNG flattened (JPEG or gray out)  12.0 / 12.0    12.5
RGBA PNG kept (PNG/WebP colour out)     9.6 / 8.7     10
LA PNG kept (16 MP)                    13.6           14
RGB PNG                                 5.6 / 5.2     5.6
palette PNG or GIF, colour out          6.6 / 5.7     6.6
palette PNG or GIF, gray out            2.5 / 2.2     2.6
L PNG                                   1.5 / 1.2     1.2 (+ the fixed part)
16-bit gray PNG (16 MP)                 5.0           5.5
progressive JPEG, 4:2:0 colour          3.5 / 3.2     2.2 x samples per pixel
=====================================  =============  ==========

Every non-JPEG format decodes at full resolution (libwebp's animation decoder keeps two RGBA
canvases whatever the frame count, and only the first frame is decoded). A JPEG decodes
DCT-scaled, so it costs per *decoded* pixel (5 bytes for colour, 2 for luma only, 9 through
Pillow's CMYK path; measured 48 MP to 1024x768 colour: 20.5 MiB in all),
plus, when progressive, libjpeg's coefficient buffer for the whole image (2 bytes per
coefficient). Output (resize result, canvas, encoder) costs per output pixel, measured
upscaling to 48 MP: JPEG L 3.1, RGB 10.3; PNG L 1.5, RGB 5.7, RGBA 8.5; WebP L 10.7, RGB
10.2, RGBA 18.2 (constants: ``OUTPUT``); plus a fixed 4 MiB.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from processor.errors import Overloaded, TooLarge

MIB = 1 << 20
FIXED = 4 * MIB
OUTPUT = {
    ("jpeg", "L"): 3.5,
    ("jpeg", "RGB"): 11.0,
    ("png", "L"): 2.0,
    ("png", "RGB"): 6.5,
    ("png", "RGBA"): 9.5,
    ("webp", "L"): 11.5,
    ("webp", "RGB"): 11.5,
    ("webp", "RGBA"): 19.5,
}
WEBP = 17.5
ALPHA_FLATTENED = 12.5
ALPHA_KEPT = {"RGBA": 10.0}
ALPHA_KEPT_OTHER = 14.0
OPAQUE = {"RGB": 5.6, "L": 1.2, "I;16": 5.5, "I;16B": 5.5, "I;16L": 5.5, "I": 5.5}
PALETTE_COLOUR, PALETTE_GRAY = 6.6, 2.6
UNKNOWN_MODE = ALPHA_FLATTENED
JPEG_PER_DECODED_PIXEL = 5.0  # RGB, through simplejpeg
JPEG_GRAY_PER_DECODED_PIXEL = 2.0  # luma only: a gray JPEG, or gray output
JPEG_PILLOW_PER_DECODED_PIXEL = 9.0  # CMYK and other modes simplejpeg cannot decode
COEFFICIENT_BYTES = 2.2
# 512 MiB pod limit - about 100 MiB idle (Python, gRPC, Pillow, numpy) - request bodies in
# work and queued and gRPC buffers (about 64 MiB with typical inputs) - slack: 320 MiB.
# One 16 MP WebP (estimate 275 MiB) fits, two at once do not; a 48 MP RGBA PNG never does.
DEFAULT_BUDGET = 320 * MIB
AT_CAPACITY = "processor at capacity; retry shortly"  # the API translates this exact text


@dataclass(frozen=True)
class Source:
    """What the header says about the decode ahead (all before any pixel is decoded)."""

    format: str  # "jpeg", "png", "webp" or "gif"
    mode: str  # Pillow's mode after open
    pixels: int  # stored width x height
    alpha: str = "none"  # "none", "flatten" (onto white) or "keep"
    grayscale: bool = False  # output
    decoded_pixels: int = 0  # JPEG: pixels after DCT scaling
    coefficient_samples: float = 0.0  # progressive JPEG: samples per pixel, all components


@dataclass(frozen=True)
class Output:
    """What the call encodes: format, mode ("L", "RGB" or "RGBA") and pixels (0: none)."""

    format: str
    mode: str
    pixels: int


def estimate(source: Source, output: Output) -> int:
    """Upper bound of one call's peak memory growth, in bytes."""
    per_output_pixel = OUTPUT.get((output.format, output.mode), max(OUTPUT.values()))
    return int(_decode_bytes(source) + per_output_pixel * output.pixels + FIXED)


def _decode_bytes(source: Source) -> float:
    if source.format == "jpeg":
        return _jpeg_bytes(source)
    if source.format == "webp":
        return WEBP * source.pixels
    return _per_pixel(source) * source.pixels


def _jpeg_bytes(source: Source) -> float:
    if source.mode not in ("L", "RGB"):
        per_pixel = JPEG_PILLOW_PER_DECODED_PIXEL
    elif source.mode == "L" or source.grayscale:
        per_pixel = JPEG_GRAY_PER_DECODED_PIXEL
    else:
        per_pixel = JPEG_PER_DECODED_PIXEL
    decoded = per_pixel * source.decoded_pixels
    return decoded + COEFFICIENT_BYTES * source.coefficient_samples * source.pixels


def _per_pixel(source: Source) -> float:
    """PNG and GIF bytes per stored pixel, by mode and what happens to alpha."""
    if source.alpha == "flatten":
        return ALPHA_FLATTENED
    if source.alpha == "keep":
        return ALPHA_KEPT.get(source.mode, ALPHA_KEPT_OTHER)
    if source.mode in ("P", "1"):
        return PALETTE_GRAY if source.grayscale else PALETTE_COLOUR
    return OPAQUE.get(source.mode, UNKNOWN_MODE)


def megabytes(nbytes: int) -> int:
    return -(-nbytes // MIB)


class Budget:
    """Bytes that calls in work may reserve; beyond it they are refused, never queued.

    Reserving costs a lock and an integer, so small images pay nothing measurable.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("memory budget must be positive")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` while the block runs: TooLarge if it can never fit, else
        Overloaded while other calls hold too much."""
        if nbytes > self.capacity:
            raise TooLarge(
                f"image needs about {megabytes(nbytes)} MB to decode; "
                f"this processor allows {megabytes(self.capacity)} MB"
            )
        with self._lock:
            if self.used + nbytes > self.capacity:
                raise Overloaded(AT_CAPACITY)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._lock:
                self.used -= nbytes
