"""Helpers for the hostile-input battery: a spawn guard, RSS, a client and hostile images."""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc

SEED_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "seed-sample.jpg"
BIG = 64 << 20
PROCESSOR_LABELS = {
    "grpc_service": "imagescaler.processor.v1.Processor",
    "grpc_method": "Process",
    "grpc_type": "unary",
}

# --- no external program may start ---------------------------------------------------------

SPAWN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "os.startfile",
    }
)


class SpawnRefused(RuntimeError):
    """Raised by the audit hook: something in this process tried to start a program."""


@dataclass
class SpawnLog:
    """Every attempt to start a program while active; each is refused, not run."""

    active: bool = False
    attempts: list[tuple[str, str]] = field(default_factory=list)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.active and event in SPAWN_EVENTS:
            self.attempts.append((event, repr(args)[:200]))
            raise SpawnRefused(f"{event} {args!r:.200}")


def rss_mb() -> float:
    """Resident set size of this process (where the servers run), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --- talking to the API --------------------------------------------------------------------


class Client:
    """A channel to the public API with large message limits (images, not gRPC's 4 MiB)."""

    def __init__(self, port: int) -> None:
        options = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.stub = imagescaler_pb2_grpc.ImageScalerStub(self.channel)

    def scale(self, content: bytes, timeout: float = 20.0) -> pb.ScaleImageReply:
        request = pb.ScaleImageRequest(image=pb.Image(content=content))
        return self.stub.ScaleImage(request, timeout=timeout)

    def refusal(self, content: bytes, timeout: float = 20.0) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as exc:
            self.scale(content, timeout)
        return exc.value

    def close(self) -> None:
        self.channel.close()


# --- hostile images --------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def photo(size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """Some texture, so encoders produce real entropy-coded data."""
    return Image.effect_noise(size, 60).convert(mode)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_with_chunks(chunks: bytes, after_idat: bool = False) -> bytes:
    """A small valid PNG with ``chunks`` inserted right after IHDR (or before IEND)."""
    png = encode(photo((16, 16), "L"), "PNG")
    if after_idat:
        return png[:-12] + chunks + png[-12:]
    return png[:33] + chunks + png[33:]


def png_bomb(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int, height: int) -> bytes:
    """A real JPEG with its frame header rewritten to declare ``width`` x ``height``."""
    data = bytearray(encode(photo((16, 16), "L"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_bomb(width: int, height: int) -> bytes:
    """Logical screen and first frame both declare the size; the frame data is tiny."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0, 0, 0)
        + b","
        + struct.pack("<HHHHB", 0, 0, width, height, 0)
        + b"\x02\x02\x4c\x01\x00;"
    )


def webp_vp8x_bomb(width: int, height: int) -> bytes:
    """An extended WebP whose canvas is huge and whose one frame is 16x16."""
    data = bytearray(encode(photo((16, 16)), "WEBP", lossless=True, exif=b"Exif\x00\x00II"))
    at = data.index(b"VP8X") + 12
    data[at : at + 6] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


def webp_vp8l_bomb(width: int, height: int) -> bytes:
    data = bytearray(encode(photo((16, 16)), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 9
    bits = struct.unpack_from("<I", data, at)[0] & ~0x0FFFFFFF
    struct.pack_into("<I", data, at, bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def webp_vp8_bomb(width: int, height: int) -> bytes:
    data = bytearray(encode(photo((16, 16)), "WEBP", quality=50))
    at = data.index(b"\x9d\x01\x2a") + 3
    struct.pack_into("<HH", data, at, width, height)
    return bytes(data)


def animated_gif(frames: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """``frames`` frames, each a new image descriptor with a few bytes of LZW data."""
    first = encode(Image.new("P", size, 1), "GIF")
    frame = first[first.index(b",") : -1]  # image descriptor + data, without the trailer
    return first[:-1] + frame * (frames - 1) + b";"


def progressive_scan_bomb(extra_scans: int, size: tuple[int, int] = (2000, 2000)) -> bytes:
    """A progressive JPEG followed by copies of one of its scans (each a full pass)."""
    data = encode(Image.new("L", size, 128), "JPEG", progressive=True, quality=50)
    scans = [match.start() for match in re.finditer(rb"\xff\xda", data)]
    scan = data[scans[1] : scans[2]]
    return data[:-2] + scan * extra_scans + b"\xff\xd9"


def seed_sample() -> bytes:
    return SEED_SAMPLE.read_bytes()
