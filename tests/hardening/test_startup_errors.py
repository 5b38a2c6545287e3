"""What stops a server at start that its flags could not show: one JSON line, exit status 2.

A port in use or a certificate that does not load used to end in a Python traceback and
exit status 1 (in a pod, a CrashLoopBackOff whose log names no option).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def start(module: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stderr


def refusal(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    entry = json.loads(stderr.strip().splitlines()[-1])
    assert entry["level"] == "error"
    return str(entry["message"])


API = ("api.server", "--processor-insecure", "--auth", "none")
PROCESSOR = ("processor.server", "--insecure")


@pytest.mark.parametrize("server", [API, PROCESSOR], ids=["api", "processor"])
def test_a_listen_port_in_use(server: tuple[str, ...], taken_port: int) -> None:
    code, err = start(*server, "--listen", f"127.0.0.1:{taken_port}", "--metrics-port", "0")
    assert code == 2 and f"127.0.0.1:{taken_port}" in refusal(err)


@pytest.mark.parametrize("server", [API, PROCESSOR], ids=["api", "processor"])
def test_a_metrics_port_in_use(server: tuple[str, ...], taken_port: int) -> None:
    code, err = start(*server, "--listen", "127.0.0.1:0", "--metrics-port", str(taken_port))
    assert code == 2 and f"metrics port {taken_port}" in refusal(err)


def test_a_certificate_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    code, err = start(
        *API,
        *("--listen", "127.0.0.1:0", "--metrics-port", "0"),
        *("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")),
    )
    assert code == 2 and "cannot start" in refusal(err)


def test_plaintext_to_the_processor_is_announced() -> None:
    """The processor refuses plaintext off loopback; the API can only say what it does."""
    argv = [sys.executable, "-m", *API, "--listen", "127.0.0.1:0", "--metrics-port", "0"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as server:
        killer = threading.Timer(60, server.kill)  # a bound, should the lines never come
        killer.start()
        try:
            assert server.stderr is not None
            messages = []
            for line in server.stderr:
                messages.append(json.loads(line)["message"])
                if "--processor-insecure" in messages[-1]:
                    break
        finally:
            killer.cancel()
            server.terminate()
    assert "serving" in messages and "--processor-insecure" in messages[-1], messages
