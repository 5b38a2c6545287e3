"""Image factories for the pipeline tests: everything is generated here, in memory, small."""

from __future__ import annotations

import math
import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageCms, ImageDraw

SEED_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "seed-sample.jpg"

# Where stored row 0 and stored column 0 appear on screen, per EXIF orientation (the
# table of the EXIF specification). Written out independently of the code under test.
EXIF_ROW0_COL0 = {
    1: ("top", "left"),
    2: ("top", "right"),
    3: ("bottom", "right"),
    4: ("bottom", "left"),
    5: ("left", "top"),
    6: ("right", "top"),
    7: ("right", "bottom"),
    8: ("left", "bottom"),
}


class Images:
    """Factories and measurements shared by the processor tests (via the ``images`` fixture)."""

    seed_sample = SEED_SAMPLE

    @staticmethod
    def photo(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
        """Photo-like content: smooth gradients, edges and some texture."""
        width, height = size
        red = Image.linear_gradient("L").resize(size)
        green = Image.radial_gradient("L").resize(size)
        blue = Image.effect_noise(size, 40).point(lambda v: v // 2 + 64)
        image = Image.merge("RGB", (red, green, blue))
        draw = ImageDraw.Draw(image)
        draw.ellipse((width // 5, height // 5, width // 2, height // 2), fill=(240, 200, 30))
        box = (width // 2, height // 2, width * 4 // 5, height * 4 // 5)
        draw.rectangle(box, fill=(20, 60, 200))
        return image.convert(mode)

    @staticmethod
    def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
        out = BytesIO()
        image.save(out, fmt, **params)
        return out.getvalue()

    @staticmethod
    def decode(data: bytes) -> Image.Image:
        image = Image.open(BytesIO(data))
        image.load()
        return image

    @staticmethod
    def exif(**tags: int | str) -> bytes:
        exif = Image.Exif()
        names = {"orientation": 0x0112, "make": 0x010F, "model": 0x0110}
        for name, value in tags.items():
            exif[names[name]] = value
        return exif.tobytes()

    @staticmethod
    def upright_marker(size: tuple[int, int] = (96, 64)) -> Image.Image:
        """White, with a black top-left and a mid-grey top-right block: no symmetry left."""
        width, height = size
        image = Image.new("L", size, 255)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, width // 3 - 1, height // 3 - 1), fill=0)
        draw.rectangle((width - width // 3, 0, width - 1, height // 3 - 1), fill=128)
        return image

    @staticmethod
    def stored_for_orientation(upright: Image.Image, orientation: int) -> Image.Image:
        """The stored pixels that a viewer honouring ``orientation`` shows as ``upright``."""
        row0, col0 = EXIF_ROW0_COL0[orientation]
        dw, dh = upright.size
        sw, sh = (dw, dh) if row0 in ("top", "bottom") else (dh, dw)
        stored = Image.new(upright.mode, (sw, sh))
        for y in range(sh):
            for x in range(sw):
                stored.putpixel((x, y), upright.getpixel(_display_xy(row0, col0, x, y, dw, dh)))
        return stored

    @staticmethod
    def png_chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    @classmethod
    def png_header_only(cls, width: int, height: int) -> bytes:
        """A tiny PNG that declares ``width`` x ``height`` (a decompression bomb's header)."""
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        idat = zlib.compress(b"\x00" * 64)
        return (
            b"\x89PNG\r\n\x1a\n"
            + cls.png_chunk(b"IHDR", ihdr)
            + cls.png_chunk(b"IDAT", idat)
            + cls.png_chunk(b"IEND", b"")
        )

    @staticmethod
    def gif_header_only(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
        """A GIF whose logical screen and first frame declare the given sizes."""
        return (
            b"GIF89a"
            + struct.pack("<HHBBB", *screen, 0, 0, 0)
            + b","
            + struct.pack("<HHHHB", 0, 0, *frame, 0)
            + b"\x02\x02\x4c\x01\x00;"
        )

    @staticmethod
    def webp_vp8x_header(width: int, height: int) -> bytes:
        payload = (
            b"\x00\x00\x00\x00"
            + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little")
        )
        body = b"WEBP" + b"VP8X" + struct.pack("<I", len(payload)) + payload
        return b"RIFF" + struct.pack("<I", len(body)) + body

    @staticmethod
    def jpeg_header_only(width: int, height: int) -> bytes:
        sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
        return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"

    @staticmethod
    def linear_rgb_profile() -> bytes:
        """A minimal ICC v2 RGB profile: sRGB primaries, linear (gamma 1.0) transfer curve."""
        return _linear_rgb_profile()

    @staticmethod
    def srgb_profile() -> bytes:
        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()

    @staticmethod
    def psnr(a: Image.Image, b: Image.Image) -> float:
        """PSNR in dB over all bands, via ImageChops (no numpy)."""
        assert a.size == b.size and a.mode == b.mode
        histogram = ImageChops.difference(a, b).histogram()
        squared = sum(count * (index % 256) ** 2 for index, count in enumerate(histogram))
        mse = squared / (a.width * a.height * len(a.getbands()))
        return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)

    @staticmethod
    def jpeg_scan_data(data: bytes) -> bytes:
        """Bytes from the first SOS marker to the end of the first EOI."""
        start = data.index(b"\xff\xda")
        return data[start : data.index(b"\xff\xd9", start) + 2]


def _display_xy(row0: str, col0: str, x: int, y: int, dw: int, dh: int) -> tuple[int, int]:
    """Where stored pixel (x, y) lands on screen, given the sides of row 0 and column 0."""
    dx = dy = 0
    if row0 == "top":
        dy = y
    elif row0 == "bottom":
        dy = dh - 1 - y
    elif row0 == "left":
        dx = y
    else:
        dx = dw - 1 - y
    if col0 == "left":
        dx = x
    elif col0 == "right":
        dx = dw - 1 - x
    elif col0 == "top":
        dy = x
    else:
        dy = dh - 1 - x
    return dx, dy


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _linear_rgb_profile() -> bytes:
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0100) + b"\0\0"
    text = b"Linear RGB (test)"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text) + 1) + text + b"\0" + b"\0" * 78
    tags = [
        (b"desc", desc),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", _xyz(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", _xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", _xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0public domain\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, payload in tags:
        payload += b"\0" * (-len(payload) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(payload))
        body += payload
    header = (
        struct.pack(">I", offset + len(body))
        + b"\0" * 4
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 28
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"\0" * 48
    )
    return header + struct.pack(">I", len(tags)) + table + body


@pytest.fixture(scope="session")
def images() -> type[Images]:
    return Images


@pytest.fixture(scope="session")
def seed_sample() -> bytes:
    return SEED_SAMPLE.read_bytes()
