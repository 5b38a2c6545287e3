"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def sample_jpeg() -> bytes:
    """The existing deployment's sample photo (1400x1316 JPEG)."""
    return (DATA / "seed-sample.jpg").read_bytes()


# --- real servers on loopback -------------------------------------------------------------

from collections.abc import Callable, Iterator  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from api import config as api_config
    from api import server as api_server
    from processor import server as processor_server


@pytest.fixture
def start_processor() -> Iterator[Callable[..., processor_server.Running]]:
    """Start plaintext processors on loopback port 0; stopped at teardown."""
    from processor import config as processor_config
    from processor import server as processor_server

    started: list[processor_server.Running] = []

    def start(**overrides: Any) -> processor_server.Running:
        settings = processor_config.ProcessorSettings(
            **{"listen": "127.0.0.1:0", "insecure": True, "workers": 2, **overrides}
        )
        running = processor_server.build_server(settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(0)


@pytest.fixture
def processor(start_processor: Callable[..., processor_server.Running]) -> processor_server.Running:
    return start_processor()


@pytest.fixture
def start_api() -> Iterator[Callable[..., api_server.Running]]:
    """Start API servers with the given settings (and build_server keywords)."""
    from api import server as api_server

    started: list[api_server.Running] = []

    def start(settings: api_config.ApiSettings, **kwargs: Any) -> api_server.Running:
        running = api_server.build_server(settings, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(0)


@pytest.fixture
def api(
    processor: processor_server.Running, start_api: Callable[..., api_server.Running]
) -> api_server.Running:
    """A default-configured API (no auth) in front of one plaintext processor."""
    from tests.stack import dev_api_settings

    return start_api(dev_api_settings(f"127.0.0.1:{processor.port}"))
