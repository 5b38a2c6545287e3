"""The servers' log stream is JSON lines only, whatever the libraries print."""

from __future__ import annotations

import json

from tests.processor.outside_pytest import run_python


def test_library_warnings_become_json_lines() -> None:
    code = (
        "import warnings; from processor import logs\n"
        "logs.configure('info')\n"
        "warnings.warn('Corrupt EXIF data', UserWarning)"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "warning" and entry["logger"] == "py.warnings"
    assert "UserWarning: Corrupt EXIF data" in entry["message"]
