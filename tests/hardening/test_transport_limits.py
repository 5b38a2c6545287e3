"""Transport limits of the public API and the processor: message and metadata sizes, admission
(refused at once, never queued) and the deadline applied to calls that set none."""

from __future__ import annotations

import http.server
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from PIL import Image

from api.pb import imagescaler_pb2 as pb
from processor.pb import processor_pb2 as ppb
from processor.pb import processor_pb2_grpc
from tests.hardening.hostile import BIG, PROCESSOR_LABELS, Client, encode, photo
from tests.stack import dev_api_settings

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def small_jpeg() -> bytes:
    return encode(photo((320, 240)), "JPEG")


class HeldOrigin:
    """An HTTP origin that holds every request until released, counting arrivals."""

    def __init__(self, body: bytes) -> None:
        self.release = threading.Event()
        self.arrived = threading.Semaphore(0)
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.arrived.release()
                origin.release.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                """Quiet: callers give up on purpose here."""

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/held.jpg"

    def wait_for(self, count: int) -> None:
        for _ in range(count):
            assert self.arrived.acquire(timeout=10), "the API did not reach the origin"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def held_origin() -> Iterator[HeldOrigin]:
    origin = HeldOrigin(small_jpeg())
    yield origin
    origin.close()


def url_request(url: str) -> pb.ScaleImageRequest:
    return pb.ScaleImageRequest(image=pb.Image(source=pb.ImageSource(http_uri=url)))


@pytest.fixture
def make_client() -> Iterator[Callable[[int], Client]]:
    made: list[Client] = []

    def make(port: int) -> Client:
        made.append(Client(port))
        return made[-1]

    yield make
    for c in made:
        c.close()


# --- message and metadata sizes ---------------------------------------------------------------


def test_message_over_the_api_limit_is_refused_before_the_processor(
    processor, start_api, make_client
) -> None:
    running = start_api(dev_api_settings(f"127.0.0.1:{processor.port}", max_input_bytes=1 << 20))
    client = make_client(running.port)
    started = time.monotonic()
    error = client.refusal(b"\xff\xd8" + bytes(2 << 20))
    assert error.code() == EXHAUSTED
    assert time.monotonic() - started < 2
    assert not processor.registry.get_sample_value("grpc_server_started_total", PROCESSOR_LABELS)
    assert client.scale(small_jpeg()).info.scaled


def test_image_between_the_byte_limit_and_the_envelope_is_refused_by_the_probe(
    processor, start_api, make_client
) -> None:
    """The transport allows 64 KiB of envelope; the image itself must still fit the limit."""
    running = start_api(dev_api_settings(f"127.0.0.1:{processor.port}", max_input_bytes=1 << 20))
    error = make_client(running.port).refusal(b"\xff\xd8" + bytes((1 << 20) + 1000))
    assert error.code() == EXHAUSTED
    assert error.details() == f"image is {(1 << 20) + 1002} bytes; the limit is {1 << 20}"


def test_metadata_over_the_limit_is_refused(client) -> None:
    request = pb.ScaleImageRequest(image=pb.Image(content=small_jpeg()))
    with pytest.raises(grpc.RpcError) as exc:
        client.stub.ScaleImage(request, metadata=[("x-filler", "a" * 100_000)], timeout=10)
    assert exc.value.code() == EXHAUSTED
    assert "metadata" in exc.value.details()
    assert client.scale(small_jpeg()).info.scaled


def test_client_metadata_is_never_forwarded_to_the_processor(client) -> None:
    """40 KB of headers pass the API's limit; forwarded, they would break the processor's 8 KB."""
    request = pb.ScaleImageRequest(image=pb.Image(content=small_jpeg()))
    metadata = [("x-filler", "a" * 40_000), ("x-more", "b" * 8_000)]
    assert client.stub.ScaleImage(request, metadata=metadata, timeout=10).info.scaled


# --- admission: refused at once, never queued ---------------------------------------------------


def test_api_refuses_calls_beyond_max_concurrent_rpcs_at_once(
    processor, start_api, make_client, held_origin
) -> None:
    settings = dev_api_settings(
        f"127.0.0.1:{processor.port}", allow_source_cidr=LOOPBACK, max_concurrent_rpcs=2
    )
    client = make_client(start_api(settings).port)
    held = [
        client.stub.ScaleImage.future(url_request(held_origin.url), timeout=30) for _ in range(2)
    ]
    held_origin.wait_for(2)
    started = time.monotonic()
    error = client.refusal(small_jpeg(), timeout=10)
    assert error.code() == EXHAUSTED
    assert time.monotonic() - started < 1.0  # refused, not queued behind the held calls
    held_origin.release.set()
    assert all(call.result().info.scaled for call in held)
    assert client.scale(small_jpeg()).info.scaled


class _Started(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "started":
            self.event.set()


@pytest.fixture
def processor_started() -> Iterator[threading.Event]:
    """Set when the processor logs that a request has started (it is then in flight)."""
    handler, logger = _Started(), logging.getLogger("processor.service")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.event
    logger.removeHandler(handler)
    logger.setLevel(previous)


def warm_up(client: Client) -> None:
    """Poll until the API's processor connection is up: with a single slot, the API's health
    watch being set up can take it from the first call."""
    for _ in range(100):
        try:
            client.scale(small_jpeg())
            return
        except grpc.RpcError as error:
            assert error.code() == EXHAUSTED, error.details()
    pytest.fail("the API never got through to an idle processor")


def test_processor_at_capacity_is_refused_through_the_api_at_once(
    start_processor, start_api, make_client, processor_started
) -> None:
    """workers + queue is the processor's admission limit; the API says so, without waiting.

    The API's connection (and its health watch) is set up before the processor fills up: a
    connection made while it is full has its health watch refused too, and then reads as
    UNAVAILABLE until the health check retries (see the hardening report).
    """
    running = start_processor(workers=1, queue=0)
    client = make_client(start_api(dev_api_settings(f"127.0.0.1:{running.port}")).port)
    warm_up(client)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{running.port}",
        options=[("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)],
    )
    heavy = ppb.ProcessRequest(
        image=encode(Image.new("L", (6000, 4000), 128), "PNG", compress_level=1),
        scaling=ppb.Scaling(width=8000, height=7500, mode=ppb.FIT_MODE_STRETCH),
        grayscale=True,
        format=ppb.FORMAT_PNG,
    )
    busy = processor_pb2_grpc.ProcessorStub(channel).Process.future(heavy, timeout=60)
    try:
        assert processor_started.wait(30)
        started = time.monotonic()
        error = client.refusal(small_jpeg())
        assert time.monotonic() - started < 1.0
        assert (error.code(), error.details()) == (
            EXHAUSTED,
            "image processors are at capacity; retry shortly",
        )
        assert not busy.done()
    finally:
        assert busy.result().geometry.output_width == 8000
        channel.close()
    warm_up(client)  # the freed slot serves the API again


# --- deadlines ------------------------------------------------------------------------------------


def no_deadline_call(client: Client, request: pb.ScaleImageRequest) -> tuple[Any, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        client.stub.ScaleImage(request)  # no timeout: the server's default must apply
    return exc.value, time.monotonic() - started


def test_call_without_deadline_gets_the_configured_default(
    processor, start_api, make_client, held_origin
) -> None:
    """Regression: grpcio reports "no deadline" as ~9e18 s left, so the cap (120 s) applied
    and only the fetch's own 20 s limit cut a silent origin."""
    settings = dev_api_settings(
        f"127.0.0.1:{processor.port}", allow_source_cidr=LOOPBACK, deadline=1.0, fetch_timeout=20.0
    )
    client = make_client(start_api(settings).port)
    error, elapsed = no_deadline_call(client, url_request(held_origin.url))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < elapsed < 4.0


def test_long_client_deadline_is_capped(processor, start_api, make_client, held_origin) -> None:
    settings = dev_api_settings(
        f"127.0.0.1:{processor.port}",
        allow_source_cidr=LOOPBACK,
        deadline=1.0,
        max_deadline=1.5,
        fetch_timeout=20.0,
    )
    client = make_client(start_api(settings).port)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        client.stub.ScaleImage(url_request(held_origin.url), timeout=600)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1.4 < time.monotonic() - started < 4.5
