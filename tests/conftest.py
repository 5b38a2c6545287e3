"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def sample_jpeg() -> bytes:
    """The existing deployment's sample photo (1400x1316 JPEG)."""
    return (DATA / "seed-sample.jpg").read_bytes()
