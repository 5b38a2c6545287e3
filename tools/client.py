"""``imagescaler-client``: scale a file or URL through the public API.

Also a small library for pipelines::

    from tools.client import ScalerClient
    with ScalerClient("127.0.0.1:50051", token=token) as client:
        result = client.scale(open("cat.jpg", "rb").read())
        result.content, result.info.output_width
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc

MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Result:
    content: bytes
    info: pb.ProcessingInfo
    metadata: dict[str, str]
    seconds: float


class ScalerClient:
    """A channel to the API plus the bearer token; reuse one per process."""

    def __init__(
        self, server: str, token: str | None = None, ca: bytes | None = None, tls: bool = False
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        if tls or ca:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self.channel = grpc.secure_channel(server, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)
        self.stub = imagescaler_pb2_grpc.ImageScalerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def scale(
        self, content: bytes | None = None, url: str | None = None, timeout: float = 30.0
    ) -> Result:
        """Scale inline bytes or a URL; raises ``grpc.RpcError`` with the server's status."""
        image = pb.Image(content=content or b"")
        if url:
            image.source.http_uri = url
        started = time.perf_counter()
        reply, call = self.stub.ScaleImage.with_call(
            pb.ScaleImageRequest(image=image), timeout=timeout, metadata=self.metadata
        )
        meta = {k: v for k, v in (call.trailing_metadata() or ()) if isinstance(v, str)}
        meta.update({k: v for k, v in (call.initial_metadata() or ()) if isinstance(v, str)})
        return Result(reply.content, reply.info, meta, time.perf_counter() - started)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ScalerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(result: Result) -> str:
    i = result.info
    lines = [
        f"original   {i.original_width}x{i.original_height} (EXIF orientation {i.orientation})",
        f"output     {i.output_width}x{i.output_height} {i.format} ({i.content_type}), "
        f"{len(result.content)} bytes",
        f"scaled     {i.scaled}"
        + (f" ({i.fit}, scale {i.scale_x:.4f} x {i.scale_y:.4f})" if i.scaled else ""),
        f"grayscale  {i.grayscale}; colour {i.color}; passthrough {i.passthrough}",
    ]
    if i.crop_width and (i.crop_x or i.crop_y):
        lines.append(f"crop       {i.crop_width}x{i.crop_height} at ({i.crop_x}, {i.crop_y})")
    if i.pad_x or i.pad_y:
        lines.append(f"pad        image at ({i.pad_x}, {i.pad_y}) in the output")
    lines.append(
        f"time       {result.seconds * 1000:.1f} ms total, {i.processing_ms:.1f} ms processing"
    )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagescaler-client", description=__doc__.split("\n")[0])
    env = os.environ.get
    p.add_argument("file", nargs="?", help="image file to scale")
    p.add_argument("--url", help="scale the image at this http(s) URL instead")
    p.add_argument("-o", "--out", default="out.jpg", help="where to write the result")
    p.add_argument(
        "--server",
        default=env("IMAGESCALER_SERVER", "127.0.0.1:50051"),
        help="API address (env IMAGESCALER_SERVER)",
    )
    p.add_argument(
        "--token", default=env("IMAGESCALER_TOKEN"), help="bearer token (env IMAGESCALER_TOKEN)"
    )
    p.add_argument(
        "--token-file",
        default=env("IMAGESCALER_TOKEN_FILE"),
        help="file holding the bearer token (env IMAGESCALER_TOKEN_FILE)",
    )
    p.add_argument(
        "--ca",
        default=env("IMAGESCALER_CA"),
        help="CA certificate for a TLS listener (env IMAGESCALER_CA)",
    )
    p.add_argument("--tls", action="store_true", help="TLS with the system roots")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.file and not args.url:
        parser().error("give an image FILE or --url")
    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    ca = Path(args.ca).read_bytes() if args.ca else None
    content = Path(args.file).read_bytes() if args.file else None
    with ScalerClient(args.server, token, ca, args.tls) as client:
        try:
            result = client.scale(content, args.url, args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    Path(args.out).write_bytes(result.content)
    print(describe(result))
    print(f"wrote      {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
