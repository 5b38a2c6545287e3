"""Where results are kept for signed-URL delivery: nowhere (default) or Google Cloud Storage.

Object names are ``PREFIX/TENANT/<sha256 of the result bytes>.<ext>``:

- tenants never share a name, so one tenant's objects (or their existence) never show up
  under another's prefix, even for identical results;
- identical results of one tenant are stored once (the name is the content);
- names are not derived from the *input*: the hash is of the output, which depends on the
  server's settings as well. A plain hash is enough because the name is not a secret: the
  bucket is private and reading needs a signed URL, whose signature covers the exact name.
  Should names ever leak to someone who can also read the bucket without a signed URL (a
  public bucket, broad IAM grants, names in shared logs), and outputs be guessable, a keyed
  hash (HMAC with a server secret) would be needed to stop existence probing; not the case here.

Uploads are whole or absent: GCS makes an object visible only when its upload completes
(a single-request multipart upload for results up to 8 MiB), checked with CRC32C. The
uploading identity needs ``storage.objects.get`` and ``storage.objects.create`` on the
bucket (``roles/storage.objectUser``, or ``objectCreator`` plus ``objectViewer``); signing
roles are in :mod:`api.signing`.

Storage trouble is retried with backoff inside the caller's deadline and then raised as
:class:`~processor.errors.Unavailable`; falling back to inline delivery is the caller's choice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import google.api_core.exceptions as api_errors
import google.auth.credentials
import google.auth.exceptions
import requests
from google.cloud import storage
from google.cloud.storage import exceptions as storage_errors

from api import signing
from processor.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# google-cloud-storage (3.17) starts a background thread on a client's first object call per
# bucket that GETs the bucket's metadata for OpenTelemetry span attributes, tracing on or off:
# a request outside the caller's deadline, with the library's own 120 s of retries while
# storage is down, needing storage.buckets.get, which the uploading identity does not hold.
BUCKET_METADATA_ENV = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as auth.tenants.TENANT_ID_PATTERN
_EXT = re.compile(r"[a-z0-9]{1,8}")
_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    api_errors.TooManyRequests,
    api_errors.ServerError,
    storage_errors.DataCorruption,
    storage_errors.InvalidResponse,
    google.auth.exceptions.TransportError,
    google.auth.exceptions.RefreshError,
)
_PERMANENT = (api_errors.GoogleAPICallError, google.auth.exceptions.GoogleAuthError)


@dataclass(frozen=True)
class Stored:
    url: str
    expires_unix: int
    size: int
    content_type: str
    sha256: str
    object_name: str


class ResultStore(Protocol):
    def put(self, tenant: str, data: bytes, content_type: str, ext: str, deadline: float) -> Stored:
        """Store ``data`` for ``tenant`` before ``deadline`` (``time.monotonic()``)."""
        ...


class NoStore:
    """Result storage switched off: any attempt to store is refused."""

    def put(self, tenant: str, data: bytes, content_type: str, ext: str, deadline: float) -> Stored:
        raise FailedPrecondition("result storage is not configured")


@dataclass(frozen=True)
class StoreSettings:
    """How results are kept and signed; validated when built."""

    url_lifetime: int = signing.DEFAULT_LIFETIME  # seconds a signed URL works
    signing_key: str | None = None  # service-account JSON key; None: IAM signBlob (WI)
    signing_email: str | None = None  # the signing service account (IAM signBlob only)
    project: str | None = None
    attempt_timeout: float = 10.0  # per storage request, further capped by the deadline
    max_attempts: int = 4  # per step (look up, upload, sign)
    backoff: float = 0.1  # first pause between attempts; doubles, with jitter

    def __post_init__(self) -> None:
        signing.lifetime(self.url_lifetime)
        if self.attempt_timeout <= 0 or self.max_attempts < 1 or self.backoff < 0:
            raise ValueError("result store: attempt timeout, attempts and backoff must be > 0")


class GcsStore:
    """Results in one GCS bucket under a prefix, delivered by V4 signed GET URLs."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        settings: StoreSettings,
        client: storage.Client,
        signer: signing.UrlSigner,
    ) -> None:
        self.bucket = client.bucket(bucket)
        self.prefix = prefix.strip("/")
        self.settings = settings
        self.client = client
        self.signer = signer

    def put(self, tenant: str, data: bytes, content_type: str, ext: str, deadline: float) -> Stored:
        digest = hashlib.sha256(data).hexdigest()
        blob = self.bucket.blob(self.object_name(tenant, digest, ext))
        present = partial(self._present, blob, data, digest)
        if not self._attempts("look-up", present, deadline):
            upload = partial(self._upload, blob, data, content_type, digest)
            self._attempts("upload", upload, deadline)
        sign = partial(self._sign, blob)
        signed = self._attempts("signing", sign, deadline)
        return Stored(signed.url, signed.expires_unix, len(data), content_type, digest, blob.name)

    def object_name(self, tenant: str, digest: str, ext: str) -> str:
        """``PREFIX/TENANT/DIGEST.EXT``; tenant and extension are checked to stay one segment."""
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"not a tenant id: {tenant!r}")
        if not _EXT.fullmatch(ext):
            raise ValueError(f"not a file extension: {ext!r}")
        name = f"{tenant}/{digest}.{ext}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _present(self, blob: storage.Blob, data: bytes, digest: str, timeout: float) -> bool:
        """Whether the object is already there with these bytes (then no upload is needed)."""
        found = self.bucket.get_blob(blob.name, timeout=_timeouts(timeout), retry=None)
        if found is None:
            return False
        if found.size != len(data) or (found.metadata or {}).get("sha256") != digest:
            log.error("stored object %s does not hold what its name says", blob.name)
            raise Unavailable("result storage unavailable; stored object is inconsistent")
        return True

    def _upload(
        self, blob: storage.Blob, data: bytes, content_type: str, digest: str, timeout: float
    ) -> None:
        """One request, only if absent: a concurrent identical upload (412) is success."""
        blob.cache_control = f"private, max-age={self.settings.url_lifetime}, immutable"
        blob.metadata = {"sha256": digest}
        try:
            blob.upload_from_string(
                data,
                content_type=content_type,
                if_generation_match=0,
                checksum="crc32c",
                timeout=_timeouts(timeout),
                retry=None,
            )
        except api_errors.PreconditionFailed:
            log.debug("object %s appeared meanwhile; keeping it", blob.name)

    def _sign(self, blob: storage.Blob, timeout: float) -> signing.SignedUrl:
        """A GET URL on the client's endpoint (the emulator's, when one is configured)."""
        endpoint = self.client.api_endpoint
        return self.signer.sign(blob, endpoint, self.settings.url_lifetime, timeout)

    def _attempts(self, what: str, call: Callable[[float], T], deadline: float) -> T:
        """``call(timeout)`` with bounded retries and backoff, all before ``deadline``."""
        pause = self.settings.backoff
        for attempt in range(1, self.settings.max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return call(min(remaining, self.settings.attempt_timeout))
            except _TRANSIENT as exc:
                log.warning("result storage %s, attempt %d failed: %r", what, attempt, exc)
            except _PERMANENT as exc:
                log.error("result storage %s refused: %r", what, exc)
                raise Unavailable(f"result storage unavailable; {what} refused") from exc
            if attempt < self.settings.max_attempts:
                pause = _sleep_within(pause, deadline)
        raise Unavailable(f"result storage unavailable; {what} failed, try again later")


def _sleep_within(pause: float, deadline: float) -> float:
    """Back off (with jitter) without passing the deadline; returns the next pause."""
    time.sleep(max(0.0, min(pause * random.uniform(0.5, 1.0), deadline - time.monotonic())))
    return pause * 2


def _timeouts(total: float) -> tuple[float, float]:
    """(connect, read) timeouts for one storage request."""
    return (min(total, 3.0), total)


def store_from_uri(
    uri: str | None,
    settings: StoreSettings | None = None,
    credentials: google.auth.credentials.Credentials | None = None,
) -> ResultStore:
    """``None`` (off), or ``gs://BUCKET[/PREFIX]``; anything else is a configuration error."""
    if uri is None or not uri.strip():
        return NoStore()
    bucket, prefix = parse_gs_uri(uri)
    settings = settings or StoreSettings()
    signer = signing.signer_from_settings(settings.signing_key, settings.signing_email, credentials)
    return GcsStore(bucket, prefix, settings, _client(settings, credentials, signer), signer)


def parse_gs_uri(uri: str) -> tuple[str, str]:
    scheme, _, rest = uri.strip().partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "gs" or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]", bucket):
        raise ValueError(f"--result-store: expected gs://BUCKET/PREFIX, got {uri!r}")
    return bucket, prefix.strip("/")


def _client(
    settings: StoreSettings,
    credentials: google.auth.credentials.Credentials | None,
    signer: signing.UrlSigner,
) -> storage.Client:
    """Anonymous against the emulator (real credentials would try Google's token endpoint);
    without the library's background bucket look-ups (:data:`BUCKET_METADATA_ENV`) unless the
    operator asked for them."""
    os.environ.setdefault(BUCKET_METADATA_ENV, "true")
    if os.environ.get(EMULATOR_ENV):
        anonymous = google.auth.credentials.AnonymousCredentials()
        return storage.Client(project=settings.project or "emulator", credentials=anonymous)
    credentials = getattr(signer, "credentials", credentials)  # the signing identity uploads too
    return storage.Client(project=settings.project, credentials=credentials)
