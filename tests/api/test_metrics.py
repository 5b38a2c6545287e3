"""Both services expose Prometheus metrics; scraped over HTTP after real requests."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.pb import imagescaler_pb2 as pb
from processor import metrics
from tests.api.test_secured import Secured, small_jpeg
from tests.stack import free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_process_series(samples) -> None:
    """What dashboards chart per pod: the process's CPU and memory, its collections."""
    assert value(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "python_gc_collections_total", generation="0") > 0
    assert any(name == "python_info" for name, _ in samples)


def test_api_and_processor_metrics(tmp_path: Path, start_api, start_processor) -> None:
    processor_port, api_port = free_port(), free_port()
    processor = start_processor(metrics_port=processor_port)
    secured = Secured(tmp_path, start_api, processor.port, metrics_port=api_port)
    try:
        token = secured.token("thumbs")  # 3 requests per hour
        for _ in range(3):
            secured.call(pb.Image(content=small_jpeg()), token)
        with pytest.raises(grpc.RpcError):
            secured.call(pb.Image(content=small_jpeg()), token)
        with pytest.raises(grpc.RpcError):
            secured.call(pb.Image(content=small_jpeg()), "not-a-token")
    finally:
        secured.channel.close()

    api = scrape(api_port)
    method = {"grpc_service": "imagescaler.ImageScaler", "grpc_method": "ScaleImage"}
    assert value(api, "grpc_server_started_total", grpc_type="unary", **method) == 5
    assert value(api, "grpc_server_handled_total", grpc_type="unary", grpc_code="OK", **method) == 3
    assert (
        value(
            api,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_code="RESOURCE_EXHAUSTED",
            **method,
        )
        == 1
    )
    assert value(api, "imagescaler_ratelimit_total", tenant="thumbs", result="allowed") == 3
    assert value(api, "imagescaler_ratelimit_total", tenant="thumbs", result="denied") == 1
    assert sum(v for (n, _), v in api.items() if n == "imagescaler_auth_failures_total") == 1
    assert value(api, "imagescaler_decisions_total", decision="scale") == 3
    assert value(api, "imagescaler_ratelimit_storage_errors_total") == 0
    assert value(api, "grpc_server_handling_seconds_count", grpc_type="unary", **method) == 5
    assert_process_series(api)

    proc = scrape(processor_port)
    assert_process_series(proc)
    assert value(proc, "imagescaler_processing_seconds_count", stage="decode") == 3
    assert (
        value(
            proc,
            "imagescaler_processed_total",
            scaled="true",
            grayscale="true",
            passthrough="false",
        )
        == 3
    )
    assert (
        value(
            proc,
            "grpc_server_handled_total",
            grpc_service="imagescaler.processor.v1.Processor",
            grpc_method="Process",
            grpc_type="unary",
            grpc_code="OK",
        )
        == 3
    )


def test_pixel_refusals_count_as_denied(tmp_path: Path, start_api, start_processor) -> None:
    """A pixel-limit refusal comes from the handler, not the admission interceptor; it was
    counted as ``allowed``."""
    api_port = free_port()
    processor = start_processor()
    secured = Secured(tmp_path, start_api, processor.port, metrics_port=api_port)
    try:
        token = secured.token("bigpix")  # 3 megapixels per hour, 1 per small image
        for _ in range(3):
            secured.call(pb.Image(content=small_jpeg()), token)
        refused = secured.refused(pb.Image(content=small_jpeg()), token)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "pixel limit" in refused.details()
    finally:
        secured.channel.close()
    api = scrape(api_port)
    assert value(api, "imagescaler_ratelimit_total", tenant="bigpix", result="allowed") == 3
    assert value(api, "imagescaler_ratelimit_total", tenant="bigpix", result="denied") == 1


@pytest.mark.parametrize(
    ("listen", "elsewhere"), [("127.0.0.1:50051", False), ("0.0.0.0:50051", True)]
)
def test_metrics_stay_on_loopback_when_the_server_does(listen: str, elsewhere: bool) -> None:
    """``make run`` listens on loopback: its metrics (tenant ids, refusal reasons) did not."""
    port = free_port()
    stop = metrics.serve(metrics.new_registry(), port, listen)
    try:
        assert "process_cpu_seconds_total" in fetch("127.0.0.1", port)
        if elsewhere:  # 127.0.0.2 stands for another interface: only a wildcard bind answers
            assert "process_cpu_seconds_total" in fetch("127.0.0.2", port)
        else:
            with pytest.raises(urllib.error.URLError, match="refused"):
                fetch("127.0.0.2", port)
    finally:
        stop()


def fetch(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()
