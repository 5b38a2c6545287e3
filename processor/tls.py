"""Mutual TLS between the API and the processor, with certificate rotation from disk.

Server side: :func:`server_credentials` (client certificates required, reloaded when the files
change), :class:`PeerCheckInterceptor` (only allowed client identities), :func:`start_probe_server`
(plaintext port serving only the health check, for Kubernetes' native gRPC probes) and
:func:`refuse_non_loopback` (guard for the plaintext development flag).
Client side: :class:`ReloadingChannel`, a channel that presents the newest client certificate.
Connections already open keep the trust they were made with: pair rotation with a maximum
connection age on the server.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2

from processor.errors import PermissionDenied, status_code

log = logging.getLogger(__name__)

ChannelOptions = Sequence[tuple[str, Any]]


# --- Certificate files ---------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """A validated certificate chain, its private key and the CA bundle to trust (PEM; None:
    a server that asks for no client certificate)."""

    cert_chain: bytes
    key: bytes
    ca: bytes | None
    description: str


def load_material(cert: Path, key: Path, ca: Path | None) -> TlsMaterial:
    """Read and check the files; raises ValueError if the key does not match the certificate."""
    cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    ca_pem = ca.read_bytes() if ca is not None else None
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    private_key = serialization.load_pem_private_key(key_pem, password=None)
    if _public_der(leaf.public_key()) != _public_der(private_key.public_key()):
        raise ValueError(f"private key {key} does not match certificate {cert}")
    if ca_pem is not None:
        x509.load_pem_x509_certificates(ca_pem)
    description = (
        f"{leaf.subject.rfc4514_string()} serial {leaf.serial_number:x} "
        f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
    )
    return TlsMaterial(cert_pem, key_pem, ca_pem, description)


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _signature(paths: Iterable[Path]) -> tuple[tuple[int, int, int], ...] | None:
    """Inode, size and mtime of each file (following symlinks, as Kubernetes swaps them)."""
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class FileReloader:
    """The last good :class:`TlsMaterial`; :meth:`poll` re-reads only when the files changed.

    A half-written or mismatched set keeps the previous material (logged once per change), so
    a rotation caught midway takes effect when its last file lands.
    """

    def __init__(self, cert: Path, key: Path, ca: Path | None) -> None:
        self._paths = (cert, key) if ca is None else (cert, key, ca)
        self._ca = ca
        self._lock = threading.Lock()
        self._seen = _signature(self._paths)
        self.current = load_material(cert, key, ca)

    def poll(self) -> TlsMaterial | None:
        """New material if the files changed and are valid, else None. Costs three stats."""
        signature = _signature(self._paths)
        with self._lock:
            if signature == self._seen:
                return None
            self._seen = signature
            try:
                material = load_material(self._paths[0], self._paths[1], self._ca)
            except (OSError, ValueError) as exc:
                log.warning(
                    "TLS files changed but are not usable, keeping %s: %s",
                    self.current.description,
                    exc,
                )
                return None
            log.info("TLS files reloaded: now %s", material.description)
            self.current = material
            return material


# --- Server side ---------------------------------------------------------------------------


def _server_config(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert_chain)], root_certificates=material.ca
    )


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """mTLS credentials requiring a client certificate signed by ``client_ca`` (None: plain
    server TLS, the API's public listener).

    gRPC asks the fetcher on every handshake, so files rotated on disk (cert-manager renewing
    a Secret) reach new connections without a restart. Raises OSError/ValueError at startup
    if the files are unusable.
    """
    reloader = FileReloader(cert, key, client_ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        material = reloader.poll()
        return None if material is None else _server_config(material)

    return grpc.dynamic_ssl_server_credentials(
        _server_config(reloader.current), fetch, require_client_authentication=client_ca is not None
    )


@dataclass(frozen=True)
class AllowedPeers:
    """Client identities (a SAN entry, or the subject CN of a certificate without SANs) that
    may call the processor."""

    identities: frozenset[str]

    def __post_init__(self) -> None:
        if not self.identities:
            raise ValueError("AllowedPeers needs at least one identity")

    def permits(self, peer: Iterable[str]) -> bool:
        return not self.identities.isdisjoint(peer)


def peer_identities(context: grpc.ServicerContext) -> frozenset[str]:
    """SAN entries (DNS, URI, IP) of the verified client certificate; its common name only
    when it has none (RFC 6125: a certificate with SANs is not vouched for under its CN)."""
    auth = context.auth_context()
    values = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name", ())
    return frozenset(v.decode("utf-8", "replace") for v in values)


def check_peer(context: grpc.ServicerContext, allowed: AllowedPeers) -> None:
    """Abort with PERMISSION_DENIED unless the client certificate names an allowed identity."""
    peer = peer_identities(context)
    if allowed.permits(peer):
        return
    log.warning("refused client %s with identities %s", context.peer(), sorted(peer))
    exc = PermissionDenied(f"client identity {sorted(peer)} may not call the processor")
    context.abort(status_code(exc), str(exc))


@dataclass(frozen=True)
class _Handler(grpc.RpcMethodHandler):
    request_streaming: bool
    response_streaming: bool
    request_deserializer: Callable[[bytes], Any] | None
    response_serializer: Callable[[Any], bytes] | None
    unary_unary: Callable[..., Any] | None
    unary_stream: Callable[..., Any] | None
    stream_unary: Callable[..., Any] | None
    stream_stream: Callable[..., Any] | None


class PeerCheckInterceptor(grpc.ServerInterceptor):
    """Runs :func:`check_peer` before every method on the mTLS port (put it first in the chain).

    A sync interceptor cannot see the call context, so it wraps the handler's behaviour.
    """

    def __init__(self, allowed: AllowedPeers) -> None:
        self._allowed = allowed

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else self._guard(handler)

    def _guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return _Handler(
            handler.request_streaming,
            handler.response_streaming,
            handler.request_deserializer,
            handler.response_serializer,
            self._wrap(handler.unary_unary),
            self._wrap(handler.unary_stream),
            self._wrap(handler.stream_unary),
            self._wrap(handler.stream_stream),
        )

    def _wrap(self, behavior: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """The behaviour behind the check, keeping gRPC's calling convention for it.

        A non-blocking stream (health ``Watch``) gets a third argument and returns at once;
        without the flag gRPC would run it as a blocking stream holding a thread until the
        client goes away.
        """
        if behavior is None:
            return None

        def guarded(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
            check_peer(context, self._allowed)
            return behavior(request, context, *callback)

        for flag in ("experimental_non_blocking", "experimental_thread_pool"):
            if hasattr(behavior, flag):
                setattr(guarded, flag, getattr(behavior, flag))
        return guarded


def start_probe_server(
    address: str, health_servicer: health.HealthServicer
) -> tuple[grpc.Server, int]:
    """Plaintext server with only ``grpc.health.v1.Health/Check``, for Kubernetes probes.

    It shares the main port's servicer, so both report the same status. ``Watch`` is left out:
    probes never use it and each open stream would hold one of the two worker threads.
    """
    check = grpc.unary_unary_rpc_method_handler(
        health_servicer.Check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="probe"),
        handlers=[grpc.method_handlers_generic_handler(health.SERVICE_NAME, {"Check": check})],
        maximum_concurrent_rpcs=16,
    )
    port = server.add_insecure_port(address)
    server.start()
    return server, port


def loopback_host(listen: str) -> str | None:
    """The host of ``listen`` (HOST:PORT) if it is on 127.0.0.0/8, ::1 or localhost."""
    host = listen.rpartition(":")[0] if ":" in listen else listen
    host = host.removeprefix("[").removesuffix("]")
    return host if _is_loopback(host) else None


def refuse_non_loopback(listen: str) -> None:
    """Raise ValueError unless ``listen`` (HOST:PORT) is on 127.0.0.0/8, ::1 or localhost."""
    if loopback_host(listen) is None:
        raise ValueError(
            f"refusing to serve plaintext on {listen!r}: --insecure is for development and only "
            "binds loopback (127.0.0.0/8, [::1] or localhost); use --tls-cert/--tls-key/"
            "--tls-client-ca for anything else"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


# --- Client side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """The API's files for mTLS to the processor, and the name the processor's cert must bear.

    ``server_name`` matters when the dialed address differs from the certificate's names
    (e.g. a headless Service resolved to pod IPs).
    """

    ca: Path
    cert: Path
    key: Path
    server_name: str | None = None


@dataclass(eq=False)
class _Generation:
    """One underlying channel and the calls still running on it."""

    channel: grpc.Channel
    in_flight: int = 0
    retired_at: float | None = None
    callables: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def callable(self, kind: str, method: str, kwargs: dict[str, Any]) -> Any:
        key = (kind, method, *sorted(kwargs.items()))
        if key not in self.callables:
            self.callables[key] = getattr(self.channel, kind)(method, **kwargs)
        return self.callables[key]


class ReloadingChannel(grpc.Channel):
    """A channel to the processor that follows client certificate rotation on disk.

    Every call checks the files (three stats); after a change, new calls go to a new
    underlying channel and the old one is closed once its calls have finished, or after
    ``grace`` seconds. Build stubs on it once. ``tls=None`` is plaintext (no reloading).
    """

    def __init__(
        self,
        target: str,
        tls: ClientTls | None,
        options: ChannelOptions = (),
        grace: float = 60.0,
    ) -> None:
        self._target, self._tls, self._options, self._grace = target, tls, tuple(options), grace
        self._reloader = None if tls is None else FileReloader(tls.cert, tls.key, tls.ca)
        self._lock = threading.Lock()
        self._retired: list[_Generation] = []
        self._closed = False
        self._current = self._build(None if self._reloader is None else self._reloader.current)

    def get(self) -> grpc.Channel:
        """The channel to build stubs on: this object, which always uses the newest files."""
        return self

    def _build(self, material: TlsMaterial | None) -> _Generation:
        if material is None:
            return _Generation(grpc.insecure_channel(self._target, options=self._options))
        credentials = grpc.ssl_channel_credentials(material.ca, material.key, material.cert_chain)
        options = list(self._options)
        if self._tls is not None and self._tls.server_name:
            options.append(("grpc.ssl_target_name_override", self._tls.server_name))
        return _Generation(grpc.secure_channel(self._target, credentials, options=options))

    def _acquire(self) -> _Generation:
        material = None if self._reloader is None else self._reloader.poll()
        with self._lock:
            if self._closed:
                raise ValueError("Cannot invoke RPC on closed channel!")
            if material is not None:
                self._current.retired_at = time.monotonic()
                self._retired.append(self._current)
                self._current = self._build(material)
            self._sweep()
            self._current.in_flight += 1
            return self._current

    def _release(self, generation: _Generation) -> None:
        with self._lock:
            generation.in_flight -= 1

    def _sweep(self) -> None:
        """Close retired channels whose calls are done or whose grace ran out (lock held)."""
        now = time.monotonic()
        for gen in list(self._retired):
            expired = gen.retired_at is not None and now - gen.retired_at >= self._grace
            if gen.in_flight == 0 or expired:
                if gen.in_flight:
                    log.warning("closing old processor channel with %d calls", gen.in_flight)
                self._retired.remove(gen)
                gen.channel.close()

    def retired_count(self) -> int:
        """Old channels not yet closed (for tests and metrics)."""
        with self._lock:
            return len(self._retired)

    def _multicallable(self, kind: str, method: str, **kwargs: Any) -> _MultiCallable:
        return _MultiCallable(self, kind, method, kwargs)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_unary", method, **_named(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_stream", method, **_named(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_unary", method, **_named(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_stream", method, **_named(args, kwargs))

    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        self._current.channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        with self._lock:
            generations = [self._current, *self._retired]
        for gen in generations:
            gen.channel.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            generations = [self._current, *self._retired]
            self._retired.clear()
        for gen in generations:
            gen.channel.close()

    def __enter__(self) -> ReloadingChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_MULTICALLABLE_PARAMS = ("request_serializer", "response_deserializer", "_registered_method")


def _named(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional multicallable parameters as keywords, so they can key a cache."""
    return {**dict(zip(_MULTICALLABLE_PARAMS, args, strict=False)), **kwargs}


class _MultiCallable(
    grpc.UnaryUnaryMultiCallable,
    grpc.UnaryStreamMultiCallable,
    grpc.StreamUnaryMultiCallable,
    grpc.StreamStreamMultiCallable,
):
    """Runs each call on the newest underlying channel and counts it until it ends."""

    def __init__(
        self, owner: ReloadingChannel, kind: str, method: str, kwargs: dict[str, Any]
    ) -> None:
        self._owner, self._kind, self._method, self._kwargs = owner, kind, method, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("__call__", args, kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("with_call", args, kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("future", args, kwargs)

    def _invoke(self, attr: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        generation = self._owner._acquire()
        blocking = self._kind.endswith("_unary") and attr != "future"
        try:
            target = generation.callable(self._kind, self._method, self._kwargs)
            result = getattr(target, attr)(*args, **kwargs)
        except BaseException:
            self._owner._release(generation)
            raise
        if blocking:
            self._owner._release(generation)
        else:
            result.add_done_callback(lambda _: self._owner._release(generation))
        return result
