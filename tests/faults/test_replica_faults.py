"""Processor replicas dying or stopping, and API replicas stopping, under load.

CI-sized runs of ``python -m tools.faults`` scenarios (see test_dependency_faults.py).
"""

from __future__ import annotations

from pathlib import Path

from tools import faults


def test_replica_killed_mid_request_costs_clients_nothing(tmp_path: Path) -> None:
    result = faults.replica_killed(faults.Scale(rate=10, duration=4), tmp_path)
    assert not result.problems, result.text()
    assert result.measured["processor0 was serving a call when killed"]


def test_all_processors_down_is_unavailable_fast_then_recovers(tmp_path: Path) -> None:
    # gRPC's reconnect backoff (1 s, growing) decides the recovery: leave 5 s after the return.
    scale = faults.Scale(rate=20, duration=8)
    result = faults.processors_down(scale, tmp_path, at=(0.15, 0.3))
    assert not result.problems, result.text()
    during = result.phases["during"]
    assert during.codes.get("UNAVAILABLE", 0) >= 0.9 * during.requests


def test_sigterm_on_the_api_under_load_fails_nothing(tmp_path: Path) -> None:
    result = faults.sigterm_api(faults.Scale(rate=20, duration=3.5), tmp_path)
    assert not result.problems, result.text()
    assert result.measured["of which failed"] == 0


def test_sigterm_on_a_processor_under_load_fails_nothing(tmp_path: Path) -> None:
    result = faults.sigterm_processor(faults.Scale(rate=20, duration=3.5), tmp_path)
    assert not result.problems, result.text()
    assert result.measured["of which failed"] == 0


def test_two_api_replicas_share_the_processors(tmp_path: Path) -> None:
    # Each API watches every processor's health. While the processor's peer check made those
    # watches blocking, each held a processor thread for its lifetime and, with only workers +
    # queue threads, the second API replica's calls all timed out (docs/reliability.md, 5).
    result = faults.api_replicas(faults.Scale(rate=10, duration=2), tmp_path)
    assert not result.problems, result.text()
