"""Revocation stores: one table of backends (memory, redis) against every behaviour."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis

from auth.revocation import (
    RECHECK_AFTER,
    RETAIN_AFTER_EXPIRY,
    MemoryRevocations,
    RedisRevocations,
    Revocations,
    revocations_from_url,
)
from auth.tokens import Claims
from processor.errors import Unavailable


def claims(jti: str = "j1", tenant: str = "acme", issued_at: float | None = None) -> Claims:
    issued = time.time() - 10 if issued_at is None else issued_at
    return Claims(
        tenant=tenant,
        subject="s",
        scopes=frozenset(),
        jti=jti,
        issued_at=issued,
        expires_at=issued + 3600,
        kid="k",
    )


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Revocations]:
    if request.param == "memory":
        yield MemoryRevocations()
        return
    url = request.getfixturevalue("redis_url")
    backend = RedisRevocations(url, prefix=request.getfixturevalue("redis_prefix"))
    yield backend
    backend.close()


def test_revoke_by_jti(store: Revocations) -> None:
    token = claims("stolen")
    assert not store.is_revoked(token)
    store.revoke_jti("stolen", token.expires_at)
    assert store.is_revoked(token)
    assert not store.is_revoked(claims("other"))


def test_revoke_tenant_tokens_issued_before(store: Revocations) -> None:
    cutoff = time.time()
    store.revoke_tenant_before("acme", cutoff)
    assert store.is_revoked(claims(issued_at=cutoff - 1))
    assert not store.is_revoked(claims(issued_at=cutoff))
    assert not store.is_revoked(claims(tenant="other", issued_at=cutoff - 1))


def test_tenant_cutoff_never_moves_back(store: Revocations) -> None:
    cutoff = time.time()
    store.revoke_tenant_before("acme", cutoff)
    store.revoke_tenant_before("acme", cutoff - 100)
    assert store.is_revoked(claims(issued_at=cutoff - 50))


def test_long_expired_jti_is_not_stored(store: Revocations) -> None:
    store.revoke_jti("ancient", time.time() - RETAIN_AFTER_EXPIRY - 10)
    assert not store.is_revoked(claims("ancient"))


def test_memory_jti_is_forgotten_after_expiry_plus_leeway_margin() -> None:
    now = [1000.0]
    store = MemoryRevocations(clock=lambda: now[0])
    store.revoke_jti("j", 2000.0)
    now[0] = 2000.0 + RETAIN_AFTER_EXPIRY - 1
    assert store.is_revoked(claims("j"))
    now[0] = 2000.0 + RETAIN_AFTER_EXPIRY + 1
    assert not store.is_revoked(claims("j"))


def test_redis_keys_expire_when_the_token_would(redis_url: str, redis_prefix: str) -> None:
    store = RedisRevocations(redis_url, prefix=redis_prefix)
    expires = time.time() + 600
    store.revoke_jti("j", expires)
    client = redis.Redis.from_url(redis_url)
    ttl = client.ttl(f"{redis_prefix}jti:j")
    client.close()
    store.close()
    assert 600 < ttl <= 600 + RETAIN_AFTER_EXPIRY + 1


def test_redis_revocations_survive_a_new_client(redis_url: str, redis_prefix: str) -> None:
    """What an API restart looks like from Redis's side: a fresh connection sees it all."""
    first = RedisRevocations(redis_url, prefix=redis_prefix)
    first.revoke_jti("j", time.time() + 600)
    first.revoke_tenant_before("acme", time.time())
    first.close()
    second = RedisRevocations(redis_url, prefix=redis_prefix)
    assert second.is_revoked(claims("j", tenant="other"))
    assert second.is_revoked(claims("x", tenant="acme", issued_at=time.time() - 60))
    second.close()


def test_redis_down_fails_closed_and_fast(dead_redis_url: str) -> None:
    store = RedisRevocations(dead_redis_url, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="revocation store unavailable"):
        store.is_revoked(claims())
    with pytest.raises(Unavailable):
        store.revoke_jti("j", time.time() + 60)
    assert time.monotonic() - started < 2
    store.close()


def test_after_a_failure_checks_fail_at_once_for_a_while() -> None:
    """A Redis that hangs held each call for the socket timeouts; now one call waits."""
    with socket.socket() as hung:  # accepts connections (the backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        now = [0.0]
        store = RedisRevocations(
            f"redis://127.0.0.1:{hung.getsockname()[1]}/0", timeout=0.2, monotonic=lambda: now[0]
        )
        with pytest.raises(Unavailable):
            store.is_revoked(claims())  # waits out the timeouts, connects at least once
        hung.settimeout(0)
        while _accepted(hung):
            pass
        with pytest.raises(Unavailable):
            store.is_revoked(claims())
        assert not _accepted(hung)  # failed without trying
        now[0] = RECHECK_AFTER
        with pytest.raises(Unavailable):
            store.is_revoked(claims())
        assert _accepted(hung)  # tried again
        store.close()


def _accepted(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def test_revocations_from_url() -> None:
    assert isinstance(revocations_from_url("memory://"), MemoryRevocations)
    backend = revocations_from_url("redis://127.0.0.1:1/0")
    assert isinstance(backend, RedisRevocations)  # lazy: no connection until used
    backend.close()
    for bad in ("memcached://x", "memory://x", "", "http://127.0.0.1:6379"):
        with pytest.raises(ValueError, match="memory://, redis://"):
            revocations_from_url(bad)
