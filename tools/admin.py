"""``imagescaler-admin``: signing keys, tokens, revocation and tenant registry checks.

Exit codes: 0 done, 1 refused or invalid input (the message says why), 2 usage error.
Every option is also an environment variable, ``IMAGESCALER_`` plus the flag in upper snake
case (``--max-ttl`` is ``IMAGESCALER_MAX_TTL``; lists are comma-separated); flags win.
Except switches (``--json``, ``--force``) and what ``revoke`` revokes (``--jti``, ``--token``,
``--tenant``): flags only, so that a variable left set for ``mint`` or ``imagescaler-client``
(``IMAGESCALER_TENANT``, ``IMAGESCALER_TOKEN``) never chooses what is revoked or replaced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt

from auth import keys
from auth.reloading import InvalidFile
from auth.revocation import RedisRevocations, redis_url_parses
from auth.tenants import SCOPES, TENANT_ID_PATTERN, load_tenants
from auth.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    AuthError,
    AuthSettings,
    TokenVerifier,
    mint,
    numeric_date,
    parse_duration,
    subject_claim,
)
from processor.errors import Unavailable
from processor.options import env_name
from tools import certs
from tools.cli import reader_may_leave

PROG = "imagescaler-admin"


class Refused(Exception):
    """Invalid input or a refused operation: exit status 1 with this message."""


class _EnvOptions:
    """argparse options whose defaults come from IMAGESCALER_* variables."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.list_fallbacks: dict[str, list[str]] = {}

    def add(self, parser: argparse.ArgumentParser, flag: str, help: str, **kw: Any) -> None:
        name = env_name(flag)
        raw = self._environ.get(name)
        if kw.get("action") in ("append", "extend"):
            self.list_fallbacks[flag.lstrip("-").replace("-", "_")] = _split(raw or "")
        elif raw is not None:
            kw["default"] = raw
        if raw is not None and flag.startswith("-"):
            kw["required"] = False
        parser.add_argument(flag, help=f"{help} (env {name})", **kw)

    def resolve(self, args: argparse.Namespace) -> argparse.Namespace:
        """Repeatable flags: the flags if given, else the environment (never both merged)."""
        for dest, fallback in self.list_fallbacks.items():
            if getattr(args, dest, None) is None:
                setattr(args, dest, fallback)
        return args


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_time(text: str, now: float | None = None) -> float:
    """``now``, Unix seconds, or ISO 8601 with a time zone (``2026-11-26T10:00:00Z``)."""
    stripped = text.strip()
    if stripped.lower() == "now":
        return time.time() if now is None else now
    if stripped.isdigit():
        return float(stripped)
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError as exc:
        raise ValueError(f"expected now, Unix seconds or ISO 8601, got {text!r}") from exc
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; add one, e.g. Z or +01:00")
    return moment.timestamp()


def _time_arg(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# keygen


def _add_keygen(sub: Any, env: _EnvOptions) -> None:
    p = sub.add_parser(
        "keygen",
        help="new signing key and its public JWKS entry",
        description="Write KID.pem (private, mode 0600) to --out and add the "
        "public key to a JWKS file, keeping the keys already there (rotation).",
    )
    env.add(p, "--out", "directory for the private key", metavar="DIR", required=True)
    env.add(
        p,
        "--alg",
        "signature algorithm",
        choices=sorted(keys.SUPPORTED_ALGORITHMS),
        default="EdDSA",
    )
    env.add(p, "--kid", "key id (default: date and random suffix)", metavar="KID")
    env.add(
        p, "--jwks", "JWKS file to add the public key to (default: DIR/jwks.json)", metavar="FILE"
    )
    p.set_defaults(run=_keygen)


def _keygen(args: argparse.Namespace) -> None:
    out = Path(args.out)
    kid = args.kid or time.strftime("%Y%m%d-") + os.urandom(4).hex()
    if not keys.KID_PATTERN.fullmatch(kid):
        raise Refused(f"--kid must match {keys.KID_PATTERN.pattern}, got {kid!r}")
    jwks_path = Path(args.jwks) if args.jwks else out / "jwks.json"
    key_path = out / f"{kid}.pem"
    private = keys.generate_private_key(args.alg)
    document = _jwks_with(jwks_path, keys.public_jwk(private, kid))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(key_path, keys.private_pem(private))
    _write_atomically(jwks_path, json.dumps(document, indent=2).encode() + b"\n")
    print(
        json.dumps(
            {
                "kid": kid,
                "alg": args.alg,
                "key": str(key_path),
                "jwks": str(jwks_path),
                "kids": [k["kid"] for k in document["keys"]],
            },
            indent=2,
        )
    )


def _jwks_with(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """The existing JWKS (if any) plus ``entry``; refuses a clashing kid or a broken file."""
    if not path.exists():
        return {"keys": [entry]}
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot extend {path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise Refused(f"cannot extend {path}: not a JWKS object with a 'keys' list")
    if any(isinstance(k, dict) and k.get("kid") == entry["kid"] for k in document["keys"]):
        raise Refused(f"{path} already has a key with kid {entry['kid']!r}")
    return {**document, "keys": [*document["keys"], entry]}


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the start (never readable by others, not even briefly)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise Refused(f"{path} already exists; choose another --kid") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write then rename, so a watching API never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # on the descriptor: a path could be swapped for a symlink
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# mint


def _add_mint(sub: Any, env: _EnvOptions) -> None:
    p = sub.add_parser(
        "mint",
        help="print a signed token",
        description="Print a token for a tenant, signed with a private key from "
        "keygen; the kid defaults to the key file's name without .pem.",
    )
    env.add(p, "--key", "private key PEM written by keygen", metavar="FILE", required=True)
    env.add(p, "--kid", "key id (default: the key file name without .pem)", metavar="KID")
    env.add(p, "--tenant", "tenant id", metavar="ID", required=True)
    env.add(
        p,
        "--scope",
        f"scopes to grant, one or more of {', '.join(sorted(SCOPES))}",
        action="extend",
        nargs="+",
        metavar="SCOPE",
    )
    env.add(p, "--ttl", "lifetime such as 15m, 1h or 2d", type=_duration, default="1h")
    env.add(p, "--max-ttl", "refuse a --ttl above this", type=_duration, default="24h")
    env.add(p, "--subject", "sub claim (default: the tenant id)", metavar="SUB")
    _add_issuer_audience(p, env)
    p.add_argument("--json", action="store_true", help="print the token and its claims as JSON")
    p.set_defaults(run=_mint)


def _add_issuer_audience(p: argparse.ArgumentParser, env: _EnvOptions) -> None:
    env.add(p, "--issuer", "iss claim", metavar="ISS", default=DEFAULT_ISSUER)
    env.add(p, "--audience", "aud claim", metavar="AUD", default=DEFAULT_AUDIENCE)


def _mint(args: argparse.Namespace) -> None:
    if args.ttl > args.max_ttl:
        raise Refused(f"--ttl {args.ttl}s is above the maximum of {args.max_ttl}s (--max-ttl)")
    if not TENANT_ID_PATTERN.fullmatch(args.tenant):
        raise Refused(f"--tenant must match {TENANT_ID_PATTERN.pattern}, got {args.tenant!r}")
    if not args.scope:  # a token without scopes is refused by every method
        raise Refused(f"give at least one --scope: {', '.join(sorted(SCOPES))}")
    unknown = sorted(set(args.scope) - SCOPES)
    if unknown:
        raise Refused(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(sorted(SCOPES))}")
    try:  # the verifier's own rule, so mint never prints a token the API refuses
        subject_claim(args.subject or args.tenant)
    except AuthError as exc:
        raise Refused(f"--subject must be 1-256 printable characters ({exc.reason})") from exc
    private = _private_key(args.key)
    kid = args.kid or Path(args.key).name.removesuffix(".pem")
    if not keys.KID_PATTERN.fullmatch(kid):
        raise Refused(f"cannot use {kid!r} as kid; pass --kid")
    token = mint(
        private,
        kid,
        tenant=args.tenant,
        scopes=args.scope,
        ttl=args.ttl,
        issuer=args.issuer,
        audience=args.audience,
        subject=args.subject,
    )
    if args.json:
        claims = jwt.decode(token, options={"verify_signature": False})
        print(json.dumps({"token": token, "kid": kid, "claims": claims}, indent=2))
    else:
        print(token)


def _private_key(path: str) -> keys.PrivateKey:
    try:
        return keys.load_private_key(path)
    except ValueError as exc:
        raise Refused(str(exc)) from exc


# inspect


def _add_inspect(sub: Any, env: _EnvOptions) -> None:
    p = sub.add_parser(
        "inspect",
        help="verify a token and print its claims or why it is refused",
        description="Verify TOKEN as the API would (without revocations) and "
        "print header and claims as JSON; exit 1 with the reason if refused.",
    )
    env.add(p, "token", "the token, or - to read it from stdin", nargs="?", metavar="TOKEN")
    env.add(p, "--jwks", "JWKS file with the public keys", metavar="FILE", required=True)
    _add_issuer_audience(p, env)
    env.add(p, "--max-ttl", "largest accepted exp - iat", type=_duration, default="24h")
    env.add(p, "--token-leeway", "clock slack in seconds", type=float, default=30.0)
    env.add(p, "--algorithms", "allowed algorithms, comma-separated", type=_split, default="EdDSA")
    p.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    token = sys.stdin.read().strip() if args.token in (None, "-") else args.token.strip()
    try:
        settings = AuthSettings(
            issuer=args.issuer,
            audience=args.audience,
            leeway=args.token_leeway,
            max_lifetime=args.max_ttl,
            algorithms=frozenset(args.algorithms),
        )
        store = keys.KeyStore(args.jwks, settings.algorithms)
    except (ValueError, InvalidFile) as exc:
        raise Refused(str(exc)) from exc
    report: dict[str, Any] = {
        "header": _unverified(jwt.get_unverified_header, token),
        "claims": _unverified(_unverified_claims, token),
    }
    try:
        TokenVerifier(settings, store).verify(token)
    except AuthError as exc:
        print(json.dumps({"valid": False, "reason": exc.reason, **report}, indent=2))
        print(f"{PROG}: refused: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps({"valid": True, **report}, indent=2))
    return 0


def _unverified_claims(token: str) -> Any:
    return jwt.decode(token, options={"verify_signature": False})


def _unverified(read: Callable[[str], Any], token: str) -> Any:
    """For display only, never trusted: None when the part cannot be decoded."""
    try:
        return read(token)
    except jwt.PyJWTError:
        return None


# revoke


def _add_revoke(sub: Any, env: _EnvOptions) -> None:
    p = sub.add_parser(
        "revoke",
        help="revoke one token (by jti) or a tenant's older tokens",
        description="Record a revocation in the Redis shared by the API replicas. A jti "
        "revocation is kept until the token expires: give the token itself (--token), or "
        "--jti with --expires at or after the token's exp.",
    )
    env.add(
        p,
        "--revocations",
        "the API's revocation store, redis://HOST:PORT/DB",
        metavar="URL",
        required=True,
    )
    # flags only (see the module docstring): IMAGESCALER_TENANT is mint's, IMAGESCALER_TOKEN
    # imagescaler-client's, and neither may pick what an operator revokes
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", help="revoke the token with this jti (needs --expires)")
    which.add_argument(
        "--token", help="revoke this token (its jti, until its exp); - reads it from stdin"
    )
    which.add_argument(
        "--tenant", metavar="ID", help="revoke the tenant's tokens issued before --before"
    )
    env.add(
        p,
        "--expires",
        "with --jti: the token's exp or later (now, Unix seconds or ISO 8601)",
        type=_time_arg,
        metavar="TIME",
    )
    env.add(
        p,
        "--before",
        "with --tenant: now, Unix seconds or ISO 8601 (default now). Tokens carry whole "
        "seconds, so those minted in the same second are refused too: mint new ones after it",
        type=_time_arg,
        default="now",
        metavar="TIME",
    )
    p.set_defaults(run=_revoke)


def _revoke(args: argparse.Namespace) -> None:
    if not args.revocations.startswith(("redis://", "rediss://", "unix://")):
        raise Refused(
            "--revocations must be the API's redis:// URL "
            "(a memory:// store lives inside one API process)"
        )
    if not redis_url_parses(args.revocations):  # never echoed: it has a password
        raise Refused("--revocations: not a URL redis-py can parse (percent-encode / ? # in it)")
    store = RedisRevocations(args.revocations)
    try:
        if args.tenant is None:
            jti, expires = _jti_and_expiry(args)
            store.revoke_jti(jti, expires)
            print(json.dumps({"revoked_jti": jti, "until": expires}))
        else:
            if not TENANT_ID_PATTERN.fullmatch(args.tenant):
                raise Refused(f"--tenant must match {TENANT_ID_PATTERN.pattern}")
            store.revoke_tenant_before(args.tenant, args.before)
            print(json.dumps({"revoked_tenant": args.tenant, "issued_before": args.before}))
    except Unavailable as exc:
        raise Refused(f"{exc} ({exc.__cause__})") from exc
    finally:
        store.close()


def _jti_and_expiry(args: argparse.Namespace) -> tuple[str, float]:
    """Never a guessed expiry: a revocation forgotten before the token expires lets a stolen
    token back in, and only the token (or the operator) knows when that is."""
    if args.token is None:
        if args.expires is None:
            raise Refused(
                "--jti needs --expires: the revocation is kept only until then, so give the "
                "token's exp (or, if unknown, now + the API's --max-token-lifetime), or pass "
                "the token itself with --token"
            )
        return str(args.jti), float(args.expires)
    if args.expires is not None:
        raise Refused("--expires goes with --jti; --token uses the token's own exp")
    token = sys.stdin.read().strip() if args.token == "-" else args.token.strip()
    claims = _unverified(_unverified_claims, token)  # a stolen token's signature is valid
    try:
        if isinstance(claims["jti"], str):
            return claims["jti"], numeric_date(claims, "exp")
    except (TypeError, KeyError, AuthError):
        pass
    raise Refused("--token: cannot read a jti and an exp from it")


# tenants check


def _add_tenants(sub: Any, env: _EnvOptions) -> None:
    p = sub.add_parser("tenants", help="tenant registry tools")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="validate a tenant registry file",
        description="Exit 0 if FILE is a valid registry, else 1.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=_tenants_check)


def _tenants_check(args: argparse.Namespace) -> None:
    try:
        tenants = load_tenants(args.file)
    except InvalidFile as exc:
        raise Refused(str(exc)) from exc
    enabled = sorted(t.id for t in tenants.values() if t.enabled)
    disabled = sorted(t.id for t in tenants.values() if not t.enabled)
    print(json.dumps({"ok": True, "enabled": enabled, "disabled": disabled}))


def build_parser(environ: Mapping[str, str]) -> tuple[argparse.ArgumentParser, _EnvOptions]:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    env = _EnvOptions(environ)
    for add in (_add_keygen, _add_mint, _add_inspect, _add_revoke, _add_tenants):
        add(sub, env)
    certs.register(sub, env.add)
    return parser, env


@reader_may_leave
def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s %(message)s")
    parser, env = build_parser(os.environ if environ is None else environ)
    args = env.resolve(parser.parse_args(argv))
    try:
        status = args.run(args)
    except Refused as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
