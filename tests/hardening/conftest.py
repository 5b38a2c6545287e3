"""Fixtures for the hostile-input battery (helpers live in tests/hardening/hostile.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hardening.hostile import Client, SpawnLog


@pytest.fixture(scope="session")
def _spawn_hook() -> SpawnLog:
    """Audit hooks cannot be removed: one per session, switched on per test."""
    log = SpawnLog()
    sys.addaudithook(log.hook)
    return log


@pytest.fixture
def spawn_log(_spawn_hook: SpawnLog) -> Iterator[SpawnLog]:
    _spawn_hook.attempts.clear()
    _spawn_hook.active = True
    yield _spawn_hook
    _spawn_hook.active = False


@pytest.fixture
def client(api: Any) -> Iterator[Client]:
    c = Client(api.port)
    yield c
    c.close()
