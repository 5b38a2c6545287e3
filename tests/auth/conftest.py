"""Fixtures for the auth tests: signing keys with a JWKS file, forged tokens, Redis URLs."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from authkit import KeyRing, SigningKey, b64


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return KeyRing(tmp_path / "jwks.json")


@pytest.fixture
def signing_key(keyring: KeyRing) -> SigningKey:
    return keyring.new("EdDSA", kid="main")


@pytest.fixture
def forge() -> Callable[..., str]:
    """A compact JWS from any header and payload; ``sign`` maps signing input to signature."""

    def build(
        header: dict[str, Any],
        payload: dict[str, Any],
        sign: Callable[[bytes], bytes] | None = None,
    ) -> str:
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
        signature = sign(signing_input.encode()) if sign else b""
        return f"{signing_input}.{b64(signature)}"

    return build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own on the shared Redis (which may be $REDIS_URL)."""
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
def dead_redis_url() -> str:
    """A loopback port where nothing listens: connections are refused at once."""
    return f"redis://127.0.0.1:{_free_port()}/0"
