"""Verification keys from a JWKS file, and the key helpers the admin tool and tests share.

Only asymmetric signing keys are ever usable: EdDSA (Ed25519) by default, ES256 (P-256) and
RS256 (RSA >= 2048 bits) when configured. Every other key in the file (HMAC ``oct``, other
curves or algorithms, private key material, a malformed ``kid``) is ignored with a log line,
so a key set can never enable algorithm confusion. Each ``PyJWK`` pins its algorithm.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from auth.reloading import InvalidFile, ReloadingFile

log = logging.getLogger(__name__)

# algorithm -> (kty, crv); RSA has no curve.
SUPPORTED_ALGORITHMS: Mapping[str, tuple[str, str | None]] = {
    "EdDSA": ("OKP", "Ed25519"),
    "ES256": ("EC", "P-256"),
    "RS256": ("RSA", None),
}
DEFAULT_ALGORITHMS = frozenset({"EdDSA"})
KID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeySource(Protocol):
    """Where the verifier finds a key by ``kid``; ``None`` means unknown."""

    def get(self, kid: str) -> jwt.PyJWK | None: ...


class _Unusable(Exception):
    """A JWKS entry that is skipped; the message says why."""


def check_algorithms(algorithms: frozenset[str]) -> frozenset[str]:
    """Refuse configuration that names anything but the supported asymmetric algorithms."""
    unknown = sorted(algorithms - SUPPORTED_ALGORITHMS.keys())
    if unknown or not algorithms:
        allowed = ", ".join(SUPPORTED_ALGORITHMS)
        raise ValueError(f"algorithms must be among {allowed}; got {sorted(algorithms)}")
    return algorithms


def parse_jwks(data: bytes, algorithms: frozenset[str]) -> dict[str, jwt.PyJWK]:
    """The usable keys of a JWKS document by ``kid``; raises InvalidFile if none is usable."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidFile(f"not JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise InvalidFile('expected a JWKS object {"keys": [...]}')
    keys: dict[str, jwt.PyJWK] = {}
    for index, entry in enumerate(document["keys"]):
        try:
            kid, key = _usable_key(entry, algorithms)
        except _Unusable as exc:
            log.warning("JWKS key #%d ignored: %s", index, exc)
            continue
        if kid in keys:
            raise InvalidFile(f"duplicate kid {kid!r}")
        keys[kid] = key
    if not keys:
        raise InvalidFile(f"no usable key (allowed algorithms: {', '.join(sorted(algorithms))})")
    return keys


def _usable_key(entry: Any, algorithms: frozenset[str]) -> tuple[str, jwt.PyJWK]:
    if not isinstance(entry, dict):
        raise _Unusable("not an object")
    kid = entry.get("kid")
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise _Unusable("missing or malformed kid")
    if _PRIVATE_MEMBERS & entry.keys():
        raise _Unusable(f"kid {kid!r} holds private or symmetric key material")
    if entry.get("use", "sig") != "sig":
        raise _Unusable(f"kid {kid!r} is not a signing key (use={entry.get('use')!r})")
    algorithm = _algorithm_of(entry, kid)
    if algorithm not in algorithms:
        raise _Unusable(f"kid {kid!r}: algorithm {algorithm} is not allowed")
    try:
        key = jwt.PyJWK(entry, algorithm=algorithm)
    except jwt.PyJWTError as exc:
        raise _Unusable(f"kid {kid!r}: {exc}") from exc
    if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
        raise _Unusable(f"kid {kid!r}: RSA key shorter than {MIN_RSA_BITS} bits")
    return kid, key


def _algorithm_of(entry: dict[str, Any], kid: str) -> str:
    """The algorithm the key's type implies; a stated ``alg`` must agree with it."""
    kty, crv = entry.get("kty"), entry.get("crv")
    implied = next(
        (alg for alg, (t, c) in SUPPORTED_ALGORITHMS.items() if t == kty and c in (None, crv)),
        None,
    )
    stated = entry.get("alg")
    if implied is None or stated not in (None, implied):
        shown = f"kty={kty!r}" + (f" crv={crv!r}" if crv else "") + f" alg={stated!r}"
        raise _Unusable(f"kid {kid!r}: unsupported key type ({shown})")
    return implied


class KeyStore:
    """The keys of a JWKS file, re-read when the file changes (key rotation without restart)."""

    def __init__(
        self,
        path: str | Path,
        algorithms: frozenset[str] = DEFAULT_ALGORITHMS,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        allowed = check_algorithms(frozenset(algorithms))
        self._file = ReloadingFile(
            path, lambda data: parse_jwks(data, allowed), "JWKS", interval, clock
        )

    def get(self, kid: str) -> jwt.PyJWK | None:
        return self._file.current().get(kid)

    def kids(self) -> frozenset[str]:
        return frozenset(self._file.current())


# Key helpers for the admin tool and tests.


def generate_private_key(algorithm: str = "EdDSA") -> PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unsupported algorithm {algorithm!r}; use one of EdDSA, ES256, RS256")


def algorithm_for(key: PrivateKey) -> str:
    """The one algorithm a private key signs with."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= MIN_RSA_BITS:
        return "RS256"
    raise ValueError("unsupported key: use Ed25519, EC P-256 or RSA >= 2048 bits")


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    """The public half as a JWKS entry (never the private members)."""
    if not KID_PATTERN.fullmatch(kid):
        raise ValueError(f"kid must match {KID_PATTERN.pattern}, got {kid!r}")
    algorithm = algorithm_for(key)
    public = jwt.get_algorithm_by_name(algorithm).to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "alg": algorithm, "use": "sig"}


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: str | Path) -> PrivateKey:
    """A PEM private key usable for signing; ValueError says why not."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, PrivateKey):
        raise ValueError(f"{path}: unsupported key type")
    algorithm_for(key)
    return key
