"""Refusals come before the request body: the API reads a call's image after admitting it.

The client here sends its single request message only when told to (a request-streaming call
on the unary method: the same bytes on the wire as a unary call), so a test can tell whether
the API answered before the body was there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.pb import imagescaler_pb2 as pb
from tests.api.test_secured import Secured

METHOD = "/imagescaler.ImageScaler/ScaleImage"
PATIENCE = 10.0  # seconds: how long an answer may take when it needs no body


class HeldBody:
    """A request stream whose one message is sent only once ``release`` is set."""

    def __init__(self, request: pb.ScaleImageRequest) -> None:
        self.request = request
        self.release = threading.Event()
        self.sent = threading.Event()

    def __iter__(self) -> Iterator[pb.ScaleImageRequest]:
        self.release.wait(PATIENCE * 3)
        self.sent.set()
        yield self.request


class Api(Secured):
    """The secured API, called as a request stream so that the body can be held back."""

    def __init__(
        self, tmp: Path, start_api: Callable, processor_port: int, **overrides: Any
    ) -> None:
        super().__init__(tmp, start_api, processor_port, **overrides)
        self.stream = self.channel.stream_unary(
            METHOD,
            request_serializer=pb.ScaleImageRequest.SerializeToString,
            response_deserializer=pb.ScaleImageReply.FromString,
        )

    def start(self, body: HeldBody, token: str) -> tuple[grpc.Future, threading.Event]:
        future = self.stream.future(
            iter(body), metadata=[("authorization", f"Bearer {token}")], timeout=PATIENCE * 4
        )
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        return future, done


@pytest.fixture
def api(tmp_path: Path, start_api, processor) -> Iterator[Api]:
    a = Api(tmp_path, start_api, processor.port)
    yield a
    a.channel.close()


def refusal_without_body(api: Api, token: str, sample_jpeg: bytes) -> grpc.RpcError:
    body = HeldBody(pb.ScaleImageRequest(image=pb.Image(content=sample_jpeg)))
    future, done = api.start(body, token)
    try:
        assert done.wait(PATIENCE), "no answer while the body was held"
        assert not body.sent.is_set()
        error = future.exception()
        assert isinstance(error, grpc.RpcError)
        return error
    finally:
        body.release.set()


def test_a_bad_token_is_refused_before_the_body(api: Api, sample_jpeg: bytes) -> None:
    error = refusal_without_body(api, "not.a.jwt", sample_jpeg)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_rate_limited_call_is_refused_before_the_body(api: Api, sample_jpeg: bytes) -> None:
    token = api.token("thumbs")  # 3/hour
    for _ in range(3):
        api.call(pb.Image(content=sample_jpeg), token)
    error = refusal_without_body(api, token, sample_jpeg)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_admitted_call_is_handled_while_its_body_is_on_the_way(
    api: Api, sample_jpeg: bytes
) -> None:
    """Control for the tests above: the handler chain really runs before the body arrives,
    and the admitted call then waits for it."""
    body = HeldBody(pb.ScaleImageRequest(image=pb.Image(content=sample_jpeg)))
    future, done = api.start(body, api.token())
    deadline = time.monotonic() + PATIENCE
    while api.running.in_flight.count == 0 and time.monotonic() < deadline:
        done.wait(0.01)
    assert api.running.in_flight.count == 1
    assert not done.is_set() and not body.sent.is_set()
    body.release.set()
    assert future.result().info.output_width == 1024


def test_a_call_that_ends_without_a_message_is_invalid(api: Api) -> None:
    metadata = [("authorization", f"Bearer {api.token()}")]
    with pytest.raises(grpc.RpcError) as exc:
        api.stream(iter(()), metadata=metadata, timeout=10)
    assert (exc.value.code(), exc.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "no request message",
    )


def test_a_body_that_never_comes_frees_its_thread_and_slot(
    tmp_path: Path, start_api, processor, sample_jpeg: bytes
) -> None:
    """Without a deadline (or with one past --max-deadline) gRPC would wait for the body for
    ever, holding a worker thread and the tenant's in-flight slot: two such calls locked
    this tenant out for good. The API's own deadline now ends the wait."""
    api = Api(
        tmp_path, start_api, processor.port, deadline=1.0, max_deadline=2.0,
        max_concurrent_per_tenant=2,
    )  # fmt: skip
    token = api.token()
    metadata = [("authorization", f"Bearer {token}")]
    bodies = [HeldBody(pb.ScaleImageRequest(image=pb.Image(content=sample_jpeg))) for _ in "ab"]
    try:
        stalled = [
            api.stream.future(iter(bodies[0]), metadata=metadata),  # no deadline at all
            api.start(bodies[1], token)[0],  # one beyond --max-deadline
        ]
        for future in stalled:
            error = future.exception(timeout=PATIENCE)
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.CANCELLED
        assert not any(body.sent.is_set() for body in bodies)
        reply, _ = api.call(pb.Image(content=sample_jpeg), token)  # the slots are free again
        assert reply.info.output_width == 1024
    finally:
        for body in bodies:
            body.release.set()
        api.channel.close()
