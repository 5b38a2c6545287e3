"""JWKS loading: only allowed asymmetric keys are usable, and the file is followed on disk."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jwt
import pytest
from authkit import KeyRing, write_atomically
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auth import keys
from auth.keys import KeyStore, parse_jwks
from auth.reloading import InvalidFile

EDDSA = frozenset({"EdDSA"})


def jwk(algorithm: str = "EdDSA", kid: str = "k", **extra: Any) -> dict[str, Any]:
    return {**keys.public_jwk(keys.generate_private_key(algorithm), kid), **extra}


def document(*entries: Any) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_allowed_asymmetric_signing_keys_are_used(caplog: pytest.LogCaptureFixture) -> None:
    ed = keys.generate_private_key("EdDSA")
    private_jwk = jwt.get_algorithm_by_name("EdDSA").to_jwk(ed, as_dict=True)
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    ignored = [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac-no-alg"},
        {**private_jwk, "kid": "private"},
        jwk("ES256", "es256-not-configured"),
        {
            **jwt.get_algorithm_by_name("ES384").to_jwk(
                ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True
            ),
            "kid": "p384",
        },
        jwk("EdDSA", "claims-rs256", alg="RS256"),
        jwk("EdDSA", "claims-none", alg="none"),
        jwk("EdDSA", "encryption", use="enc"),
        {**jwk("EdDSA"), "kid": "../etc/passwd"},
        {**jwt.get_algorithm_by_name("RS256").to_jwk(small_rsa, as_dict=True), "kid": "rsa1024"},
        "not an object",
    ]
    with caplog.at_level(logging.WARNING, logger="auth.keys"):
        usable = parse_jwks(document(jwk("EdDSA", "good"), *ignored), EDDSA)
    assert list(usable) == ["good"]
    assert usable["good"].algorithm_name == "EdDSA"
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == len(ignored)


def test_configured_algorithms_enable_es256_and_rs256() -> None:
    both = parse_jwks(
        document(jwk("ES256", "es"), jwk("RS256", "rs")), frozenset({"ES256", "RS256"})
    )
    assert {kid: k.algorithm_name for kid, k in both.items()} == {"es": "ES256", "rs": "RS256"}
    with pytest.raises(ValueError, match="algorithms"):
        KeyStore("unused.json", frozenset({"HS256"}))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not JSON"),
        (b'{"keys": {}}', "JWKS object"),
        (b"[]", "JWKS object"),
        (document(), "no usable key"),
        (document({"kty": "oct", "k": "c2VjcmV0", "kid": "h"}), "no usable key"),
        (document(jwk(kid="same"), jwk(kid="same")), "duplicate kid"),
    ],
)
def test_invalid_documents(data: bytes, message: str) -> None:
    with pytest.raises(InvalidFile, match=message):
        parse_jwks(data, EDDSA)


def test_missing_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidFile, match="No such file"):
        KeyStore(tmp_path / "absent.json")


def test_rotation_is_seen_after_the_check_interval(keyring: KeyRing) -> None:
    old = keyring.new(kid="old")
    clock = FakeClock()
    store = KeyStore(keyring.path, interval=1.0, clock=clock)
    new = keyring.new(kid="new")
    assert store.get(new.kid) is None  # not re-checked within the interval
    clock.now = 1.0
    assert store.get(new.kid) is not None
    assert store.get(old.kid) is not None
    keyring.remove("old")
    clock.now = 2.0
    assert store.kids() == {"new"}


def test_invalid_new_file_keeps_the_last_good_one(
    keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    keyring.new(kid="good")
    clock = FakeClock()
    store = KeyStore(keyring.path, interval=1.0, clock=clock)
    write_atomically(keyring.path, b'{"keys": [')
    with caplog.at_level(logging.ERROR, logger="auth.reloading"):
        for step in range(1, 4):
            clock.now = float(step)
            assert store.kids() == {"good"}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once, not on every check
    assert "keeping the last good JWKS" in errors[0] and "not JSON" in errors[0]
    keyring.path.unlink()
    clock.now = 5.0
    assert store.kids() == {"good"}
    keyring.new(kid="fixed")
    clock.now = 6.0
    assert store.kids() == {"good", "fixed"}


def test_kubernetes_style_symlink_swap(tmp_path: Path) -> None:
    """A mounted Secret: jwks.json -> ..data/jwks.json, ..data -> ..v1, swapped to ..v2."""
    for version, kid in (("..v1", "first"), ("..v2", "second")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "jwks.json").write_bytes(document(jwk(kid=kid)))
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "jwks.json").symlink_to("..data/jwks.json")
    store = KeyStore(tmp_path / "jwks.json", interval=0)
    assert store.kids() == {"first"}
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert store.kids() == {"second"}


def test_key_helpers_round_trip(tmp_path: Path) -> None:
    for alg in ("EdDSA", "ES256", "RS256"):
        private = keys.generate_private_key(alg)
        entry = keys.public_jwk(private, "kid-1")
        assert keys.algorithm_for(private) == alg and entry["alg"] == alg
        assert not {"d", "p", "q"} & entry.keys()
        path = tmp_path / f"{alg}.pem"
        path.write_bytes(keys.private_pem(private))
        assert keys.algorithm_for(keys.load_private_key(path)) == alg
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        keys.load_private_key(tmp_path / "junk.pem")
