"""Memory-aware admission: the estimate bounds real peaks, the budget refuses what won't fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from processor import imaging, memory
from processor.errors import InvalidInput, Overloaded, TooLarge
from processor.headers import open_image
from processor.pb import processor_pb2 as pb
from processor.pb import processor_pb2_grpc

LIMITS = imaging.Limits()
GRAY_JPEG = imaging.Job(size=(1024, 768), grayscale=True, format="jpeg")

# Peak RSS growth of one process() call in a fresh interpreter: reset the high-water mark
# (clear_refs 5), then VmHWM after the call minus VmRSS before it.
MEASURE = """
import sys
from processor import imaging
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
data = open(sys.argv[1], "rb").read()
job = imaging.Job(size=(1024, 768), grayscale=True, format="jpeg")
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS:")
imaging.process(data, job, imaging.Limits())
print((kib("VmHWM:") - before) * 1024)
"""


def estimate(data: bytes, job: imaging.Job = GRAY_JPEG) -> int:
    image, header = open_image(data, LIMITS.max_bytes, LIMITS.max_pixels)
    with image:
        geometry = imaging.plan(header.oriented_size, job, header.orientation)
        return imaging.memory_estimate(image, header, job, geometry)


@pytest.fixture(scope="module")
def big_png(images) -> bytes:
    """RGBA flattened for gray output: the costliest bytes per pixel of the PNG paths."""
    return images.encode(images.photo((1600, 1200), "RGBA"), "PNG", compress_level=1)


@pytest.fixture(scope="module")
def small_png(images) -> bytes:
    return images.encode(images.photo((64, 48)), "PNG")


def test_estimate_bounds_the_measured_peak_of_a_large_png(images, tmp_path: Path) -> None:
    data = images.encode(images.photo((2400, 1800), "RGBA"), "PNG", compress_level=1)
    path = tmp_path / "rgba.png"
    path.write_bytes(data)
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    measured, estimated = int(run.stdout), estimate(data)
    assert measured > 2400 * 1800 * 4  # the decode really happened in the measured window
    assert measured <= estimated <= 1.4 * measured, (measured, estimated)


def test_an_image_needing_more_than_the_budget_is_refused_before_decoding(images) -> None:
    bomb = images.png_header_only(8000, 6000)  # 48 MP declared, almost no pixel data
    with pytest.raises(InvalidInput, match="corrupt"):
        imaging.process(bomb, GRAY_JPEG, LIMITS)  # decoding it fails...
    budget = memory.Budget(32 << 20)
    with pytest.raises(TooLarge) as refused:
        imaging.process(bomb, GRAY_JPEG, LIMITS, budget)  # ...so this never decoded
    needs = memory.megabytes(estimate(bomb))
    assert str(refused.value) == (
        f"image needs about {needs} MB to decode; this processor allows 32 MB"
    )
    assert budget.peak == 0


def test_while_one_call_holds_the_budget_big_calls_wait_for_none_small_ones_pass(
    big_png: bytes, small_png: bytes
) -> None:
    need = estimate(big_png)
    budget = memory.Budget(need * 3 // 2)  # room for one big call, not two
    with budget.reserve(need):
        with pytest.raises(Overloaded) as refused:
            imaging.process(big_png, GRAY_JPEG, LIMITS, budget)
        assert str(refused.value) == "processor at capacity; retry shortly"
        small = imaging.process(small_png, GRAY_JPEG, LIMITS, budget)
        assert small.geometry.output_width == 1024
        assert budget.used == need
    assert imaging.process(big_png, GRAY_JPEG, LIMITS, budget).grayscale


def test_the_budget_is_released_after_success_and_after_failure(big_png: bytes) -> None:
    budget = memory.Budget(256 << 20)
    imaging.process(big_png, GRAY_JPEG, LIMITS, budget)
    assert (budget.used, budget.peak) == (0, estimate(big_png))
    corrupt = big_png[: len(big_png) // 2]
    budget = memory.Budget(256 << 20)
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        imaging.process(corrupt, GRAY_JPEG, LIMITS, budget)
    assert budget.peak > 0 and budget.used == 0


def test_small_images_are_estimated_small(images, small_png: bytes) -> None:
    """A thumbnail-sized input costs the fixed part and its output, nothing near a budget."""
    assert estimate(small_png) < memory.FIXED + 4 * 1024 * 768
    jpeg = images.encode(images.photo((4000, 3000)), "JPEG", quality=85)
    assert estimate(jpeg) < 40 << 20  # decoded DCT-scaled, not 12 MP at full size


def test_the_service_refuses_over_budget_images_with_resource_exhausted(
    images, start_processor, small_png: bytes
) -> None:
    """Through the real server, built from settings: --memory-budget reaches the admission."""
    service_port = start_processor(memory_budget=32 << 20).port
    with grpc.insecure_channel(f"127.0.0.1:{service_port}") as channel:
        stub = processor_pb2_grpc.ProcessorStub(channel)
        request = pb.ProcessRequest(image=images.png_header_only(8000, 6000), grayscale=True)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Process(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details().endswith("this processor allows 32 MB")
        assert stub.Process(pb.ProcessRequest(image=small_png), timeout=10).image
