"""``make run``: the whole service on this machine, on embedded defaults, with the sample photo.

A recipe an operator can follow by hand: development certificates for mutual TLS, a signing
key and JWKS, a tenant registry, a token; then the processor and the API, the sample photo
through the client into ``out.jpg``, and both servers kept serving until Ctrl-C.
No Redis and no cloud: rate limits and revocations live in memory.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools import serverenv

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
SAMPLE = ROOT / "tests" / "data" / "seed-sample.jpg"
API, PROCESSOR, PROBE = "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"
TENANTS = """\
tenants:
  - id: demo
    scopes: [scale:content, scale:url]
    rate_limit: 50/second;3000/minute
"""


def run(*argv: str | Path) -> str:
    """Run one of our console scripts (as a module of this interpreter) and return stdout."""
    done = subprocess.run(
        [sys.executable, "-m", *map(str, argv)], cwd=ROOT, text=True, capture_output=True
    )
    if done.returncode != 0:
        sys.exit(f"demo: {' '.join(map(str, argv))} failed:\n{done.stderr}")
    return done.stdout


def prepare() -> None:
    """Certificates, key, tenants and token: made once, kept in .run/ (git-ignored)."""
    RUN.mkdir(exist_ok=True)
    if not certs_fresh(RUN / "certs"):  # missing, or the 90-day dev certificates ran out
        run("tools.admin", "certs", "--out", RUN / "certs", "--force")
    if not (RUN / "keys" / "demo.pem").exists():
        run("tools.admin", "keygen", "--out", RUN / "keys", "--kid", "demo")
    (RUN / "tenants.yaml").write_text(TENANTS)
    token = run(
        "tools.admin",
        "mint",
        "--key",
        RUN / "keys" / "demo.pem",
        "--tenant",
        "demo",
        "--scope",
        "scale:content",
        "--scope",
        "scale:url",
        "--ttl",
        "12h",
    )
    (RUN / "token").unlink(missing_ok=True)  # created afresh, 0600: a bearer token
    fd = os.open(RUN / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token.strip() + "\n")


def certs_fresh(certs: Path, margin: datetime.timedelta = datetime.timedelta(days=1)) -> bool:
    """Every certificate the demo uses is there and valid for at least ``margin`` more."""
    until = datetime.datetime.now(datetime.UTC) + margin
    for name in ("ca.pem", "processor.pem", "api.pem"):
        path = certs / name
        if not path.exists():
            return False
        if x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc < until:
            return False
    return True


def start() -> list[subprocess.Popen[bytes]]:
    certs = RUN / "certs"
    processor = [
        "processor.server",
        "--listen",
        PROCESSOR,
        "--probe-listen",
        PROBE,
        "--tls-cert",
        certs / "processor.pem",
        "--tls-key",
        certs / "processor-key.pem",
        "--tls-client-ca",
        certs / "ca.pem",
        "--allow-client",
        "imagescaler-api",
        "--metrics-port",
        "5002",
    ]
    api = [
        "api.server",
        "--listen",
        API,
        "--processor",
        PROCESSOR,
        "--processor-ca",
        certs / "ca.pem",
        "--processor-cert",
        certs / "api.pem",
        "--processor-key",
        certs / "api-key.pem",
        "--jwks",
        RUN / "keys" / "jwks.json",
        "--tenants",
        RUN / "tenants.yaml",
        "--metrics-port",
        "5001",
    ]
    env = serverenv.server_env()  # as the container image runs them
    return [
        subprocess.Popen([sys.executable, "-m", *map(str, argv)], cwd=ROOT, env=env)
        for argv in (processor, api)
    ]


def wait_serving(target: str, children: list[subprocess.Popen[bytes]], limit: float = 30) -> None:
    """Poll the health service until SERVING (readiness, as Kubernetes probes do)."""
    deadline = time.monotonic() + limit
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                sys.exit("demo: a server exited during startup (see its log above)")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    sys.exit(f"demo: {target} did not become healthy")


def main() -> None:
    prepare()
    children = start()
    try:
        wait_serving(PROBE, children)
        wait_serving(API, children)
        print(
            run(
                "tools.client",
                SAMPLE,
                "-o",
                ROOT / "out.jpg",
                "--server",
                API,
                "--token-file",
                RUN / "token",
            )
        )
        print(
            f"Serving: API on {API} (metrics :5001), processor on {PROCESSOR} (mTLS).\n"
            f"Try: .venv/bin/imagescaler-client {SAMPLE.relative_to(ROOT)} -o out.jpg "
            f"--token-file .run/token\nCtrl-C stops both servers.",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(30)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    main()
