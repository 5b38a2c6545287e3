"""Fetch an image from a caller-supplied URL without letting the caller reach our network.

The caller chooses the URL, so every hop is treated as hostile (server-side request forgery):

* only ``http``/``https``; no userinfo, control or space characters, or URLs over 2,048 chars;
* the host is resolved once (through an injectable resolver, bounded by the deadline) and
  refused if *any* address is not public: loopback, private, CGNAT, link-local/metadata,
  multicast, reserved, documentation, unspecified/broadcast, ULA, site-local, and IPv4 hidden
  in IPv6 (mapped ``::ffff:a.b.c.d``, compatible ``::a.b.c.d``, NAT64, 6to4) unless inside
  ``FetchPolicy.allow_cidrs``. Refusing on any bad address (rather than using the good ones)
  keeps a name that mixes public and internal addresses from ever being half-trusted;
* numeric hosts in legacy forms (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``)
  are parsed here as the C library would and checked as addresses, never sent to DNS;
* the connection goes to the exact address that was checked (no second lookup, so no DNS
  rebinding window); TLS is verified against the original host name; proxies from the
  environment are never used (``http.client`` has no proxy support);
* redirects (301, 302, 303, 307, 308) are re-validated hop by hop, at most ``max_redirects``;
* ports outside ``allowed_ports`` are refused unless every address is inside ``allow_cidrs``
  (operators allow a range for on-prem sources, often on odd ports; tests use loopback);
* the body is streamed under a byte cap, compression is neither asked for nor accepted, and a
  content type that is clearly not an image is refused before the body is read;
* one deadline, ``min(policy.total_timeout, timeout)``, bounds resolution, connects, every
  socket read (so a one-byte-per-second origin is cut at the deadline) and all redirects;
* a fetch for a gRPC call stops as soon as the call ends (cancelled, connection lost): its
  sockets are shut down and a waiting resolution is woken, so it frees the tenant's slot.

Errors (from :mod:`processor.errors`; messages never name internal addresses):

* ``InvalidInput``: bad URL, scheme, userinfo, port, blocked address or name, compressed body
  (the request itself is unacceptable; retrying will not help);
* ``FailedPrecondition``: the origin answered but refuses or sends no usable image: 4xx other
  than 408/429, non-image content type, an empty body, too many redirects, bad TLS certificate
  or handshake, malformed HTTP (including conflicting Content-Length headers);
* ``Unavailable``: DNS failure, connection refused/reset, truncated body, 5xx, 408, 429
  (transient: the origin may work later);
* ``TooLarge``: the body exceeds ``max_bytes`` (declared or while streaming), or the response
  as a whole (interim responses, headers, chunk framing, trailers) exceeds twice that;
* ``DeadlineExceeded``: a connect or read timeout, or the total deadline passed;
* ``Cancelled`` (or ``DeadlineExceeded``, by :func:`processor.errors.check_caller`): the call
  ended while its image was being fetched.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import ipaddress
import queue
import re
import socket
import ssl
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urljoin, urlsplit

from processor.errors import (
    Caller,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    ServiceError,
    TooLarge,
    Unavailable,
    check_caller,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
BLOCKED_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog"})
GENERIC_BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
_READ_CHUNK = 64 * 1024
FETCHING = "waited for its URL source"  # check_caller: "... cancelled while it waited for ..."

# Explicit lists, because ipaddress.is_global varies across Python patch releases and calls
# multicast, ::a.b.c.d and 64:ff9b::/96 "global" in 3.11.
_BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
    )
)
_GLOBAL_V6 = ipaddress.IPv6Network("2000::/3")  # the only IPv6 global unicast space
_BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "2001::/23",  # IETF protocol assignments, incl. Teredo
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")

_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_PORT = re.compile(r"[0-9]{1,5}")
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_QUERY_SAFE = _PATH_SAFE + "?"


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for URL sources; built once from the API settings."""

    max_bytes: int = 32 * 1024 * 1024
    connect_timeout: float = 3.0
    read_timeout: float = 10.0  # per socket read
    total_timeout: float = 20.0  # whole fetch incl. redirects; also bounded by fetch(timeout)
    max_redirects: int = 3
    allowed_ports: frozenset[int] = frozenset({80, 443})  # not enforced inside allow_cidrs
    allow_cidrs: tuple[IPNetwork, ...] = ()  # allowed despite the private/loopback block
    user_agent: str = "imagescaler/0.1"


@dataclass(frozen=True)
class Fetched:
    """A fetched body; ``final_url`` has no query or fragment (they often carry secrets)."""

    data: bytes
    final_url: str
    content_type: str  # media type without parameters, lower case; "" when the origin sent none
    elapsed: float


@dataclass(frozen=True)
class SourceURL:
    """A URL that passed the syntax checks; ``host`` is ASCII, lower case, without brackets."""

    scheme: str
    host: str
    port: int
    target: str  # request target: percent-encoded path plus query
    literal: IPAddress | None  # set when the host is an IP address in any notation

    @property
    def redacted(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.target.split('?', 1)[0]}"


def parse_cidrs(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse operator CIDRs strictly: host bits set (``10.1.2.3/8``) is a typo, not a range."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"bad CIDR {text!r}: {exc}") from None
    return tuple(networks)


def system_resolver(host: str, port: int) -> list[str]:
    """The default resolver: the system's getaddrinfo, TCP addresses, duplicates removed."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# --- URL syntax -------------------------------------------------------------------------


def parse_source_url(url: str) -> SourceURL:
    """Check a URL's syntax (no network); raise InvalidInput with a safe message."""
    _check_characters(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a bracketed host that is not IPv6
        raise InvalidInput("malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput("URL scheme not allowed (only http and https)")
    netloc = parts.netloc
    if "@" in netloc or "\\" in netloc:
        raise InvalidInput("URL userinfo (user@host) not allowed")
    host_text, port_text = _split_netloc(netloc)
    host, literal = _parse_host(host_text)
    return SourceURL(
        scheme=parts.scheme,
        host=host,
        port=_parse_port(port_text, parts.scheme),
        target=_request_target(parts.path, parts.query),
        literal=literal,
    )


def _check_characters(url: str) -> None:
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"URL longer than {MAX_URL_LENGTH} characters")
    # urlsplit silently drops tabs and newlines, so look before it does.
    if any(unicodedata.category(ch)[0] in "CZ" for ch in url):
        raise InvalidInput("URL contains control, format or whitespace characters")


def _split_netloc(netloc: str) -> tuple[str, str]:
    if netloc.startswith("["):
        inner, bracket, rest = netloc[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidInput("malformed IPv6 host in URL")
        return f"[{inner}]", rest[1:]
    host, _, port = netloc.partition(":")
    return host, port


def _parse_port(text: str, scheme: str) -> int:
    if not text:
        return 443 if scheme == "https" else 80
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise InvalidInput("malformed port in URL")
    return int(text)


def _parse_host(text: str) -> tuple[str, IPAddress | None]:
    """Return the normalized host and, for IP literals in any notation, the address."""
    if text.startswith("["):
        return _parse_ipv6_literal(text[1:-1])
    host = _ascii_host(text).lower()
    host = host[:-1] if host.endswith(".") else host
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(lb) for lb in labels):
        raise InvalidInput("malformed host in URL")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return host, _parse_numeric_ipv4(host)
    return host, None


def _parse_ipv6_literal(inner: str) -> tuple[str, IPAddress]:
    if "%" in inner:
        raise InvalidInput("IPv6 zone identifiers not allowed in URL")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        raise InvalidInput("malformed IPv6 host in URL") from None
    return str(address), address


def _ascii_host(text: str) -> str:
    """IDNA-encode non-ASCII hosts (NFKC folds fullwidth digits and dots to ASCII)."""
    if text.isascii():
        return text
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidInput("malformed internationalized host in URL") from None


def _parse_numeric_ipv4(host: str) -> ipaddress.IPv4Address:
    """Parse ``127.1``, ``0x7f000001``, ``0177.0.0.1``... as inet_aton does, or refuse.

    A host whose last label is a number is an address to every HTTP stack (WHATWG URL);
    treating it as a DNS name would let the system resolver reinterpret it behind our back.
    """
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        raise InvalidInput("malformed numeric host in URL") from None


def _request_target(path: str, query: str) -> str:
    target = quote(path or "/", safe=_PATH_SAFE)
    return f"{target}?{quote(query, safe=_QUERY_SAFE)}" if query else target


# --- addresses --------------------------------------------------------------------------


def address_allowed(address: IPAddress, allow_cidrs: Iterable[IPNetwork] = ()) -> bool:
    """True if the address, and any IPv4 address embedded in it, is public or allowed."""
    allow = tuple(allow_cidrs)
    return all(any(form in net for net in allow) or _is_public(form) for form in _forms(address))


def _canonical(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` is a.b.c.d on the wire (dual-stack sockets), so treat it as such."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forms(address: IPAddress) -> Iterator[IPAddress]:
    """The address itself and the IPv4 address a NAT64 or 6to4 gateway would reach."""
    address = _canonical(address)
    yield address
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64:
            yield ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        elif address.sixtofour is not None:
            yield address.sixtofour


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv4Address):
        return not any(address in net for net in _BLOCKED_V4) and address.is_global
    if address in _NAT64:  # judged by the embedded IPv4 address (see _forms)
        return True
    return address in _GLOBAL_V6 and not any(address in net for net in _BLOCKED_V6)


# --- the deadline -----------------------------------------------------------------------


class _DeadlinePassed(TimeoutError):
    """The total fetch budget is used up (a TimeoutError so OS-level handlers agree)."""


@dataclass(frozen=True)
class _Clock:
    start: float
    deadline: float

    @classmethod
    def begin(cls, budget: float) -> _Clock:
        now = time.monotonic()
        return cls(now, now + max(budget, 0.0))

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def bound(self, limit: float) -> float:
        """The timeout for the next blocking step: ``limit``, cut to what the budget leaves."""
        left = self.remaining()
        if left <= 0:
            raise _DeadlinePassed("fetch budget used up")
        return min(limit, left)


class Call(Caller, Protocol):
    """The gRPC call a fetch is for (``grpc.ServicerContext`` is one)."""

    def add_callback(self, callback: Callable[[], None]) -> bool: ...


class _Hangup:
    """Ends a fetch's blocking steps when its call ends: gRPC runs :meth:`end` then (on its
    own thread, no thread of ours), which shuts the fetch's sockets down, so that a blocked
    connect, TLS handshake or read returns at once, and wakes a waiting resolution.

    A socket is shut down through a duplicate of its descriptor, closed here under the lock:
    a descriptor that http.client has closed, and the process reused, is never touched.
    """

    def __init__(self, call: Call | None) -> None:
        self._watched = call is not None
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], object]] = []
        self._duplicates: list[socket.socket] = []
        self._ended = call is not None and not call.add_callback(self.end)

    def end(self) -> None:
        with self._lock:
            self._ended = True
            for wake in self._wakers:
                with contextlib.suppress(OSError):
                    wake()

    def watch(self, wake: Callable[[], object]) -> None:
        """Run ``wake`` when the call ends; no next step starts once it has."""
        with self._lock:
            if self._ended:
                raise Cancelled("the call ended while its URL source was fetched")
            self._wakers.append(wake)

    def adopt(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the call ends (until :meth:`release`)."""
        if not self._watched:
            return
        duplicate = sock.dup()
        try:
            self.watch(functools.partial(duplicate.shutdown, socket.SHUT_RDWR))
        except BaseException:
            duplicate.close()
            raise
        self._duplicates.append(duplicate)

    def release(self) -> None:
        """The exchange is over: its sockets are no longer ours to shut down."""
        with self._lock:
            self._wakers.clear()
            for duplicate in self._duplicates:
                duplicate.close()
            self._duplicates.clear()


@contextlib.contextmanager
def _released(hangup: _Hangup) -> Iterator[None]:
    """One exchange: its sockets are watched until it ends (each redirect has its own)."""
    try:
        yield
    finally:
        hangup.release()


def _resolve_within(
    resolver: Resolver, host: str, port: int, clock: _Clock, hangup: _Hangup
) -> list[str]:
    """Run the resolver in a daemon thread so a stuck DNS lookup cannot outlive the deadline
    (or the call)."""
    box: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    hangup.watch(lambda: box.put((False, Cancelled("the call ended during resolution"))))

    def run() -> None:
        try:
            box.put((True, resolver(host, port)))
        except BaseException as exc:  # handed to the caller below
            box.put((False, exc))

    threading.Thread(target=run, name="fetch-resolve", daemon=True).start()
    try:
        ok, value = box.get(timeout=clock.bound(float("inf")))
    except queue.Empty:
        raise _DeadlinePassed("resolution timed out") from None
    if not ok:
        raise value
    return list(value)


def _wire_budget(max_bytes: int) -> int:
    """Bytes a response may take on the wire: the body, and as much again for chunk framing,
    plus room for headers. http.client reads any number of 1xx responses and trailer lines,
    so without it an origin could keep a core busy until the deadline."""
    return 2 * max_bytes + 64 * 1024


class _DeadlineRaw(io.RawIOBase):
    """Socket reads that re-arm the timeout before every recv, capped by the deadline, and
    counted against the response's byte budget."""

    def __init__(
        self, inner: io.RawIOBase, sock: socket.socket, clock: _Clock, limit: float, budget: int
    ):
        super().__init__()
        self._inner, self._sock, self._clock, self._limit = inner, sock, clock, limit
        self._left = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self._left <= 0:
            raise TooLarge("URL source response is too large (headers, framing or body)")
        self._sock.settimeout(self._clock.bound(self._limit))
        with memoryview(buffer) as view:
            n = self._inner.readinto(view[: self._left])
        self._left -= n or 0
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTPResponse whose status line, headers and body all obey the deadline."""

    def __init__(
        self, sock: socket.socket, *args: Any, clock: _Clock, limit: float, budget: int, **kw: Any
    ):
        super().__init__(sock, *args, **kw)
        inner = self.fp.detach()  # keep the socket's io reference; only swap the reader
        self.fp = io.BufferedReader(_DeadlineRaw(inner, sock, clock, limit, budget))


class _Connection(http.client.HTTPConnection):
    """HTTP to an address that was already checked; Host still names the original host."""

    def __init__(
        self,
        url: SourceURL,
        addresses: list[IPAddress],
        clock: _Clock,
        p: FetchPolicy,
        hangup: _Hangup,
    ):
        super().__init__(url.host, url.port)
        self._addresses, self._clock, self._policy, self._hangup = addresses, clock, p, hangup
        self.response_class = functools.partial(  # type: ignore[assignment]
            _DeadlineResponse, clock=clock, limit=p.read_timeout, budget=_wire_budget(p.max_bytes)
        )

    def connect(self) -> None:
        self.sock = self._open()

    def _open(self) -> socket.socket:
        error: OSError = ConnectionError("no address")
        for address in self._addresses:
            try:
                return _open_socket(address, self.port, self._clock, self._policy, self._hangup)
            except _DeadlinePassed:
                raise
            except OSError as exc:
                error = exc
        raise error


class _TLSConnection(_Connection):
    """HTTPS: TLS over the checked address, certificate verified against the original name."""

    default_port = http.client.HTTPS_PORT

    def __init__(self, *args: Any, context: ssl.SSLContext) -> None:
        super().__init__(*args)
        self._context = context

    def connect(self) -> None:
        sock = self._open()
        try:
            # CPython bounds the whole handshake by the socket timeout set in _open_socket.
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except (ssl.SSLCertVerificationError, ssl.SSLEOFError):
            sock.close()
            raise
        except ssl.SSLError as exc:  # plain HTTP on the port, no protocol in common: permanent
            sock.close()
            raise _HandshakeFailed(str(exc)) from exc
        except BaseException:
            sock.close()
            raise


class _HandshakeFailed(OSError):
    """The TLS handshake itself failed (not a certificate, not a dropped connection)."""


def _tls_alert(exc: BaseException) -> bool:
    """A fatal alert the origin sent: a refusal, not a network fault. In TLS 1.3 a demand for
    a client certificate arrives so, after our side of the handshake has finished."""
    return isinstance(exc, ssl.SSLError) and "ALERT" in str(exc.reason or "")


def _open_socket(
    address: IPAddress, port: int, clock: _Clock, policy: FetchPolicy, hangup: _Hangup
) -> socket.socket:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        hangup.adopt(sock)
        sock.settimeout(clock.bound(policy.connect_timeout))
        sock.connect((str(address), port))
        sock.settimeout(clock.bound(policy.read_timeout))
    except BaseException:
        sock.close()
        raise
    return sock


# --- the fetcher ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Redirect:
    location: str


class Fetcher:
    """Fetches URL sources under a :class:`FetchPolicy`; thread-safe, keeps no connections.

    ``ssl_context`` is the trust for https origins (default: the system CAs); tests and
    on-prem deployments pass their own CA.
    """

    def __init__(
        self,
        policy: FetchPolicy,
        resolver: Resolver | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver or system_resolver
        self._ssl = ssl_context  # the system default is built on first https use (~20 ms)

    def fetch(self, url: str, timeout: float, call: Call | None = None) -> Fetched:
        """Fetch ``url`` within ``timeout`` seconds (what is left of the caller's deadline);
        a fetch whose ``call`` ends stops at once, whatever it was waiting for."""
        clock = _Clock.begin(min(self._policy.total_timeout, timeout))
        hangup = _Hangup(call)
        try:
            fetched = self._follow(url, clock, hangup)
        except ServiceError:
            check_caller(call, FETCHING)
            raise
        except (OSError, http.client.HTTPException) as exc:
            check_caller(call, FETCHING)  # the hangup's own doing, not the origin's
            raise _translate(exc, clock) from exc
        finally:
            hangup.release()
        check_caller(call, FETCHING)  # a body without a length, cut short, looks whole
        return fetched

    def _follow(self, url: str, clock: _Clock, hangup: _Hangup) -> Fetched:
        for hop in range(self._policy.max_redirects + 1):
            source, addresses = self._checked(url, clock, hangup, redirected=hop > 0)
            reply = self._exchange(source, addresses, clock, hangup)
            if isinstance(reply, Fetched):
                return reply
            try:
                url = urljoin(url, reply.location)
            except ValueError:  # e.g. an unclosed IPv6 bracket
                raise InvalidInput("redirect refused: malformed URL") from None
        raise FailedPrecondition(
            f"URL source redirected more than {self._policy.max_redirects} times"
        )

    def _checked(
        self, url: str, clock: _Clock, hangup: _Hangup, redirected: bool
    ) -> tuple[SourceURL, list[IPAddress]]:
        """Validate one hop; a refused redirect says so, so callers can tell the hops apart."""
        try:
            source = parse_source_url(url)
            return source, self._destination(source, clock, hangup)
        except InvalidInput as exc:
            if redirected:
                raise InvalidInput(f"redirect refused: {exc}") from None
            raise

    def _destination(self, source: SourceURL, clock: _Clock, hangup: _Hangup) -> list[IPAddress]:
        """Resolve and check the host; return the addresses to connect to (all checked)."""
        policy = self._policy
        port_free = source.port in policy.allowed_ports
        if not port_free and not policy.allow_cidrs:
            raise InvalidInput("URL port not allowed")
        if source.host in BLOCKED_NAMES:
            raise InvalidInput("URL host not allowed")
        literal = source.literal
        addresses = [literal] if literal is not None else self._resolve(source, clock, hangup)
        if not all(address_allowed(a, policy.allow_cidrs) for a in addresses):
            raise InvalidInput("URL host resolves to an address that is not allowed")
        canonical = [_canonical(a) for a in addresses]
        if not port_free and not all(_in_allowed(a, policy) for a in canonical):
            raise InvalidInput("URL port not allowed")
        return canonical

    def _resolve(self, source: SourceURL, clock: _Clock, hangup: _Hangup) -> list[IPAddress]:
        texts = _resolve_within(self._resolver, source.host, source.port, clock, hangup)
        if not texts:
            raise Unavailable("URL host has no addresses (DNS; may be transient)")
        try:
            return [ipaddress.ip_address(text) for text in texts]
        except ValueError:
            raise InvalidInput("URL host resolves to an address that is not allowed") from None

    def _exchange(
        self, source: SourceURL, addresses: list[IPAddress], clock: _Clock, hangup: _Hangup
    ) -> Fetched | _Redirect:
        connection = self._connection(source, addresses, clock, hangup)
        with contextlib.closing(connection) as conn, _released(hangup):
            conn.request("GET", source.target, headers=self._headers())
            with contextlib.closing(conn.getresponse()) as response:
                if response.status in REDIRECT_STATUSES:
                    return _Redirect(_location(response))
                content_type = _check_response(response, self._policy.max_bytes)
                data = _read_capped(response, self._policy.max_bytes)
        return Fetched(data, source.redacted, content_type, time.monotonic() - clock.start)

    def _connection(
        self, source: SourceURL, addresses: list[IPAddress], clock: _Clock, hangup: _Hangup
    ) -> _Connection:
        p = self._policy
        if source.scheme == "https":
            if self._ssl is None:  # a benign race: two threads may both build one
                self._ssl = ssl.create_default_context()
            return _TLSConnection(source, addresses, clock, p, hangup, context=self._ssl)
        return _Connection(source, addresses, clock, p, hangup)

    def _headers(self) -> dict[str, str]:
        return {
            "User-Agent": self._policy.user_agent,
            "Accept": "image/*, application/octet-stream;q=0.5",
            "Accept-Encoding": "identity",
            "Connection": "close",
        }


def _in_allowed(address: IPAddress, policy: FetchPolicy) -> bool:
    return any(address in net for net in policy.allow_cidrs)


def _location(response: http.client.HTTPResponse) -> str:
    location = (response.getheader("Location") or "").strip()
    if not location:
        raise FailedPrecondition("URL source redirected without a Location")
    try:
        _check_characters(location)
    except InvalidInput as exc:
        raise InvalidInput(f"redirect refused: {exc}") from None
    return location


def _check_response(response: http.client.HTTPResponse, max_bytes: int) -> str:
    """Refuse before reading the body; return the media type ("" if none)."""
    _check_status(response.status)
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    transfer = (response.getheader("Transfer-Encoding") or "chunked").strip().lower()
    if encoding != "identity" or transfer != "chunked":
        raise InvalidInput("URL source sent a compressed or encoded body (not accepted)")
    if len(_declared_lengths(response)) > 1:
        raise FailedPrecondition("URL source sent conflicting Content-Length headers")
    media_type = _media_type(response.getheader("Content-Type"))
    if response.length is not None and response.length > max_bytes:
        raise TooLarge(f"URL source is larger than {max_bytes} bytes")
    return media_type


def _declared_lengths(response: http.client.HTTPResponse) -> set[str]:
    """Every Content-Length value, repeated headers and comma lists alike, leading zeros off."""
    values = ",".join(response.headers.get_all("Content-Length") or ()).split(",")
    return {v.strip().lstrip("0") or "0" for v in values if v.strip()}


def _check_status(status: int) -> None:
    if status == 200:
        return
    if status >= 500 or status in (408, 429):
        raise Unavailable(f"URL source answered HTTP {status} (transient; may work later)")
    if 400 <= status < 500:
        raise FailedPrecondition(f"URL source answered HTTP {status}; retrying will not help")
    raise FailedPrecondition(f"URL source answered HTTP {status}, not an image")


def _media_type(header: str | None) -> str:
    """Missing and generic binary types pass (the processor sniffs the bytes); else image/*."""
    media_type = (header or "").split(";", 1)[0].strip().lower()
    if not media_type or media_type.startswith("image/") or media_type in GENERIC_BINARY_TYPES:
        return media_type
    raise FailedPrecondition("URL source content type is not an image")


def _read_capped(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """Read at most ``max_bytes``; one byte more is TooLarge, a short body is Unavailable."""
    declared = response.length
    chunks: list[bytes] = []
    total = 0
    while chunk := response.read1(min(_READ_CHUNK, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"URL source is larger than {max_bytes} bytes")
        chunks.append(chunk)
    if declared is not None and total != declared:
        raise Unavailable("URL source closed the connection mid-body (transient)")
    if not total:
        raise FailedPrecondition("URL source sent an empty body, not an image")
    return b"".join(chunks)


def _translate(exc: BaseException, clock: _Clock) -> ServiceError:
    """The one place where socket, TLS and HTTP errors become domain errors."""
    if isinstance(exc, TimeoutError):
        if clock.remaining() <= 0:
            return DeadlineExceeded("URL source too slow: fetch time budget used up")
        return DeadlineExceeded("URL source timed out (connect or read)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return FailedPrecondition("URL source TLS certificate verification failed")
    if isinstance(exc, _HandshakeFailed) or _tls_alert(exc):
        return FailedPrecondition("URL source TLS handshake failed")
    if isinstance(exc, socket.gaierror):
        return Unavailable("URL host could not be resolved (DNS; may be transient)")
    if isinstance(exc, ConnectionRefusedError):
        return Unavailable("URL source refused the connection (may be transient)")
    if isinstance(exc, OSError | http.client.IncompleteRead):
        return Unavailable("URL source connection failed (may be transient)")
    return FailedPrecondition("URL source sent a malformed HTTP response")
