"""End to end through real API and processor servers on loopback."""

from __future__ import annotations

import http.server
import io
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from PIL import Image

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
from tests.legacy_contract import legacy_scale
from tests.stack import dev_api_settings, free_port
from tools.loadgen import SCALE_IMAGE


def jpeg(size: tuple[int, int], color: tuple[int, int, int] = (200, 60, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def call(port: int, image: pb.Image, timeout: float = 10.0) -> pb.ScaleImageReply:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = imagescaler_pb2_grpc.ImageScalerStub(channel)
        return stub.ScaleImage(pb.ScaleImageRequest(image=image), timeout=timeout)


def status_of(port: int, image: pb.Image, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call(port, image, timeout)
    return exc.value.code(), exc.value.details()


class Origin:
    """A real HTTP server on loopback serving fixed bytes, optionally slowly."""

    def __init__(self, body: bytes, delay: float = 0.0) -> None:
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if origin.delay:
                    origin.release.wait(origin.delay)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(origin.body)))
                self.end_headers()
                self.wfile.write(origin.body)

            def log_message(self, *args: object) -> None:
                pass

        self.body, self.delay, self.release = body, delay, threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/photo.jpg"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def origin(sample_jpeg: bytes) -> Iterator[Callable[..., Origin]]:
    made: list[Origin] = []

    def make(body: bytes = sample_jpeg, delay: float = 0.0) -> Origin:
        made.append(Origin(body, delay))
        return made[-1]

    yield make
    for o in made:
        o.close()


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def test_legacy_client_gets_1024x768_grayscale_jpeg(api, sample_jpeg: bytes) -> None:
    content = legacy_scale(f"127.0.0.1:{api.port}", sample_jpeg)
    with Image.open(io.BytesIO(content)) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (1024, 768), "L")


def test_reply_tells_what_was_done(api, sample_jpeg: bytes) -> None:
    info = call(api.port, pb.Image(content=sample_jpeg)).info
    assert (info.original_width, info.original_height) == (1400, 1316)
    assert (info.output_width, info.output_height) == (1024, 768)
    assert info.scaled and info.grayscale and info.fit == "pad"
    assert info.content_type == "image/jpeg"
    # pad: the whole photo fits the height; horizontal bars on both sides
    assert info.scale_y == pytest.approx(768 / 1316, rel=1e-3)
    assert info.pad_x == (1024 - round(1400 * info.scale_x)) // 2


def test_within_margin_is_not_rescaled(api) -> None:
    reply = call(api.port, pb.Image(content=jpeg((1000, 760))))
    assert not reply.info.scaled
    with Image.open(io.BytesIO(reply.content)) as im:
        assert (im.size, im.mode) == ((1000, 760), "L")


def test_content_wins_over_source(api) -> None:
    image = pb.Image(content=jpeg((2048, 1536)), source=pb.ImageSource(http_uri="ftp://x/"))
    assert call(api.port, image).info.output_width == 1024


def test_url_source_from_an_allowed_range(processor, start_api, origin) -> None:
    running = start_api(dev_api_settings(f"127.0.0.1:{processor.port}", allow_source_cidr=LOOPBACK))
    reply = call(running.port, pb.Image(source=pb.ImageSource(http_uri=origin().url)))
    assert (reply.info.output_width, reply.info.output_height) == (1024, 768)


def test_url_source_on_loopback_refused_by_default(api, origin) -> None:
    code, details = status_of(api.port, pb.Image(source=pb.ImageSource(http_uri=origin().url)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "127.0.0.1" not in details


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "gopher://127.0.0.1/", "not a url"])
def test_bad_url_schemes(api, uri: str) -> None:
    code, _ = status_of(api.port, pb.Image(source=pb.ImageSource(http_uri=uri)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_slow_source_hits_the_callers_deadline(processor, start_api, origin) -> None:
    running = start_api(dev_api_settings(f"127.0.0.1:{processor.port}", allow_source_cidr=LOOPBACK))
    slow = origin(delay=30)
    started = time.monotonic()
    code, _ = status_of(running.port, pb.Image(source=pb.ImageSource(http_uri=slow.url)), 1.0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


def test_oversized_source_refused(processor, start_api, origin, sample_jpeg: bytes) -> None:
    running = start_api(
        dev_api_settings(
            f"127.0.0.1:{processor.port}",
            allow_source_cidr=LOOPBACK,
            max_input_bytes=100_000,
        )
    )
    code, _ = status_of(running.port, pb.Image(source=pb.ImageSource(http_uri=origin().url)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("image", "code"),
    [
        (pb.Image(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Image(content=b"definitely not an image"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Image(content=b"GIF89a\x10\x00"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_inputs_get_precise_status_and_server_carries_on(
    api, image: pb.Image, code: grpc.StatusCode
) -> None:
    assert status_of(api.port, image)[0] == code
    assert call(api.port, pb.Image(content=jpeg((640, 480)))).info.scaled


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x03\x0a\x05ab"],
    ids=["not protobuf", "truncated image", "truncated content"],
)
def test_malformed_request_is_invalid_argument(api, body: bytes) -> None:
    """Bytes that are no ScaleImageRequest are the caller's error, not an INTERNAL one."""
    with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
        scale = channel.unary_unary(SCALE_IMAGE)  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as exc:
            scale(body, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == (
        "malformed request: not a valid imagescaler.ScaleImageRequest message"
    )
    assert call(api.port, pb.Image(content=jpeg((640, 480)))).info.scaled


def test_processor_down_is_unavailable_fast(start_api) -> None:
    port = free_port()  # nobody listens there
    running = start_api(dev_api_settings(f"127.0.0.1:{port}"))
    started = time.monotonic()
    code, details = status_of(running.port, pb.Image(content=jpeg((640, 480))))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "processor" in details
    assert time.monotonic() - started < 5


def test_deadline_exceeded_while_processing(api, sample_jpeg: bytes) -> None:
    code, _ = status_of(api.port, pb.Image(content=sample_jpeg), timeout=0.001)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_request_log_line_without_secrets(api, sample_jpeg: bytes, caplog) -> None:
    """One line per request; with --auth none it is a warning that says so."""
    with caplog.at_level(logging.INFO, logger="imagescaler.access"):
        call(api.port, pb.Image(content=sample_jpeg))
    (record,) = [r for r in caplog.records if r.name == "imagescaler.access"]
    assert record.levelno == logging.WARNING and record.auth == "none"
    assert record.status == "OK" and record.scaled is True and record.bytes_in == len(sample_jpeg)
    assert record.method == "/imagescaler.ImageScaler/ScaleImage" and record.latency_ms > 0


def test_reply_may_exceed_the_input_limit(processor, start_api) -> None:
    """A small noisy JPEG becomes a larger PNG: the input limit must not cap the reply."""
    noise = Image.effect_noise((1000, 1000), 100).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=30)
    limit = 512 * 1024
    assert len(buf.getvalue()) < limit
    running = start_api(
        dev_api_settings(
            f"127.0.0.1:{processor.port}",
            max_input_bytes=limit,
            format="png",
            grayscale=False,
        )
    )
    reply = call(running.port, pb.Image(content=buf.getvalue()))
    assert len(reply.content) > limit + 64 * 1024  # beyond the request limit and its envelope
    assert reply.info.format == "png"
