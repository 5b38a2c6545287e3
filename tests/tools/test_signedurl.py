"""fetch_signed against a real HTTP server on loopback that answers as told, right or wrong.

Retrieval from the GCS emulator through a real signed URL is in tests/api/test_results.py.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tools.signedurl import FetchError, fetch_signed

BODY = b"\x89PNG result bytes"


@dataclass
class Answer:
    status: int = 200
    content_type: str = "image/png"
    body: bytes = BODY
    headers: dict[str, str] = field(default_factory=dict)
    length: bool = True  # send Content-Length


@dataclass
class Origin:
    port: int
    answer: Answer
    seen_headers: list[dict[str, str]]

    def url(self, path: str = "/bucket/acme/abc.png?X-Goog-Signature=00") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(origin: Origin) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            origin.seen_headers.append(dict(self.headers))
            answer = origin.answer
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            if answer.length:
                self.send_header("Content-Length", str(len(answer.body)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def origin() -> Iterator[Origin]:
    state = Origin(0, Answer(), [])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_port
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def test_returns_the_announced_bytes_and_sends_no_credentials(origin: Origin) -> None:
    sha = hashlib.sha256(BODY).hexdigest()
    assert fetch_signed(origin.url(), len(BODY), "image/png", 5.0, sha) == BODY
    sent = {name.lower() for name in origin.seen_headers[0]}
    assert not sent & {"authorization", "cookie"}


def test_content_type_parameters_are_tolerated(origin: Origin) -> None:
    origin.answer.content_type = "image/png; charset=binary"
    assert fetch_signed(origin.url(), len(BODY), "image/png", 5.0) == BODY


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(status=403, body=b"<Error><Code>ExpiredToken</Code></Error>"), "403 \\(Expired"),
        (Answer(status=404, body=b"not here"), "HTTP 404"),
        (Answer(status=204, body=b""), "HTTP 204"),
        (Answer(content_type="text/html"), "content type"),
        (Answer(body=BODY + b"more"), "announced"),
        (Answer(body=BODY + b"more", length=False), "more than"),
        (Answer(body=BODY[:5], length=False), "5 of"),
    ],
)
def test_wrong_answers_are_refused(origin: Origin, answer: Answer, message: str) -> None:
    origin.answer = answer
    with pytest.raises(FetchError, match=message):
        fetch_signed(origin.url(), len(BODY), "image/png", 5.0)


def test_bytes_that_do_not_match_the_digest_are_refused(origin: Origin) -> None:
    with pytest.raises(FetchError, match="sha256"):
        fetch_signed(origin.url(), len(BODY), "image/png", 5.0, "00" * 32)


def test_redirects_are_not_followed(origin: Origin) -> None:
    origin.answer = Answer(status=302, headers={"Location": origin.url("/elsewhere")})
    with pytest.raises(FetchError, match="redirect"):
        fetch_signed(origin.url(), len(BODY), "image/png", 5.0)
    assert len(origin.seen_headers) == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http:///nohost"])
def test_only_http_urls_are_fetched(url: str) -> None:
    with pytest.raises(FetchError, match="http"):
        fetch_signed(url, 1, "image/png", 1.0)


def test_errors_do_not_repeat_the_signature(origin: Origin) -> None:
    origin.answer = Answer(status=403)
    with pytest.raises(FetchError) as caught:
        fetch_signed(origin.url("/b/o?X-Goog-Signature=secretsig"), 1, "image/png", 5.0)
    assert "secretsig" not in str(caught.value)


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/b/o"
        with pytest.raises(FetchError, match="timed out"):
            fetch_signed(url, 1, "image/png", 0.3)
