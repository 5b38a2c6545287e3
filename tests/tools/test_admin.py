"""imagescaler-admin: keygen -> mint -> inspect -> call, and every refusal's exit code."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import redis
from cryptography import x509

from api.interceptors import AuthInterceptor, current
from api.pb import imagescaler_pb2, imagescaler_pb2_grpc
from auth.keys import KeyStore, load_private_key
from auth.revocation import RedisRevocations
from auth.tenants import TenantRegistry
from auth.tokens import AuthError, AuthSettings, Claims, TokenVerifier, mint
from processor.options import env_name
from tests.stack import free_port
from tools import admin
from tools.certs import CLOCK_SKEW, Pki

ROOT = Path(__file__).resolve().parents[2]

SCOPE = ("--scope", "scale:content")


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    status = admin.main(list(argv), environ=environ or {})
    out, err = capsys.readouterr()
    return status, out, err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        admin.main(list(argv), environ={})
    assert info.value.code == 2
    return capsys.readouterr().err


class Echo(imagescaler_pb2_grpc.ImageScalerServicer):
    def ScaleImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        return imagescaler_pb2.ScaleImageReply(content=current().tenant_id.encode())


@pytest.fixture
def keydir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    status, out, _ = run(capsys, "keygen", "--out", str(tmp_path / "keys"), "--kid", "k1")
    assert status == 0 and json.loads(out)["kids"] == ["k1"]
    return tmp_path / "keys"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path], int]]:
    servers: list[grpc.Server] = []

    def start(jwks: Path) -> int:
        (tmp_path / "tenants.yaml").write_text("tenants: [{id: acme}]")
        verifier = TokenVerifier(AuthSettings(), KeyStore(jwks, interval=0))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2),
            interceptors=[AuthInterceptor(verifier, TenantRegistry(tmp_path / "tenants.yaml"))],
        )
        imagescaler_pb2_grpc.add_ImageScalerServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0)


def call(port: int, token: str) -> tuple[grpc.StatusCode, bytes | str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = imagescaler_pb2_grpc.ImageScalerStub(channel)
        try:
            reply = stub.ScaleImage(
                imagescaler_pb2.ScaleImageRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, reply.content


def test_round_trip_keygen_mint_inspect_call(
    keydir: Path, capsys: pytest.CaptureFixture[str], serve: Callable[[Path], int]
) -> None:
    status, out, _ = run(
        capsys,
        "mint",
        "--key",
        str(keydir / "k1.pem"),
        "--tenant",
        "acme",
        "--scope",
        "scale:content",
        "--ttl",
        "15m",
    )
    token = out.strip()
    assert status == 0 and token.count(".") == 2
    status, out, _ = run(capsys, "inspect", token, "--jwks", str(keydir / "jwks.json"))
    report = json.loads(out)
    assert status == 0 and report["valid"] is True
    assert report["header"]["kid"] == "k1"
    assert report["claims"]["tenant"] == "acme" and report["claims"]["scope"] == "scale:content"
    assert report["claims"]["exp"] - report["claims"]["iat"] == 900
    assert call(serve(keydir / "jwks.json"), token) == (grpc.StatusCode.OK, b"acme")


def test_keygen_rotation_keeps_old_keys_and_protects_private_keys(
    keydir: Path, capsys: pytest.CaptureFixture[str], serve: Callable[[Path], int]
) -> None:
    port = serve(keydir / "jwks.json")
    old = run(capsys, "mint", "--key", str(keydir / "k1.pem"), "--tenant", "acme", *SCOPE)[
        1
    ].strip()
    status, out, _ = run(capsys, "keygen", "--out", str(keydir), "--kid", "k2", "--alg", "EdDSA")
    assert status == 0 and json.loads(out)["kids"] == ["k1", "k2"]
    new = run(capsys, "mint", "--key", str(keydir / "k2.pem"), "--tenant", "acme", *SCOPE)[
        1
    ].strip()
    assert call(port, old)[0] == call(port, new)[0] == grpc.StatusCode.OK
    for name in ("k1.pem", "k2.pem"):
        assert stat.S_IMODE((keydir / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    jwks = (keydir / "jwks.json").read_text()
    assert '"d"' not in jwks and "PRIVATE" not in jwks
    status, _, err = run(capsys, "keygen", "--out", str(keydir), "--kid", "k2")
    assert status == 1 and "already has a key with kid 'k2'" in err


def test_keygen_refuses_a_broken_jwks_without_writing_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "jwks.json").write_text("{oops")
    status, _, err = run(
        capsys,
        "keygen",
        "--out",
        str(tmp_path / "k"),
        "--kid",
        "k1",
        "--jwks",
        str(tmp_path / "jwks.json"),
    )
    assert status == 1 and "cannot extend" in err
    assert not (tmp_path / "k" / "k1.pem").exists()


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_keygen_other_algorithms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], alg: str
) -> None:
    run(capsys, "keygen", "--out", str(tmp_path), "--kid", "k", "--alg", alg)
    token = run(capsys, "mint", "--key", str(tmp_path / "k.pem"), "--tenant", "acme", *SCOPE)[
        1
    ].strip()
    status, out, _ = run(
        capsys, "inspect", token, "--jwks", str(tmp_path / "jwks.json"), "--algorithms", alg
    )
    assert status == 0 and json.loads(out)["header"]["alg"] == alg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ttl", "2d"], "above the maximum of 86400s"),
        (["--ttl", "2h", "--max-ttl", "1h"], "above the maximum of 3600s"),
        (["--scope", "scale:everything"], "unknown scope(s) scale:everything"),
        (["--tenant", "Acme"], "--tenant must match"),
        (["--kid", "../x"], "cannot use '../x' as kid"),
        ([], "give at least one --scope"),  # was a token every method refuses
        # were printed, then refused by the API as "bad claim: sub"
        (["--subject", "svc\nadmin"], "--subject must be 1-256 printable characters"),
        (["--subject", "s" * 257], "--subject must be 1-256 printable characters"),
    ],
)
def test_mint_refusals(
    keydir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    base = ["mint", "--key", str(keydir / "k1.pem"), "--tenant", "acme"]
    scoped = argv if not argv or "--scope" in argv else [*argv, *SCOPE]
    status, out, err = run(capsys, *base, *scoped)
    assert (status, out) == (1, "") and message in err


def test_mint_subject_at_the_verifiers_limit_is_accepted(
    keydir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["mint", "--key", str(keydir / "k1.pem"), "--tenant", "acme", *SCOPE]
    token = run(capsys, *argv, "--subject", "s" * 256)[1].strip()
    status, out, _ = run(capsys, "inspect", token, "--jwks", str(keydir / "jwks.json"))
    assert status == 0 and json.loads(out)["claims"]["sub"] == "s" * 256


@pytest.mark.parametrize(
    "scopes",
    [
        ["--scope", "scale:content", "scale:url"],  # the form documented in interfaces.md
        ["--scope", "scale:content", "--scope", "scale:url"],
        ["--scope", "scale:url", "--scope", "scale:content", "scale:url"],
    ],
)
def test_mint_takes_several_scopes_after_one_flag_or_repeated(
    keydir: Path, capsys: pytest.CaptureFixture[str], scopes: list[str]
) -> None:
    argv = ["mint", "--json", "--key", str(keydir / "k1.pem"), *scopes, "--tenant", "acme"]
    status, out, _ = run(capsys, *argv)
    assert status == 0 and json.loads(out)["claims"]["scope"] == "scale:content scale:url"
    assert "expected at least one argument" in usage_error(capsys, *argv[:4], "--scope")


def test_mint_from_environment_and_json(keydir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    environ = {
        "IMAGESCALER_KEY": str(keydir / "k1.pem"),
        "IMAGESCALER_TENANT": "acme",
        "IMAGESCALER_SCOPE": "scale:content, scale:url",
        "IMAGESCALER_TTL": "2m",
        "IMAGESCALER_AUDIENCE": "from-env",
    }
    status, out, _ = run(capsys, "mint", "--json", environ=environ)
    claims = json.loads(out)["claims"]
    assert status == 0
    assert (claims["tenant"], claims["scope"], claims["aud"]) == (
        "acme",
        "scale:content scale:url",
        "from-env",
    )
    assert claims["exp"] - claims["iat"] == 120
    status, out, _ = run(
        capsys, "mint", "--json", "--scope", "scale:url", "--audience", "flag", environ=environ
    )
    claims = json.loads(out)["claims"]
    assert (claims["scope"], claims["aud"]) == ("scale:url", "flag")  # flags win, not merged


def test_inspect_explains_refusals(
    keydir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jwks = str(keydir / "jwks.json")
    token = run(
        capsys,
        "mint",
        "--key",
        str(keydir / "k1.pem"),
        "--tenant",
        "acme",
        *SCOPE,
        "--audience",
        "elsewhere",
    )[1].strip()
    status, out, err = run(capsys, "inspect", token, "--jwks", jwks)
    report = json.loads(out)
    assert status == 1 and report["valid"] is False and report["reason"] == "wrong audience"
    assert report["claims"]["aud"] == "elsewhere" and "refused: wrong audience" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    status, out, _ = run(capsys, "inspect", "-", "--jwks", jwks, "--audience", "elsewhere")
    assert status == 0 and json.loads(out)["valid"] is True
    status, out, _ = run(capsys, "inspect", "not-a-token", "--jwks", jwks)
    assert status == 1 and json.loads(out) == {
        "valid": False,
        "reason": "malformed token",
        "header": None,
        "claims": None,
    }
    status, _, err = run(capsys, "inspect", token, "--jwks", str(keydir / "k1.pem"))
    assert status == 1 and "not JSON" in err


def test_revoke_needs_a_shared_store(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "revoke", "--revocations", "memory://", "--jti", "x")
    assert status == 1 and "must be the API's redis:// URL" in err
    status, _, err = run(  # a password with an unescaped /: refused, and never echoed
        capsys, "revoke", "--revocations", "redis://:pa/ss@127.0.0.1:1/0", "--tenant", "acme"
    )
    assert status == 1 and "not a URL redis-py can parse" in err and "pa/ss" not in err
    status, _, err = run(
        capsys, "revoke", "--revocations", f"redis://127.0.0.1:{free_port()}/0", "--tenant", "acme"
    )
    assert status == 1 and "revocation store unavailable" in err
    assert "one of the arguments --jti --token --tenant is required" in usage_error(
        capsys, "revoke", "--revocations", "redis://127.0.0.1:1/0"
    )


def test_revoke_tenant_before_a_time(
    capsys: pytest.CaptureFixture[str], start_redis: Callable[[], Any]
) -> None:
    url = start_redis().url
    status, out, _ = run(
        capsys,
        "revoke",
        "--tenant",
        "acme",
        "--before",
        "2026-01-01T00:00:00Z",
        environ={"IMAGESCALER_REVOCATIONS": url},
    )
    assert status == 0 and json.loads(out)["issued_before"] == 1767225600.0
    store = RedisRevocations(url)
    old = Claims("acme", "s", frozenset(), "j", 1767225599.0, 1767229199.0, "k")
    newer = Claims("acme", "s", frozenset(), "j", 1767225600.0, 1767229200.0, "k")
    assert store.is_revoked(old) and not store.is_revoked(newer)
    status, _, _ = run(
        capsys,
        "revoke",
        "--revocations",
        url,
        "--jti",
        "j2",
        "--expires",
        str(int(time.time()) + 60),
    )
    assert status == 0 and store.is_revoked(Claims("b", "s", frozenset(), "j2", 0, 1, "k"))
    store.close()


def test_revoke_keeps_a_stolen_token_out_until_it_expires(
    keydir: Path,
    capsys: pytest.CaptureFixture[str],
    start_redis: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An API may accept tokens living longer than 24 h (--max-token-lifetime), but a bare
    `revoke --jti` kept the revocation for the tool's own 24 h: the token then worked again."""
    url = start_redis().url
    key = load_private_key(keydir / "k1.pem")
    token = mint(key, "k1", tenant="acme", scopes=["scale:content"], ttl=3 * 86400, jti="stolen")
    exp = float(jwt.decode(token, options={"verify_signature": False})["exp"])
    status, _, err = run(capsys, "revoke", "--revocations", url, "--jti", "stolen")
    assert status == 1 and "--jti needs --expires" in err
    assert redis.Redis.from_url(url).keys() == []
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    status, out, _ = run(capsys, "revoke", "--revocations", url, "--token", "-")
    assert status == 0 and json.loads(out) == {"revoked_jti": "stolen", "until": exp}
    [stored] = redis.Redis.from_url(url).keys()
    assert redis.Redis.from_url(url).ttl(stored) >= exp - time.time()
    settings = AuthSettings(max_lifetime=7 * 86400)
    verifier = TokenVerifier(settings, KeyStore(keydir / "jwks.json"), RedisRevocations(url))
    with pytest.raises(AuthError, match="token revoked"):
        verifier.verify(token)


def test_revoke_token_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    base = ("revoke", "--revocations", f"redis://127.0.0.1:{free_port()}/0")
    status, _, err = run(capsys, *base, "--token", "not-a-token")
    assert status == 1 and "--token: cannot read a jti and an exp from it" in err
    status, _, err = run(capsys, *base, "--token", "x.y.z", "--expires", "now")
    assert status == 1 and "--expires goes with --jti" in err
    assert "not allowed with argument --jti" in usage_error(
        capsys, *base, "--jti", "j", "--token", "t"
    )


def test_parse_time() -> None:
    assert admin.parse_time("now", now=5.0) == 5.0
    assert admin.parse_time("1767225600") == 1767225600.0
    assert admin.parse_time("2026-01-01T01:00:00+01:00") == 1767225600.0
    with pytest.raises(ValueError, match="no time zone"):
        admin.parse_time("2026-01-01T00:00:00")
    with pytest.raises(ValueError, match="expected now"):
        admin.parse_time("yesterday")


def test_tenants_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("tenants:\n  - id: acme\n  - id: old\n    enabled: false\n")
    status, out, _ = run(capsys, "tenants", "check", str(good))
    assert status == 0 and json.loads(out) == {"ok": True, "enabled": ["acme"], "disabled": ["old"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  - id: acme\n    storage: maybe\n")
    status, out, err = run(capsys, "tenants", "check", str(bad))
    assert status == 1 and out == ""
    assert "tenant 'acme': 'storage' must be one of forbid, allow, require" in err


def _lifetime(cert_path: Path) -> datetime.timedelta:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def _processor_sans(pki: Pki) -> list[str]:
    cert = x509.load_pem_x509_certificate(pki.processor_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


def test_certs_from_the_environment_and_flags_win(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`certs` read no variable: IMAGESCALER_OUT was "required", IMAGESCALER_DAYS ignored."""
    environ = {
        "IMAGESCALER_OUT": str(tmp_path / "env"),
        "IMAGESCALER_DAYS": "5",
        "IMAGESCALER_DNS": "processor, processor.ns.svc",
    }
    status, out, _ = run(capsys, "certs", environ=environ)
    pki = Pki.in_dir(tmp_path / "env")
    assert status == 0 and out.split() == [str(path) for path in pki.paths()]
    assert _lifetime(pki.api_cert) == datetime.timedelta(days=5) + CLOCK_SKEW
    loopback = ["localhost", "127.0.0.1", "::1"]
    assert _processor_sans(pki) == [*loopback, "processor", "processor.ns.svc"]
    flags = ("--out", str(tmp_path / "flag"), "--days", "7", "--dns", "p7")
    status, _, _ = run(capsys, "certs", *flags, environ=environ)
    pki = Pki.in_dir(tmp_path / "flag")
    assert status == 0 and _lifetime(pki.api_cert) == datetime.timedelta(days=7) + CLOCK_SKEW
    assert _processor_sans(pki) == [*loopback, "p7"]  # the flag's list, not merged
    with pytest.raises(SystemExit) as info:
        admin.main(["certs"], environ={**environ, "IMAGESCALER_DAYS": "0"})
    assert info.value.code == 2 and "--days: must be positive" in capsys.readouterr().err


FLAGS_ONLY = {
    ("mint", "--json"),
    ("certs", "--force"),
    ("revoke", "--jti"),
    ("revoke", "--token"),
    ("revoke", "--tenant"),
}


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield parser.prog.removeprefix(f"{admin.PROG} "), action


def test_every_option_is_an_environment_variable_unless_the_help_says_not() -> None:
    """What --help promises; the exceptions are named in it (and why)."""
    parser, _ = admin.build_parser({})
    seen: set[tuple[str, str]] = set()
    for command, action in _options(parser):
        flag = action.option_strings[-1]
        from_env = f"(env {env_name(flag)})" in (action.help or "")
        assert from_env != ((command, flag) in FLAGS_ONLY), (command, flag)
        seen.add((command, flag))
    assert seen >= FLAGS_ONLY
    assert all(f"``{flag}``" in (admin.__doc__ or "") for _, flag in FLAGS_ONLY)


def test_revoke_never_takes_its_target_from_the_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """IMAGESCALER_TENANT (mint's) or IMAGESCALER_TOKEN (imagescaler-client's) left set."""
    environ = {
        "IMAGESCALER_REVOCATIONS": "redis://127.0.0.1:1/0",
        "IMAGESCALER_TENANT": "acme",
        "IMAGESCALER_TOKEN": "x.y.z",
        "IMAGESCALER_JTI": "j",
    }
    with pytest.raises(SystemExit) as info:
        admin.main(["revoke"], environ=environ)
    assert info.value.code == 2
    assert "one of the arguments --jti --token --tenant is required" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "required: COMMAND" in usage_error(capsys)
    assert "invalid choice" in usage_error(
        capsys, "keygen", "--out", str(tmp_path), "--alg", "HS256"
    )
    assert "expected a positive duration" in usage_error(
        capsys, "mint", "--key", "k.pem", "--tenant", "acme", "--ttl", "soon"
    )
    assert "required: --key" in usage_error(capsys, "mint", "--tenant", "acme")


def test_exit_codes_from_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [{id: UPPER}]")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.admin", "tenants", "check", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "'id' must match" in proc.stderr
