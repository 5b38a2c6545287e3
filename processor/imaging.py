"""The pixel pipeline: decode, orient, crop and scale, colour, pad, encode. No gRPC here.

:func:`process` runs one image through these steps, cheapest refusal first:

1. :func:`processor.headers.open_image` refuses bad input from the header alone.
2. A JPEG is decoded already shrunk in the DCT domain, luma only when grayscale is asked:
   libjpeg-turbo's N/8 scaling through ``simplejpeg`` (finer steps than Pillow's ``draft``,
   25-40% faster on the benchmark photos), else Pillow's ``draft`` (CMYK, or anything
   ``simplejpeg`` refuses: Pillow has the last word on damaged files).
3. EXIF orientation is applied with ``transpose`` (ImageOps.exif_transpose copies metadata).
4. One ``resize`` does crop, integer reduce and LANCZOS (``box`` and ``reducing_gap``).
5. Colour: alpha is flattened onto white for JPEG and grayscale output; colour output is
   converted from a non-sRGB ICC profile to sRGB; grayscale output takes luma from the
   encoded values and drops any profile knowingly (``color="gray"``).
6. Padding is pasted onto a canvas; the encoder gets no metadata at all.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import simplejpeg
from PIL import Image, ImageCms

from processor import memory
from processor.errors import InvalidInput, Overloaded, ServiceError, TooLarge
from processor.headers import Header, open_image

FIT_MODES = ("fit", "fill", "pad", "stretch")
OUTPUT_FORMATS = ("jpeg", "png", "webp")
DEFAULT_QUALITY = 85
COLOR_SRGB = "srgb"  # no profile, an sRGB profile, or an unusable one: sRGB assumed
COLOR_CONVERTED = "converted-to-srgb"
COLOR_GRAY = "gray"

# Decode JPEGs at least this much larger than the output. The DCT-domain downscale is a
# blocky filter; a LANCZOS pass over >= 1.4x hides it. Measured at q85 against a
# full-resolution LANCZOS reference: <= 0.9 dB worse than the naive path, where landing
# at 1.0-1.3x the output size lost up to 2.9 dB on the sample photo.
DCT_MARGIN = 1.4
# resize() first reduce()s by an integer factor while >= 2x the output remains. Measured on
# a 12 MP photo: 2.0 is up to 2x faster than 3.0 and loses <= 0.2 dB at q85.
REDUCING_GAP = 2.0
# zlib level 1 encodes 3-4x faster than the default 6 for 5-15% more bytes.
PNG_COMPRESS_LEVEL = 1
# libwebp method 0 encodes about 3x faster than the default 4 for 15-25% more bytes.
WEBP_METHOD = 0
# 4:2:0 chroma, the usual for photos: smaller and faster to encode than 4:4:4.
JPEG_SUBSAMPLING = "4:2:0"
_SIMPLEJPEG_SPACES = {"L": ("GRAY", "Gray"), "RGB": ("RGB", "420")}

_MAX_SIDE = {"jpeg": 65_500, "png": 2**31 - 1, "webp": 16_383}
_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_KEY_BAND = 256  # rows per step when a 16-bit tRNS key is painted white
_PROFILE_SPACES = {"RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK", "L": "GRAY"}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# APP1-APP15 except APP14 (Adobe: tells decoders the colour transform), and COM.
_JPEG_DROPPED = (frozenset(range(0xE1, 0xF0)) - {0xEE}) | {0xFE}
# The end of entropy-coded data: 0xFF followed by neither stuffing (00), RSTn nor fill.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class Limits:
    """Per-image refusal thresholds. Pillow's own bomb check must never fire first."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("limits must be positive")
        if Image.MAX_IMAGE_PIXELS and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels may not exceed Pillow's {Image.MAX_IMAGE_PIXELS}")


@dataclass(frozen=True)
class Job:
    """What one request asks for. Invalid values raise InvalidInput (they come from callers).

    The default mode, ``pad``, gives ML pipelines exactly the target size with no distortion
    and nothing cropped away.
    """

    size: tuple[int, int] | None = None  # None: keep the size
    mode: str = "pad"
    pad_color: tuple[int, int, int] = (0, 0, 0)
    grayscale: bool = True
    format: str = "jpeg"
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        if self.mode not in FIT_MODES:
            raise InvalidInput(f"unknown mode {self.mode!r}; expected one of {FIT_MODES}")
        if self.format not in OUTPUT_FORMATS:
            raise InvalidInput(f"unknown format {self.format!r}; expected {OUTPUT_FORMATS}")
        if not 1 <= self.quality <= 100:
            raise InvalidInput(f"quality must be 1-100, got {self.quality}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise InvalidInput(f"target size must be at least 1x1, got {self.size}")
        if len(self.pad_color) != 3 or not all(0 <= c <= 255 for c in self.pad_color):
            raise InvalidInput(f"pad colour must be three values 0-255, got {self.pad_color}")


@dataclass(frozen=True)
class Geometry:
    """How output pixels map to the original: ``out = (orig - crop) * scale + pad``.

    Coordinates are continuous (pixel edges, not centres); the original is taken after EXIF
    orientation. The crop is the whole image unless mode ``fill`` cut it.
    """

    original_width: int
    original_height: int
    orientation: int
    output_width: int
    output_height: int
    scale_x: float
    scale_y: float
    crop_x: int
    crop_y: int
    crop_width: int
    crop_height: int
    pad_x: int
    pad_y: int

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        return (
            self.crop_x,
            self.crop_y,
            self.crop_x + self.crop_width,
            self.crop_y + self.crop_height,
        )

    @property
    def content_size(self) -> tuple[int, int]:
        """Size of the scaled image before padding."""
        return round(self.crop_width * self.scale_x), round(self.crop_height * self.scale_y)

    def to_output(self, x: float, y: float) -> tuple[float, float]:
        """Map a point of the (oriented) original to the output."""
        return (
            (x - self.crop_x) * self.scale_x + self.pad_x,
            (y - self.crop_y) * self.scale_y + self.pad_y,
        )

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Map a point of the output back to the (oriented) original."""
        return (
            (x - self.pad_x) / self.scale_x + self.crop_x,
            (y - self.pad_y) / self.scale_y + self.crop_y,
        )


@dataclass(frozen=True)
class Timings:
    decode_ms: float
    transform_ms: float
    encode_ms: float


@dataclass(frozen=True)
class Result:
    """The encoded image and what was done to it (see :class:`Geometry` for the mapping).

    ``color`` is COLOR_GRAY whenever the output is gray: luma comes from the encoded values
    and any ICC profile is dropped on purpose, as ML pipelines expect.
    """

    data: bytes
    geometry: Geometry
    format: str
    input_format: str
    scaled: bool
    grayscale: bool  # the output is single-channel gray
    mode: str | None  # the fit mode used, when scaled
    color: str  # COLOR_SRGB, COLOR_CONVERTED or COLOR_GRAY
    passthrough: bool  # input JPEG kept bit for bit, only metadata segments dropped
    timings: Timings


def process(data: bytes, job: Job, limits: Limits, budget: memory.Budget | None = None) -> Result:
    """Run one image through the pipeline; refuse it with a ServiceError.

    With a ``budget``, the call holds its estimated peak memory (from the header) while it
    decodes and transforms, or is refused before decoding when that does not fit.
    """
    started = time.perf_counter()
    image, header = open_image(data, limits.max_bytes, limits.max_pixels)
    try:
        geometry = plan(header.oriented_size, job, header.orientation)
        _check_output(geometry, job, limits)
        stripped = None
        if _can_pass_through(image, header, job):
            stripped = strip_jpeg_metadata(data)
        need = memory_estimate(image, header, job, geometry, passthrough=stripped is not None)
        with budget.reserve(need) if budget else nullcontext():
            if stripped is not None:
                _check_decodes(image)
                return _passthrough(stripped, image, geometry, started)
            return _convert(data, image, header, job, geometry, started)
    finally:
        image.close()


def memory_estimate(
    image: Image.Image, header: Header, job: Job, geometry: Geometry, passthrough: bool = False
) -> int:
    """Upper bound of the call's peak memory, from the header alone (see processor.memory)."""
    alpha = _alpha_fate(image, job)
    output = memory.Output(
        format=job.format,
        mode="L" if job.grayscale else "RGBA" if alpha == "keep" else "RGB",
        pixels=0 if passthrough else geometry.output_width * geometry.output_height,
    )
    source = memory.Source(
        format=header.format,
        mode=image.mode,
        pixels=header.pixels,
        alpha=alpha,
        grayscale=job.grayscale,
        decoded_pixels=_jpeg_decoded_pixels(header, geometry, passthrough),
        coefficient_samples=_coefficient_samples(image),
    )
    return memory.estimate(source, output)


def _alpha_fate(image: Image.Image, job: Job) -> str:
    if not _has_alpha(image):
        return "none"
    return "keep" if _keeps_alpha(job) else "flatten"


def _keeps_alpha(job: Job) -> bool:
    """Only colour PNG or WebP output carries alpha; everything else is flattened onto white."""
    return job.format != "jpeg" and not job.grayscale


def _jpeg_decoded_pixels(header: Header, geometry: Geometry, passthrough: bool) -> int:
    """Pixels a JPEG decodes to: Pillow's power-of-two DCT scale, at least as many as
    simplejpeg's N/8 (so a fallback to Pillow stays within the estimate)."""
    if header.format != "jpeg":
        return 0
    if passthrough:
        return math.ceil(header.width / 8) * math.ceil(header.height / 8)
    need = decode_size(header, geometry)
    fits = min(header.width // max(1, need[0]), header.height // max(1, need[1]))
    scale = next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)
    return math.ceil(header.width / scale) * math.ceil(header.height / scale)


def _coefficient_samples(image: Image.Image) -> float:
    """Progressive JPEG: libjpeg buffers every component's coefficients (samples/pixel)."""
    layers = getattr(image, "layer", None)
    if not image.info.get("progressive") or not layers:
        return 0.0
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    return sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)


def plan(oriented_size: tuple[int, int], job: Job, orientation: int = 1) -> Geometry:
    """Pure geometry: where the crop, scale and padding of ``job`` put the image."""
    width, height = oriented_size
    whole = (0, 0, width, height)
    if job.size is None:
        return _geometry(oriented_size, orientation, whole, oriented_size, oriented_size)
    if job.mode == "stretch":
        return _geometry(oriented_size, orientation, whole, job.size, job.size)
    if job.mode == "fill":
        crop = _centre_crop(oriented_size, job.size)
        return _geometry(oriented_size, orientation, crop, job.size, job.size)
    content = fit_size(oriented_size, job.size)
    canvas = content if job.mode == "fit" else job.size
    return _geometry(oriented_size, orientation, whole, content, canvas)


def fit_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """Largest size inside ``box`` with the aspect ratio of ``size`` (>= 1 px per side)."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return (
        min(box[0], max(1, round(size[0] * scale))),
        min(box[1], max(1, round(size[1] * scale))),
    )


def _centre_crop(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer centre crop with the aspect ratio of ``box`` that ``fill`` scales up to it."""
    scale = max(box[0] / size[0], box[1] / size[1])
    width = min(size[0], max(1, round(box[0] / scale)))
    height = min(size[1], max(1, round(box[1] / scale)))
    return (size[0] - width) // 2, (size[1] - height) // 2, width, height


def _geometry(
    size: tuple[int, int],
    orientation: int,
    crop: tuple[int, int, int, int],
    content: tuple[int, int],
    canvas: tuple[int, int],
) -> Geometry:
    x, y, width, height = crop
    return Geometry(
        original_width=size[0],
        original_height=size[1],
        orientation=orientation,
        output_width=canvas[0],
        output_height=canvas[1],
        scale_x=content[0] / width,
        scale_y=content[1] / height,
        crop_x=x,
        crop_y=y,
        crop_width=width,
        crop_height=height,
        pad_x=(canvas[0] - content[0]) // 2,
        pad_y=(canvas[1] - content[1]) // 2,
    )


def decode_size(header: Header, geometry: Geometry) -> tuple[int, int]:
    """Stored (unoriented) size the decoder must deliver: DCT_MARGIN x output resolution.

    Scaled from the whole image, so for ``fill`` the cropped region keeps its resolution.
    """
    width = math.ceil(geometry.original_width * geometry.scale_x * DCT_MARGIN)
    height = math.ceil(geometry.original_height * geometry.scale_y * DCT_MARGIN)
    return (height, width) if header.orientation >= 5 else (width, height)


def max_side(fmt: str) -> int:
    """The longest side an output in ``fmt`` can have."""
    return _MAX_SIDE[fmt]


def _check_output(geometry: Geometry, job: Job, limits: Limits) -> None:
    width, height = geometry.output_width, geometry.output_height
    if width * height > limits.max_pixels:
        raise TooLarge(f"output would be {width}x{height} pixels; the limit is {limits.max_pixels}")
    if max(width, height) > _MAX_SIDE[job.format]:
        raise InvalidInput(
            f"{job.format.upper()} output is limited to {_MAX_SIDE[job.format]} pixels a side"
        )


@contextmanager
def _stage(name: str, message: str | None = None) -> Iterator[None]:
    """Turn any failure inside one stage into a one-line domain error (cause chained)."""
    try:
        yield
    except ServiceError:
        raise
    except MemoryError as exc:
        raise Overloaded(f"out of memory during {name}") from exc
    except Exception as exc:
        text = message or f"image could not be processed ({name} failed: {type(exc).__name__})"
        raise InvalidInput(text) from exc


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def _convert(
    data: bytes,
    image: Image.Image,
    header: Header,
    job: Job,
    geometry: Geometry,
    started: float,
) -> Result:
    with _stage("decode", "corrupt or truncated image data"):
        decoded, factor = _decode(data, image, header, job, geometry)
    decode_ms, mark = _ms(started), time.perf_counter()
    with _stage("transform"):
        working = _working_mode(decoded, job.grayscale, _keeps_alpha(job))
        pixels = _orient(working, header.orientation)
        pixels = _resize(pixels, geometry, factor)
        pixels, color = _output_colour(pixels, image.info.get("icc_profile"), job.grayscale)
        pixels = _pad(pixels, geometry, job.pad_color)
    transform_ms, mark = _ms(mark), time.perf_counter()
    with _stage("encode"):
        encoded = _encode(pixels, job)
    return Result(
        data=encoded,
        geometry=geometry,
        format=job.format,
        input_format=header.format,
        scaled=job.size is not None,
        grayscale=pixels.mode == "L",
        mode=job.mode if job.size is not None else None,
        color=color,
        passthrough=False,
        timings=Timings(decode_ms, transform_ms, _ms(mark)),
    )


def _decode(
    data: bytes, image: Image.Image, header: Header, job: Job, geometry: Geometry
) -> tuple[Image.Image, float]:
    """Decoded pixels (stored orientation) and their scale relative to the stored size."""
    need = decode_size(header, geometry)
    factor = 1.0
    if header.format == "jpeg":
        fast = _decode_dct(data, image, need, job.grayscale)
        if fast is not None:
            return fast
        factor = _draft(image, need, job.grayscale)
    image.load()
    return image, factor


def _decode_dct(
    data: bytes, image: Image.Image, need: tuple[int, int], grayscale: bool
) -> tuple[Image.Image, float] | None:
    """libjpeg-turbo N/8 DCT scaling via simplejpeg; None leaves the decode to Pillow."""
    width, height = image.size
    shrinks = need[0] * 8 <= width * 7 and need[1] * 8 <= height * 7
    if image.mode not in ("L", "RGB") or not shrinks or min(width, height) < 16:
        return None
    mode = "L" if grayscale or image.mode == "L" else "RGB"
    try:
        array = simplejpeg.decode_jpeg(
            data, "GRAY" if mode == "L" else "RGB", min_width=need[0], min_height=need[1]
        )
    except ValueError:
        return None  # strict mode refuses any damage; Pillow decides what is acceptable
    size = (array.shape[1], array.shape[0])
    eighths = size[0] * 8 // width  # ceil(width * n / 8) == size[0] for width >= 16
    if (math.ceil(width * eighths / 8), math.ceil(height * eighths / 8)) != size:
        return None
    return Image.frombuffer(mode, size, array, "raw", mode, 0, 1), eighths / 8


def _draft(image: Image.Image, need: tuple[int, int], grayscale: bool) -> float:
    """Pillow's DCT scaling (1/2, 1/4, 1/8) and luma-only decode; the factor applied."""
    width, height = image.size
    shrink = need if need[0] < width and need[1] < height else None
    drafted = image.draft("L" if grayscale else None, shrink)
    return drafted[1][2] / width if drafted else 1.0


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )


def _working_mode(image: Image.Image, grayscale: bool, keep_alpha: bool) -> Image.Image:
    """Bring any decoded mode to L, RGB, RGBA or CMYK: what LANCZOS and the output need."""
    if image.mode.startswith("I"):
        image = _sixteen_to_eight(image)
    elif image.mode == "1" and "transparency" in image.info:
        image = _one_bit_on_white(image)
    if _has_alpha(image):
        if keep_alpha:
            return image if image.mode == "RGBA" else image.convert("RGBA")
        image = _flatten(image)
    if grayscale:
        return image if image.mode == "L" else image.convert("L")
    return image if image.mode in ("L", "RGB", "CMYK") else image.convert("RGB")


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """Scale 16-bit gray to 8 bits; Pillow's convert("L") would clip everything above 255.

    A tRNS key names one 16-bit value: its pixels are flattened onto white here, matched
    before scaling, so values next to it (the same at 8 bits) stay as they are.
    """
    scaled = image.point(lambda value: value * (1 / 257) + 0.5).convert("L")
    key = scaled.info.pop("transparency", None)
    if isinstance(key, int):
        _whiten_key(scaled, image, key)
    return scaled


def _whiten_key(scaled: Image.Image, wide: Image.Image, key: int) -> None:
    """Paint white where ``wide`` (16-bit) holds ``key``, a band of rows at a time: a mask of
    the whole image would cost more memory than the decode is allowed."""
    width, height = wide.size
    for top in range(0, height, _KEY_BAND):
        box = (0, top, width, min(top + _KEY_BAND, height))
        hit = np.asarray(wide.crop(box)) == key
        if hit.any():
            scaled.paste(255, box, Image.fromarray(hit))


def _one_bit_on_white(image: Image.Image) -> Image.Image:
    """A 1-bit image with a tRNS key, flattened onto white in one 8-bit channel."""
    if not image.info["transparency"]:  # black is transparent: nothing but white is left
        return Image.new("L", image.size, 255)
    gray = image.convert("L")  # white is transparent: white on white
    gray.info.pop("transparency", None)
    return gray


def _flatten(image: Image.Image) -> Image.Image:
    """Composite onto white: what viewers show for transparency, and JPEG has no alpha."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, _WHITE)
    canvas.paste(rgba, mask=rgba)
    return canvas


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _resize(image: Image.Image, geometry: Geometry, factor: float) -> Image.Image:
    """Crop, reduce and LANCZOS in one pass; the box is in decoded (DCT-scaled) pixels."""
    box = (
        geometry.crop_x * factor,
        geometry.crop_y * factor,
        (geometry.crop_x + geometry.crop_width) * factor,
        (geometry.crop_y + geometry.crop_height) * factor,
    )
    size = geometry.content_size
    if size == image.size and box == (0, 0, image.width, image.height):
        return image
    return image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def _output_colour(
    image: Image.Image, icc: bytes | None, grayscale: bool
) -> tuple[Image.Image, str]:
    """Final mode and what happened to colour. Runs on the reduced image, so it is cheap."""
    if grayscale:
        return image, COLOR_GRAY
    converted = _to_srgb(image, icc) if icc else None
    if converted is not None:
        return converted, COLOR_CONVERTED
    if image.mode in ("RGB", "RGBA"):
        return image, COLOR_SRGB
    return image.convert("RGB"), COLOR_SRGB


def _profile(icc: bytes) -> ImageCms.ImageCmsProfile | None:
    try:
        return ImageCms.ImageCmsProfile(BytesIO(icc))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    try:
        return "sRGB" in ImageCms.getProfileDescription(profile)
    except (ImageCms.PyCMSError, ValueError, TypeError):
        return False


def _to_srgb(image: Image.Image, icc: bytes) -> Image.Image | None:
    """Convert from the embedded profile; None when it is sRGB, unusable or the wrong kind."""
    profile = _profile(icc)
    if profile is None or _is_srgb(profile):
        return None
    if profile.profile.xcolor_space.strip() != _PROFILE_SPACES.get(image.mode):
        return None
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    source = image.convert("RGB") if alpha is not None else image
    try:
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        converted = ImageCms.profileToProfile(source, profile, srgb, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    if converted is None:
        return None
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def _pad(image: Image.Image, geometry: Geometry, color: tuple[int, int, int]) -> Image.Image:
    size = (geometry.output_width, geometry.output_height)
    if image.size == size:
        return image
    canvas = Image.new(image.mode, size, _fill(image.mode, color))
    canvas.paste(image, (geometry.pad_x, geometry.pad_y))
    return canvas


def _fill(mode: str, color: tuple[int, int, int]) -> int | tuple[int, ...]:
    """The pad colour in ``mode``: luma as Pillow computes it for L, opaque for RGBA."""
    if mode == "L":
        red, green, blue = color
        return (red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16
    return (*color, 255) if mode == "RGBA" else color


def _encode(image: Image.Image, job: Job) -> bytes:
    """Encode with no metadata: Pillow would otherwise carry ICC/EXIF/comments from info."""
    if job.format == "jpeg" and image.mode in _SIMPLEJPEG_SPACES:
        return _encode_jpeg(image, job.quality)
    image.info = {}
    out = BytesIO()
    if job.format == "jpeg":
        image.save(out, "JPEG", quality=job.quality, subsampling=JPEG_SUBSAMPLING)
    elif job.format == "png":
        image.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        image.save(out, "WEBP", quality=job.quality, method=WEBP_METHOD)
    return out.getvalue()


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """libjpeg-turbo through simplejpeg: Pillow's JPEG encoder holds the GIL for the whole
    encode (3 ms for 1024x768), stalling the server's other threads; this releases it, is
    ~10% faster, and writes a bare JFIF file (no metadata to strip)."""
    pixels = np.asarray(image)
    space, subsampling = _SIMPLEJPEG_SPACES[image.mode]
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return simplejpeg.encode_jpeg(
        pixels, quality=quality, colorspace=space, colorsubsampling=subsampling
    )


def _can_pass_through(image: Image.Image, header: Header, job: Job) -> bool:
    """No pixel work asked and the JPEG already has the output's mode and colour space.

    Colour output passes only RGB (YCbCr) JPEGs through: a gray JPEG asked for in colour is
    re-encoded as RGB so that colour output always has three channels.
    """
    if job.size is not None or header.orientation != 1:
        return False
    if header.format != "jpeg" or job.format != "jpeg":
        return False
    if job.grayscale:
        return image.mode == "L"
    icc = image.info.get("icc_profile")
    profile = _profile(icc) if icc else None
    return image.mode == "RGB" and (not icc or (profile is not None and _is_srgb(profile)))


def _check_decodes(image: Image.Image) -> None:
    """Decode at 1/8 scale (about 1 ms for 1 MP): a passed-through JPEG with broken entropy
    data must be refused as the decode path would refuse it, not returned as a success."""
    with _stage("decode", "corrupt or truncated image data"):
        image.draft(image.mode, (1, 1))
        image.load()


def _passthrough(data: bytes, image: Image.Image, geometry: Geometry, started: float) -> Result:
    gray = image.mode == "L"
    decode_ms = _ms(started)
    return Result(
        data=data,
        geometry=geometry,
        format="jpeg",
        input_format="jpeg",
        scaled=False,
        grayscale=gray,
        mode=None,
        color=COLOR_GRAY if gray else COLOR_SRGB,
        passthrough=True,
        timings=Timings(decode_ms, 0.0, 0.0),
    )


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """Drop APP1-APP15 (but APP14 Adobe) and COM segments; keep everything else as is.

    Stops at the first EOI, so an MPO keeps only its first picture. Returns None when the
    stream is not a well-formed SOI ... EOI sequence (e.g. truncated): the caller decodes.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    parts, pos = [data[:2]], 2
    while pos + 2 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            parts.append(data[pos : pos + 2])
            return b"".join(parts)
        end = _segment_end(data, pos)
        if end is None:
            return None
        if marker not in _JPEG_DROPPED:
            parts.append(data[pos:end])
        pos = end
    return None


def _segment_end(data: bytes, pos: int) -> int | None:
    """End of the marker segment at ``pos``, including the entropy-coded data after SOS."""
    if pos + 4 > len(data):
        return None
    end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    if end > len(data) or end < pos + 4:
        return None
    if data[pos + 1] != 0xDA:
        return end
    scan_end = _SCAN_END.search(data, end)
    return scan_end.start() if scan_end else None
