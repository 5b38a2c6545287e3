"""imagescaler-client: file in, result out, what was done printed; rate-limit retry."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import Image

from api.pb import imagescaler_pb2 as pb
from api.pb import imagescaler_pb2_grpc
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


class FlakyScaler(imagescaler_pb2_grpc.ImageScalerServicer):
    """Fails the first attempts the way a stopping replica does, then answers."""

    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = failures
        self.sizes: list[int] = []

    def ScaleImage(self, request, context):
        self.sizes.append(len(request.image.content))
        if self.failures:
            context.abort(self.failures.pop(0), "replica stopping")
        return pb.ScaleImageReply(content=b"ok")


@pytest.mark.parametrize(
    ("failures", "attempts"),
    [
        ([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED], 3),
        ([grpc.StatusCode.UNAVAILABLE] * 3, 3),  # three attempts, no more
        ([grpc.StatusCode.INVALID_ARGUMENT], 1),  # not retried
    ],
)
def test_client_retries_a_stopping_replica_even_for_large_images(failures, attempts) -> None:
    servicer = FlakyScaler(list(failures))
    server = grpc.server(
        futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    imagescaler_pb2_grpc.add_ImageScalerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    image = os.urandom(3 << 20)  # beyond gRPC's default 256 KiB retry buffer
    try:
        with client.ScalerClient(f"127.0.0.1:{port}") as scaler:
            if len(failures) < attempts:
                assert scaler.scale(image, timeout=20).content == b"ok"
            else:
                with pytest.raises(grpc.RpcError) as refused:
                    scaler.scale(image, timeout=20)
                assert refused.value.code() == failures[attempts - 1]
    finally:
        server.stop(None)
    assert servicer.sizes == [len(image)] * attempts


@pytest.mark.parametrize("fetch", [False, True])
def test_store_keeps_an_image_the_api_sent_inline_instead(
    tmp_path: Path, capsys, fetch: bool
) -> None:
    """The API's --result-fallback-inline: storage failed, the bytes came in the reply. The
    client printed an empty URL (expiring 1970) and dropped them, or failed to fetch ""."""
    reply = pb.ScaleImageReply(content=b"jpeg bytes", storage_fallback=True)
    result = client.Result(reply.content, reply.info, {}, 0.1, reply)
    out = tmp_path / "out.jpg"
    argv = ["x", "--store", "-o", str(out), *(["--fetch"] if fetch else [])]
    client.deliver(result, client.parser().parse_args(argv))
    assert out.read_bytes() == b"jpeg bytes"
    assert "came inline" in capsys.readouterr().err


def test_token_flags_win_over_the_environment(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    stale.write_text("from-env-file\n")
    fresh = tmp_path / "fresh"
    fresh.write_text("from-flag-file\n")
    env = {"IMAGESCALER_TOKEN_FILE": str(stale), "IMAGESCALER_TOKEN": "from-env"}

    def token(*flags: str) -> str | None:
        return client.token_from(client.parser().parse_args(["x", *flags]), env)

    assert token("--token", "from-flag") == "from-flag"
    assert token("--token-file", str(fresh)) == "from-flag-file"
    assert token() == "from-env"
    assert (
        client.token_from(client.parser().parse_args(["x"]), {"IMAGESCALER_TOKEN_FILE": str(stale)})
        == "from-env-file"
    )


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        client.main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["{missing}"], "cannot read {missing}: No such file or directory"),
        (["{photo}", "--token-file", "{missing}"], "cannot read {missing}: No such"),
        (["{photo}", "--ca", "{missing}"], "cannot read {missing}: No such file"),
        (["{photo}", "--retry", "-1"], "--retry: expected a non-negative integer, got '-1'"),
        (["{photo}", "--retry", "many"], "--retry: expected a non-negative integer"),
        (["{photo}", "--url", "http://127.0.0.1:1/p.jpg"], "give an image FILE or --url, not"),
        (["{empty}"], "{empty} is empty"),
        (["{photo}", "-o", "{dir}"], "-o {dir}: is a directory"),
        (["{photo}", "-o", "{missing}/out.jpg"], "-o {missing}/out.jpg: no directory {missing}"),
        (["{photo}", "-o", "{photo}/out.jpg"], "no directory {photo}"),
    ],
)
def test_bad_inputs_are_usage_errors_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """Were FileNotFoundError tracebacks, and --retry -1 an 'AssertionError: unreachable'."""
    names = {"photo": tmp_path / "p.jpg", "missing": tmp_path / "nope", "dir": tmp_path}
    names["empty"] = tmp_path / "empty.jpg"
    names["photo"].write_bytes(b"x")
    names["empty"].write_bytes(b"")
    argv = [f.format(**names) for f in flags]
    err = usage_error(capsys, *argv, "--server", "127.0.0.1:1", "--timeout", "1")
    assert message.format(**names) in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text", ["eyJh.SECRET.sig\nsecond-line\n", "eyJh.SECRET .sig", "a\tSECRET"]
)
def test_a_token_with_whitespace_inside_is_refused_before_any_call(
    api, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """Was 'INTERNAL: Invalid metadata' from gRPC, which says nothing about the token file."""
    photo, token = tmp_path / "p.jpg", tmp_path / "token"
    photo.write_bytes(b"x")
    token.write_text(text)
    err = usage_error(
        capsys, str(photo), "--token-file", str(token), "--server", f"127.0.0.1:{api.port}"
    )
    assert "the token has whitespace, control or non-ASCII characters inside" in err
    assert "SECRET" not in err


def test_a_result_that_cannot_be_written_is_an_error_not_a_traceback(
    api, tmp_path: Path, sample_jpeg: bytes, capsys
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(sample_jpeg)
    server = f"127.0.0.1:{api.port}"
    assert client.main([str(photo), "-o", "/dev/full", "--server", server]) == 1
    err = capsys.readouterr().err
    assert "error: cannot write /dev/full: No space left on device" in err


class ReaderLeavesAfterOnePrint(io.StringIO):
    """A stdout whose reader went away after the first print (``... | head``)."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes > 2:  # print() writes its text, then its end
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_reader_that_left_is_not_blamed_on_the_output_file(
    api, tmp_path: Path, sample_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was 'error: cannot write out.jpg: Broken pipe' (the file was written): the broken pipe
    must reach reader_may_leave, which ends the command quietly."""
    photo, out = tmp_path / "photo.jpg", tmp_path / "out.jpg"
    photo.write_bytes(sample_jpeg)
    monkeypatch.setattr(sys, "stdout", ReaderLeavesAfterOnePrint())
    with pytest.raises(BrokenPipeError):
        client.main.__wrapped__([str(photo), "-o", str(out), "--server", f"127.0.0.1:{api.port}"])
    with Image.open(out) as im:
        assert im.size == (1024, 768)


def test_a_missing_file_from_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.client", str(tmp_path / "nope.jpg"), "--token", "t"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("imagescaler-client: error: cannot read")
