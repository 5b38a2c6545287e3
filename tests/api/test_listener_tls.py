"""TLS on the public listener (so bearer tokens never cross a network in clear)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.stack import dev_api_settings, free_port
from tools.certs import create_dev_pki
from tools.client import ScalerClient


def test_tls_listener_and_plaintext_probe_port(tmp_path: Path, processor, start_api) -> None:
    pki = create_dev_pki(tmp_path / "pki")
    probe = free_port()
    running = start_api(
        dev_api_settings(
            f"127.0.0.1:{processor.port}",
            tls_cert=str(pki.processor_cert),
            tls_key=str(pki.processor_key),
            probe_listen=f"127.0.0.1:{probe}",
        )
    )
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), "navy").save(buf, "JPEG")

    with ScalerClient(f"localhost:{running.port}", ca=pki.ca_cert.read_bytes()) as client:
        assert client.scale(buf.getvalue()).info.output_width == 1024

    with (
        ScalerClient(f"127.0.0.1:{running.port}") as plaintext,
        pytest.raises(grpc.RpcError) as exc,
    ):
        plaintext.scale(buf.getvalue(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE

    with grpc.insecure_channel(f"127.0.0.1:{probe}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
