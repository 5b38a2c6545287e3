"""Token revocation: by ``jti``, or every token of a tenant issued before a moment.

The store is chosen by URL: ``memory://`` (one process, lost on restart; for development
and tests) or ``redis://...`` (shared by all API replicas, survives their restarts).

When Redis cannot answer, checks **fail closed**: :meth:`is_revoked` raises
:class:`processor.errors.Unavailable` and the call gets ``UNAVAILABLE``. Revocation is used
exactly when a token is known to be stolen; failing open would let its holder in whenever
Redis is slow or unreachable (or can be made so). The cost is an outage of authenticated
calls while Redis is down (the rate limiter, by default, fails open instead). After a
failure, checks fail at once for :data:`RECHECK_AFTER` seconds rather than each waiting out
the socket timeouts: a Redis that hangs would otherwise hold every worker thread for them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from auth.tokens import Claims
from processor.errors import Unavailable

# Kept past a token's exp so a revoked token stays refused through the verifier's leeway
# (at most 300 s).
RETAIN_AFTER_EXPIRY = 300
DEFAULT_PREFIX = "imagescaler:revoked:"
RECHECK_AFTER = 1.0  # seconds a failed store is left alone by is_revoked


class StoreUnavailable(Unavailable):
    """The store failed: checks fail closed, and a retry after the pause may get through."""

    retry_after = math.ceil(RECHECK_AFTER)


class Revocations(Protocol):
    def revoke_jti(self, jti: str, expires_at: float) -> None:
        """Refuse the token with this ``jti``; forgotten once it would have expired anyway."""

    def revoke_tenant_before(self, tenant: str, when: float) -> None:
        """Refuse the tenant's tokens issued before ``when``; a later cutoff never moves back."""

    def is_revoked(self, claims: Claims) -> bool: ...


class MemoryRevocations:
    """In-process revocations, for one replica or tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jtis: dict[str, float] = {}  # jti -> forget after
        self._tenants: dict[str, float] = {}  # tenant -> cutoff

    def revoke_jti(self, jti: str, expires_at: float) -> None:
        forget_after = expires_at + RETAIN_AFTER_EXPIRY
        with self._lock:
            now = self._clock()
            self._jtis = {j: t for j, t in self._jtis.items() if t > now}
            if forget_after > now:
                self._jtis[jti] = max(forget_after, self._jtis.get(jti, 0.0))

    def revoke_tenant_before(self, tenant: str, when: float) -> None:
        with self._lock:
            self._tenants[tenant] = max(when, self._tenants.get(tenant, -math.inf))

    def is_revoked(self, claims: Claims) -> bool:
        with self._lock:
            if self._jtis.get(claims.jti, -math.inf) > self._clock():
                return True
            return claims.issued_at < self._tenants.get(claims.tenant, -math.inf)


class RedisRevocations:
    """Revocations in Redis: one expiring key per ``jti``, one sorted set of tenant cutoffs
    (``ZADD GT`` keeps the latest; Redis >= 6.2)."""

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # URL query options (e.g. ?socket_timeout=1) win over these defaults.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._prefix = prefix
        self._clock = clock
        self._monotonic = monotonic
        self._failed_until = -math.inf

    def revoke_jti(self, jti: str, expires_at: float) -> None:
        forget_at = math.ceil(expires_at) + RETAIN_AFTER_EXPIRY
        if forget_at <= self._clock():
            return  # the token is refused as expired anyway
        with _translated():
            self._client.set(self._jti_key(jti), b"1", exat=forget_at)

    def revoke_tenant_before(self, tenant: str, when: float) -> None:
        with _translated():
            self._client.zadd(self._tenants_key(), {tenant: when}, gt=True)

    def is_revoked(self, claims: Claims) -> bool:
        if self._monotonic() < self._failed_until:
            raise StoreUnavailable("revocation store unavailable")
        try:
            with _translated():
                pipe = self._client.pipeline(transaction=False)
                pipe.exists(self._jti_key(claims.jti))
                pipe.zscore(self._tenants_key(), claims.tenant)
                jti_revoked, cutoff = pipe.execute()
        except Unavailable:
            self._failed_until = self._monotonic() + RECHECK_AFTER
            raise
        return bool(jti_revoked) or (cutoff is not None and claims.issued_at < float(cutoff))

    def close(self) -> None:
        self._client.close()

    def _jti_key(self, jti: str) -> str:
        return f"{self._prefix}jti:{jti}"

    def _tenants_key(self) -> str:
        return f"{self._prefix}tenants"


@contextmanager
def _translated() -> Iterator[None]:
    """Redis failures become the domain's Unavailable, at this one boundary."""
    try:
        yield
    except redis.RedisError as exc:
        raise StoreUnavailable("revocation store unavailable") from exc


def redis_url_parses(url: str) -> bool:
    """redis-py's own check of a URL, so start-up finds a bad port (or a password with an
    unescaped / ? #) rather than the first call. The URL is never echoed: it may hold one."""
    try:
        parse_url(url)
    except ValueError:
        return False
    return True


def revocation_store_supported(url: str) -> bool:
    return url == "memory://" or redis_url_parses(url)


def revocations_from_url(url: str, timeout: float = 0.5) -> Revocations:
    """``memory://`` or ``redis://``/``rediss://``/``unix://`` (redis-py URL syntax)."""
    if url == "memory://":
        return MemoryRevocations()
    if revocation_store_supported(url):
        return RedisRevocations(url, timeout=timeout)
    # never the URL itself: it may carry a password
    raise ValueError("revocation store must be memory://, redis://, rediss:// or unix://")
