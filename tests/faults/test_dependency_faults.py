"""Faults in what the API depends on (Redis, result storage, URL origins), under load.

CI-sized runs of ``python -m tools.faults`` scenarios: the whole stack as subprocesses on
loopback, a few seconds of open-loop load, the fault injected at fixed moments. Each scenario
states its promise and lists what broke it; ``result.text()`` explains a failure.
"""

from __future__ import annotations

from pathlib import Path

from tools import faults


def test_redis_down_fails_open_counts_errors_and_recovers(tmp_path: Path) -> None:
    result = faults.redis_down(faults.Scale(rate=20, duration=3), tmp_path)
    assert not result.problems, result.text()
    during = result.phases["during"]
    assert during.requests > 0 and during.codes == {"OK": during.requests}
    assert result.measured["storage errors counted"] > 0


def test_redis_down_fails_closed_fast_and_recovers(tmp_path: Path) -> None:
    result = faults.redis_down_closed(faults.Scale(rate=20, duration=3), tmp_path)
    assert not result.problems, result.text()
    during = result.phases["during"]
    assert during.codes == {"UNAVAILABLE": during.requests}
    assert during.p99_ms < 250, result.text()
    assert result.phases["after"].codes.get("OK", 0) > 0


def test_slow_redis_costs_each_request_about_one_limiter_timeout_at_most(tmp_path: Path) -> None:
    # Redis answering in 500 ms, five times the limiter's 100 ms timeout, is not waited for.
    result = faults.redis_slow(faults.Scale(rate=20, duration=3), tmp_path, delays=(0.5,))
    assert not result.problems, result.text()
    assert result.phases["500 ms"].p50_ms < result.phases["no delay"].p50_ms + 200, result.text()
    assert result.measured["storage errors counted"] > 0


def test_storage_down_is_unavailable_within_the_deadline(tmp_path: Path) -> None:
    result = faults.storage_down(faults.Scale(rate=10, duration=3.5), tmp_path)
    assert not result.problems, result.text()
    assert result.phases["during"].codes.get("UNAVAILABLE", 0) > 0
    assert result.phases["during"].max_ms < 10_000


def test_storage_down_with_inline_fallback_serves_every_request(tmp_path: Path) -> None:
    result = faults.storage_down_fallback(faults.Scale(rate=10, duration=3.5), tmp_path)
    assert not result.problems, result.text()
    assert result.measured["delivered inline instead"] > 0


def test_blackholed_origin_costs_its_tenant_the_budget_and_no_one_else_anything(
    tmp_path: Path,
) -> None:
    result = faults.origin_blackholed(faults.Scale(rate=10, duration=3), tmp_path)
    assert not result.problems, result.text()
    assert result.phases["blackholed"].codes.get("DEADLINE_EXCEEDED", 0) > 0
    assert result.phases["bystander"].failed() == 0
