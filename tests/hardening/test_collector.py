"""The servers keep the garbage collector off their start-up heap.

A full collection walked every module, class and function the process had imported: 20-70 ms
holding the GIL, a stall for every call in flight, and the p99 of W3 at 70% of peak was up to
4x its p50 (docs/benchmarks.md, "Latency at 70% of peak").
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.serving import freeze_startup_heap
from tools import faults
from tools.loadgen import frozen_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's own collector as it was: unfrozen afterwards."""
    assert gc.get_freeze_count() == 0
    try:
        yield
    finally:
        gc.unfreeze()


def test_freezing_takes_what_exists_out_of_every_collection(unfrozen: None) -> None:
    startup = [[index] for index in range(50_000)]  # a start-up heap: tracked containers
    frozen = freeze_startup_heap()
    assert frozen >= len(startup)
    tracked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    assert not any(id(o) in tracked for o in startup)
    later = [0]
    assert any(o is later for o in gc.get_objects(0))  # what comes after is collected as usual


def test_the_load_generators_freeze_only_while_measuring(unfrozen: None) -> None:
    heap = [[index] for index in range(10_000)]
    with frozen_heap():
        assert gc.get_freeze_count() >= len(heap)
    assert gc.get_freeze_count() == 0


def test_both_servers_freeze_their_startup_heap(tmp_path: Path) -> None:
    spec = faults.StackSpec(processors=1)
    with faults.running(spec, tmp_path) as stack:
        for server in stack.servers():
            serving = [e for e in server.log_lines() if e.get("message") == "serving"]
            # gRPC, protobuf, Pillow and the rest: tens of thousands of objects
            assert serving and serving[0]["frozen_objects"] > 10_000, server.name
