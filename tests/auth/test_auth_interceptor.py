"""The authentication interceptor on a real gRPC server: issue 4's battery, end to end."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from authkit import KeyRing, SigningKey
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from api.interceptors import (
    AnonymousInterceptor,
    AuthInterceptor,
    current,
    current_principal,
    require_scope,
)
from api.pb import imagescaler_pb2, imagescaler_pb2_grpc
from auth.keys import KeyStore, generate_private_key
from auth.revocation import RECHECK_AFTER, MemoryRevocations, RedisRevocations, Revocations
from auth.tenants import TenantRegistry
from auth.tokens import AuthSettings, TokenVerifier
from processor.errors import ServiceError, status_code
from tools import admin

SERVICE = imagescaler_pb2.DESCRIPTOR.services_by_name["ImageScaler"].full_name
BIG_METADATA = [("grpc.max_metadata_size", 64 << 10), ("grpc.absolute_max_metadata_size", 64 << 10)]
TENANTS = """
tenants:
  - id: acme
    scopes: [scale:content, scale:url]
  - id: small
    scopes: [scale:content]
  - id: gone
    enabled: false
"""


class EchoPrincipal(imagescaler_pb2_grpc.ImageScalerServicer):
    """Replies with what the handler knows about its caller, as JSON."""

    def ScaleImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            require_scope("scale:url" if request.image.source.http_uri else "scale:content")
        except ServiceError as exc:
            context.abort(status_code(exc), str(exc))
        principal = current()
        seen = {
            "tenant": principal.tenant_id,
            "scopes": sorted(principal.scopes),
            "anonymous": principal.anonymous,
            "jti": principal.claims.jti,
        }
        return imagescaler_pb2.ScaleImageReply(content=json.dumps(seen).encode())


def stream_steps(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in range(3):
        yield current_principal.get().tenant_id.encode()


@dataclass
class Result:
    code: grpc.StatusCode
    details: str
    reply: dict[str, Any] | None


class Servers:
    """Real servers on 127.0.0.1:0 wrapped by an interceptor; stopped at teardown."""

    def __init__(self) -> None:
        self.started: list[grpc.Server] = []
        self.channels: list[grpc.Channel] = []

    def start(self, interceptor: grpc.ServerInterceptor, options: Any = BIG_METADATA) -> int:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor], options=options
        )
        imagescaler_pb2_grpc.add_ImageScalerServicer_to_server(EchoPrincipal(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Echo", {"Stream": grpc.unary_stream_rpc_method_handler(stream_steps)}
                )
            ]
        )
        reflection.enable_server_reflection([SERVICE, reflection.SERVICE_NAME], server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.started.append(server)
        return port

    def channel(self, port: int) -> grpc.Channel:
        self.channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return self.channels[-1]

    def call(
        self,
        port: int,
        token: str | None = None,
        url: str = "",
        metadata: list[tuple[str, str]] | None = None,
    ) -> Result:
        stub = imagescaler_pb2_grpc.ImageScalerStub(self.channel(port))
        sent = list(metadata or []) + ([("authorization", f"Bearer {token}")] if token else [])
        image = imagescaler_pb2.Image(source=imagescaler_pb2.ImageSource(http_uri=url))
        try:
            reply = stub.ScaleImage(
                imagescaler_pb2.ScaleImageRequest(image=image), metadata=sent, timeout=10
            )
        except grpc.RpcError as exc:
            return Result(exc.code(), exc.details() or "", None)
        return Result(grpc.StatusCode.OK, "", json.loads(reply.content))

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        for server in self.started:
            server.stop(0)


@pytest.fixture
def servers() -> Iterator[Servers]:
    running = Servers()
    yield running
    running.stop()


@pytest.fixture
def tenants(tmp_path: Path) -> TenantRegistry:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    return TenantRegistry(path, interval=0)


def interceptor(
    keyring: KeyRing, tenants: TenantRegistry, revocations: Revocations | None = None
) -> AuthInterceptor:
    verifier = TokenVerifier(AuthSettings(), KeyStore(keyring.path, interval=0), revocations)
    return AuthInterceptor(verifier, tenants)


@pytest.fixture
def port(
    servers: Servers, keyring: KeyRing, signing_key: SigningKey, tenants: TenantRegistry
) -> int:
    return servers.start(interceptor(keyring, tenants))


def unauthenticated(result: Result, reason: str) -> None:
    assert (result.code, result.details) == (grpc.StatusCode.UNAUTHENTICATED, reason)


def test_valid_token_reaches_the_handler_as_its_tenant(
    servers: Servers, port: int, signing_key: SigningKey
) -> None:
    token = signing_key.token(
        "acme", scopes=["scale:content", "scale:url", "results:store"], jti="t1"
    )
    result = servers.call(port, token)
    assert result.code == grpc.StatusCode.OK
    # results:store is in the token but not allowed for the tenant: effective scopes drop it
    assert result.reply == {
        "tenant": "acme",
        "scopes": ["scale:content", "scale:url"],
        "anonymous": False,
        "jti": "t1",
    }


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], "missing bearer token"),
        ([("authorization", "Basic YWNtZTpodW50ZXIy")], "not a bearer token"),
        ([("authorization", "Bearer")], "malformed authorization header"),
        ([("authorization", "bearer")], "malformed authorization header"),
        ([("authorization", "Token abc")], "not a bearer token"),
        ([("authorization", "Bearer  ")], "malformed authorization header"),
        ([("authorization", "Bearer a b")], "malformed authorization header"),
        (
            [("authorization", "Bearer x"), ("authorization", "Bearer y")],
            "several authorization headers",
        ),
        ([("authorization", "Bearer " + "a" * 16384)], "authorization header too large"),
        ([("x-token", "Bearer abc")], "missing bearer token"),
    ],
)
def test_bearer_header_forms(
    servers: Servers, port: int, metadata: list[tuple[str, str]], reason: str
) -> None:
    unauthenticated(servers.call(port, metadata=metadata), reason)


def test_oversized_header_with_default_grpc_limits_is_refused_too(
    servers: Servers, keyring: KeyRing, signing_key: SigningKey, tenants: TenantRegistry
) -> None:
    """Without raised metadata limits gRPC itself refuses a 16 KB header (not our status)."""
    port = servers.start(interceptor(keyring, tenants), options=[])
    result = servers.call(port, metadata=[("authorization", "Bearer " + "a" * 16384)])
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def _hs256_with_public_key(key: SigningKey, forge: Callable[..., str]) -> str:
    secret = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = jwt_claims()
    return forge(
        {"alg": "HS256", "kid": key.kid},
        claims,
        sign=lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )


def jwt_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "imagescaler-admin",
        "aud": "imagescaler",
        "sub": "acme",
        "tenant": "acme",
        "iat": now,
        "exp": now + 600,
        "jti": "j",
    }
    return {**claims, **overrides}


def _tampered(key: SigningKey, forge: Callable[..., str]) -> str:
    header, _, signature = key.token("small").split(".")
    payload = forge({}, jwt_claims(scope="scale:content scale:url")).split(".")[1]
    return f"{header}.{payload}.{signature}"


TOKENS: list[tuple[str, Callable[[SigningKey, Callable[..., str]], str], str]] = [
    (
        "alg none",
        lambda k, f: f({"alg": "none", "kid": k.kid}, jwt_claims(), lambda _: b"x"),
        "algorithm not allowed",
    ),
    ("hs256 with public key", _hs256_with_public_key, "algorithm not allowed"),
    (  # unhashable: a set lookup raised TypeError and the call ended UNKNOWN
        "alg a list",
        lambda k, f: f({"alg": ["EdDSA"], "kid": k.kid}, jwt_claims(), lambda _: b"x"),
        "algorithm not allowed",
    ),
    ("expired", lambda k, f: k.token(now=time.time() - 700, ttl=600), "expired"),
    (
        "nbf in the future",
        lambda k, f: k.token(extra_claims={"nbf": int(time.time()) + 600}),
        "not yet valid",
    ),
    ("wrong aud", lambda k, f: k.token(audience="other-service"), "wrong audience"),
    ("wrong iss", lambda k, f: k.token(issuer="someone"), "wrong issuer"),
    (
        "unknown kid",
        lambda k, f: SigningKey(generate_private_key(), "other").token(),
        "unknown key",
    ),
    ("tampered payload", _tampered, "bad signature"),
    (
        "missing tenant",
        lambda k, f: k.token(extra_claims={"tenant": None}),
        "missing claim: tenant",
    ),
    ("missing jti", lambda k, f: k.token(extra_claims={"jti": None}), "missing claim: jti"),
    ("lifetime above max", lambda k, f: k.token(ttl=2 * 86400), "lifetime too long"),
    (
        "jku header",
        lambda k, f: k.token(extra_headers={"jku": "http://127.0.0.1:1/k"}),
        "unsupported header: jku",
    ),
    (
        "crit header",
        lambda k, f: k.token(extra_headers={"crit": ["exp"]}),
        "unsupported header: crit",
    ),
    ("path-like kid", lambda k, f: SigningKey(k.private, "../../jwks").token(), "malformed kid"),
    (
        "16 KB token",
        lambda k, f: k.token(extra_claims={"pad": "x" * 12000}),
        "authorization header too large",
    ),
]


@pytest.mark.parametrize(
    ("make", "reason"), [(m, r) for _, m, r in TOKENS], ids=[name for name, _, _ in TOKENS]
)
def test_refused_tokens(
    servers: Servers,
    port: int,
    signing_key: SigningKey,
    forge: Callable[..., str],
    make: Callable[[SigningKey, Callable[..., str]], str],
    reason: str,
) -> None:
    unauthenticated(servers.call(port, make(signing_key, forge)), reason)


def test_failures_are_logged_with_reason_and_kid_never_the_token(
    servers: Servers, port: int, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    token = signing_key.token(now=time.time() - 700, ttl=600, jti="old-one")
    with caplog.at_level(logging.WARNING, logger="api.interceptors"):
        unauthenticated(servers.call(port, token), "expired")
    (record,) = [r for r in caplog.records if r.name == "api.interceptors"]
    line = record.getMessage()
    assert "ScaleImage" in line and "expired" in line
    assert "kid=main" in line and "jti=old-one" in line
    assert token not in line and token.split(".")[2] not in caplog.text


@pytest.mark.parametrize(
    ("tenant", "scopes", "url", "code", "details"),
    [
        ("gone", ["scale:content"], "", grpc.StatusCode.PERMISSION_DENIED, "tenant disabled: gone"),
        (
            "nobody",
            ["scale:content"],
            "",
            grpc.StatusCode.PERMISSION_DENIED,
            "unknown tenant: nobody",
        ),
        (
            "acme",
            ["scale:content"],
            "http://example.test/a.jpg",
            grpc.StatusCode.PERMISSION_DENIED,
            "missing scope: scale:url",
        ),
        (
            "small",
            ["scale:content", "scale:url"],
            "http://example.test/a.jpg",
            grpc.StatusCode.PERMISSION_DENIED,
            "missing scope: scale:url",
        ),
        ("acme", [], "", grpc.StatusCode.PERMISSION_DENIED, "missing scope: scale:content"),
        ("acme", ["scale:url"], "http://example.test/a.jpg", grpc.StatusCode.OK, ""),
    ],
)
def test_tenants_and_scopes(
    servers: Servers,
    port: int,
    signing_key: SigningKey,
    tenant: str,
    scopes: list[str],
    url: str,
    code: grpc.StatusCode,
    details: str,
) -> None:
    result = servers.call(port, signing_key.token(tenant, scopes=scopes), url=url)
    assert (result.code, result.details) == (code, details)


def test_key_rotation_without_restart(
    servers: Servers, port: int, keyring: KeyRing, signing_key: SigningKey
) -> None:
    old_token = signing_key.token()
    assert servers.call(port, old_token).code == grpc.StatusCode.OK
    new_key = keyring.new(kid="next")
    assert servers.call(port, new_key.token()).code == grpc.StatusCode.OK
    assert servers.call(port, old_token).code == grpc.StatusCode.OK  # both during the overlap
    keyring.remove(signing_key.kid)
    unauthenticated(servers.call(port, old_token), "unknown key")
    assert servers.call(port, new_key.token()).code == grpc.StatusCode.OK


def test_tenant_disabled_without_restart(
    servers: Servers, port: int, signing_key: SigningKey, tenants: TenantRegistry, tmp_path: Path
) -> None:
    token = signing_key.token("small")
    assert servers.call(port, token).code == grpc.StatusCode.OK
    updated = TENANTS.replace("  - id: small\n", "  - id: small\n    enabled: false\n")
    (tmp_path / "tenants.new").write_text(updated)
    (tmp_path / "tenants.new").replace(tmp_path / "tenants.yaml")
    assert servers.call(port, token).details == "tenant disabled: small"


def test_health_and_reflection_need_no_token(servers: Servers, port: int) -> None:
    channel = servers.channel(port)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=5)
    assert SERVICE in {s.name for s in answer.list_services_response.service}
    unauthenticated(servers.call(port), "missing bearer token")


def test_streaming_handlers_see_the_principal_on_every_step(
    servers: Servers, port: int, signing_key: SigningKey
) -> None:
    stream = servers.channel(port).unary_stream("/test.Echo/Stream")
    token = signing_key.token("small")
    assert (
        list(stream(b"", metadata=[("authorization", f"Bearer {token}")], timeout=5))
        == [b"small"] * 3
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stream(b"", timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_concurrent_calls_each_see_their_own_tenant(
    servers: Servers, port: int, signing_key: SigningKey
) -> None:
    tokens = {tenant: signing_key.token(tenant) for tenant in ("acme", "small")}
    order = ["acme", "small"] * 16
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda t: servers.call(port, tokens[t]), order))
    assert [r.reply["tenant"] if r.reply else r.details for r in results] == order


def test_revoked_jti_is_refused_by_every_replica_sharing_redis(
    servers: Servers,
    keyring: KeyRing,
    signing_key: SigningKey,
    tenants: TenantRegistry,
    start_redis: Callable[[], Any],
) -> None:
    redis_server = start_redis()
    replicas = [
        servers.start(interceptor(keyring, tenants, RedisRevocations(redis_server.url)))
        for _ in range(2)
    ]
    stolen, other = signing_key.token(jti="stolen"), signing_key.token(jti="fine")
    assert [servers.call(p, stolen).code for p in replicas] == [grpc.StatusCode.OK] * 2
    assert (
        admin.main(["revoke", "--revocations", redis_server.url, "--token", stolen], environ={})
        == 0
    )
    for p in replicas:
        unauthenticated(servers.call(p, stolen), "token revoked")
        assert servers.call(p, other).code == grpc.StatusCode.OK
    restarted = servers.start(interceptor(keyring, tenants, RedisRevocations(redis_server.url)))
    unauthenticated(servers.call(restarted, stolen), "token revoked")


def test_tenant_tokens_issued_before_a_moment_are_revoked(
    servers: Servers,
    keyring: KeyRing,
    signing_key: SigningKey,
    tenants: TenantRegistry,
) -> None:
    revocations = MemoryRevocations()
    port = servers.start(interceptor(keyring, tenants, revocations))
    before = signing_key.token("acme", now=time.time() - 60)
    revocations.revoke_tenant_before("acme", time.time() - 30)
    unauthenticated(servers.call(port, before), "token revoked")
    assert servers.call(port, signing_key.token("acme")).code == grpc.StatusCode.OK
    assert servers.call(port, signing_key.token("small", now=time.time() - 60)).reply


def test_redis_down_fails_closed_with_unavailable_and_recovers(
    request: pytest.FixtureRequest,
    servers: Servers,
    keyring: KeyRing,
    signing_key: SigningKey,
    tenants: TenantRegistry,
    start_redis: Callable[[], Any],
) -> None:
    redis_server = start_redis()
    now = [0.0]
    revocations = RedisRevocations(redis_server.url, monotonic=lambda: now[0])
    request.addfinalizer(revocations.close)
    port = servers.start(interceptor(keyring, tenants, revocations))
    token = signing_key.token()
    assert servers.call(port, token).code == grpc.StatusCode.OK
    redis_server.stop()
    result = servers.call(port, token)
    assert (result.code, result.details) == (
        grpc.StatusCode.UNAVAILABLE,
        "revocation store unavailable",
    )
    with pytest.raises(grpc.RpcError) as paused:  # within the pause: retry once it is over
        imagescaler_pb2_grpc.ImageScalerStub(servers.channel(port)).ScaleImage(
            imagescaler_pb2.ScaleImageRequest(),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
    trailers = dict(paused.value.trailing_metadata())
    assert (trailers["retry-after"], trailers["grpc-retry-pushback-ms"]) == ("1", "1000")
    redis_server.start()
    now[0] = RECHECK_AFTER  # the store is left alone for a while after a failure
    assert servers.call(port, token).code == grpc.StatusCode.OK


def test_auth_none_serves_everyone_as_legacy_and_says_so(
    servers: Servers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="api.interceptors"):
        port = servers.start(AnonymousInterceptor())
        result = servers.call(port)
    assert result.reply == {
        "tenant": "legacy",
        "scopes": ["scale:content", "scale:url"],
        "anonymous": True,
        "jti": "anonymous",
    }
    messages = [r.getMessage() for r in caplog.records]
    assert any("AUTHENTICATION IS OFF" in m for m in messages)
    path = tmp_path / "legacy.yaml"
    path.write_text("tenants: [{id: legacy, enabled: false}]")
    disabled = servers.start(AnonymousInterceptor(TenantRegistry(path)))
    result = servers.call(disabled)
    assert (result.code, result.details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant disabled: legacy",
    )
