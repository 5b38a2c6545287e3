"""``imagescaler-client``: scale a file or URL through the public API.

Also a small library for pipelines::

    from tools.client import ScalerClient
    with ScalerClient("127.0.0.1:50051", token=token) as client:
        result = client.scale(open("cat.jpg", "rb").read())
        result.content, result.info.output_width
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
from tools.cli import reader_may_leave
from tools.signedurl import FetchError, fetch_signed

MAX_MESSAGE = 64 * 1024 * 1024
# ScaleImage is idempotent: try again on another connection when an API replica is gone or
# draining (UNAVAILABLE) or gRPC cancelled the call as that replica stopped (CANCELLED). The
# retry buffer must hold a whole request, or gRPC silently gives up retrying large images.
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "imagescaler.ImageScaler"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ]
}
RATE_LIMIT_KEYS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after")
# What a gRPC metadata value may carry, minus the space: anything else in a token is a mistake
# (two lines in a token file) that gRPC would only report as "INTERNAL: Invalid metadata".
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]*")


@dataclass(frozen=True)
class Result:
    content: bytes
    info: pb.ProcessingInfo
    metadata: dict[str, str]
    seconds: float
    reply: pb.ScaleImageReply


class ScalerClient:
    """A channel to the API plus the bearer token; reuse one per process."""

    def __init__(
        self, server: str, token: str | None = None, ca: bytes | None = None, tls: bool = False
    ) -> None:
        if token and not TOKEN_PATTERN.fullmatch(token):  # never show the token itself
            raise ValueError(
                "the token has whitespace, control or non-ASCII characters inside "
                "(a token file with more than one line?)"
            )
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE),
            ("grpc.retry_buffer_size", 4 * MAX_MESSAGE),
        ]
        if tls or ca:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self.channel = grpc.secure_channel(server, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)
        self.stub = imagescaler_pb2_grpc.ImageScalerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def scale(
        self,
        content: bytes | None = None,
        url: str | None = None,
        timeout: float = 30.0,
        delivery: pb.Delivery = pb.DELIVERY_INLINE,
    ) -> Result:
        """Scale inline bytes or a URL; raises ``grpc.RpcError`` with the server's status."""
        image = pb.Image(content=content or b"")
        if url:
            image.source.http_uri = url
        started = time.perf_counter()
        reply, call = self.stub.ScaleImage.with_call(
            pb.ScaleImageRequest(image=image, delivery=delivery),
            timeout=timeout,
            metadata=self.metadata,
        )
        meta = {k: v for k, v in (call.trailing_metadata() or ()) if isinstance(v, str)}
        meta.update({k: v for k, v in (call.initial_metadata() or ()) if isinstance(v, str)})
        return Result(reply.content, reply.info, meta, time.perf_counter() - started, reply)

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
    # No environment defaults here: token_from puts both flags before both variables.
    p.add_argument("--token", help="bearer token (env IMAGESCALER_TOKEN)")
    p.add_argument(
        "--token-file", help="file holding the bearer token (env IMAGESCALER_TOKEN_FILE)"
    )
    p.add_argument(
        "--ca",
        default=env("IMAGESCALER_CA"),
        help="CA certificate for a TLS listener (env IMAGESCALER_CA)",
    )
    p.add_argument("--tls", action="store_true", help="TLS with the system roots")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    p.add_argument(
        "--store",
        action="store_true",
        help="ask for signed-URL delivery: print the URL and its expiry",
    )
    p.add_argument(
        "--fetch",
        action="store_true",
        help="with --store: download the result through the signed URL into --out",
    )
    p.add_argument(
        "--retry",
        type=_count,
        default=0,
        metavar="N",
        help="retry up to N times when rate limited, waiting retry-after seconds",
    )
    return p


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def scale_with_retry(
    client: ScalerClient, args: argparse.Namespace, content: bytes | None
) -> Result:
    """Honour ``retry-after`` on RESOURCE_EXHAUSTED, at most ``args.retry`` times."""
    delivery = pb.DELIVERY_URL if args.store else pb.DELIVERY_INLINE
    for attempt in range(args.retry + 1):
        try:
            return client.scale(content, args.url, args.timeout, delivery)
        except grpc.RpcError as exc:
            trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
            print_limits(trailers)
            wait = trailers.get("retry-after")
            limited = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            if not (limited and wait and attempt < args.retry):
                raise
            print(f"rate limited; retrying in {wait} s", file=sys.stderr)
            time.sleep(float(wait))
    raise AssertionError("unreachable")


def print_limits(metadata: dict[str, str]) -> None:
    shown = [f"{k}={metadata[k]}" for k in RATE_LIMIT_KEYS if k in metadata]
    if shown:
        print("ratelimit  " + " ".join(shown), file=sys.stderr)


def token_from(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """--token, else --token-file, else IMAGESCALER_TOKEN, else IMAGESCALER_TOKEN_FILE
    (flags win over the environment, as for every option)."""
    if args.token:
        return str(args.token)
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if environ.get("IMAGESCALER_TOKEN"):
        return environ["IMAGESCALER_TOKEN"]
    path = environ.get("IMAGESCALER_TOKEN_FILE")
    return Path(path).read_text().strip() if path else None


def deliver(result: Result, args: argparse.Namespace) -> None:
    """Write the inline bytes, or print (and with --fetch download) the signed URL."""
    stored = result.reply.stored
    if args.store and result.reply.storage_fallback:  # the API's --result-fallback-inline
        print("stored     no: result storage failed, the image came inline", file=sys.stderr)
    if args.store and not result.reply.storage_fallback:
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stored.expires_unix))
        print(
            f"url        {stored.url}\nexpires    {expiry}\nsize       {stored.size} bytes "
            f"{stored.content_type}"
        )
        if not args.fetch:
            return
        data = fetch_signed(
            stored.url, stored.size, stored.content_type, args.timeout, stored.sha256
        )
    else:
        data = result.content
    try:
        Path(args.out).write_bytes(data)
    except OSError as exc:  # only the file's: a closed stdout is reader_may_leave's
        raise OutputError(f"cannot write {args.out}: {exc.strerror}") from exc
    print(f"wrote      {args.out}")


class OutputError(Exception):
    """The result could not be written to ``--out``."""


@reader_may_leave
def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.file and not args.url:
        p.error("give an image FILE or --url")
    if args.file and args.url:
        p.error("give an image FILE or --url, not both")
    if args.fetch and not args.store:
        p.error("--fetch needs --store")
    if problem := unwritable(args):  # before the call: the work would be done and charged
        p.error(problem)
    try:
        token = token_from(args, os.environ)
        ca = Path(args.ca).read_bytes() if args.ca else None
        content = Path(args.file).read_bytes() if args.file else None
        client = ScalerClient(args.server, token, ca, args.tls)
    except OSError as exc:
        p.error(f"cannot read {exc.filename}: {exc.strerror}")
    except ValueError as exc:  # a token file that is not text, or a malformed token
        p.error(str(exc))
    if content == b"":  # proto3 sends no bytes as no image: say what is wrong here
        p.error(f"{args.file} is empty")
    with client:
        try:
            result = scale_with_retry(client, args, content)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    print(describe(result))
    print_limits(result.metadata)
    try:
        deliver(result, args)
    except FetchError as exc:
        print(f"error: fetching the signed URL: {exc}", file=sys.stderr)
        return 1
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def unwritable(args: argparse.Namespace) -> str | None:
    """Why ``--out`` cannot take the result, when the result is to be written there."""
    if args.store and not args.fetch:
        return None  # only the URL is printed
    out = Path(args.out)
    if out.is_dir():
        return f"-o {out}: is a directory"
    if not out.parent.is_dir():
        return f"-o {out}: no directory {out.parent}"
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        return f"-o {out}: permission denied"
    return None


if __name__ == "__main__":
    sys.exit(main())
