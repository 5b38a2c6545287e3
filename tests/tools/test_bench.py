"""imagescaler-bench: it still runs end to end and reports what it promises. Times nothing."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
from PIL import Image

from tools import bench

pytestmark = pytest.mark.timeout(90)
ARGS = [
    *("--duration", "0.5", "--workload", "W3", "--mode", "all"),
    *("--soak", "20", "--json", "--markdown"),
]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """One short run of every mode on the small workload (real servers, real Redis)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = bench.main(ARGS)
    assert code == 0
    return json.loads(out.getvalue())


def rows(report: dict[str, Any], mode: str, loop: str | None = None) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["mode"] == mode and r.get("loop") == loop]


@pytest.mark.parametrize(
    ("mode", "loop", "processes"),
    [
        ("engine", None, {"bench"}),
        ("naive", None, {"bench"}),
        ("e2e", "closed", {"processor", "api", "redis", "client"}),
        ("e2e", "open", {"processor", "api", "redis", "client"}),
    ],
)
def test_every_mode_reports_throughput_latency_cpu_and_memory(
    report: dict[str, Any], mode: str, loop: str | None, processes: set[str]
) -> None:
    (row,) = rows(report, mode, loop)
    assert row["workload"] == "W3"
    assert row["images"] > 0 and row["errors"] == 0, row["error_codes"]
    assert row["images_per_s"] > 0
    lat = row["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert set(row["cpu_ms_per_image"]) == processes
    assert set(row["rss_mb"]) == processes
    assert all(mem["peak"] > 0 for mem in row["rss_mb"].values())
    workers = {"bench"} if mode != "e2e" else {"processor", "api"}
    assert all(row["cpu_ms_per_image"][name] > 0 for name in workers)


def test_e2e_reports_idle_memory_and_open_loop_rate(report: dict[str, Any]) -> None:
    (closed,) = rows(report, "e2e", "closed")
    (opened,) = rows(report, "e2e", "open")
    assert closed["idle_rss_mb"]["processor"] > 0
    assert opened["peak_fraction"] == pytest.approx(bench.OPEN_LOOP_FRACTION, abs=0.01)


@pytest.mark.parametrize("loop", ["closed", "open"])
def test_e2e_splits_a_call_into_pipeline_and_the_rest(report: dict[str, Any], loop: str) -> None:
    """Where a call's milliseconds go: the processor's pipeline (its own report) and the rest."""
    (row,) = rows(report, "e2e", loop)
    split = row["call_split_ms"]
    assert 0 < split["pipeline"] < split["call"]
    assert split["outside_pipeline"] == pytest.approx(split["call"] - split["pipeline"], abs=0.02)
    assert f"{split['pipeline']} in the processor's pipeline" in report["markdown"]
    assert all("call_split_ms" not in r for r in rows(report, "engine"))


def test_call_split_uses_means() -> None:
    split = bench.call_split([10.0, 20.0, 60.0], [5.0, 5.0, 20.0])
    assert split == {"call": 30.0, "pipeline": 10.0, "outside_pipeline": 20.0}


def test_ratios_overhead_soak_and_targets(report: dict[str, Any]) -> None:
    kinds = {(r["workload"], r["ratio"]) for r in report["ratios"]}
    assert kinds == {("W3", "engine/naive"), ("W3", "e2e/engine")}
    skip = ("workload", "ratio", "cores_busy")
    assert all(v > 0 for r in report["ratios"] for k, v in r.items() if k not in skip)
    (e2e,) = (r for r in report["ratios"] if r["ratio"] == "e2e/engine")
    busy = e2e["cores_busy"]
    assert 0 < busy["e2e"] <= 1.05 and 0 < busy["engine"] <= 1.05  # fractions of the cores
    # the gap to the engine, split: what CPU allows times how busy the cores were
    explained = e2e["cpu_ceiling"] * busy["e2e"] / busy["engine"]
    assert explained == pytest.approx(e2e["throughput"], rel=0.05)
    assert "cores busy" in report["markdown"]
    overhead = report["auth_overhead"]
    assert overhead["pairs"] > 0 and overhead["secured_p50_ms"] > 0
    assert overhead["ratelimit_hit_us"]["p50"] > 0
    assert set(overhead["api_cpu_ms_per_request"]) == {"secured", "baseline", "floor", "redis"}
    assert overhead["floor_p50_ms"] > 0
    assert [s["requests"] for s in report["soak"]["processor_rss"]] == list(range(2, 21, 2))
    names = {t["target"] for t in report["targets"]}
    assert "W3 e2e/engine throughput" in names
    assert "auth + rate limiting added p50 (ms)" in names
    assert all(isinstance(t["met"], bool) for t in report["targets"])


def test_report_names_the_machine_and_command(report: dict[str, Any]) -> None:
    machine = report["machine"]
    assert machine["nproc"] >= 1 and machine["cpu_model"]
    assert {"Pillow", "grpcio"} <= set(machine["versions"])
    assert report["command"].startswith("imagescaler-bench --duration 0.5")
    assert report["markdown"].startswith("| workload | mode |")
    assert "| W3 | e2e | c=2 |" in report["markdown"]


def test_engine_quality_within_limit_of_naive_on_1080p() -> None:
    """The engine's DCT-domain shortcuts cost at most 1.5 dB against full-resolution LANCZOS."""
    workload = bench.WORKLOADS["W2"]
    data = (bench.DATA_DIR / workload.file).read_bytes()
    q = bench.quality(data, workload)
    assert q["engine_psnr_db"] > 30
    assert q["difference_db"] <= 1.5


def test_psnr_of_known_error() -> None:
    reference = Image.new("L", (64, 48), 100)
    out = io.BytesIO()
    Image.new("L", (64, 48), 110).save(out, "PNG")  # every pixel off by 10: MSE 100
    assert bench.psnr(out.getvalue(), reference) == pytest.approx(28.13, abs=0.01)


def test_percentile_interpolates() -> None:
    assert bench.percentile([], 0.5) == 0.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert bench.percentile([5.0], 0.99) == 5.0


def test_unknown_workload_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--workload", "W9"])
    assert exc.value.code == 2
    assert "unknown workload W9" in capsys.readouterr().err
