"""The benchmark's pass-through refuses what the API refuses before forwarding anything."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from api.service import MALFORMED, add_to_server
from processor import serving
from processor.pb import processor_pb2 as ppb
from tools.floorproxy import PassThrough
from tools.loadgen import SCALE_IMAGE


def unreachable(*args: object, **kwargs: object) -> ppb.ProcessReply:
    raise AssertionError("a malformed request reached the processor")


@pytest.fixture
def port() -> Iterator[int]:
    server = serving.new_server(2, None, serving.message_options(1 << 20))
    add_to_server(PassThrough(unreachable, ppb.ProcessRequest()).ScaleImage, server)
    bound = serving.bind(server, "127.0.0.1:0", None)
    server.start()
    yield bound
    server.stop(None).wait()


def test_malformed_request_is_invalid_argument_and_not_forwarded(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        scale = channel.unary_unary(SCALE_IMAGE)  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as exc:
            scale(b"\x0a\x05ab", timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == MALFORMED
