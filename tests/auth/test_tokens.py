"""TokenVerifier: every way a token can be wrong is refused with a short, precise reason."""

from __future__ import annotations

import hashlib
import hmac
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from authkit import NOW, KeyRing, SigningKey
from cryptography.hazmat.primitives import serialization

from auth.keys import KeyStore, generate_private_key
from auth.revocation import MemoryRevocations
from auth.tokens import (
    AuthError,
    AuthSettings,
    TokenVerifier,
    mint,
    parse_duration,
)
from processor.errors import Unauthenticated

SETTINGS = AuthSettings(issuer="imagescaler-admin", audience="imagescaler")


def verifier_for(keyring: KeyRing, settings: AuthSettings = SETTINGS, **kw: Any) -> TokenVerifier:
    store = KeyStore(keyring.path, settings.algorithms, interval=0)
    return TokenVerifier(settings, store, clock=lambda: NOW, **kw)


@pytest.fixture
def verifier(keyring: KeyRing, signing_key: SigningKey) -> TokenVerifier:
    return verifier_for(keyring)


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    return info.value.reason


def valid_claims(**overrides: Any) -> dict[str, Any]:
    claims = {
        "iss": "imagescaler-admin",
        "aud": "imagescaler",
        "sub": "acme",
        "tenant": "acme",
        "scope": "scale:content",
        "iat": int(NOW),
        "exp": int(NOW) + 600,
        "jti": "j1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign_with(key: SigningKey) -> Callable[[bytes], bytes]:
    return lambda data: key.private.sign(data)  # type: ignore[call-arg]


def test_valid_token_gives_its_claims(verifier: TokenVerifier, signing_key: SigningKey) -> None:
    token = signing_key.token(scopes=["scale:url", "scale:content"], now=NOW, ttl=600, jti="abc")
    claims = verifier.verify(token)
    assert (claims.tenant, claims.subject, claims.jti) == ("acme", "acme", "abc")
    assert claims.kid == "main"
    assert claims.scopes == {"scale:url", "scale:content"}
    assert claims.expires_at - claims.issued_at == 600
    assert isinstance(AuthError("x"), Unauthenticated)


def test_alg_none_is_refused(verifier: TokenVerifier, forge: Callable[..., str]) -> None:
    token = forge({"alg": "none", "kid": "main"}, valid_claims())
    assert refused(verifier, token) == "malformed token"  # empty signature segment
    token = forge({"alg": "none", "kid": "main"}, valid_claims(), sign=lambda _: b"x")
    assert refused(verifier, token) == "algorithm not allowed"
    for alg in (["EdDSA"], {"EdDSA": 1}, None, 7):  # not a string: refused, not a TypeError
        token = forge({"alg": alg, "kid": "main"}, valid_claims(), sign=lambda _: b"x")
        assert refused(verifier, token) == "algorithm not allowed"


def test_hs256_signed_with_the_public_key_is_refused(
    verifier: TokenVerifier, signing_key: SigningKey, keyring: KeyRing, forge: Callable[..., str]
) -> None:
    public_pem = signing_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw_jwk = keyring.entries[0]["x"].encode()
    for secret in (public_pem, raw_jwk):
        token = forge(
            {"alg": "HS256", "kid": "main", "typ": "JWT"},
            valid_claims(),
            sign=lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
        )
        assert refused(verifier, token) == "algorithm not allowed"


def test_algorithm_comes_from_the_key_not_the_header(keyring: KeyRing) -> None:
    """ES256 allowed by configuration still cannot verify against an Ed25519 key's kid."""
    ed = keyring.new("EdDSA", kid="ed")
    es = keyring.new("ES256", kid="es")
    verifier = verifier_for(keyring, AuthSettings(algorithms=frozenset({"EdDSA", "ES256"})))
    assert verifier.verify(es.token(now=NOW)).kid == "es"
    wrong_kid = mint(es.private, "ed", tenant="acme", now=NOW)
    assert refused(verifier, wrong_kid) == "algorithm not allowed"
    assert verifier.verify(ed.token(now=NOW)).kid == "ed"


def test_rs256_when_configured(keyring: KeyRing, signing_key: SigningKey) -> None:
    rs = keyring.new("RS256", kid="rs")
    assert refused(verifier_for(keyring), rs.token(now=NOW)) == "algorithm not allowed"
    verifier = verifier_for(keyring, AuthSettings(algorithms=frozenset({"RS256"})))
    assert verifier.verify(rs.token(now=NOW)).kid == "rs"


@pytest.mark.parametrize(
    ("minted", "reason"),
    [
        ({"now": NOW - 700, "ttl": 600}, "expired"),
        ({"now": NOW - 620, "ttl": 600}, None),  # 20 s past exp: within the 30 s leeway
        ({"now": NOW + 600}, "issued in the future"),
        ({"now": NOW, "extra_claims": {"nbf": NOW + 120}}, "not yet valid"),
        ({"now": NOW, "extra_claims": {"nbf": NOW + 20}}, None),
        ({"now": NOW, "ttl": 24 * 3600 + 1}, "lifetime too long"),
        ({"now": NOW, "audience": "someone-else"}, "wrong audience"),
        ({"now": NOW, "issuer": "imagescaler-admin-evil"}, "wrong issuer"),
        ({"now": NOW, "extra_claims": {"iss": "imagescaler"}}, "wrong issuer"),
        ({"now": NOW, "extra_claims": {"tenant": None}}, "missing claim: tenant"),
        ({"now": NOW, "extra_claims": {"jti": None}}, "missing claim: jti"),
        ({"now": NOW, "extra_claims": {"tenant": "ACME"}}, "bad claim: tenant"),
        ({"now": NOW, "extra_claims": {"tenant": "acme\u200b"}}, "bad claim: tenant"),
        ({"now": NOW, "extra_claims": {"exp": "soon"}}, "bad claim: exp"),
        ({"now": NOW, "extra_claims": {"iat": True}}, "bad claim: iat"),
        ({"now": NOW, "extra_claims": {"exp": 10**400}}, "bad claim: exp"),
        ({"now": NOW, "extra_claims": {"exp": float("inf")}}, "bad claim: exp"),
        ({"now": NOW, "extra_claims": {"nbf": float("nan")}}, "bad claim: nbf"),
        ({"now": NOW, "extra_claims": {"scope": ["scale:url"]}}, "bad claim: scope"),
        ({"now": NOW, "extra_claims": {"jti": "a/../b"}}, "bad claim: jti"),
    ],
)
def test_claim_checks(
    verifier: TokenVerifier, signing_key: SigningKey, minted: dict[str, Any], reason: str | None
) -> None:
    token = signing_key.token(**minted)
    if reason is None:
        assert verifier.verify(token).tenant == "acme"
    else:
        assert refused(verifier, token) == reason


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "sub"])
def test_every_required_claim(
    verifier: TokenVerifier, signing_key: SigningKey, forge: Callable[..., str], claim: str
) -> None:
    token = forge(
        {"alg": "EdDSA", "kid": "main"}, valid_claims(**{claim: None}), sign=sign_with(signing_key)
    )
    assert refused(verifier, token) == f"missing claim: {claim}"


def test_unknown_kid(verifier: TokenVerifier) -> None:
    other = SigningKey(generate_private_key(), "not-in-jwks")
    assert refused(verifier, other.token(now=NOW)) == "unknown key"


def test_tampered_payload(
    verifier: TokenVerifier, signing_key: SigningKey, forge: Callable[..., str]
) -> None:
    header, _, signature = signing_key.token(tenant="acme", now=NOW).split(".")
    other = forge({}, valid_claims(tenant="victim")).split(".")[1]
    assert refused(verifier, f"{header}.{other}.{signature}") == "bad signature"


def test_signature_from_another_key(verifier: TokenVerifier) -> None:
    stranger = SigningKey(generate_private_key(), "main")  # same kid, different key
    assert refused(verifier, stranger.token(now=NOW)) == "bad signature"


def test_oversized_token_is_refused_before_parsing(verifier: TokenVerifier) -> None:
    assert refused(verifier, "a" * 16384) == "token too large"
    assert refused(verifier, "x." * 4000) == "malformed token"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "a.b.c", "e30.e30.!!!", "ImZvbyI.e30.AA", "W10.e30.AA"],
)
def test_malformed_tokens(verifier: TokenVerifier, token: str) -> None:
    assert refused(verifier, token) == "malformed token"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"jku": "http://127.0.0.1:{port}/jwks.json"}, "unsupported header: jku"),
        ({"x5u": "http://127.0.0.1:{port}/cert.pem"}, "unsupported header: x5u"),
        ({"x5c": ["MIIB"]}, "unsupported header: x5c"),
        ({"jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AA"}}, "unsupported header: jwk"),
        ({"crit": ["exp"]}, "unsupported header: crit"),
        ({"crit": ["b64"], "b64": False}, "unsupported header: crit"),
        ({"kid": "../../../../etc/passwd"}, "malformed kid"),
        ({"kid": "/etc/passwd"}, "malformed kid"),
        ({"kid": "file:///etc/passwd"}, "malformed kid"),
        ({"kid": "main\u0000"}, "malformed kid"),
        ({"kid": "k" * 129}, "malformed kid"),
        ({"kid": 7}, "malformed kid"),
        ({"kid": None}, "missing header: kid"),
    ],
)
def test_headers_that_would_fetch_or_read_are_refused_without_doing_it(
    verifier: TokenVerifier,
    signing_key: SigningKey,
    forge: Callable[..., str],
    listener: socket.socket,
    audit: list[tuple[str, Any]],
    extra: dict[str, Any],
    reason: str,
) -> None:
    port = listener.getsockname()[1]
    header = {
        "alg": "EdDSA",
        "kid": "main",
        **{k: (v.format(port=port) if isinstance(v, str) else v) for k, v in extra.items()},
    }
    header = {k: v for k, v in header.items() if v is not None}
    token = forge(header, valid_claims(), sign=sign_with(signing_key))
    assert refused(verifier, token) == reason
    assert audit == []  # no file opened, no name resolved, no connection made
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected to the URL in the header


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock


_AUDITED = frozenset(
    {
        "open",
        "socket.connect",
        "socket.getaddrinfo",
        "urllib.Request",
        "http.client.connect",
        "subprocess.Popen",
        "os.listdir",
    }
)


class _AuditRecorder:
    """A process-wide audit hook (they cannot be removed) that records only when asked to."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] | None = None
        self.thread = 0
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: Any) -> None:
        if self.events is not None and event in _AUDITED and threading.get_ident() == self.thread:
            self.events.append((event, args))


@pytest.fixture(scope="session")
def _audit_recorder() -> _AuditRecorder:
    return _AuditRecorder()


@pytest.fixture
def audit(
    _audit_recorder: _AuditRecorder, verifier: TokenVerifier, signing_key: SigningKey
) -> Iterator[list[tuple[str, Any]]]:
    """Events seen during the test body, after one warm-up verification (lazy imports)."""
    verifier.verify(signing_key.token(now=NOW))
    events: list[tuple[str, Any]] = []
    _audit_recorder.events, _audit_recorder.thread = events, threading.get_ident()
    try:
        yield events
    finally:
        _audit_recorder.events = None


def test_revoked_token(keyring: KeyRing, signing_key: SigningKey) -> None:
    revocations = MemoryRevocations(clock=lambda: NOW)
    verifier = verifier_for(keyring, revocations=revocations)
    token = signing_key.token(now=NOW, jti="stolen")
    assert verifier.verify(token).jti == "stolen"
    revocations.revoke_jti("stolen", NOW + 3600)
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.reason == "token revoked"
    assert (info.value.kid, info.value.jti) == ("main", "stolen")


@pytest.mark.parametrize(
    "bad",
    [
        {"algorithms": frozenset({"HS256"})},
        {"algorithms": frozenset({"none"})},
        {"algorithms": frozenset()},
        {"leeway": -1},
        {"max_lifetime": 0},
        {"issuer": ""},
    ],
)
def test_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AuthSettings(**bad)


def test_mint_refuses_what_the_verifier_would(signing_key: SigningKey) -> None:
    with pytest.raises(ValueError, match="tenant"):
        signing_key.token(tenant="Acme")
    with pytest.raises(ValueError, match="scope"):
        signing_key.token(scopes=["scale url"])
    header = jwt.get_unverified_header(signing_key.token())
    assert header == {"alg": "EdDSA", "kid": "main", "typ": "JWT"}


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "1w", "1.5h", "h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
