"""V4 signed GET URLs for stored results, signed with a key file or through IAM ``signBlob``.

Two ways to hold the signing identity:

- **Key file** (``StoreSettings.signing_key``): a service-account JSON key; signing is local.
  That account needs ``roles/storage.objectViewer`` on the bucket (a signed URL acts with the
  signer's permissions).
- **Workload Identity** (no key file): the pod's Google service account signs through the IAM
  credentials ``signBlob`` call with its own access token. It needs
  ``roles/iam.serviceAccountTokenCreator`` on *itself* (``iam.serviceAccounts.signBlob``) and
  ``roles/storage.objectViewer`` on the bucket. ``signing_email`` names it; left empty, the
  metadata server is asked.

We sign through :class:`google.auth.iam.Signer` rather than passing ``access_token`` to
``generate_signed_url``: the latter retries for up to 120 s with its own timeouts, which no RPC
deadline can bound, while here every IAM request gets the time the caller has left.
"""

from __future__ import annotations

import datetime
import functools
import urllib.parse
from dataclasses import dataclass
from typing import Protocol

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.auth import iam
from google.cloud.storage import Blob
from google.oauth2 import service_account

MAX_LIFETIME = 604_800  # seconds: GCS refuses V4 signatures valid for longer (7 days)
DEFAULT_LIFETIME = 900
_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
_TOKEN_URI = "https://oauth2.googleapis.com/token"  # never called: signing only


def lifetime(value: str | int) -> int:
    """Validate a signed-URL lifetime in whole seconds (1 s to 7 days)."""
    seconds = int(value)
    if str(value).strip() != str(seconds) or not 1 <= seconds <= MAX_LIFETIME:
        raise ValueError(
            f"signed-URL lifetime: whole seconds from 1 to {MAX_LIFETIME} (7 days), got {value!r}"
        )
    return seconds


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expires_unix: int  # X-Goog-Date + X-Goog-Expires, exactly as signed


class UrlSigner(Protocol):
    """Signs a GET URL for one object; ``timeout`` bounds any network call it makes."""

    def sign(self, blob: Blob, endpoint: str, lifetime: int, timeout: float) -> SignedUrl: ...


class KeyFileSigner:
    """Signs locally with a service-account key file (read once, at startup)."""

    def __init__(self, key_file: str) -> None:
        self.credentials = service_account.Credentials.from_service_account_file(
            key_file, scopes=_SCOPES
        )

    def sign(self, blob: Blob, endpoint: str, lifetime: int, timeout: float) -> SignedUrl:
        return _signed(blob, endpoint, lifetime, self.credentials)


class IamSigner:
    """Signs through IAM ``signBlob`` with ``credentials``' access token (Workload Identity)."""

    def __init__(
        self,
        credentials: google.auth.credentials.Credentials,
        email: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.credentials = credentials
        self.email = email
        self.session = session or requests.Session()

    def sign(self, blob: Blob, endpoint: str, lifetime: int, timeout: float) -> SignedUrl:
        request = google.auth.transport.requests.Request(self.session)
        bounded = functools.partial(request, timeout=timeout)
        email = self._email(bounded)
        signer = iam.Signer(bounded, self.credentials, email)
        signing = service_account.Credentials(signer, email, _TOKEN_URI)
        return _signed(blob, endpoint, lifetime, signing)

    def _email(self, request: functools.partial[object]) -> str:
        """The configured account, else the one the metadata server names after a refresh."""
        if self.email:
            return self.email
        if not self.credentials.valid:
            self.credentials.refresh(request)
        email = getattr(self.credentials, "service_account_email", None)
        if not email or email == "default":  # a GoogleAuthError: results.py's "permanent"
            raise google.auth.exceptions.GoogleAuthError(
                "cannot tell which service account signs: set --result-signing-email"
            )
        self.email = email
        return email


def signer_from_settings(
    key_file: str | None,
    email: str | None,
    credentials: google.auth.credentials.Credentials | None = None,
) -> UrlSigner:
    """A key-file signer when a key file is given, else IAM signBlob with ``credentials``/ADC."""
    if key_file:
        return KeyFileSigner(key_file)
    if credentials is None:
        credentials, _ = google.auth.default(scopes=_SCOPES)
    return IamSigner(credentials, email)


def _signed(
    blob: Blob, endpoint: str, lifetime: int, credentials: service_account.Credentials
) -> SignedUrl:
    url = blob.generate_signed_url(
        version="v4",
        expiration=datetime.timedelta(seconds=lifetime),
        method="GET",
        credentials=credentials,
        api_access_endpoint=endpoint,
    )
    return SignedUrl(url, expires_unix(url))


def expires_unix(url: str) -> int:
    """When a V4 URL stops working, read from its own X-Goog-Date and X-Goog-Expires."""
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    signed_at = datetime.datetime.strptime(query["X-Goog-Date"], "%Y%m%dT%H%M%SZ")
    start = int(signed_at.replace(tzinfo=datetime.UTC).timestamp())
    return start + int(query["X-Goog-Expires"])
