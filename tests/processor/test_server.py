"""The processor as a gRPC server: health, reflection, limits, overload and drain."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from processor import config
from processor.pb import processor_pb2 as pb
from processor.pb import processor_pb2_grpc
from processor.service import SERVICE_NAME

BIG = 64 << 20


def stub(port: int) -> processor_pb2_grpc.ProcessorStub:
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)],
    )
    return processor_pb2_grpc.ProcessorStub(channel)


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def heavy_request() -> pb.ProcessRequest:
    """A legitimate request that keeps a worker busy for a good while (large upscale)."""
    return pb.ProcessRequest(
        image=png((6000, 4000)),
        scaling=pb.Scaling(width=8000, height=7500, mode=pb.FIT_MODE_STRETCH),
        grayscale=True,
        format=pb.FORMAT_PNG,
    )


class Started(logging.Handler):
    """Signals when the processor logs that a request started (it is then in flight)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "started":
            self.event.set()


@pytest.fixture
def started() -> Iterator[threading.Event]:
    handler = Started()
    logger = logging.getLogger("processor.service")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler.event
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_health_and_reflection(processor) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{processor.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "imagescaler.processor.v1.Processor"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "imagescaler.processor.v1.Processor" in names
    channel.close()


def test_process_sample(processor, sample_jpeg: bytes) -> None:
    reply = stub(processor.port).Process(
        pb.ProcessRequest(
            image=sample_jpeg, scaling=pb.Scaling(width=1024, height=768), grayscale=True
        ),
        timeout=30,
    )
    assert (reply.geometry.output_width, reply.geometry.output_height) == (1024, 768)
    assert reply.mode == pb.FIT_MODE_PAD and reply.scaled and reply.grayscale
    with Image.open(io.BytesIO(reply.image)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "L", (1024, 768))
    assert reply.timings.decode_ms > 0 and reply.timings.encode_ms > 0


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.ProcessRequest(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (
            pb.ProcessRequest(image=b"%PDF-1.7 not an image"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unsupported",
        ),
        (
            pb.ProcessRequest(image=png((64, 64)), quality=101),
            grpc.StatusCode.INVALID_ARGUMENT,
            "quality",
        ),
        (
            pb.ProcessRequest(image=png((64, 64)), scaling=pb.Scaling(width=0, height=5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target size",
        ),
        (
            pb.ProcessRequest(image=png((64, 64)), format=9),
            grpc.StatusCode.INVALID_ARGUMENT,
            "format",
        ),
    ],
)
def test_bad_requests_then_server_still_answers(
    processor, request_: pb.ProcessRequest, code: grpc.StatusCode, words: str
) -> None:
    s = stub(processor.port)
    with pytest.raises(grpc.RpcError) as exc:
        s.Process(request_, timeout=10)
    assert exc.value.code() == code
    assert words in exc.value.details()
    assert s.Process(pb.ProcessRequest(image=png((32, 32))), timeout=10).image


def test_malformed_request_is_invalid_argument(processor) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{processor.port}") as channel:
        process = channel.unary_unary(f"/{SERVICE_NAME}/Process")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as exc:
            process(b"\x0a\x05ab", timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in exc.value.details()
    assert stub(processor.port).Process(pb.ProcessRequest(image=png((32, 32))), timeout=10).image


def test_message_over_the_configured_limit(start_processor) -> None:
    running = start_processor(max_input_bytes=1 << 20)
    with pytest.raises(grpc.RpcError) as exc:
        stub(running.port).Process(pb.ProcessRequest(image=b"\xff" * (2 << 20)), timeout=10)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_overload_is_refused_at_once(start_processor, started: threading.Event) -> None:
    """Beyond workers + queue, Process is refused at once; health still answers, so a new
    API connection sees a busy replica, not a dead one."""
    running = start_processor(workers=1, queue=0)
    s = stub(running.port)
    busy = s.Process.future(heavy_request(), timeout=60)
    assert started.wait(30)
    with pytest.raises(grpc.RpcError) as exc:
        s.Process(pb.ProcessRequest(image=png((32, 32))), timeout=10)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity" in exc.value.details()
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as fresh:
        check = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert busy.result().geometry.output_width == 8000


def test_insecure_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="refusing to serve plaintext"):
        config.ProcessorSettings(listen="0.0.0.0:50052", insecure=True)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--queue", "-2"),  # refused every call as "at capacity"; -3 was a traceback
        ("--drain-delay", "-1"),  # time.sleep(-1) on SIGTERM: no drain at all
        ("--grace", "inf"),  # int32 milliseconds in gRPC's options: OverflowError
        ("--max-connection-age", "3000000"),
        ("--max-input-bytes", "4GB"),
    ],
)
def test_values_that_failed_later_stop_at_start(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        config.load(["--insecure", flag, value], environ={})
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_help_lists_options_and_env_names() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "processor.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for flag in (
        "--listen",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--insecure",
        "--metrics-port",
        "--workers",
        "--max-input-bytes",
    ):
        assert flag in out
    assert "IMAGESCALER_MAX_INPUT_BYTES" in out


def test_sigterm_drains_in_flight_request() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "processor.server",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "debug",
            "--grace",
            "30",
            "--metrics-port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = iter(proc.stderr)  # type: ignore[arg-type]
        port = next(json.loads(line)["port"] for line in lines if '"serving"' in line)
        s = stub(port)
        in_flight = s.Process.future(heavy_request(), timeout=60)
        next(line for line in lines if '"started"' in line)
        proc.send_signal(signal.SIGTERM)
        next(line for line in lines if '"draining"' in line)
        with pytest.raises(grpc.RpcError) as refused:
            s.Process(pb.ProcessRequest(image=png((32, 32))), timeout=10)
        # new calls are refused while the in-flight one finishes
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert in_flight.result().geometry.output_width == 8000
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_every_settings_field_is_an_option() -> None:
    from dataclasses import fields

    dests = {a.dest for a in config.build_options().parser._actions}
    assert not {f.name for f in fields(config.ProcessorSettings)} - dests
