"""Download a result through its signed URL, as any party without credentials would.

The URL comes from a server's reply, so it is treated as untrusted: http(s) only, no
redirects, no credentials sent, and the answer must match the size, type (and digest) the
reply announced before any byte is handed back. Errors never repeat the URL: its query
string is a bearer credential until it expires.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from typing import IO, NoReturn

_CHUNK = 64 * 1024


class FetchError(Exception):
    """The signed URL did not give back the announced result."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Signed GETs are answered directly; a redirect would be a surprise, not a result."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        raise FetchError(f"signed URL answered with a redirect (HTTP {code})")


def fetch_signed(
    url: str,
    expected_size: int,
    expected_type: str,
    timeout: float,
    expected_sha256: str | None = None,
) -> bytes:
    """The object's bytes, checked against status 200, content type, size and digest."""
    host = _checked_host(url)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
            _check_headers(resp.status, resp.headers, expected_size, expected_type)
            data = _read_at_most(resp, expected_size + 1, deadline)
    except urllib.error.HTTPError as exc:
        _refused(exc)
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"cannot download from {host}: {_reason(exc)}") from exc
    _check_body(data, expected_size, expected_sha256)
    return data


def _checked_host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise FetchError("not an http(s) URL")
    return parts.netloc


def _check_headers(status: int, headers: Message, size: int, content_type: str) -> None:
    if status != 200:
        raise FetchError(f"signed URL answered HTTP {status}, expected 200")
    got_type = headers.get_content_type()
    if got_type != content_type.split(";")[0].strip().lower():
        raise FetchError(f"content type is {got_type!r}, expected {content_type!r}")
    length = headers.get("Content-Length")
    if length is not None and length.strip() != str(size):
        raise FetchError(f"server announced {length} bytes, expected {size}")


def _read_at_most(resp: IO[bytes], limit: int, deadline: float) -> bytes:
    """Read up to ``limit`` bytes, giving up when the whole download outlasts its timeout."""
    chunks: list[bytes] = []
    received = 0
    while received < limit:
        if time.monotonic() > deadline:
            raise FetchError("download took longer than its timeout")
        chunk = resp.read(min(_CHUNK, limit - received))
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def _check_body(data: bytes, size: int, sha256: str | None) -> None:
    if len(data) > size:
        raise FetchError(f"received more than the {size} bytes expected")
    if len(data) < size:
        raise FetchError(f"received {len(data)} of {size} bytes expected")
    if sha256 and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise FetchError("downloaded bytes do not match the announced sha256")


def _refused(exc: urllib.error.HTTPError) -> NoReturn:
    """Name the status and, for GCS XML errors, their code (e.g. ExpiredToken)."""
    body = exc.read(2048).decode("utf-8", "replace")
    code = re.search(r"<Code>([A-Za-z]+)</Code>", body)
    detail = f" ({code.group(1)})" if code else ""
    raise FetchError(f"signed URL answered HTTP {exc.code}{detail}") from exc


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, socket.timeout | TimeoutError):
        return "timed out"
    return str(reason)
