"""The load generator: its schedule (pure arithmetic) and real runs against loopback servers."""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
from tests.stack import free_port
from tools import loadgen
from tools.loadgen import Profile, arrivals

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = str(DATA / "seed-sample.jpg")


def count_between(times: list[float], start: float, end: float) -> int:
    return sum(start <= t < end for t in times)


# --- schedule ------------------------------------------------------------------------------


def test_constant_profile_spaces_arrivals_evenly() -> None:
    times = list(arrivals(Profile("constant", rate=10, duration=2)))
    assert len(times) == 20
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == [pytest.approx(0.1, abs=1e-5)] * 19
    assert times[0] >= 0 and times[-1] <= 2


def test_ramp_profile_rises_linearly() -> None:
    profile = Profile("ramp", rate=10, duration=10)
    times = list(arrivals(profile))
    assert len(times) == 50  # the integral of 0 -> 10/s over 10 s
    assert count_between(times, 0, 5) in (12, 13)  # a quarter of them in the first half
    assert count_between(times, 9, 10) in (9, 10)  # about 9.5/s at the end
    assert profile.rate_at(5) == pytest.approx(5)


def test_ramp_can_start_above_zero() -> None:
    times = list(arrivals(Profile("ramp", rate=10, duration=4, start_rate=6)))
    assert len(times) == 32
    assert count_between(times, 0, 1) in (6, 7)


def test_step_profile_climbs_in_equal_steps() -> None:
    profile = Profile("step", rate=8, duration=8, steps=4)
    times = list(arrivals(profile))
    assert len(times) == 2 * 2 + 4 * 2 + 6 * 2 + 8 * 2
    per_step = [count_between(times, 2 * k, 2 * k + 2) for k in range(4)]
    assert per_step == [4, 8, 12, 16]
    assert [profile.rate_at(t) for t in (0, 2.5, 7.99, 8)] == [2, 4, 8, 8]


def test_day_profile_peaks_at_midday_and_returns_to_night() -> None:
    profile = Profile("day", rate=20, duration=10, start_rate=2)
    times = list(arrivals(profile))
    assert len(times) == 2 * 10 + 18 * 5  # night rate plus half the swing
    assert profile.rate_at(0) == pytest.approx(2) == profile.rate_at(10)
    assert profile.rate_at(5) == pytest.approx(20)
    night, noon = count_between(times, 0, 1), count_between(times, 4.5, 5.5)
    assert night <= 3 and noon >= 19
    assert abs(count_between(times, 0, 5) - count_between(times, 5, 10)) <= 1


def test_day_profile_night_defaults_to_a_tenth_of_the_peak() -> None:
    assert Profile("day", rate=50, duration=60).rate_at(0) == pytest.approx(5)


def test_poisson_arrivals_keep_the_rate_and_are_reproducible() -> None:
    profile = Profile("constant", rate=200, duration=10)
    first = list(arrivals(profile, poisson=True, seed=7))
    assert first == list(arrivals(profile, poisson=True, seed=7))
    assert abs(len(first) - 2000) < 4 * math.sqrt(2000)
    gaps = [b - a for a, b in itertools.pairwise(first)]
    assert len(set(round(g, 6) for g in gaps)) > 100  # irregular, unlike uniform arrivals


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "burst", "rate": 1, "duration": 1},
        {"kind": "constant", "rate": 0, "duration": 1},
        {"kind": "constant", "rate": 1, "duration": 0},
        {"kind": "ramp", "rate": 5, "duration": 1, "start_rate": 6},
    ],
)
def test_bad_profiles_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Profile(**kwargs)


def test_percentiles_are_nearest_rank() -> None:
    values = [i / 1000 for i in range(1, 101)]
    summary = loadgen.summary_ms(values)
    assert summary == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0, "mean": 50.5}
    assert loadgen.summary_ms([])["p99"] == 0.0


def test_token_comes_from_flag_file_or_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    p = loadgen.parser({})
    args = p.parse_args(["--rate", "1", "--duration", "1", SAMPLE])
    assert loadgen.token_from(args, {}) is None
    assert loadgen.token_from(args, {"IMAGESCALER_TOKEN": "from-env"}) == "from-env"
    env_file = {"IMAGESCALER_TOKEN_FILE": str(token_file)}
    assert loadgen.token_from(args, env_file) == "from-file"
    args = p.parse_args(["--token-file", str(token_file), "--rate", "1", "--duration", "1", "x"])
    assert loadgen.token_from(args, {"IMAGESCALER_TOKEN": "from-env"}) == "from-file"


# --- real runs -------------------------------------------------------------------------------


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status = loadgen.main([*argv, "--json", "--quiet"], environ={})
    return status, json.loads(capsys.readouterr().out)


def test_run_against_the_api_reports_every_request(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = run_json(
        capsys,
        "--server", f"127.0.0.1:{api.port}",
        "--rate", "10", "--duration", "2", "--connections", "2",
        SAMPLE,
    )  # fmt: skip
    assert status == 0
    assert report["scheduled"] == report["sent"] == report["completed"] == 20
    assert report["codes"] == {"OK": 20}
    assert report["stopped_early"] is False
    assert report["target_rate"] == pytest.approx(10)
    assert report["achieved_rate"] == pytest.approx(10, rel=0.1)
    assert report["connections"] == 2
    for key in ("latency_ms", "service_latency_ms"):
        lat = report[key]
        assert set(lat) == {"p50", "p90", "p99", "max", "mean"}
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["profile"]["kind"] == "constant"
    assert report["served_by"] == {}


def test_a_full_in_flight_pool_makes_starts_late_not_lost(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """One slot, an arrival every 10 ms and calls that take longer: starts slip, none vanish."""
    status, report = run_json(
        capsys,
        "--server", f"127.0.0.1:{api.port}",
        "--rate", "100", "--duration", "0.4", "--max-in-flight", "1",
        SAMPLE,
    )  # fmt: skip
    assert status == 0
    assert report["sent"] == report["completed"] == report["codes"]["OK"] == 40
    assert report["late"] > 0 and report["max_late_ms"] > loadgen.LATE_AFTER * 1000
    # Latency counts from the scheduled start, so it includes the wait for the slot.
    assert report["latency_ms"]["max"] > report["service_latency_ms"]["max"]


def test_failures_are_counted_by_status_code(capsys: pytest.CaptureFixture[str]) -> None:
    status, report = run_json(
        capsys,
        "--server", f"127.0.0.1:{free_port()}",
        "--rate", "10", "--duration", "1", "--timeout", "5",
        SAMPLE,
    )  # fmt: skip
    assert status == 1
    assert report["codes"] == {"UNAVAILABLE": 10}
    assert report["completed"] == 10


class Replica(imagescaler_pb2_grpc.ImageScalerServicer):
    """A stand-in API that names the connection each call came in on, as a replica would."""

    def ScaleImage(self, request: pb.ScaleImageRequest, context: grpc.ServicerContext) -> Any:
        context.send_initial_metadata((("x-served-by", context.peer()),))
        return pb.ScaleImageReply(content=b"ok")


@pytest.fixture
def replica() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    imagescaler_pb2_grpc.add_ImageScalerServicer_to_server(Replica(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_connections_are_separate_and_spread_is_reported(
    replica: int, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = run_json(
        capsys,
        "--server", f"127.0.0.1:{replica}",
        "--rate", "60", "--duration", "0.5", "--connections", "3",
        SAMPLE,
    )  # fmt: skip
    assert status == 0
    spread = report["served_by"]
    assert len(spread) == 3  # three TCP connections, so an L4 balancer could spread them
    assert sum(spread.values()) == 30
    assert sorted(spread.values()) == [10, 10, 10]


def test_human_report(replica: int, capsys: pytest.CaptureFixture[str]) -> None:
    status = loadgen.main(
        ["--server", f"127.0.0.1:{replica}", "--rate", "20", "--duration", "0.5", SAMPLE],
        environ={},
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "requests   scheduled 10, sent 10, completed 10" in out
    assert "codes      OK 10" in out
    assert "replicas   ipv4:127.0.0.1:" in out


def test_progress_line_shows_the_run_so_far() -> None:
    stats = loadgen.Stats()
    for _ in range(3):
        stats.due()
        stats.started(0.0)
    stats.finished("OK", 0.0, 0.0, None)
    stats.finished("UNAVAILABLE", 0.0, 0.0, None)
    out = io.StringIO()
    progress = loadgen.Progress(out, Profile("ramp", rate=10, duration=10), stats)
    progress.next = 0  # due now
    progress()
    line = out.getvalue()
    assert line.endswith("\n") and "\r" not in line  # not a terminal: plain lines
    assert "sent 3  ok 1  err 1  in flight 1  late 0" in line
