"""TLS on the public listener (so bearer tokens never cross a network in clear)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.stack import dev_api_settings, free_port
from tools.certs import CertifiedKey, create_dev_pki, issue, new_authority
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


def test_a_renewed_listener_certificate_serves_new_connections_without_a_restart(
    tmp_path: Path, processor, start_api
) -> None:
    """cert-manager renews the Secret in place; the API must not need a rollout for it."""
    old_ca, new_ca = new_authority("old CA"), new_authority("new CA")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    issue(old_ca, "api", purpose="server", names=["localhost"]).write(cert, key)
    running = start_api(
        dev_api_settings(f"127.0.0.1:{processor.port}", tls_cert=str(cert), tls_key=str(key))
    )
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), "teal").save(buf, "JPEG")

    def scale(trusted: CertifiedKey) -> int:
        with ScalerClient(f"localhost:{running.port}", ca=trusted.cert_pem()) as client:
            return client.scale(buf.getvalue(), timeout=10).info.output_width

    assert scale(old_ca) == 1024
    issue(new_ca, "api", purpose="server", names=["localhost"]).write(cert, key)
    assert scale(new_ca) == 1024
    with pytest.raises(grpc.RpcError) as exc:
        scale(old_ca)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
