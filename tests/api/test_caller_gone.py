"""A URL call whose caller has gone stops fetching and frees its tenant's in-flight slot.

Found by a review: two cancelled URL calls to a trickling origin held both slots of a tenant
capped at 2 for the whole --fetch-timeout (20 s; 10 s, the read timeout, with a silent
origin), and were logged DEADLINE_EXCEEDED at the end of it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from api.pb import imagescaler_pb2 as pb
from tests.api.test_secured import Secured

if TYPE_CHECKING:
    from tests.api.conftest import Origin, Route

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
PROMPT = 5.0  # s: the cancelled calls' end (without the fix: 10 s silent, 20 s trickling)


class AccessLog(logging.Handler):
    """The statuses the access log writes, as it writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.codes: list[str] = []
        self._written = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._written:
            self.codes.append(record.status)  # type: ignore[attr-defined]
            self._written.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._written:
            return self._written.wait_for(lambda: len(self.codes) >= count, timeout)


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    logger, handler = logging.getLogger("imagescaler.access"), AccessLog()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def trickle(h: BaseHTTPRequestHandler, stop: threading.Event) -> None:
    """1000 bytes every 0.5 s, no length: well within every read timeout, never done."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.end_headers()
    while not stop.wait(0.5):
        h.wfile.write(bytes(1000))
        h.wfile.flush()


def silent(h: BaseHTTPRequestHandler, stop: threading.Event) -> None:
    stop.wait()


def counted(route: Route, arrived: threading.Semaphore) -> Route:
    def write(h: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        arrived.release()
        route(h, stop)

    return write


def jpeg(body: bytes) -> Route:
    def write(h: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return write


@pytest.mark.parametrize("route", [trickle, silent])
@pytest.mark.parametrize("ending", ["cancel", "close"])
def test_a_gone_caller_frees_its_tenants_slot_at_once(
    tmp_path: Path,
    start_api: Callable,
    processor,
    origin: Origin,
    access_log: AccessLog,
    sample_jpeg: bytes,
    route: Route,
    ending: str,
) -> None:
    api = Secured(
        tmp_path, start_api, processor.port, allow_source_cidr=LOOPBACK,
        max_concurrent_per_tenant=2,
    )  # fmt: skip
    arrived = threading.Semaphore(0)
    origin.routes["/slow"] = counted(route, arrived)
    origin.routes["/img"] = jpeg(sample_jpeg)
    token = api.token(scopes=("scale:url",))
    leaving = grpc.insecure_channel(f"127.0.0.1:{api.port}")  # the gone callers' own
    try:
        scale = leaving.unary_unary(
            "/imagescaler.ImageScaler/ScaleImage",
            request_serializer=pb.ScaleImageRequest.SerializeToString,
            response_deserializer=pb.ScaleImageReply.FromString,
        )
        source = pb.ImageSource(http_uri=origin.url("/slow"))
        slow = pb.ScaleImageRequest(image=pb.Image(source=source))
        metadata = [("authorization", f"Bearer {token}")]
        calls = [scale.future(slow, metadata=metadata, timeout=60) for _ in range(2)]
        assert arrived.acquire(timeout=PROMPT) and arrived.acquire(timeout=PROMPT)
        image = pb.Image(source=pb.ImageSource(http_uri=origin.url("/img")))
        refused = api.refused(image, token)  # control: the two calls fill the tenant's cap
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrency limit" in refused.details()
        if ending == "cancel":
            for call in calls:
                call.cancel()
        else:
            leaving.close()
        assert access_log.wait_for(3, PROMPT), f"still running: {access_log.codes}"
        assert access_log.codes == ["RESOURCE_EXHAUSTED", "CANCELLED", "CANCELLED"]
        reply, _ = api.call(image, token)  # admitted: the slots are free again
        assert reply.info.output_width == 1024
    finally:
        leaving.close()
        api.channel.close()
    labels = {"tenant": "acme", "grpc_code": "CANCELLED"}
    assert api.running.registry.get_sample_value("imagescaler_requests_total", labels) == 2
