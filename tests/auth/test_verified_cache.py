"""TokenVerifier remembers tokens whose signature it checked, and nothing more than that."""

from __future__ import annotations

from typing import Any

import pytest
from authkit import NOW, KeyRing, SigningKey

from auth.keys import KeyStore
from auth.revocation import MemoryRevocations
from auth.tokens import VERIFIED_CACHE_SIZE, AuthError, AuthSettings, TokenVerifier

SETTINGS = AuthSettings(issuer="imagescaler-admin", audience="imagescaler")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def counting(verifier: TokenVerifier) -> list[str]:
    """Record each signature check (the expensive step the cache skips)."""
    calls: list[str] = []
    decode = verifier._decode

    def counted(token: str, *args: Any) -> dict[str, Any]:
        calls.append(token)
        return decode(token, *args)

    verifier._decode = counted  # type: ignore[method-assign]
    return calls


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def revocations() -> MemoryRevocations:
    return MemoryRevocations()


@pytest.fixture
def verifier(
    keyring: KeyRing, signing_key: SigningKey, clock: Clock, revocations: MemoryRevocations
) -> TokenVerifier:
    store = KeyStore(keyring.path, SETTINGS.algorithms, interval=0)
    return TokenVerifier(SETTINGS, store, revocations, clock=clock)


def test_a_token_is_checked_once(verifier: TokenVerifier, signing_key: SigningKey) -> None:
    calls = counting(verifier)
    token = signing_key.token(now=NOW, ttl=600)
    other = signing_key.token(now=NOW, ttl=600)
    for _ in range(3):
        assert verifier.verify(token).tenant == "acme"
    verifier.verify(other)
    assert calls == [token, other]


def test_a_cached_token_still_expires(
    verifier: TokenVerifier, signing_key: SigningKey, clock: Clock
) -> None:
    token = signing_key.token(now=NOW, ttl=600)
    verifier.verify(token)
    clock.now = NOW + 600 + SETTINGS.leeway + 1
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(token)


def test_a_cached_token_can_still_be_revoked(
    verifier: TokenVerifier, signing_key: SigningKey, revocations: MemoryRevocations
) -> None:
    token = signing_key.token(now=NOW, ttl=600, jti="j-cached")
    verifier.verify(token)
    revocations.revoke_jti("j-cached", NOW + 600)
    with pytest.raises(AuthError, match="token revoked"):
        verifier.verify(token)


def test_a_replaced_or_removed_key_is_not_trusted_from_the_cache(
    verifier: TokenVerifier, keyring: KeyRing, signing_key: SigningKey
) -> None:
    token = signing_key.token(now=NOW, ttl=600)
    verifier.verify(token)
    keyring.remove("main")
    keyring.new("EdDSA", kid="main")  # same kid, different key
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(token)
    keyring.new("EdDSA", kid="other")
    keyring.remove("main")  # (a JWKS with no usable key would be ignored)
    with pytest.raises(AuthError, match="unknown key"):
        verifier.verify(token)


def test_the_cache_is_bounded(verifier: TokenVerifier, signing_key: SigningKey) -> None:
    calls = counting(verifier)
    first = signing_key.token(now=NOW, ttl=600)
    verifier.verify(first)
    for _ in range(VERIFIED_CACHE_SIZE):
        verifier.verify(signing_key.token(now=NOW, ttl=600))
    assert len(verifier._verified) == VERIFIED_CACHE_SIZE
    verifier.verify(first)  # evicted: checked again
    assert calls.count(first) == 2
