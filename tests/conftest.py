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
            **{
                "listen": "127.0.0.1:0",
                "insecure": True,
                "workers": 2,
                "metrics_port": 0,
                **overrides,
            }
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


# --- Redis ----------------------------------------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402


class RedisProcess:
    """A real ``redis-server`` on a free loopback port; can be stopped and restarted in place."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (the test command's setup installs it)")
        self.binary, self.dir = binary, tmp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)  # polling for readiness, not synchronising on time
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisProcess]]:
    """Spawn private Redis servers (for tests that stop and restart them)."""
    spawned: list[RedisProcess] = []

    def start() -> RedisProcess:
        spawned.append(RedisProcess(tmp_path_factory.mktemp("redis")))
        return spawned[-1]

    yield start
    for r in spawned:
        r.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL shared by the session: ``$REDIS_URL`` if set, else a spawned server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()
