"""Result storage against a real GCS emulator on loopback; signatures checked independently.

The only test double is the IAM ``signBlob`` endpoint (Workload Identity has no key file to
sign with); it signs with a test key, like the real service would with the account's key.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import google.auth.credentials
import google.auth.iam
import google.oauth2.credentials
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage
from google.cloud import storage

from api import results, signing
from processor.errors import FailedPrecondition, Unavailable
from tools.signedurl import fetch_signed

SA_EMAIL = "results-signer@test-project.iam.gserviceaccount.com"
WI_EMAIL = "api-pod@test-project.iam.gserviceaccount.com"
WI_TOKEN = "ya29.workload-identity-test-token"


# --- the emulator: a real HTTP server on a free loopback port -----------------------------


class _Server(http.server.HTTPServer):
    def __init__(self, storage_: Storage) -> None:
        super().__init__(("127.0.0.1", 0), partial(_RecordingHandler, storage_))
        self.requests: list[tuple[str, str]] = []


class _RecordingHandler(RequestHandler):
    """The emulator's own handler; it only notes each request so tests can count uploads."""

    server: _Server

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        self.server.requests.append((self.command, self.path))


@dataclass
class Emulator:
    url: str
    server: _Server

    def uploads(self) -> list[str]:
        return [path for method, path in self.server.requests if path.startswith("/upload/")]


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    server = _Server(Storage(use_memory_fs=True))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield Emulator(f"http://127.0.0.1:{server.server_port}", server)
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def gcs(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> storage.Client:
    """A client of the emulator, which STORAGE_EMULATOR_HOST points at for this test."""
    monkeypatch.setenv(results.EMULATOR_ENV, emulator.url)
    monkeypatch.setenv(results.BUCKET_METADATA_ENV, "true")  # no stray threads from tests
    anonymous = google.auth.credentials.AnonymousCredentials()
    return storage.Client(project="test-project", credentials=anonymous)


@pytest.fixture
def bucket(gcs: storage.Client, request: pytest.FixtureRequest) -> storage.Bucket:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = "results-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    return gcs.create_bucket(name)


# --- a test service account: an RSA key and its JSON key file ------------------------------


@dataclass(frozen=True)
class ServiceAccount:
    key: rsa.RSAPrivateKey
    file: Path


@pytest.fixture(scope="module")
def service_account(tmp_path_factory: pytest.TempPathFactory) -> ServiceAccount:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    info = {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "test-key-1",
        "private_key": pem.decode(),
        "client_email": SA_EMAIL,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path = tmp_path_factory.mktemp("sa") / "key.json"
    path.write_text(json.dumps(info))
    return ServiceAccount(key, path)


def make_store(bucket: storage.Bucket, sa: ServiceAccount, **settings: Any) -> results.GcsStore:
    store = results.store_from_uri(
        f"gs://{bucket.name}/results/v1",
        results.StoreSettings(signing_key=str(sa.file), **settings),
    )
    assert isinstance(store, results.GcsStore)
    return store


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


# --- an independent V4 signature check -------------------------------------------------------


def _encode(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def verify_v4(url: str, public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """Rebuild the canonical request and string to sign from the URL; check the signature."""
    parts = urllib.parse.urlsplit(url)
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    signature = bytes.fromhex(params.pop("X-Goog-Signature"))
    assert params["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert params["X-Goog-SignedHeaders"] == "host"
    query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(params.items()))
    canonical = "\n".join(
        ["GET", parts.path, query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"]
    )
    _email, scope = params["X-Goog-Credential"].split("/", 1)
    assert scope.endswith("/auto/storage/goog4_request")
    to_sign = "\n".join(
        [
            "GOOG4-RSA-SHA256",
            params["X-Goog-Date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    public_key.verify(signature, to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())
    return params


# --- storing ----------------------------------------------------------------------------------


def test_put_uploads_the_result_under_tenant_and_content_hash(
    bucket: storage.Bucket, service_account: ServiceAccount
) -> None:
    data = b"\xff\xd8 a scaled jpeg"
    stored = make_store(bucket, service_account).put("acme", data, "image/jpeg", "jpg", soon())

    digest = hashlib.sha256(data).hexdigest()
    assert stored.object_name == f"results/v1/acme/{digest}.jpg"
    assert (stored.size, stored.content_type, stored.sha256) == (len(data), "image/jpeg", digest)
    blob = bucket.get_blob(stored.object_name)
    assert blob is not None
    assert (blob.content_type, blob.size) == ("image/jpeg", len(data))
    assert blob.cache_control == "private, max-age=900, immutable"
    assert blob.download_as_bytes() == data


def test_identical_result_is_stored_once(
    bucket: storage.Bucket, service_account: ServiceAccount, emulator: Emulator
) -> None:
    store = make_store(bucket, service_account)
    first = store.put("acme", b"same bytes", "image/png", "png", soon())
    generation = bucket.get_blob(first.object_name).generation
    uploads = len(emulator.uploads())

    second = store.put("acme", b"same bytes", "image/png", "png", soon())

    assert second.object_name == first.object_name
    assert len(emulator.uploads()) == uploads
    assert bucket.get_blob(first.object_name).generation == generation


def test_tenants_never_share_objects(
    bucket: storage.Bucket, service_account: ServiceAccount
) -> None:
    store = make_store(bucket, service_account)
    a = store.put("tenant-a", b"identical", "image/jpeg", "jpg", soon())
    b = store.put("tenant-b", b"identical", "image/jpeg", "jpg", soon())

    assert a.object_name != b.object_name
    names_a = [o.name for o in bucket.list_blobs(prefix="results/v1/tenant-a/")]
    names_b = [o.name for o in bucket.list_blobs(prefix="results/v1/tenant-b/")]
    assert (names_a, names_b) == ([a.object_name], [b.object_name])
    assert urllib.parse.urlsplit(a.url).path.endswith(a.object_name)


def test_names_that_would_leave_the_tenant_prefix_are_refused(
    bucket: storage.Bucket, service_account: ServiceAccount
) -> None:
    store = make_store(bucket, service_account)
    for tenant, ext in [("../other", "jpg"), ("Acme", "jpg"), ("", "jpg"), ("acme", "j/pg")]:
        with pytest.raises(ValueError):
            store.put(tenant, b"x", "image/jpeg", ext, soon())
    assert list(bucket.list_blobs()) == []


def test_object_that_does_not_hold_its_hash_is_never_handed_out(
    bucket: storage.Bucket, service_account: ServiceAccount
) -> None:
    data = b"the real result"
    name = f"results/v1/acme/{hashlib.sha256(data).hexdigest()}.jpg"
    bucket.blob(name).upload_from_string(b"something else", content_type="image/jpeg")

    with pytest.raises(Unavailable, match="inconsistent"):
        make_store(bucket, service_account).put("acme", data, "image/jpeg", "jpg", soon())


# --- signed URLs ------------------------------------------------------------------------------


def test_signed_url_carries_a_valid_v4_signature(
    bucket: storage.Bucket, service_account: ServiceAccount
) -> None:
    store = make_store(bucket, service_account)
    stored = store.put("acme", b"signed", "image/jpeg", "jpg", soon())
    other = store.put("other", b"signed", "image/jpeg", "jpg", soon())
    public = service_account.key.public_key()

    params = verify_v4(stored.url, public)

    assert params["X-Goog-Credential"].startswith(SA_EMAIL + "/")
    forged = stored.url.replace(stored.object_name, other.object_name)
    with pytest.raises(InvalidSignature):
        verify_v4(forged, public)


def test_signed_url_expires_after_the_configured_lifetime(
    bucket: storage.Bucket, service_account: ServiceAccount
) -> None:
    before = time.time()
    stored = make_store(bucket, service_account, url_lifetime=120).put(
        "acme", b"short-lived", "image/jpeg", "jpg", soon()
    )

    params = verify_v4(stored.url, service_account.key.public_key())
    assert params["X-Goog-Expires"] == "120"
    assert signing.expires_unix(stored.url) == stored.expires_unix
    assert before + 119 <= stored.expires_unix <= time.time() + 120


def test_anyone_can_fetch_the_result_through_the_url(
    bucket: storage.Bucket, service_account: ServiceAccount, sample_jpeg: bytes
) -> None:
    stored = make_store(bucket, service_account).put(
        "acme", sample_jpeg, "image/jpeg", "jpg", soon()
    )

    assert stored.url.startswith(bucket.client.api_endpoint + "/")
    got = fetch_signed(stored.url, stored.size, stored.content_type, 5.0, stored.sha256)
    assert got == sample_jpeg


@pytest.mark.parametrize("seconds", ["0", "-5", "604801", "1.5", "soon"])
def test_url_lifetime_outside_gcs_limits_is_refused(seconds: str) -> None:
    with pytest.raises(ValueError):
        signing.lifetime(seconds)


def test_url_lifetime_limits() -> None:
    assert signing.lifetime("604800") == 604800
    assert results.StoreSettings().url_lifetime == 900
    with pytest.raises(ValueError, match="7 days"):
        results.StoreSettings(url_lifetime=604801)


# --- configuration ----------------------------------------------------------------------------


def test_storage_is_off_unless_configured() -> None:
    store = results.store_from_uri(None)
    with pytest.raises(FailedPrecondition, match="not configured"):
        store.put("acme", b"x", "image/jpeg", "jpg", soon())


@pytest.mark.parametrize("uri", ["s3://bucket/x", "gs://", "gs://Upper/x", "bucket/prefix"])
def test_result_store_uri_must_be_gs(uri: str) -> None:
    with pytest.raises(ValueError, match="gs://BUCKET/PREFIX"):
        results.store_from_uri(uri)


def test_result_store_uri_gives_bucket_and_prefix(
    gcs: storage.Client, service_account: ServiceAccount
) -> None:
    settings = results.StoreSettings(signing_key=str(service_account.file))
    store = results.store_from_uri("gs://my-bucket/a/b/", settings)
    assert isinstance(store, results.GcsStore)
    assert (store.bucket.name, store.prefix) == ("my-bucket", "a/b")
    assert store.object_name("acme", "ab12", "png") == "a/b/acme/ab12.png"


# --- storage trouble --------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_storage_down_gives_unavailable_after_bounded_retries(
    service_account: ServiceAccount,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(results.EMULATOR_ENV, f"http://127.0.0.1:{_closed_port()}")
    settings = results.StoreSettings(signing_key=str(service_account.file), backoff=0.01)
    store = results.store_from_uri("gs://results/p", settings)
    caplog.set_level(logging.WARNING, logger="api.results")

    started = time.monotonic()
    with pytest.raises(Unavailable, match="result storage unavailable"):
        store.put("acme", b"x", "image/jpeg", "jpg", started + 5)

    assert time.monotonic() - started < 5
    failures = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert len(failures) == settings.max_attempts


def test_storage_that_never_answers_gives_unavailable_within_the_deadline(
    service_account: ServiceAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing the call started outlives it: the storage library's background bucket look-up
    would still be waiting on this socket, with 120 s of its own retries ahead of it."""
    monkeypatch.delenv(results.BUCKET_METADATA_ENV, raising=False)
    with socket.socket() as black_hole:  # accepts connections (backlog), never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        monkeypatch.setenv(results.EMULATOR_ENV, f"http://127.0.0.1:{black_hole.getsockname()[1]}")
        settings = results.StoreSettings(signing_key=str(service_account.file))
        store = results.store_from_uri("gs://results/p", settings)
        threads = set(threading.enumerate())

        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.put("acme", b"x", "image/jpeg", "jpg", started + 0.6)
        elapsed = time.monotonic() - started
        left_running = set(threading.enumerate()) - threads

    assert 0.5 < elapsed < 2.0
    assert not left_running


def test_deadline_already_spent_gives_unavailable_without_storing(
    bucket: storage.Bucket, service_account: ServiceAccount, emulator: Emulator
) -> None:
    requests_before = len(emulator.server.requests)
    with pytest.raises(Unavailable):
        make_store(bucket, service_account).put("acme", b"x", "image/jpeg", "jpg", soon(-1))
    assert len(emulator.server.requests) == requests_before


# --- Workload Identity: signing through a stubbed IAM signBlob endpoint -----------------------


@dataclass
class IamStub:
    """Answers ``signBlob`` like IAM: the payload signed (RSA PKCS1v15 SHA-256) with ``key``."""

    key: rsa.RSAPrivateKey
    status: int = 200
    calls: list[tuple[str, str]] = field(default_factory=list)


def _iam_handler(stub: IamStub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.calls.append((self.path, self.headers.get("Authorization", "")))
            payload = base64.b64decode(body["payload"])
            signed = stub.key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
            answer = {"keyId": "k1", "signedBlob": base64.b64encode(signed).decode()}
            self._reply(answer if stub.status == 200 else {"error": {"code": stub.status}})

        def _reply(self, answer: dict[str, Any]) -> None:
            raw = json.dumps(answer).encode()
            self.send_response(stub.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def iam(monkeypatch: pytest.MonkeyPatch, service_account: ServiceAccount) -> Iterator[IamStub]:
    """The IAM credentials API on loopback: google.auth's signBlob address points here."""
    stub = IamStub(service_account.key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _iam_handler(stub))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}/v1/projects/-/serviceAccounts/{{}}:signBlob"
    monkeypatch.setattr(google.auth.iam, "_IAM_SIGN_ENDPOINT", endpoint)
    yield stub
    server.shutdown()
    server.server_close()
    thread.join()


def wi_store(bucket: storage.Bucket, **settings: Any) -> results.ResultStore:
    """No key file: the pod's token (a fixed one here) and IAM signBlob."""
    credentials = google.oauth2.credentials.Credentials(token=WI_TOKEN)
    return results.store_from_uri(
        f"gs://{bucket.name}/wi",
        results.StoreSettings(signing_email=WI_EMAIL, backoff=0.01, **settings),
        credentials=credentials,
    )


def test_workload_identity_signs_through_iam_signblob(
    bucket: storage.Bucket, iam: IamStub, service_account: ServiceAccount
) -> None:
    stored = wi_store(bucket).put("acme", b"wi result", "image/webp", "webp", soon())

    params = verify_v4(stored.url, service_account.key.public_key())
    assert params["X-Goog-Credential"].startswith(WI_EMAIL + "/")
    assert iam.calls == [
        (f"/v1/projects/-/serviceAccounts/{WI_EMAIL}:signBlob", f"Bearer {WI_TOKEN}")
    ]
    assert fetch_signed(stored.url, stored.size, "image/webp", 5.0) == b"wi result"


def test_credentials_naming_no_account_give_unavailable(
    bucket: storage.Bucket, iam: IamStub
) -> None:
    """User credentials (no service account) and no --result-signing-email: the signer
    cannot tell whose key to use. That was a ValueError, UNKNOWN to the client and past
    --result-fallback-inline; it is the storage being unavailable."""
    credentials = google.oauth2.credentials.Credentials(token=WI_TOKEN)
    store = results.store_from_uri(
        f"gs://{bucket.name}/wi", results.StoreSettings(backoff=0.01), credentials=credentials
    )
    with pytest.raises(Unavailable, match="signing"):
        store.put("acme", b"x", "image/webp", "webp", soon())
    assert iam.calls == []


def test_iam_refusing_to_sign_gives_unavailable(bucket: storage.Bucket, iam: IamStub) -> None:
    iam.status = 403
    with pytest.raises(Unavailable, match="signing"):
        wi_store(bucket, max_attempts=2).put("acme", b"x", "image/webp", "webp", soon())
    assert len(iam.calls) == 2
