"""Helpers shared by the auth tests (imported by name: tests/auth is on sys.path)."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auth import keys
from auth.tokens import mint

NOW = 1_800_000_000.0  # the fixed "now" of unit tests


@dataclass
class SigningKey:
    private: keys.PrivateKey
    kid: str

    def token(self, tenant: str = "acme", **kw: Any) -> str:
        kw.setdefault("scopes", ["scale:content"])
        return mint(self.private, self.kid, tenant=tenant, **kw)


class KeyRing:
    """Private keys in memory, their public halves in a JWKS file written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []

    def new(self, alg: str = "EdDSA", kid: str | None = None) -> SigningKey:
        kid = kid or f"{alg.lower()}-{len(self.entries)}"
        key = SigningKey(keys.generate_private_key(alg), kid)
        self.entries.append(keys.public_jwk(key.private, key.kid))
        self.write()
        return key

    def remove(self, kid: str) -> None:
        self.entries = [e for e in self.entries if e["kid"] != kid]
        self.write()

    def write(self, document: Any = None) -> None:
        data = json.dumps({"keys": self.entries} if document is None else document)
        write_atomically(self.path, data.encode())


def write_atomically(path: Path, data: bytes) -> None:
    """Like a Kubernetes volume update: a new inode appears under the old name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
