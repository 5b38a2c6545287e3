"""``make run``'s set-up: what it keeps in .run/ between runs still works."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from tools import certs, demo


def test_expiring_certificates_are_replaced_and_fresh_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dev certificates last 90 days and .run/ is kept: after that the demo's mTLS
    handshake failed for good, since only a missing CA made it issue new ones."""
    monkeypatch.setattr(demo, "RUN", tmp_path)
    certs.create_dev_pki(tmp_path / "certs", days=1)  # runs out within the day
    assert not demo.certs_fresh(tmp_path / "certs")
    demo.prepare()
    assert demo.certs_fresh(tmp_path / "certs", datetime.timedelta(days=30))
    ca = (tmp_path / "certs" / "ca.pem").read_bytes()
    demo.prepare()  # fresh: kept, so running servers' peers stay valid
    assert (tmp_path / "certs" / "ca.pem").read_bytes() == ca
    assert (tmp_path / "token").read_text().count(".") == 2
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600  # a bearer token
