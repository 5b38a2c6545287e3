"""The tenant is only ever the one in the verified token, and look-alike tenant ids (case,
invisible or confusable characters) are refused wherever an id becomes a key or a path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.pb import imagescaler_pb2 as pb
from api.ratelimit import Limiter, RateLimits
from auth import keys
from auth.reloading import InvalidFile
from auth.tenants import parse_tenants
from auth.tokens import mint
from tests.hardening.hostile import encode, photo
from tests.stack import dev_api_settings

TENANTS = """
tenants:
  - id: acme
    scopes: [scale:content]
    rate_limit: 2/hour  # not per minute: a test crossing a clock minute gets a third call
  - id: other
    scopes: [scale:content]
  - id: gone
    enabled: false
"""
METHOD = "/imagescaler.ImageScaler/ScaleImage"

LOOK_ALIKES = [
    "Acme",
    "ACME",
    "acme\u200b",  # zero-width space
    "\u200bacme",
    "acme\ufeff",  # byte order mark
    "ac\u00adme",  # soft hyphen
    "acme\u2060",  # word joiner
    "\uff41\uff43\uff4d\uff45",  # fullwidth, NFKC-folds to "acme"
    "acm\u0435",  # Cyrillic ie
    "acme\u0301",  # combining accent
    "acme\n",
    "acme ",
    " acme",
    "acme\x00",
    "acme/../other",
    "acme:other",
    "",
]


class Api:
    """A JWT-protected API over the real processor, and a key to mint its tokens."""

    def __init__(self, tmp: Path, start_api: Any, processor_port: int) -> None:
        self.key = keys.generate_private_key()
        (tmp / "jwks.json").write_text(json.dumps({"keys": [keys.public_jwk(self.key, "k1")]}))
        (tmp / "tenants.yaml").write_text(TENANTS)
        settings = dev_api_settings(
            f"127.0.0.1:{processor_port}",
            auth="jwt",
            jwks=str(tmp / "jwks.json"),
            tenants=str(tmp / "tenants.yaml"),
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{start_api(settings).port}")
        self.raw = self.channel.unary_unary(METHOD)  # bytes in, bytes out
        self.image = encode(photo((320, 240)), "JPEG")

    def token(self, tenant: str = "acme", **claims: Any) -> str:
        extra = {"tenant": claims.pop("claimed")} if "claimed" in claims else None
        return mint(
            self.key, "k1", tenant=tenant, scopes=["scale:content"], extra_claims=extra, **claims
        )

    def call(self, token: str, metadata: tuple[tuple[str, str], ...] = (), extra: bytes = b""):
        """ScaleImage with the bearer token, more metadata and raw bytes appended to the body."""
        request = pb.ScaleImageRequest(image=pb.Image(content=self.image)).SerializeToString()
        headers = (("authorization", f"Bearer {token}"), *metadata)
        return self.raw.with_call(request + extra, metadata=headers, timeout=10)

    def refusal(self, token: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as exc:
            self.call(token, metadata)
        return exc.value


@pytest.fixture
def api_jwt(tmp_path: Path, start_api, processor) -> Iterator[Api]:
    api = Api(tmp_path, start_api, processor.port)
    yield api
    api.channel.close()


SPOOFED_METADATA = (
    ("tenant", "other"),
    ("x-tenant", "other"),
    ("x-tenant-id", "other"),
    ("x-imagescaler-tenant", "other"),
    ("x-forwarded-user", "other"),
)


def unknown_field(number: int, text: bytes) -> bytes:
    """A length-delimited protobuf field the public message does not define."""
    return bytes([(number << 3 | 2) & 0x7F | 0x80, number >> 4]) + bytes([len(text)]) + text


def test_tenant_headers_and_unknown_fields_cannot_change_the_tenant(api_jwt: Api) -> None:
    """acme (2/hour) spends its own budget, whatever the call claims besides its token."""
    extra = unknown_field(99, b"other") + unknown_field(100, b'{"tenant":"other"}')
    for _ in range(2):
        reply, call = api_jwt.call(api_jwt.token("acme"), SPOOFED_METADATA, extra)
        assert pb.ScaleImageReply.FromString(reply).info.scaled
        assert dict(call.trailing_metadata() or ())["ratelimit-limit"] == "2"
    error = api_jwt.refusal(api_jwt.token("acme"), SPOOFED_METADATA)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "for tenant acme;" in error.details()
    api_jwt.call(api_jwt.token("other"))  # other's budget was never touched


def test_disabled_tenant_cannot_borrow_another_tenant(api_jwt: Api) -> None:
    error = api_jwt.refusal(api_jwt.token("gone"), (("tenant", "acme"), ("x-tenant", "acme")))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant disabled: gone",
    )


def test_sub_claim_naming_another_tenant_changes_nothing(api_jwt: Api) -> None:
    for _ in range(2):
        api_jwt.call(api_jwt.token("acme", subject="other"))
    error = api_jwt.refusal(api_jwt.token("acme", subject="other"))
    assert "for tenant acme;" in error.details()


@pytest.mark.parametrize("claimed", LOOK_ALIKES, ids=[ascii(t) for t in LOOK_ALIKES])
def test_look_alike_tenant_claims_are_refused(api_jwt: Api, claimed: str) -> None:
    error = api_jwt.refusal(api_jwt.token("acme", claimed=claimed))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "bad claim: tenant",
    )


@pytest.mark.parametrize("claimed", [["acme"], {"id": "acme"}, 7, None, True])
def test_non_string_tenant_claims_are_refused(api_jwt: Api, claimed: Any) -> None:
    error = api_jwt.refusal(api_jwt.token("acme", claimed=claimed))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("tenant_id", LOOK_ALIKES, ids=[ascii(t) for t in LOOK_ALIKES])
def test_registry_refuses_look_alike_ids(tenant_id: str) -> None:
    document = json.dumps({"tenants": [{"id": "acme"}, {"id": tenant_id}]}).encode()
    with pytest.raises(InvalidFile, match="'id' must match"):
        parse_tenants(document)


@pytest.mark.parametrize("tenant_id", LOOK_ALIKES, ids=[ascii(t) for t in LOOK_ALIKES])
def test_rate_limit_keys_refuse_look_alike_ids(tenant_id: str) -> None:
    limiter = Limiter(RateLimits(default_rate="5/minute"))
    try:
        with pytest.raises(ValueError, match="rate-limit key"):
            limiter.acquire(tenant_id)
        with pytest.raises(ValueError, match="rate-limit key"):
            limiter.charge_pixels(tenant_id, 1.0)
        assert limiter.acquire("acme").tenant == "acme"
    finally:
        limiter.close()
