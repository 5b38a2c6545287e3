"""Per-tenant limits: request rate, megapixels per period and calls in flight.

Counters live in `limits` storage chosen by one URL: ``memory://`` (the default, per process)
or ``redis://``, ``rediss://``, ``redis+sentinel://``, ``redis+cluster://`` (shared, so every
API replica spends one budget per tenant). The in-flight cap is per replica and in-process.

Choices, and why:

- **Strategy: sliding-window counter** by default. It keeps two counters per key whatever the
  limit or the cost, so a hit is one O(1) Lua call and a tenant costs a few bytes in Redis. The
  moving window is exact but stores one list entry per unit (a 3000/minute limit is 3000
  timestamps per tenant, and a 50 MP image charged against a pixel budget pushes 50 entries).
  The counter's error is bounded: it assumes the previous window's hits were spread evenly.
  ``moving-window`` and ``fixed-window`` stay selectable; the strategy is part of every key
  because the strategies store different data types and must never share one.
- **Failure policy: open** by default. The limiter guards fairness, not security (callers are
  already authenticated), so a Redis outage should not turn into an outage for every tenant.
  The damage while open is bounded: the in-flight cap is in-process and keeps working, each
  failure is counted and logged, and the limiter returns to Redis on its own. ``closed``
  answers UNAVAILABLE instead, for deployments where over-use costs more than refusals.
- **Several limits** (``20/second;600/minute``) are hit shortest window first and stop at the
  first refusal, so a client bursting past its per-second limit does not also burn its
  minute budget with refused calls.
- **One Redis round trip per limit**: `limits`' hit answers a bare yes or no, and reading the
  window for ``ratelimit-remaining`` is a second call. On Redis (not Cluster, whose pipelines
  refuse scripts) the default strategy sends `limits`' own two scripts, on its own keys, in one
  write (:class:`RedisCounter`). Other strategies and storages go through `limits` itself.
- **Redis never hangs a request**: the timeout is one budget for all of an RPC's limiter calls
  (request rate, then pixels), replies are awaited only until it is spent, there are no
  client-side retries, and after a failure the storage is left alone for ``recheck_after``
  seconds. So a slow Redis costs a call at most one timeout (Cluster and the other strategies:
  under two, as their calls stop once it is spent), and a Redis slower than that is treated as
  down. A cluster client that cannot connect when built is retried the same way, so the API
  also starts while Redis is down.
- **retry-after** is when the refused cost fits again (computed from the counter's two
  windows: `limits`' own reset time is only when the first unit frees up, too early for a
  50 MP image), rounded up, at least 1 s.

Every response carries ``ratelimit-limit``, ``ratelimit-remaining`` and ``ratelimit-reset``
(seconds until the whole quota is back if unused) for the request-rate limit closest to
exhaustion, in the spirit of the IETF RateLimit header fields draft, as trailing metadata
(the only metadata that reaches a client with an error). A pixel refusal reports the pixel
limit instead, a concurrency refusal the in-flight cap; a call served while the storage
failed open has none (nothing is known). A refusal adds ``retry-after`` (seconds) and a
``google.rpc.RetryInfo`` detail. With ``--auth none`` every caller is the tenant ``legacy``
(``api.interceptors``); a call with no principal at all counts as ``_anonymous`` (registry ids
cannot start with an underscore: no collision with a tenant).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from limits import RateLimitItem, parse_many
from limits.errors import ConfigurationError, StorageError
from limits.storage import RedisClusterStorage, RedisStorage, Storage, storage_from_string
from limits.strategies import STRATEGIES, RateLimiter, SlidingWindowCounterRateLimiter

from api import accesslog
from processor.errors import ServiceError, TooLarge, retry_hints
from processor.serving import Behaviour, UnaryInterceptor

log = logging.getLogger("imagescaler.ratelimit")

ANONYMOUS = "_anonymous"
SCHEMES = ("memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")
POLICIES = ("open", "closed")
TENANT_KEY = re.compile(r"[a-z0-9_][a-z0-9_-]{0,63}")
SKIPPED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RateLimits:
    """The limiter's settings; ``None`` defaults mean "no limit of that kind"."""

    storage: str = "memory://"
    strategy: str = "sliding-window-counter"
    default_rate: str | None = "50/second;3000/minute"
    default_pixels: str | None = "2000/minute"  # megapixels per period
    default_max_concurrent: int | None = 16  # per tenant per replica
    failure_policy: str = "open"
    timeout: float = 0.1  # seconds of Redis time per RPC, all its limiter calls together
    recheck_after: float = 1.0  # seconds without storage calls after a failure
    log_interval: float = 5.0  # at most one failure log line per interval

    def __post_init__(self) -> None:
        if self.storage.split("://", 1)[0] not in SCHEMES or "://" not in self.storage:
            raise ValueError(f"rate-limit storage must be one of {', '.join(SCHEMES)} URLs")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"rate-limit strategy must be one of {', '.join(STRATEGIES)}")
        if self.failure_policy not in POLICIES:
            raise ValueError("rate-limit failure policy must be 'open' or 'closed'")
        if not 0 < self.timeout <= 5 or self.recheck_after < 0 or self.log_interval < 0:
            raise ValueError("rate-limit timeout must be in (0, 5] s, intervals >= 0")
        if self.default_max_concurrent is not None and self.default_max_concurrent < 1:
            raise ValueError("default max concurrent must be >= 1")
        for text in (self.default_rate, self.default_pixels):
            if text is not None:
                parse_many(text)

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``storage_from_string``: short timeouts, no hidden retries."""
        if self.storage.startswith("memory://"):
            return {"wrap_exceptions": True}
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # redis.Redis() defaults to 10 retries with backoff (Sentinel and cluster clients are
        # built that way): seconds, not a fraction of one. The failure policy decides instead.
        # No CLIENT SETINFO: two more round trips on every new connection, and a connection
        # is new after every timeout, so a slow Redis would spend a call's budget on them.
        client = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
            "driver_info": None,
        }
        if self.storage.startswith("redis+sentinel://"):
            return {"wrap_exceptions": True, "sentinel_kwargs": dict(client), **client}
        return {"wrap_exceptions": True, **client}


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's own limits; ``None`` takes the default from :class:`RateLimits`."""

    rate: str | None = None
    pixels: str | None = None
    max_concurrent: int | None = None


def no_tenant_limits(tenant: str) -> TenantLimits:
    """Every tenant on the defaults (development, tests)."""
    return TenantLimits()


@dataclass(frozen=True)
class Quota:
    """The tightest limit's state, as the ratelimit-* metadata reports it."""

    limit: int
    remaining: int
    reset: int  # seconds

    def metadata(self) -> Metadata:
        return (
            ("ratelimit-limit", str(self.limit)),
            ("ratelimit-remaining", str(self.remaining)),
            ("ratelimit-reset", str(self.reset)),
        )


class LimitError(ServiceError):
    """A refusal the caller may retry after ``retry_after`` seconds."""

    retry_after: int

    def __init__(self, message: str, retry_after: int, metadata: Metadata = ()) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.metadata = metadata


class RateLimited(LimitError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class LimiterUnavailable(LimitError):
    """The storage failed and the policy is fail-closed."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass
class Admission:
    """An admitted call: its quota (None: no rate limit, or the storage failed open)."""

    tenant: str
    quota: Quota | None
    degraded: bool = False  # admitted by the fail-open policy, uncounted
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def metadata(self) -> Metadata:
        return self.quota.metadata() if self.quota else ()

    def release(self) -> None:
        """Give the in-flight slot back (idempotent)."""
        release, self._release = self._release, None
        if release:
            release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StorageHealth:
    """Counts storage failures, logs them at most once per interval, pauses after one."""

    def __init__(self, settings: RateLimits) -> None:
        self.settings = settings
        self.failures = 0
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._next_log = 0.0
        self._unlogged = 0
        self._down = False

    def paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def failed(self, error: Exception | None) -> None:
        """Count one call decided by the failure policy; ``error`` None while paused."""
        with self._lock:
            self.failures += 1
            self._unlogged += 1
            now = time.monotonic()
            if error is not None:
                self._paused_until = now + self.settings.recheck_after
                self._down = True
            if now < self._next_log:
                return
            count, self._unlogged = self._unlogged, 0
            self._next_log = now + self.settings.log_interval
        log.warning(
            "rate-limit storage failed; failing %s",
            self.settings.failure_policy,
            extra={
                "failures": self.failures,
                "since_last_log": count,
                "error": str(error) if error else "paused after an earlier failure",
            },
        )

    def succeeded(self) -> None:
        if self._down:
            with self._lock:
                was_down, self._down = self._down, False
            if was_down:
                log.info("rate-limit storage recovered", extra={"failures": self.failures})


class Budget:
    """Redis time one RPC may still spend; all of its limiter calls draw on it."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds


_budget: ContextVar[Budget | None] = ContextVar("ratelimit_budget", default=None)


class Limiter:
    """Per-tenant limits over one `limits` storage, plus a per-replica in-flight cap."""

    def __init__(
        self,
        settings: RateLimits,
        limits_for: Callable[[str], TenantLimits] = no_tenant_limits,
    ) -> None:
        self.settings = settings
        self.limits_for = limits_for
        self.health = StorageHealth(settings)
        self._parsed: dict[str, tuple[RateLimitItem, ...]] = {}
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._counter: Counter | None = None
        self._storage: Storage | None = None
        self._remote = not settings.storage.startswith("memory://")  # memory has no deadline
        try:
            self._connect()
        except StorageError as exc:  # serve under the failure policy until Redis is there
            self.health.failed(exc)

    @property
    def failures(self) -> int:
        """Calls decided by the failure policy because the storage failed."""
        return self.health.failures

    @contextmanager
    def budget(self) -> Iterator[None]:
        """One timeout of storage time for every limiter call made inside (one RPC)."""
        token = _budget.set(Budget(self.settings.timeout))
        try:
            yield
        finally:
            _budget.reset(token)

    def acquire(self, tenant: str) -> Admission:
        """Admit one call or raise LimitError; release the admission when the call ends."""
        own = self._own_limits(tenant)
        cap = own.max_concurrent or self.settings.default_max_concurrent
        release = self._take_slot(tenant, cap)
        try:
            items = self._items(own.rate or self.settings.default_rate)
            quota, degraded = self._guarded(
                lambda counter, deadline: self._spend(counter, deadline, tenant, "rate", items, 1),
                items,
            )
        except BaseException:
            release()
            raise
        return Admission(tenant, quota, degraded, release)

    def charge_pixels(self, tenant: str, megapixels: float) -> Quota | None:
        """Spend ``ceil(megapixels)`` of the tenant's pixel budget, or raise.

        Raises RateLimited when the budget is spent for now, TooLarge when one image
        costs more than the whole budget (retrying cannot help).
        """
        own = self._own_limits(tenant)
        items = self._items(own.pixels or self.settings.default_pixels)
        cost = max(1, math.ceil(megapixels))
        for item in items:
            if cost > item.amount:
                raise TooLarge(
                    f"image of {cost} megapixels exceeds the pixel limit {item} of tenant {tenant}"
                )
        quota, _ = self._guarded(
            lambda counter, deadline: self._spend(counter, deadline, tenant, "pixels", items, cost),
            items,
        )
        return quota

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    def close(self) -> None:
        """Close the storage's connections (Redis); memory storage has none."""
        for name in ("storage", "storage_slave"):
            client = getattr(self._storage, name, None)
            if callable(getattr(client, "close", None)):
                client.close()  # type: ignore[union-attr]

    def _own_limits(self, tenant: str) -> TenantLimits:
        if not TENANT_KEY.fullmatch(tenant):
            raise ValueError(f"not a tenant id usable as a rate-limit key: {tenant!r}")
        return self.limits_for(tenant)

    def _items(self, text: str | None) -> tuple[RateLimitItem, ...]:
        """Parsed once per distinct string, shortest window first."""
        if text is None:
            return ()
        items = self._parsed.get(text)
        if items is None:
            items = tuple(sorted(parse_many(text), key=lambda item: item.get_expiry()))
            self._parsed[text] = items
        return items

    def _take_slot(self, tenant: str, cap: int | None) -> Callable[[], None]:
        with self._lock:
            count = self._in_flight.get(tenant, 0)
            if cap is not None and count >= cap:
                raise RateLimited(
                    f"concurrency limit {cap} calls in flight exceeded for tenant {tenant}; "
                    "retry in 1 s",
                    1,
                    Quota(cap, 0, 1).metadata(),
                )
            self._in_flight[tenant] = count + 1
        return lambda: self._give_slot(tenant)

    def _give_slot(self, tenant: str) -> None:
        with self._lock:
            count = self._in_flight.get(tenant, 0) - 1
            if count > 0:
                self._in_flight[tenant] = count
            else:
                self._in_flight.pop(tenant, None)

    def _connect(self) -> Counter:
        """The counter over its storage; redis+cluster connects here, so this can fail too."""
        if self._counter is not None:
            return self._counter
        with self._connect_lock:
            if self._counter is None:
                try:
                    storage = storage_from_string(
                        self.settings.storage, **self.settings.storage_options()
                    )
                except ConfigurationError:
                    raise
                except Exception as exc:  # RedisClusterException is no RedisError
                    raise StorageError(exc) from exc
                assert isinstance(storage, Storage)  # the schemes allowed are synchronous
                self._storage = storage
                self._counter = counter_for(storage, self.settings.strategy)
            return self._counter

    def _guarded(
        self, spend: Callable[[Counter, float], Quota | None], items: Sequence[RateLimitItem]
    ) -> tuple[Quota | None, bool]:
        """(quota, degraded): storage calls under the failure policy and the RPC's budget."""
        if not items:
            return None, False
        if self.health.paused():
            return self._failed(None)
        budget = _budget.get() or Budget(self.settings.timeout)
        started = time.monotonic()
        try:
            quota = spend(self._connect(), started + budget.left if self._remote else math.inf)
        except StorageError as exc:
            return self._failed(exc)
        finally:
            budget.left -= time.monotonic() - started
        self.health.succeeded()
        return quota, False

    def _failed(self, error: Exception | None) -> tuple[None, bool]:
        """Fail closed (raise) or open (served without a quota, degraded)."""
        self.health.failed(error)
        if self.settings.failure_policy == "closed":
            retry = max(1, math.ceil(self.settings.recheck_after))
            raise LimiterUnavailable("rate limiter unavailable", retry)
        return None, True

    def _spend(
        self,
        counter: Counter,
        deadline: float,
        tenant: str,
        kind: str,
        items: Sequence[RateLimitItem],
        cost: int,
    ) -> Quota | None:
        """Hit every limit (shortest window first) or raise RateLimited for the first refusal;
        the quota of the limit closest to exhaustion (ties: the one that takes longest to
        reset)."""
        key = ("imagescaler", self.settings.strategy, kind, tenant)
        quotas = []
        for item in items:
            admitted, usage = counter.hit(item, key, cost, deadline)
            if not admitted:
                retry = max(1, math.ceil(usage.fits_in))
                raise RateLimited(
                    f"{'pixel' if kind == 'pixels' else 'rate'} limit {item}"
                    f"{' megapixels' if kind == 'pixels' else ''} exceeded "
                    f"for tenant {tenant}; retry in {retry} s",
                    retry,
                    Quota(
                        item.amount, usage.remaining, max(retry, math.ceil(usage.full_in))
                    ).metadata(),
                )
            quotas.append(Quota(item.amount, usage.remaining, max(0, math.ceil(usage.full_in))))
        return min(quotas, key=lambda q: (q.remaining, -q.reset), default=None)


# --- counters: one hit and what it leaves -------------------------------------------------

Window = tuple[int, float, int, float]  # sliding-window counter: previous, its ttl, current, ttl


@dataclass(frozen=True)
class Usage:
    """One limit right after a hit."""

    remaining: int
    fits_in: float  # seconds until the hit's cost fits
    full_in: float  # seconds until the whole quota is back if unused


class Counter(Protocol):
    def hit(
        self, item: RateLimitItem, key: tuple[str, ...], cost: int, deadline: float
    ) -> tuple[bool, Usage]:
        """Spend ``cost`` if it fits; raise StorageError when ``deadline`` (monotonic) passes."""
        ...


def counter_for(storage: Storage, strategy: str) -> Counter:
    """One round trip per hit where the storage allows it, `limits` itself elsewhere."""
    if (
        strategy == "sliding-window-counter"
        and isinstance(storage, RedisStorage)
        and not isinstance(storage, RedisClusterStorage)
    ):
        return RedisCounter(storage)
    return LimitsCounter(STRATEGIES[strategy](storage))


class LimitsCounter:
    """Any strategy on any storage through `limits`: a hit, then a read of its window."""

    def __init__(self, strategy: RateLimiter) -> None:
        self.strategy = strategy

    def hit(
        self, item: RateLimitItem, key: tuple[str, ...], cost: int, deadline: float
    ) -> tuple[bool, Usage]:
        _left(deadline)
        admitted = self.strategy.hit(item, *key, cost=cost)
        _left(deadline)
        return admitted, self._usage(item, key, cost)

    def _usage(self, item: RateLimitItem, key: tuple[str, ...], cost: int) -> Usage:
        if isinstance(self.strategy, SlidingWindowCounterRateLimiter):
            # get_window_stats' reset is when some unit frees up: neither of the two we need.
            window = self.strategy.storage.get_sliding_window(  # type: ignore[attr-defined]
                item.key_for(*key), item.get_expiry()
            )
            return sliding_usage(window, item, cost)
        reset, remaining = self.strategy.get_window_stats(item, *key)
        return Usage(remaining, reset - time.time(), reset - time.time())


class RedisCounter:
    """Sliding-window counter on one Redis (or Sentinel's master): a hit and its window read
    in one write, replies awaited until the deadline and no longer.

    These are `limits`' own scripts on `limits`' own keys (its private key helpers, so they
    cannot drift apart), sent with EVAL so that a restarted Redis needs no SCRIPT LOAD.
    `limits` has no call that returns the window with the hit, and none with a deadline.
    """

    def __init__(self, storage: RedisStorage) -> None:
        import redis

        client: Any = storage.get_connection()  # redis.Redis: Sentinel's is for the master
        self._storage, self._pool, self._errors = storage, client.connection_pool, redis.RedisError

    def hit(
        self, item: RateLimitItem, key: tuple[str, ...], cost: int, deadline: float
    ) -> tuple[bool, Usage]:
        name, expiry, storage = item.key_for(*key), item.get_expiry(), self._storage
        keys = (
            storage.prefixed_key(storage._previous_window_key(name)),
            storage.prefixed_key(storage._current_window_key(name)),
        )
        acquired, window = self._round_trip(
            deadline,
            ("EVAL", storage.SCRIPT_ACQUIRE_SLIDING_WINDOW, 2, *keys, item.amount, expiry, cost),
            ("EVAL", storage.SCRIPT_SLIDING_WINDOW, 2, *keys, expiry),
        )
        return bool(acquired), sliding_usage(_window_from(window), item, cost)

    def _round_trip(self, deadline: float, *commands: tuple[Any, ...]) -> list[Any]:
        """Send ``commands`` in one write; their replies, or StorageError."""
        try:
            connection = self._pool.get_connection()
        except self._errors as exc:
            raise StorageError(exc) from exc
        try:
            connection.send_packed_command(connection.pack_commands(commands))
            return [connection.read_response(timeout=_left(deadline)) for _ in commands]
        except BaseException as exc:
            connection.disconnect()  # replies may still arrive: never reuse it as it is
            if isinstance(exc, self._errors):
                raise StorageError(exc) from exc
            raise
        finally:
            self._pool.release(connection)


def _left(deadline: float) -> float:
    """Seconds until ``deadline``; StorageError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise StorageError(TimeoutError("the call's rate-limit storage budget is spent"))
    return left


def _window_from(reply: Sequence[Any]) -> Window:
    """sliding_window.lua's reply as `limits` reads it (ttls in ms there, s here)."""
    if not reply:
        return 0, 0.0, 0, 0.0
    previous, previous_ttl, current, current_ttl = reply
    return (
        int(previous or 0),
        max(0.0, float(previous_ttl or 0)) / 1000,
        int(current or 0),
        max(0.0, float(current_ttl or 0)) / 1000,
    )


def sliding_usage(window: Window, item: RateLimitItem, cost: int) -> Usage:
    """What a sliding-window counter's state leaves of ``item`` for a hit of ``cost``."""
    previous, previous_ttl, current, _ = window
    used = math.floor(previous * previous_ttl / item.get_expiry()) + current
    return Usage(
        max(0, item.amount - used),
        sliding_wait(window, item, cost),
        sliding_wait(window, item, item.amount),
    )


def sliding_wait(window: Window, item: RateLimitItem, cost: int) -> float:
    """Seconds until ``cost`` fits a sliding-window counter if nobody else spends meanwhile.

    ``window`` is the storage's (previous count, previous ttl, current count, current ttl);
    a hit fits when floor(previous * previous_ttl / expiry) + current + cost <= amount.
    """
    previous, previous_ttl, current, current_ttl = window
    expiry, amount = item.get_expiry(), item.amount
    shift = max(0.0, current_ttl - expiry)  # when the current window becomes the previous
    room = amount - current - cost
    if room >= 0:
        wait = 0.0 if previous == 0 else max(0.0, previous_ttl - (room + 1) * expiry / previous)
        if wait <= shift:
            return wait
    if current == 0:
        return shift
    return shift + max(0.0, expiry * (1 - (amount - cost + 1) / current))


# --- gRPC ---------------------------------------------------------------------------------


def abort_for(context: grpc.ServicerContext, error: ServiceError) -> NoReturn:
    """Abort with a rich status; LimitErrors add RetryInfo, ``retry-after`` and ratelimit-*.

    The one way both the interceptor and handlers (``charge_pixels``) report these errors.
    """
    status = status_pb2.Status(code=error.code.value[0], message=str(error))
    extra: Metadata = ()
    if isinstance(error, LimitError):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=error.retry_after)
            )
        )
        status.details.append(detail)
        hints = retry_hints(error.retry_after, context.time_remaining())
        extra = (*hints, *error.metadata)
    rich = rpc_status.to_status(status)
    # abort_with_status replaces the trailing metadata: merge rather than set it first.
    merged = _merged(context.trailing_metadata(), (*extra, *rich.trailing_metadata))
    context.abort_with_status(rich._replace(trailing_metadata=merged))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _merged(existing: Any, extra: Metadata) -> Metadata:
    """``existing`` plus the entries of ``extra`` whose keys it does not have yet."""
    current = tuple(existing or ())
    present = {key for key, _ in current}
    return current + tuple((k, v) for k, v in extra if k not in present)


class RateLimitInterceptor(UnaryInterceptor):
    """Admits each unary call for the verified tenant; must run inside authentication."""

    def __init__(self, limiter: Limiter, tenant_of: Callable[[], str | None]) -> None:
        self._limiter = limiter
        self._tenant_of = tenant_of

    def applies(self, method: str) -> bool:
        return not method.startswith(SKIPPED_METHODS)

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        def limited(request: Any, context: grpc.ServicerContext) -> Any:
            with self._limiter.budget(), self._admit(context) as admission:
                try:
                    return behaviour(request, context)  # charge_pixels draws on the budget too
                finally:
                    # Also after an abort: the status leaves only when this frame unwinds.
                    context.set_trailing_metadata(
                        _merged(context.trailing_metadata(), admission.metadata())
                    )

        return limited

    def _admit(self, context: grpc.ServicerContext) -> Admission:
        try:
            admission = self._limiter.acquire(self._tenant_of() or ANONYMOUS)
        except LimitError as exc:
            accesslog.note(reason=str(exc), retry_after=exc.retry_after)
            abort_for(context, exc)
        if admission.degraded:
            accesslog.note(ratelimit="unavailable")
        return admission


# --- measurement --------------------------------------------------------------------------


@dataclass(frozen=True)
class Overhead:
    """Per-call cost of acquire() + release(), in microseconds."""

    p50_us: float
    p90_us: float
    p99_us: float
    samples: int


def measure_overhead(
    settings: RateLimits,
    samples: int = 2000,
    rate: str = "1000000/second;1000000000/minute",
) -> Overhead:
    """Time acquire()+release() for a fresh tenant whose limits never refuse."""
    limiter = Limiter(settings, lambda _: TenantLimits(rate=rate, max_concurrent=1))
    tenant = f"bench-{uuid.uuid4().hex[:12]}"
    try:
        for _ in range(min(100, samples)):  # connections, scripts, caches
            limiter.acquire(tenant).release()
        timings = []
        for _ in range(samples):
            started = time.perf_counter()
            limiter.acquire(tenant).release()
            timings.append((time.perf_counter() - started) * 1e6)
        if limiter.failures:
            raise RuntimeError(f"rate-limit storage failed {limiter.failures} times")
    finally:
        limiter.close()
    cuts = statistics.quantiles(timings, n=100)
    return Overhead(round(cuts[49], 1), round(cuts[89], 1), round(cuts[98], 1), samples)
