"""Run Python code the way a server runs, not under pytest (which makes every warning an
error): what it prints is what an operator's log would get."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
