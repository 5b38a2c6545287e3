"""The API's hand-assembled processor request is the message protobuf would have built."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import api
from api import server as api_server
from api.forwarding import SERVICE, Body, BytesInFlight, ProcessorClient, encode_request
from api.pb import imagescaler_pb2 as pb
from api.service import SERVICE_NAME
from processor import serving
from processor.errors import Cancelled, Overloaded, ServiceError
from processor.pb import processor_pb2 as ppb
from tests.callers import FakeCaller
from tests.stack import dev_api_settings

JOB = ppb.ProcessRequest(
    scaling=ppb.Scaling(width=1024, height=768, mode=ppb.FIT_MODE_PAD, pad_color=0x102030),
    grayscale=True,
    format=ppb.FORMAT_JPEG,
    quality=85,
)


# Lengths on both sides of each varint byte boundary, and a photo-sized image.
@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152, 2_450_000])
def test_encoded_request_parses_to_the_job_with_the_image(size: int) -> None:
    image = bytes(range(256)) * (size // 256) + bytes(size % 256)
    parsed = ppb.ProcessRequest.FromString(encode_request(JOB, image))
    expected = ppb.ProcessRequest()
    expected.CopyFrom(JOB)
    expected.image = image
    assert parsed == expected
    assert parsed.image == image


def test_a_job_without_scaling_stays_without_it() -> None:
    parsed = ppb.ProcessRequest.FromString(encode_request(ppb.ProcessRequest(grayscale=True), b"x"))
    assert not parsed.HasField("scaling")
    assert (parsed.grayscale, parsed.image) == (True, b"x")


def test_bytes_in_flight_wait_for_room_and_give_up_at_the_deadline() -> None:
    in_flight = BytesInFlight(100)
    entered = threading.Event()

    def later() -> None:
        with in_flight.hold(60, time.monotonic() + 30):
            entered.set()

    with in_flight.hold(60, time.monotonic() + 1):
        with (  # no room before its deadline
            pytest.raises(Overloaded, match="at capacity"),
            in_flight.hold(60, time.monotonic() + 0.1),
        ):
            pass
        waiter = threading.Thread(target=later)
        waiter.start()
        assert not entered.is_set() and in_flight.used == 60
    waiter.join(timeout=10)
    assert entered.is_set() and in_flight.used == 0  # room once the first was done


def test_an_image_larger_than_the_cap_goes_alone() -> None:
    in_flight = BytesInFlight(100)
    with in_flight.hold(150, time.monotonic()):
        assert in_flight.used == 150


class _Announcing(threading.Condition):
    """A condition that says when someone starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.someone_waits = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.someone_waits.set()
        return super().wait(timeout)


def test_bytes_in_flight_serve_waiting_calls_in_arrival_order() -> None:
    """A small call that would fit waits behind a large one that came first (no starvation)."""
    in_flight = BytesInFlight(100)
    in_flight._room = _Announcing()
    entered: list[int] = []

    def large() -> None:
        with in_flight.hold(60, time.monotonic() + 30):
            entered.append(60)

    with in_flight.hold(60, time.monotonic() + 1):
        waiter = threading.Thread(target=large)
        waiter.start()
        assert in_flight._room.someone_waits.wait(timeout=10)
        with (  # 60 + 10 fits, but the large call is first in line
            pytest.raises(Overloaded),
            in_flight.hold(10, time.monotonic() + 0.1),
        ):
            pass
    waiter.join(timeout=10)
    assert entered == [60] and in_flight.used == 0


@pytest.mark.parametrize(
    ("end", "code"),
    [
        (FakeCaller.cancel, grpc.StatusCode.CANCELLED),
        (FakeCaller.expire, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_a_waiting_call_whose_caller_is_gone_leaves_the_line(end, code) -> None:
    in_flight = BytesInFlight(100)
    caller, outcome = FakeCaller(), []

    def waiting() -> None:
        try:
            with in_flight.hold(60, time.monotonic() + 30, caller):
                outcome.append("sent")
        except ServiceError as exc:
            outcome.append(exc.code)

    with in_flight.hold(60, time.monotonic() + 1):
        waiter = threading.Thread(target=waiting)
        waiter.start()
        assert caller.asked.wait(timeout=10)
        end(caller)
        waiter.join(timeout=10)
        assert outcome == [code]  # before room came: never sent to a processor


def test_a_call_waiting_for_room_holds_no_copy_of_its_image() -> None:
    """Waiting large calls pile up in the API's memory: each holds the received image only."""
    in_flight = BytesInFlight(100)
    in_flight._room = _Announcing()
    channel = grpc.insecure_channel("127.0.0.1:9")  # never reached: the call gives up first
    client = ProcessorClient(channel, in_flight)
    image = bytes(8 * 1024 * 1024)
    caller, outcome, peak = FakeCaller(), [], []

    def waiting() -> None:
        try:
            client.process(JOB, Body(image), 30, caller)
        except Cancelled:
            outcome.append("left")

    tracemalloc.start()
    try:
        with in_flight.hold(100, time.monotonic() + 30):
            waiter = threading.Thread(target=waiting)
            waiter.start()
            assert caller.asked.wait(timeout=10)
            peak.append(tracemalloc.get_traced_memory()[1])
            caller.cancel()
            waiter.join(timeout=10)
    finally:
        tracemalloc.stop()
        channel.close()
    assert outcome == ["left"]
    assert peak[0] < len(image) // 2


class HoldingProcessor:
    """A processor stand-in that keeps each call until :attr:`release` is set."""

    def __init__(self, max_message: int) -> None:
        self.arrived, self.release = threading.Event(), threading.Event()
        options = serving.message_options(max_message)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
        process = grpc.unary_unary_rpc_method_handler(
            self._process, response_serializer=ppb.ProcessReply.SerializeToString
        )
        handlers = grpc.method_handlers_generic_handler(SERVICE, {"Process": process})
        self.server.add_generic_rpc_handlers((handlers,))
        serving.add_health_and_reflection(self.server, [SERVICE])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _process(self, request: bytes, context: Any) -> ppb.ProcessReply:
        self.arrived.set()
        self.release.wait(timeout=30)
        return ppb.ProcessReply(image=b"scaled", format=ppb.FORMAT_JPEG)


def test_a_call_at_the_processor_holds_one_copy_of_its_image(
    start_api: Callable[..., api_server.Running], sample_jpeg: bytes
) -> None:
    """While a processor works on an image the API holds the forwarded copy only: the
    received one is let go (each 31 MiB upload in flight held two Python copies)."""
    image = sample_jpeg + bytes(8 * 1024 * 1024)  # a real header; the stand-in decodes nothing
    raw = pb.ScaleImageRequest(image=pb.Image(content=image)).SerializeToString()
    held = HoldingProcessor(32 * 1024 * 1024)
    running = start_api(dev_api_settings(f"127.0.0.1:{held.port}"))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    call = channel.unary_unary(
        f"/{SERVICE_NAME}/ScaleImage", response_deserializer=pb.ScaleImageReply.FromString
    )
    tracemalloc.start(64)  # deep enough to see api/ code above processor/wire.py's copy
    try:
        reply = call.future(raw, timeout=30)  # our C-level send copy is not traced
        assert held.arrived.wait(timeout=10)
        snapshot = tracemalloc.take_snapshot()
        held.release.set()
        assert reply.result().content == b"scaled"
    finally:
        tracemalloc.stop()
        held.release.set()
        channel.close()
        held.server.stop(0)
    assert len(image) <= _allocated_by_the_api(snapshot) < len(image) * 3 // 2  # forwarded copy


def _allocated_by_the_api(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated with code of the ``api`` package on the stack (not the stand-in's)."""
    ours = str(Path(api.__file__).parent) + "/"
    traces = snapshot.traces
    return sum(t.size for t in traces if any(f.filename.startswith(ours) for f in t.traceback))
