"""The API with its real interceptor chain: JWT authentication, scopes and rate limits."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
from auth import keys
from auth.tokens import mint
from tests.legacy_contract import legacy_scale
from tests.stack import dev_api_settings

TENANTS = """
tenants:
  - id: acme
    scopes: [scale:content, scale:url]
  - id: thumbs
    scopes: [scale:content]
    rate_limit: 3/hour  # hours, not minutes: memory windows follow the clock, and a test
    # crossing a minute boundary would get a fourth call through
  - id: bigpix
    scopes: [scale:content]
    pixel_limit: 3/hour
  - id: other
    scopes: [scale:content]
  - id: gone
    enabled: false
"""


class Secured:
    """A started JWT-protected API and a way to mint tokens for it."""

    def __init__(self, tmp: Path, start_api: Callable, processor_port: int, **overrides) -> None:
        self.key = keys.generate_private_key()
        (tmp / "jwks.json").write_text(json.dumps({"keys": [keys.public_jwk(self.key, "k1")]}))
        (tmp / "tenants.yaml").write_text(TENANTS)
        settings = dev_api_settings(
            f"127.0.0.1:{processor_port}",
            auth="jwt",
            jwks=str(tmp / "jwks.json"),
            tenants=str(tmp / "tenants.yaml"),
            **overrides,
        )
        self.running = start_api(settings)
        self.port = self.running.port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = imagescaler_pb2_grpc.ImageScalerStub(self.channel)

    def token(self, tenant: str = "acme", scopes: tuple[str, ...] = ("scale:content",)) -> str:
        return mint(self.key, "k1", tenant=tenant, scopes=scopes, ttl=600)

    def call(self, image: pb.Image, token: str | None):
        metadata = [("authorization", f"Bearer {token}")] if token else []
        return self.stub.ScaleImage.with_call(
            pb.ScaleImageRequest(image=image), metadata=metadata, timeout=10
        )

    def refused(self, image: pb.Image, token: str | None) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as exc:
            self.call(image, token)
        return exc.value


@pytest.fixture
def secured(tmp_path: Path, start_api, processor):
    s = Secured(tmp_path, start_api, processor.port)
    yield s
    s.channel.close()


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_valid_token_scales(secured: Secured) -> None:
    reply, call = secured.call(pb.Image(content=small_jpeg()), secured.token())
    assert reply.info.output_width == 1024
    trailers = dict(call.trailing_metadata())
    assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(trailers)


def test_legacy_client_without_token_is_unauthenticated(secured: Secured, sample_jpeg) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        legacy_scale(f"127.0.0.1:{secured.port}", sample_jpeg)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("tenant", "scopes", "image", "code", "words"),
    [
        (
            "acme",
            ("scale:content",),
            pb.Image(source=pb.ImageSource(http_uri="http://x.test/a")),
            grpc.StatusCode.PERMISSION_DENIED,
            "scale:url",
        ),
        (
            "gone",
            ("scale:content",),
            pb.Image(content=b"x"),
            grpc.StatusCode.PERMISSION_DENIED,
            "disabled",
        ),
        (
            "nobody",
            ("scale:content",),
            pb.Image(content=b"x"),
            grpc.StatusCode.PERMISSION_DENIED,
            "unknown",
        ),
    ],
)
def test_permissions(secured: Secured, tenant, scopes, image, code, words) -> None:
    error = secured.refused(image, secured.token(tenant, scopes))
    assert error.code() == code
    assert words in error.details()


def test_bad_token_reason_is_short_and_leaks_nothing(secured: Secured) -> None:
    token = secured.token()
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    error = secured.refused(pb.Image(content=small_jpeg()), forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert token.split(".")[1] not in error.details()


def test_health_needs_no_token(secured: Secured) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1


def test_tenant_rate_limit_then_retry_info(secured: Secured) -> None:
    token = secured.token("thumbs")
    for _ in range(3):
        secured.call(pb.Image(content=small_jpeg()), token)
    error = secured.refused(pb.Image(content=small_jpeg()), token)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(error.trailing_metadata())
    assert 1 <= int(trailers["retry-after"]) <= 3600
    status = rpc_status.from_call(error)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.seconds == int(trailers["retry-after"])
    # another tenant is unaffected
    secured.call(pb.Image(content=small_jpeg()), secured.token("other"))


def test_pixel_budget(secured: Secured, sample_jpeg: bytes) -> None:
    token = secured.token("bigpix")  # 3 MP per hour; the sample photo is 1.84 MP
    secured.call(pb.Image(content=sample_jpeg), token)
    error = secured.refused(pb.Image(content=sample_jpeg), token)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry-after" in dict(error.trailing_metadata())
