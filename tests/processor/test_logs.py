"""The servers' log stream is JSON lines only, whatever the libraries print."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_library_warnings_become_json_lines() -> None:
    code = (
        "import warnings; from processor import logs\n"
        "logs.configure('info')\n"
        "warnings.warn('Corrupt EXIF data', UserWarning)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "warning" and entry["logger"] == "py.warnings"
    assert "UserWarning: Corrupt EXIF data" in entry["message"]
