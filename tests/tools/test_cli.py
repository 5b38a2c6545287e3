"""The tools end quietly when their reader goes away (``imagescaler-admin ... | head``)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_a_reader_that_left_gets_no_traceback(tmp_path: Path) -> None:
    registry = tmp_path / "tenants.yaml"
    registry.write_text("tenants: [{id: acme}]")
    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tools.admin", "tenants", "check", str(registry)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 1


@pytest.mark.parametrize("tool", ["admin", "client", "loadgen", "bench"])
def test_every_tool_that_prints_lets_its_reader_leave(tool: str) -> None:
    main = importlib.import_module(f"tools.{tool}").main
    assert main.__wrapped__.__module__ == f"tools.{tool}"
