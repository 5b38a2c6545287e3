"""Startup configuration: flags over environment over config file, bad values exit at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api import config

DEV = ["--processor-insecure", "--auth", "none"]


def test_defaults(tmp_path: Path) -> None:
    s = config.load(DEV, environ={})
    assert s.listen == "0.0.0.0:50051"
    assert (s.target_size, s.grayscale, s.margin, s.fit) == ((1024, 768), True, 0.05, "pad")
    assert s.max_input_bytes == 32 * 1024 * 1024


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    conf = tmp_path / "api.toml"
    conf.write_text('target-size = "800x600"\nmargin = 0.1\nquality = 70\ngrayscale = false\n')
    env = {"IMAGESCALER_CONFIG": str(conf), "IMAGESCALER_MARGIN": "0.2"}
    s = config.load([*DEV, "--quality", "90"], environ=env)
    assert s.target_size == (800, 600)  # file
    assert s.grayscale is False  # file
    assert s.margin == 0.2  # env beats file
    assert s.quality == 90  # flag beats file


def test_list_options_from_env() -> None:
    env = {"IMAGESCALER_ALLOW_SOURCE_CIDR": "127.0.0.0/8, 10.1.0.0/16"}
    s = config.load(DEV, environ=env)
    assert [str(n) for n in s.allow_source_cidr] == ["127.0.0.0/8", "10.1.0.0/16"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--allow-source-port", "80,8443", "--allow-source-port", "9000"],
        ["--allow-source-port", "80", "--allow-source-port", "8443,9000"],
        ["--allow-source-port", "80, 8443, 9000"],
    ],
)
def test_list_flags_repeat_or_take_commas(argv: list[str]) -> None:
    """--help shows a list's default comma-separated (80,443); as a flag it was refused."""
    assert config.load([*DEV, *argv], environ={}).allow_source_port == (80, 8443, 9000)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--target-size", "0x768"], {}, "--target-size"),
        (["--margin", "1.5"], {}, "--margin"),
        (["--format", "gif"], {}, "--format"),
        (["--quality", "0"], {}, "--quality"),
        ([], {"IMAGESCALER_TARGET_SIZE": "big"}, "IMAGESCALER_TARGET_SIZE"),
        ([], {"IMAGESCALER_GRAYSCALE": "maybe"}, "IMAGESCALER_GRAYSCALE"),
        (["--allow-source-cidr", "nonsense"], {}, "--allow-source-cidr"),
        # accepted once, then a crash: sleep(-1) mid-drain, int32 overflows in gRPC options
        (["--drain-delay", "-1"], {}, "--drain-delay"),
        (["--drain-delay", "nan"], {}, "--drain-delay"),
        (["--grace", "inf"], {}, "--grace"),
        # accepted, then every scaled call refused as if the image were at fault
        (["--target-size", "16384x768", "--format", "webp"], {}, "--target-size"),
        (["--target-size", "16384x16384"], {}, "--target-size"),
        (["--target-size", "20000x10"], {}, "--target-size"),
        (["--max-input-bytes", "4GB"], {}, "--max-input-bytes"),
        # each was a traceback from build_server, or accepted and then broke every call
        (["--token-leeway", "400"], {}, "--token-leeway"),
        (["--token-leeway", "nan"], {}, "--token-leeway"),
        ([], {"IMAGESCALER_TOKEN_LEEWAY": "-1"}, "IMAGESCALER_TOKEN_LEEWAY"),
        (["--revocations", "bogus"], {}, "--revocations"),
        (["--revocations", "redis://[::1"], {}, "--revocations"),
        (["--revocations", "redis://h:notaport/0"], {}, "--revocations"),
        # a password with an unescaped / made the limiter fail open on every call
        (["--ratelimit-storage", "redis://:pa/ss@127.0.0.1:6379/0"], {}, "--ratelimit-storage"),
        (["--issuer", ""], {}, "--issuer"),
        (["--fetch-max-redirects", "-5"], {}, "--fetch-max-redirects"),
        (["--deadline", "1e12", "--max-deadline", "1e12"], {}, "--deadline"),
    ],
)
def test_bad_values_exit_naming_the_option(
    argv: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        config.load([*DEV, *argv], environ=env)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_unknown_config_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "api.toml"
    conf.write_text('target_sise = "800x600"\n')
    with pytest.raises(SystemExit):
        config.load([*DEV, "--config", str(conf)], environ={})
    assert "target_sise" in capsys.readouterr().err


def test_processor_tls_required_unless_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config.load(["--auth", "none"], environ={})
    assert "--processor-ca" in capsys.readouterr().err


@pytest.mark.parametrize("uri", ["bogus://x", "127.0.0.1:6379", "redis:/x"])
def test_a_bad_ratelimit_storage_stops_with_a_message(uri: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        config.load([*DEV, "--ratelimit-storage", uri], environ={})
    assert exc.value.code == 2
    assert "--ratelimit-storage: expected one of memory://, redis://" in capsys.readouterr().err


def test_a_bad_revocation_store_is_refused_without_echoing_it(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        config.load([*DEV, "--revocations", "redis+sentinel://:hunter2@h1:26379/m"], environ={})
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--revocations: expected memory://" in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    "uri",
    [
        "redis://:hunter2@127.0.0.1:6379/0",
        "redis://user:hunter2@127.0.0.1:6379/0?socket_timeout=1",
        "redis://127.0.0.1:6379/0?password=hunter2",  # redis-py takes it from the query too
        "redis+sentinel://h1:26379,h2:26379/mymaster?sentinel_password=hunter2&db=0",
        "redis+sentinel://:a?b/hunter2@h1:26379/mymaster",  # / and ? inside the password
    ],
)
def test_public_view_redacts_redis_password(uri: str) -> None:
    revocations = ["--revocations", uri] if uri.startswith("redis://") else []  # no sentinel
    s = config.load([*DEV, "--ratelimit-storage", uri, *revocations], environ={})
    public = str(s.public())
    assert "hunter2" not in public
    assert "6379" in public  # where it points stays readable


def test_help_shows_every_option_with_env_name() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from api.config import build_options; build_options().parser.print_help()",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200"},
    ).stdout
    for flag in ("--target-size", "--margin", "--processor", "--allow-source-cidr", "--jwks"):
        assert flag in out
    assert "IMAGESCALER_TARGET_SIZE" in out
    assert "flags, then environment, then config file" in out


def test_every_settings_field_is_an_option() -> None:
    """A field without a flag cannot be set by operators (flag, env or file)."""
    from dataclasses import fields

    dests = {a.dest for a in config.build_options().parser._actions}
    missing = {f.name for f in fields(config.ApiSettings)} - dests
    assert not missing


@pytest.mark.parametrize(
    ("jwks", "registry", "named"),
    [
        ("{}", "tenants: [{id: acme}]", "JWKS"),
        ('{"keys": []}', "tenants: [{id: acme, storage: sometimes}]", "tenant 'acme': 'storage'"),
        ('{"keys": []}', "tenants: [{id: acme, storage: require}]", "--result-store"),
    ],
)
def test_a_key_set_or_registry_that_cannot_serve_stops_the_api_at_start(
    tmp_path: Path, jwks: str, registry: str, named: str
) -> None:
    """A clear JSON log line and exit code 2, not a traceback."""
    (tmp_path / "jwks.json").write_text(jwks)
    (tmp_path / "tenants.yaml").write_text(registry)
    server = [sys.executable, "-m", "api.server", "--listen", "127.0.0.1:0", "--metrics-port", "0"]
    files = ["--jwks", str(tmp_path / "jwks.json"), "--tenants", str(tmp_path / "tenants.yaml")]
    done = subprocess.run(
        [*server, "--processor-insecure", "--auth", "jwt", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert named in json.loads(done.stderr.strip().splitlines()[-1])["message"]
