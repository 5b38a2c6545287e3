"""JWT verification (and minting, for the admin tool and tests).

The verifier trusts nothing in the token header but ``kid``: the algorithm comes from the
key the ``kid`` names (a PyJWK pins it), and headers that would make a verifier fetch or
read something (``jku``, ``x5u``, ``x5c``, ``jwk``) or change the rules (``crit``, ``b64``)
are refused before any key lookup. Failures raise :class:`AuthError` with a short reason
that is safe to return to the caller.
"""

from __future__ import annotations

import binascii
import json
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt

from auth.keys import DEFAULT_ALGORITHMS, KID_PATTERN, KeySource, PrivateKey, algorithm_for
from auth.keys import check_algorithms as _check_algorithms
from auth.tenants import TENANT_ID_PATTERN
from processor.errors import Unauthenticated

if TYPE_CHECKING:
    from auth.revocation import Revocations

DEFAULT_ISSUER = "imagescaler-admin"
DEFAULT_AUDIENCE = "imagescaler"
MAX_TOKEN_BYTES = 8192
VERIFIED_CACHE_SIZE = 1024  # tokens; at most MAX_TOKEN_BYTES each
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "sub", "tenant", "jti")
REFUSED_HEADERS = ("jku", "x5u", "x5c", "jwk", "crit", "b64")
JTI_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SCOPE_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")

# PyJWT exception -> reason; subclasses before their bases.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.DecodeError, "malformed token"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.exceptions.InvalidSubjectError, "bad claim: sub"),
    (jwt.exceptions.InvalidJTIError, "bad claim: jti"),
    (jwt.InvalidKeyError, "unusable key"),
)


class AuthError(Unauthenticated):
    """A refused token. ``reason`` is short and safe to show; kid/jti are for the log line."""

    def __init__(self, reason: str, kid: str | None = None, jti: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kid = kid
        self.jti = jti


MAX_LEEWAY = 300.0  # clock skew beyond minutes is a broken clock, not skew


@dataclass(frozen=True)
class AuthSettings:
    """What a valid token must say, and how much clock slack and lifetime it may have."""

    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    leeway: float = 30.0
    max_lifetime: float = 24 * 3600.0
    algorithms: frozenset[str] = field(default=DEFAULT_ALGORITHMS)

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience must not be empty")
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be 0-{MAX_LEEWAY:g} seconds, got {self.leeway}")
        if self.max_lifetime <= 0:
            raise ValueError(f"max lifetime must be positive, got {self.max_lifetime}")
        object.__setattr__(self, "algorithms", _check_algorithms(frozenset(self.algorithms)))


@dataclass(frozen=True)
class Claims:
    """The verified facts of a token; times are Unix seconds."""

    tenant: str
    subject: str
    scopes: frozenset[str]
    jti: str
    issued_at: float
    expires_at: float
    kid: str


class TokenVerifier:
    """Verifies bearer tokens against a key source, the settings and (optionally) revocations."""

    def __init__(
        self,
        settings: AuthSettings,
        keys: KeySource,
        revocations: Revocations | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._revocations = revocations
        self._clock = clock
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})
        self._verified: OrderedDict[str, tuple[jwt.PyJWK, dict[str, Any]]] = OrderedDict()
        self._verified_lock = threading.Lock()

    @property
    def settings(self) -> AuthSettings:
        return self._settings

    def verify(self, token: str) -> Claims:
        """Claims of a valid, unrevoked token; AuthError otherwise (Unavailable if the
        revocation store cannot answer)."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        header = _header(token)
        kid = _kid(header)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.algorithms:  # a list: no hash
            raise AuthError("algorithm not allowed", kid=kid)
        key = self._keys.get(kid)
        if key is None:
            raise AuthError("unknown key", kid=kid)
        if alg != key.algorithm_name:
            raise AuthError("algorithm not allowed", kid=kid)
        claims = self._claims(self._signed_payload(token, key, kid), kid)
        if self._revocations is not None and self._revocations.is_revoked(claims):
            raise AuthError("token revoked", kid=kid, jti=claims.jti)
        return claims

    def _signed_payload(self, token: str, key: jwt.PyJWK, kid: str) -> dict[str, Any]:
        """The payload of a token whose signature, iss and aud check out.

        A pipeline sends the same token with every call, and checking it costs ~200 us of
        CPU (a quarter of what authentication adds to a request): a token verified with this
        very key object is not checked again. A key reload makes new objects, so a rotated
        or removed key is never trusted from here; times, claims and revocation are checked
        on every call by the caller.
        """
        with self._verified_lock:
            cached = self._verified.get(token)
            if cached is not None and cached[0] is key:
                self._verified.move_to_end(token)
                return cached[1]
        payload = self._decode(token, key, kid)
        with self._verified_lock:
            self._verified[token] = (key, payload)
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return payload

    def _decode(self, token: str, key: jwt.PyJWK, kid: str) -> dict[str, Any]:
        """Signature, iss, aud and presence of required claims, via PyJWT; times are ours."""
        options: Any = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "require": list(REQUIRED_CLAIMS),
        }
        try:
            payload: dict[str, Any] = self._jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                options=options,
                audience=self._settings.audience,
                issuer=self._settings.issuer,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim: {exc.claim}", kid=kid) from exc
        except jwt.PyJWTError as exc:  # InvalidKeyError etc. are not InvalidTokenErrors
            reason = next((r for t, r in _REASONS if isinstance(exc, t)), "invalid token")
            raise AuthError(reason, kid=kid) from exc
        return payload

    def _claims(self, payload: dict[str, Any], kid: str) -> Claims:
        jti = payload["jti"]
        if not isinstance(jti, str) or not JTI_PATTERN.fullmatch(jti):
            raise AuthError("bad claim: jti", kid=kid)
        try:
            self._check_times(payload)
            claims = Claims(
                tenant=_tenant(payload["tenant"]),
                subject=subject_claim(payload["sub"]),
                scopes=_scopes(payload.get("scope")),
                jti=jti,
                issued_at=numeric_date(payload, "iat"),
                expires_at=numeric_date(payload, "exp"),
                kid=kid,
            )
        except AuthError as exc:
            raise AuthError(exc.reason, kid=kid, jti=jti) from None
        return claims

    def _check_times(self, payload: dict[str, Any]) -> None:
        issued, expires = numeric_date(payload, "iat"), numeric_date(payload, "exp")
        not_before = numeric_date(payload, "nbf") if "nbf" in payload else None
        now, leeway = self._clock(), self._settings.leeway
        if expires <= issued:
            raise AuthError("bad claim: exp")
        if expires <= now - leeway:
            raise AuthError("expired")
        if issued > now + leeway:
            raise AuthError("issued in the future")
        if not_before is not None and not_before > now + leeway:
            raise AuthError("not yet valid")
        if expires - issued > self._settings.max_lifetime:
            raise AuthError("lifetime too long")


def _header(token: str) -> dict[str, Any]:
    """The token's JOSE header, after refusing anything but a plain compact JWS."""
    segments = token.split(".")
    if len(segments) != 3 or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise AuthError("malformed token")
    try:
        header = json.loads(jwt.utils.base64url_decode(segments[0]))
    except (ValueError, binascii.Error, RecursionError):
        raise AuthError("malformed token") from None
    if not isinstance(header, dict):
        raise AuthError("malformed token")
    for name in REFUSED_HEADERS:
        if name in header:
            raise AuthError(f"unsupported header: {name}")
    return header


def _kid(header: dict[str, Any]) -> str:
    kid = header.get("kid")
    if kid is None:
        raise AuthError("missing header: kid")
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise AuthError("malformed kid")
    return kid


def numeric_date(payload: dict[str, Any], name: str) -> float:
    """A NumericDate: a finite number (JSON also allows 1e999, NaN and 400-digit integers)."""
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"bad claim: {name}")
    try:
        number = float(value)
    except OverflowError:
        raise AuthError(f"bad claim: {name}") from None
    if not math.isfinite(number):
        raise AuthError(f"bad claim: {name}")
    return number


def _tenant(value: Any) -> str:
    if not isinstance(value, str) or not TENANT_ID_PATTERN.fullmatch(value):
        raise AuthError("bad claim: tenant")
    return value


def subject_claim(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 256 or not value.isprintable():
        raise AuthError("bad claim: sub")
    return value


def _scopes(value: Any) -> frozenset[str]:
    """OAuth style: one space-separated string; absent means no scopes."""
    if value is None:
        return frozenset()
    if not isinstance(value, str):
        raise AuthError("bad claim: scope")
    return frozenset(value.split())


def mint(
    private_key: PrivateKey,
    kid: str,
    *,
    tenant: str,
    scopes: Iterable[str] = (),
    ttl: int = 3600,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    subject: str | None = None,
    now: float | None = None,
    jti: str | None = None,
    extra_claims: dict[str, Any] | None = None,
    extra_headers: dict[str, Any] | None = None,
) -> str:
    """A signed token; ``extra_*`` exist so tests can forge hostile variants."""
    if not TENANT_ID_PATTERN.fullmatch(tenant):
        raise ValueError(f"tenant id must match {TENANT_ID_PATTERN.pattern}, got {tenant!r}")
    bad = sorted(s for s in scopes if not SCOPE_PATTERN.fullmatch(s))
    if bad:
        raise ValueError(f"malformed scope(s): {', '.join(map(repr, bad))}")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject or tenant,
        "tenant": tenant,
        "scope": " ".join(sorted(set(scopes))),
        "iat": issued,
        "exp": issued + ttl,
        "jti": jti or uuid.uuid4().hex,
        **(extra_claims or {}),
    }
    headers = {"kid": kid, **(extra_headers or {})}
    return jwt.encode(payload, private_key, algorithm=algorithm_for(private_key), headers=headers)


_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h`` or ``2d``."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or int(match[1]) <= 0:
        raise ValueError(f"expected a positive duration such as 15m, 1h or 2d, got {text!r}")
    return int(match[1]) * _UNITS[match[2]]
