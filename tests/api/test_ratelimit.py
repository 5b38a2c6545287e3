"""Per-tenant limits through a real gRPC server, on memory and on a real Redis."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import limits
import pytest
import redis as redis_client
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
from api.ratelimit import (
    Limiter,
    RateLimitInterceptor,
    RateLimits,
    TenantLimits,
    abort_for,
    measure_overhead,
    sliding_wait,
)
from processor.errors import ServiceError
from tools import client

OK = grpc.StatusCode.OK
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# --- a tiny API: tenant from metadata (stands in for authentication), then the limiter ----


class TenantFromMetadata(grpc.ServerInterceptor):
    """Sets the tenant ContextVar from ``x-test-tenant`` around the inner behaviour."""

    def __init__(self, tenant: ContextVar[str | None]) -> None:
        self.tenant = tenant

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        name, inner = dict(details.invocation_metadata).get("x-test-tenant"), handler.unary_unary

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            token = self.tenant.set(name)
            try:
                return inner(request, context)
            finally:
                self.tenant.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            behaviour, handler.request_deserializer, handler.response_serializer
        )


class Servicer(imagescaler_pb2_grpc.ImageScalerServicer):
    """Empty replies; charges ``x-test-megapixels``; ``x-test-hold`` waits for ``proceed``."""

    def __init__(self, limiter: Limiter, tenant: ContextVar[str | None]) -> None:
        self.limiter, self.tenant = limiter, tenant
        self.entered, self.proceed = threading.Event(), threading.Event()

    def ScaleImage(self, request: pb.ScaleImageRequest, context: Any) -> pb.ScaleImageReply:
        metadata = dict(context.invocation_metadata())
        try:
            if "x-test-megapixels" in metadata:
                tenant = self.tenant.get() or "_anonymous"
                self.limiter.charge_pixels(tenant, float(metadata["x-test-megapixels"]))
        except ServiceError as exc:
            abort_for(context, exc)
        if "x-test-hold" in metadata:
            self.entered.set()
            assert self.proceed.wait(10)
        return pb.ScaleImageReply(content=b"ok")


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailing: dict[str, Any]
    retry_info: int | None  # RetryInfo.retry_delay seconds from the rich status

    def quota(self) -> tuple[str, str, str]:
        t = self.trailing
        return t["ratelimit-limit"], t["ratelimit-remaining"], t["ratelimit-reset"]


@dataclass
class Api:
    stub: imagescaler_pb2_grpc.ImageScalerStub
    channel: grpc.Channel
    servicer: Servicer
    target: str

    def call(
        self, tenant: str | None, megapixels: float | None = None, hold: bool = False
    ) -> Outcome:
        metadata = [("x-test-tenant", tenant)] if tenant else []
        if megapixels is not None:
            metadata.append(("x-test-megapixels", str(megapixels)))
        if hold:
            metadata.append(("x-test-hold", "1"))
        try:
            _, call = self.stub.ScaleImage.with_call(
                pb.ScaleImageRequest(), metadata=metadata, timeout=10
            )
            return Outcome(OK, "", dict(call.trailing_metadata()), None)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details(), dict(exc.trailing_metadata()), _retry(exc))


def _retry(call: Any) -> int | None:
    status = rpc_status.from_call(call)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds
    return None


@pytest.fixture
def serve() -> Iterator[Callable[[Limiter], Api]]:
    stops: list[Callable[[], None]] = []

    def start(limiter: Limiter) -> Api:
        tenant: ContextVar[str | None] = ContextVar("test_tenant", default=None)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            interceptors=[TenantFromMetadata(tenant), RateLimitInterceptor(limiter, tenant.get)],
        )
        servicer = Servicer(limiter, tenant)
        imagescaler_pb2_grpc.add_ImageScalerServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stops.append(lambda: (servicer.proceed.set(), channel.close(), server.stop(0)))
        stub = imagescaler_pb2_grpc.ImageScalerStub(channel)
        return Api(stub, channel, servicer, f"127.0.0.1:{port}")

    yield start
    for stop in stops:
        stop()


@pytest.fixture
def make_limiter() -> Iterator[Callable[..., Limiter]]:
    """Limiters from RateLimits keywords and a {tenant: TenantLimits} table; closed at teardown."""
    made: list[Limiter] = []

    def make(table: dict[str, TenantLimits] | None = None, **settings: Any) -> Limiter:
        own = {} if table is None else table
        made.append(Limiter(RateLimits(**settings), lambda t: own.get(t, TenantLimits())))
        return made[-1]

    yield make
    for limiter in made:
        limiter.close()


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> str:
    return "memory://" if request.param == "memory" else str(request.getfixturevalue("redis_url"))


def new_tenant() -> str:
    """Unique per test: the session's Redis is shared by every test."""
    return f"t{uuid.uuid4().hex[:12]}"


def fresh_second(storage: str) -> None:
    """Memory windows align to the epoch: start in the first half of a second so a short
    window does not end between the hits that exhaust it (Redis windows start at the first hit)."""
    if storage.startswith("memory") and time.time() % 1 > 0.5:
        time.sleep(1.01 - time.time() % 1)  # waiting for the window boundary itself


# --- behaviour -----------------------------------------------------------------------------


def test_exact_limit_then_resource_exhausted(storage, make_limiter, serve) -> None:
    api, tenant = serve(make_limiter(storage=storage, default_rate="3/hour")), new_tenant()
    first_hit = time.time()
    remaining = [api.call(tenant).trailing["ratelimit-remaining"] for _ in range(3)]
    refused = api.call(tenant)

    assert remaining == ["2", "1", "0"]
    assert refused.code == EXHAUSTED
    assert refused.details == (
        f"rate limit 3 per 1 hour exceeded for tenant {tenant}; "
        f"retry in {refused.trailing['retry-after']} s"
    )
    retry = int(refused.trailing["retry-after"])
    assert refused.retry_info == retry
    limit, remaining, reset = refused.quota()
    assert (limit, remaining) == ("3", "0")
    # The whole quota is back once the full old window has decayed below one hit: 2/3 of an
    # hour after the shift that lets the next call in.
    assert abs(int(reset) - retry - 2400) <= 2
    # Redis windows start at the first hit; memory windows at the start of the hour.
    end = first_hit + 3600 if storage.startswith("redis") else math.ceil(time.time() / 3600) * 3600
    assert abs(retry - (end - time.time())) <= 2


def test_window_recovery_waits_exactly_retry_after(storage, make_limiter, serve) -> None:
    rate, pixels = new_tenant(), new_tenant()
    table = {pixels: TenantLimits(pixels="10/second")}
    api = serve(make_limiter(table, storage=storage, default_rate="2/second"))
    fresh_second(storage)
    assert [api.call(rate).code for _ in range(2)] == [OK, OK]
    assert api.call(pixels, megapixels=10).code == OK
    rate_refused, pixel_refused = api.call(rate), api.call(pixels, megapixels=10)

    assert rate_refused.code == pixel_refused.code == EXHAUSTED
    assert rate_refused.retry_info == 1
    # 10 MP against a full 10 MP window fit only when the old window has all but decayed:
    # the shift (under 1 s away) plus 0.9 s, not "when the first unit frees up" (the shift).
    assert pixel_refused.retry_info == 2
    time.sleep(1)  # the retry-after the refusal named
    assert api.call(rate).code == OK
    assert api.call(pixels, megapixels=10).code == EXHAUSTED
    time.sleep(1)
    assert api.call(pixels, megapixels=10).code == OK


def test_tenants_are_isolated(storage, make_limiter, serve) -> None:
    api = serve(make_limiter(storage=storage, default_rate="2/hour"))
    a, b = new_tenant(), new_tenant()
    assert [api.call(a).code for _ in range(3)] == [OK, OK, EXHAUSTED]

    b_calls = [api.call(b) for _ in range(3)]
    assert [c.code for c in b_calls] == [OK, OK, EXHAUSTED]
    assert b_calls[0].trailing["ratelimit-remaining"] == "1"
    assert api.call(a).code == EXHAUSTED


def test_two_replicas_share_one_budget(redis_url, make_limiter, serve) -> None:
    replicas = [
        serve(make_limiter(storage=redis_url, default_rate="3/hour", default_pixels="50/hour"))
        for _ in range(2)
    ]
    tenant = new_tenant()
    calls = [replicas[i % 2].call(tenant) for i in range(4)]

    assert [c.code for c in calls] == [OK, OK, OK, EXHAUSTED]
    assert [c.trailing["ratelimit-remaining"] for c in calls] == ["2", "1", "0", "0"]
    one, two = (r.servicer.limiter for r in replicas)
    one.charge_pixels(tenant, 40)
    with pytest.raises(ServiceError, match="pixel limit 50 per 1 hour"):
        two.charge_pixels(tenant, 11)


def test_memory_storage_is_per_process(make_limiter) -> None:
    one, two, tenant = make_limiter(default_rate="1/hour"), make_limiter(default_rate="1/hour"), "a"
    one.acquire(tenant).release()
    two.acquire(tenant).release()  # each replica counts on its own without Redis
    with pytest.raises(ServiceError):
        one.acquire(tenant)


def test_pixel_budget_is_charged_by_size(storage, make_limiter, serve) -> None:
    table = {}
    api = serve(make_limiter(table, storage=storage, default_rate="50/hour"))
    tenant = new_tenant()
    table[tenant] = TenantLimits(pixels="100/hour")

    assert [api.call(tenant, megapixels=mp).code for mp in (60, 29.2)] == [OK, OK]
    refused = api.call(tenant, megapixels=20)
    fits = api.call(tenant, megapixels=10)  # 60 + 30 + 10: cost, not count, is the budget
    tiny = api.call(tenant, megapixels=0.2)  # rounds up to 1 MP
    huge = api.call(new_tenant(), megapixels=2001)  # more than a default budget ever holds

    assert refused.code == EXHAUSTED and refused.retry_info is not None
    assert refused.details.startswith(
        f"pixel limit 100 per 1 hour megapixels exceeded for tenant {tenant}; retry in "
    )
    assert refused.trailing["retry-after"] == str(refused.retry_info)
    assert refused.quota()[:2] == ("100", "10")  # the pixel limit, and what is left of it
    assert fits.code == OK and tiny.code == EXHAUSTED
    assert huge.code == EXHAUSTED and huge.retry_info is None
    assert huge.quota()[:2] == ("50", "49")  # the interceptor's metadata survives an abort
    assert "exceeds the pixel limit 2000 per 1 minute" in huge.details


def test_concurrency_cap_per_tenant(storage, make_limiter, serve) -> None:
    tenant, other = new_tenant(), new_tenant()
    limiter = make_limiter({tenant: TenantLimits(max_concurrent=1)}, storage=storage)
    api = serve(limiter)
    with futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(api.call, tenant, hold=True)
        assert api.servicer.entered.wait(10)
        refused, neighbour = api.call(tenant), api.call(other)
        api.servicer.proceed.set()
        assert held.result(10).code == OK

    assert refused.code == EXHAUSTED
    assert refused.details == (
        f"concurrency limit 1 calls in flight exceeded for tenant {tenant}; retry in 1 s"
    )
    assert refused.retry_info == 1 and refused.trailing["retry-after"] == "1"
    assert refused.quota() == ("1", "0", "1")
    assert neighbour.code == OK
    assert api.call(tenant, megapixels=5000).code == EXHAUSTED  # the handler refuses ...
    assert api.call(tenant).code == OK  # ... and the slot still comes back
    assert limiter.in_flight(tenant) == 0


def test_metadata_reports_the_tightest_limit(storage, make_limiter, serve) -> None:
    api = serve(make_limiter(storage=storage, default_rate="5/second;3/hour"))
    tenant = new_tenant()
    first = api.call(tenant)

    assert first.code == OK
    limit, remaining, reset = first.quota()
    assert (limit, remaining) == ("3", "2")  # the hour limit is closer to exhaustion
    assert 0 <= int(reset) <= 3600


def test_health_and_reflection_are_not_limited(make_limiter, serve) -> None:
    api = serve(make_limiter(default_rate="1/hour"))
    assert [api.call(None).code for _ in range(2)] == [OK, EXHAUSTED]  # anonymous is limited
    health_stub = health_pb2_grpc.HealthStub(api.channel)
    for _ in range(3):
        reply = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_memory_storage_is_the_default_and_needs_no_redis() -> None:
    settings = RateLimits()
    assert settings.storage == "memory://" and settings.failure_policy == "open"
    limiter = Limiter(RateLimits(default_rate="2/hour"))
    assert [limiter.acquire("acme").metadata()[1] for _ in range(2)] == [
        ("ratelimit-remaining", "1"),
        ("ratelimit-remaining", "0"),
    ]
    with pytest.raises(ServiceError, match="rate limit 2 per 1 hour"):
        limiter.acquire("acme")
    assert limiter.failures == 0


# --- Redis trouble -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_killed_then_restarted(policy, start_redis, make_limiter, serve, caplog) -> None:
    redis = start_redis()
    limiter = make_limiter(
        storage=redis.url, default_rate="2/hour", failure_policy=policy, recheck_after=0
    )
    api, tenant = serve(limiter), new_tenant()
    assert [api.call(tenant).code for _ in range(3)] == [OK, OK, EXHAUSTED]

    redis.stop()
    with caplog.at_level(logging.WARNING, "imagescaler.ratelimit"):
        during = [api.call(tenant) for _ in range(3)]
    if policy == "open":
        assert [c.code for c in during] == [OK] * 3
        assert "ratelimit-limit" not in during[0].trailing  # nothing known to report
    else:
        assert [c.code for c in during] == [grpc.StatusCode.UNAVAILABLE] * 3
        assert during[0].details == "rate limiter unavailable"
        assert during[0].retry_info == 1 and during[0].trailing["retry-after"] == "1"
        assert during[0].trailing["grpc-retry-pushback-ms"] == "1000"  # gRPC's retry waits too
    assert limiter.failures == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    redis.start()  # same port, empty data; the limiter is not rebuilt
    assert [api.call(tenant).code for _ in range(3)] == [OK, OK, EXHAUSTED]
    assert limiter.failures == 3


class ClusterRedis:
    """A one-node Redis Cluster on loopback, not started until ``start()``."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.port = directory, _cluster_port()
        self.url = f"redis+cluster://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--cluster-enabled", "yes", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        admin = _ready(self.port)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10  # a new master serves after a 2 s rejoin delay
        while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "cluster did not become ready"
            time.sleep(0.05)  # polling for readiness
        admin.close()

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cluster_redis(tmp_path: Path) -> Iterator[ClusterRedis]:
    cluster = ClusterRedis(tmp_path)
    yield cluster
    cluster.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus (port + 10000) is a valid port too."""
    for candidate in random.sample(range(20000, 40000), 50):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", candidate))
                b.bind(("127.0.0.1", candidate + 10000))
            except OSError:
                continue
            return candidate
    raise RuntimeError("no free port pair")


def _ready(port: int) -> redis_client.Redis:
    admin = redis_client.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.ping()
            return admin
        except redis_client.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)  # polling for readiness


def test_cluster_down_at_startup_then_up(cluster_redis, make_limiter) -> None:
    # A generous timeout: the first call after the start builds the cluster client (slot map,
    # connection), which took over the default 100 ms on a slowed-down run and failed open.
    limiter = make_limiter(
        storage=cluster_redis.url, default_rate="2/hour", recheck_after=0, timeout=5.0
    )
    assert limiter.acquire("acme").degraded  # cluster clients connect when built: not yet
    cluster_redis.start()
    quotas = [limiter.acquire("acme").quota for _ in range(2)]
    with pytest.raises(ServiceError, match="rate limit 2 per 1 hour"):
        limiter.acquire("acme")
    assert [q.remaining for q in quotas if q] == [1, 0]
    assert limiter.failures == 2  # one while building at startup, one on the first call


def test_frozen_redis_does_not_hang(start_redis, make_limiter) -> None:
    redis = start_redis()
    limiter = make_limiter(storage=redis.url, timeout=0.1, recheck_after=30)
    limiter.acquire("acme").release()
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        first = limiter.acquire("acme")
        first_took = time.monotonic() - started
        started = time.monotonic()
        second = limiter.acquire("acme")  # within recheck_after: Redis is not asked at all
        second_took = time.monotonic() - started
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    assert first.degraded and second.degraded and limiter.failures == 2
    assert first_took < 1.0
    assert second_took < 0.05


# --- pieces --------------------------------------------------------------------------------


def test_sliding_wait_accounts_for_cost() -> None:
    item = limits.parse("10/minute")
    # Empty previous window, 10 spent now, shift in 20 s. One unit fits right after the shift
    # (floor(10 * 59.9/60) = 9); ten fit once under one unit of the old window is left (54 s).
    assert sliding_wait((0, 0.0, 10, 80.0), item, 1) == pytest.approx(20.0)
    assert sliding_wait((0, 0.0, 10, 80.0), item, 10) == pytest.approx(74.0)
    # 6 in the previous window decaying, 2 now: 5 fit once floor(6 * ttl / 60) <= 3.
    assert sliding_wait((6, 30.0, 2, 90.0), item, 5) == pytest.approx(0.0)
    assert sliding_wait((6, 45.0, 2, 105.0), item, 5) == pytest.approx(5.0)


def test_settings_are_validated_and_redis_calls_time_out() -> None:
    for bad in (
        {"storage": "memcached://127.0.0.1:11211"},
        {"storage": "redis"},
        {"strategy": "token-bucket"},
        {"failure_policy": "maybe"},
        {"timeout": 0},
        {"default_rate": "lots"},
        {"default_max_concurrent": 0},
    ):
        with pytest.raises(ValueError):
            RateLimits(**bad)
    options = RateLimits(storage="redis://127.0.0.1:1/0", timeout=0.2).storage_options()
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 0.2
    assert options["retry"].get_retries() == 0 and options["wrap_exceptions"] is True
    sentinel = RateLimits(storage="redis+sentinel://127.0.0.1:1/main").storage_options()
    assert sentinel["sentinel_kwargs"]["socket_timeout"] == 0.1


@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window"])
def test_other_strategies_enforce_the_same_limit(strategy, storage, make_limiter) -> None:
    limiter = make_limiter(storage=storage, strategy=strategy, default_rate="2/hour")
    tenant = new_tenant()
    limiter.acquire(tenant).release()
    limiter.acquire(tenant).release()
    with pytest.raises(ServiceError) as refused:
        limiter.acquire(tenant)
    assert 3500 <= refused.value.retry_after <= 3600  # type: ignore[attr-defined]


def test_measure_overhead(storage: str) -> None:
    overhead = measure_overhead(RateLimits(storage=storage), samples=200)
    assert overhead.samples == 200 and 0 < overhead.p50_us <= overhead.p99_us


def test_no_limits_configured_means_no_storage_calls(make_limiter) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens here
    limiter = make_limiter(storage=dead, default_rate=None, default_pixels=None)
    admission = limiter.acquire("acme")
    assert admission.quota is None and not admission.degraded
    assert limiter.charge_pixels("acme", 50) is None
    assert limiter.failures == 0


@pytest.mark.parametrize("timeout", [0.5, 1.05])  # 1.05: the retry would have no time left
def test_grpc_retries_do_not_hammer_a_refusal_they_cannot_outwait(
    start_redis, make_limiter, serve, timeout: float
) -> None:
    """The client's retry policy would retry UNAVAILABLE after 0.1 s into the same refusal; the
    pushback tells it to wait the retry-after, or, when its deadline comes first, not to retry
    (gRPC would otherwise wait out the deadline and report DEADLINE_EXCEEDED)."""
    redis = start_redis()
    limiter = make_limiter(storage=redis.url, failure_policy="closed")
    api, tenant = serve(limiter), new_tenant()
    redis.stop()
    config = ("grpc.service_config", json.dumps(client.SERVICE_CONFIG))
    with grpc.insecure_channel(api.target, options=[config]) as channel:
        stub = imagescaler_pb2_grpc.ImageScalerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ScaleImage(
                pb.ScaleImageRequest(), metadata=[("x-test-tenant", tenant)], timeout=timeout
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(refused.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"
    assert limiter.failures == 1  # one attempt: without the pushback, three within 0.3 s
