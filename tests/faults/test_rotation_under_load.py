"""Certificate files replaced mid-load: a full CA rollover costs no request."""

from __future__ import annotations

from pathlib import Path

from tools import faults


def test_ca_rollover_mid_load_fails_nothing_and_is_picked_up(tmp_path: Path) -> None:
    result = faults.cert_rotation(faults.Scale(rate=20, duration=4), tmp_path)
    assert not result.problems, result.text()
    assert all(n >= 3 for n in result.measured["TLS reloads logged"].values())
