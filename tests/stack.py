"""Helpers for tests that start real servers (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any

from api import config as api_config


def dev_api_settings(processor_target: str, **overrides: Any) -> api_config.ApiSettings:
    """API settings for tests: loopback, plaintext processor, no auth unless overridden."""
    base = api_config.ApiSettings(
        listen="127.0.0.1:0",
        processor=processor_target,
        processor_insecure=True,
        auth="none",
        metrics_port=0,
        workers=8,
    )
    return replace(base, **overrides)


def free_port() -> int:
    """A loopback port that was free a moment ago (for "nobody listens here" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
