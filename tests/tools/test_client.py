"""imagescaler-client: file in, result out, what was done printed; rate-limit retry."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from auth import keys
from auth.tokens import mint
from tests.stack import dev_api_settings
from tools import client


def test_scale_a_file(api, tmp_path: Path, sample_jpeg: bytes, capsys) -> None:
    photo, out = tmp_path / "photo.jpg", tmp_path / "out.jpg"
    photo.write_bytes(sample_jpeg)
    assert client.main([str(photo), "-o", str(out), "--server", f"127.0.0.1:{api.port}"]) == 0
    printed = capsys.readouterr().out
    assert "original   1400x1316" in printed and "output     1024x768" in printed
    with Image.open(out) as im:
        assert im.size == (1024, 768)


def test_error_is_reported_with_status(api, tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "bogus.jpg"
    bogus.write_bytes(b"not an image at all")
    assert client.main([str(bogus), "--server", f"127.0.0.1:{api.port}"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_retry_honours_retry_after(processor, start_api, tmp_path: Path, capsys) -> None:
    key = keys.generate_private_key()
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [keys.public_jwk(key, "k")]}))
    (tmp_path / "t.yaml").write_text(
        "tenants:\n  - id: slow\n    scopes: [scale:content]\n    rate_limit: 1/second\n"
    )
    running = start_api(
        dev_api_settings(
            f"127.0.0.1:{processor.port}",
            auth="jwt",
            jwks=str(tmp_path / "jwks.json"),
            tenants=str(tmp_path / "t.yaml"),
        )
    )
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, "JPEG")
    photo = tmp_path / "p.jpg"
    photo.write_bytes(buf.getvalue())
    token = mint(key, "k", tenant="slow", scopes=["scale:content"], ttl=60)
    argv = [
        str(photo),
        "-o",
        str(tmp_path / "o.jpg"),
        "--server",
        f"127.0.0.1:{running.port}",
        "--token",
        token,
    ]
    assert client.main(argv) == 0
    assert client.main(argv) == 1  # limited, no retry asked
    assert "RESOURCE_EXHAUSTED" in capsys.readouterr().err
    assert client.main([*argv, "--retry", "3"]) == 0
    err = capsys.readouterr().err
    assert "retrying in" in err and "ratelimit-limit=" in err
