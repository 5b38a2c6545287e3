"""The API's side of the processor protocol: channel, balancing, retries and error translation.

Why each channel setting is what it is, with the numbers the tests measured, is in
docs/load-balancing.md.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from api import accesslog
from processor import serving, wire
from processor.errors import (
    Caller,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    ServiceError,
    TooLarge,
    Unavailable,
    check_caller,
)
from processor.pb import processor_pb2 as pb

SERVICE = "imagescaler.processor.v1.Processor"
METHOD = f"/{SERVICE}/Process"
BALANCING_POLICIES = ("round_robin", "pick_first")

# Keepalive: the processor allows pings every 30 s (grpc.http2.min_ping_interval_without_data_ms);
# pinging more often than that earns a GOAWAY "too_many_pings" (tests check the two agree).
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# gRPC re-resolves DNS at most this often (default 30 s), whatever triggers it: a replica's
# max-connection-age GOAWAY must not wait 30 s to reveal a scaled-out replica.
MIN_RESOLUTION_INTERVAL_MS = 5_000

# Statuses worth one more attempt from us: gRPC's own retries stop once response headers have
# arrived (a replica killed while replying), and a retired TLS channel cancels its stragglers.
REISSUE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
MIN_REISSUE_SECONDS = 0.05
DEFAULT_BYTES_IN_FLIGHT = 64 * 1024 * 1024  # per API replica (--processor-bytes-in-flight)
LINE_CHECK = 0.05  # seconds between a waiting call's looks at whether its caller is still there


def service_config_for(balancing: str = "round_robin") -> dict[str, Any]:
    """Per-call balancing, client-side health checks and retries of this idempotent call.

    ``pick_first`` sends every call down one connection to one replica: it is here to show
    (and measure) the imbalance, not for production.
    """
    if balancing not in BALANCING_POLICIES:
        raise ValueError(f"balancing policy must be one of {BALANCING_POLICIES}, got {balancing!r}")
    return {
        "loadBalancingConfig": [{balancing: {}}],
        # The processor reports NOT_SERVING when it starts draining: stop picking it at once.
        "healthCheckConfig": {"serviceName": SERVICE},
        "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": _retry_policy()}],
    }


def _retry_policy() -> dict[str, Any]:
    """UNAVAILABLE: replica gone or draining. CANCELLED: a replica stopped mid-call resets it."""
    return {
        "maxAttempts": 3,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
    }


def channel_options(
    max_message: int, service_config: dict[str, Any] | None = None
) -> list[tuple[str, Any]]:
    """Message limits, the service config, keepalive matching the processor's, retry buffers."""
    config = service_config if service_config is not None else service_config_for()
    return serving.message_options(
        max_message,
        [
            ("grpc.service_config", json.dumps(config)),
            # Ours, never one from a DNS TXT record (not looked up by default; make sure).
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.dns_min_time_between_resolutions_ms", MIN_RESOLUTION_INTERVAL_MS),
            ("grpc.enable_retries", 1),
            # Retries replay the request: buffer a whole image, not gRPC's default 256 KiB.
            ("grpc.per_rpc_retry_buffer_size", max_message + serving.ENVELOPE),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            # Reconnect within a second when processors come back (gRPC's default backoff
            # grows to 120 s; measured recovery 6.1 s -> 0 s in docs/reliability.md).
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
        client=True,
    )


def encode_request(job: pb.ProcessRequest, image: bytes) -> bytes:
    """``job`` (its ``image`` unset) serialized with ``image`` as its image field.

    Building ``ProcessRequest(image=...)`` and serializing it copies the image three times
    (into the message, into upb's encoder, into the result), each ~0.45 ms for a 2.45 MB photo
    in a busy server (perf, docs/benchmarks.md). Protobuf's wire format lets a field follow the
    serialized rest of its message, so the image is copied once, here.
    """
    return b"".join((job.SerializeToString(), _IMAGE_TAG, wire.varint(len(image)), image))


_IMAGE_TAG = wire.tag(pb.ProcessRequest.IMAGE_FIELD_NUMBER)


class Body:
    """An image on its way to a processor, referenced from here only: the processor client
    takes it once the forwarded copy exists, so a call in flight holds one copy, not two."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def take(self) -> bytes:
        data, self.data = self.data, b""
        return data


class BytesInFlight:
    """A cap on the request bytes this API has out at the processors at once.

    gRPC receives a whole request into the processor's memory however busy the processor is,
    a refused call's too (docs/reliability.md finding 14), so only the sender can bound what a
    burst of large images costs a processor. A call waits for room until its deadline, in
    arrival order (else a stream of small images could starve a large one); one image larger
    than the cap still goes, alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room = threading.Condition()
        self._line: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def hold(self, size: int, deadline: float, caller: Caller | None = None) -> Iterator[None]:
        """Room for ``size`` bytes; a waiting call whose caller has gone leaves the line."""
        with self._room:
            turn = object()
            self._line.append(turn)
            try:
                while self._line[0] is not turn or (self.used and self.used + size > self.limit):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Overloaded("image processors are at capacity; retry shortly")
                    check_caller(caller, "waited for a processor")
                    self._room.wait(min(left, LINE_CHECK))
            finally:
                self._line.remove(turn)
                self._room.notify_all()  # the next in line may fit now
            self.used += size
        try:
            yield
        finally:
            with self._room:
                self.used -= size
                self._room.notify_all()


class ProcessorClient:
    """Calls ``Process``; every processor failure leaves here as a domain error.

    A call that failed with UNAVAILABLE or CANCELLED after gRPC's own retries is issued once
    more if the deadline allows: processing is idempotent.
    """

    def __init__(self, channel: grpc.Channel, in_flight: BytesInFlight | None = None) -> None:
        # Requests arrive already serialized (encode_request), hence no request serializer.
        self._call = channel.unary_unary(
            METHOD, response_deserializer=pb.ProcessReply.FromString, _registered_method=True
        )
        self.in_flight = in_flight or BytesInFlight(DEFAULT_BYTES_IN_FLIGHT)

    def process(
        self,
        job: pb.ProcessRequest,
        image: Body,
        timeout: float,
        caller: Caller | None = None,
    ) -> pb.ProcessReply:
        """Process ``image`` as ``job`` says (``job.image`` stays unset); a call waiting for
        room leaves when its ``caller`` has gone."""
        deadline = time.monotonic() + timeout
        # The forwarded copy is made once the call has room, and replaces the image: a call
        # holds one copy, waiting or in flight.
        with self.in_flight.hold(job.ByteSize() + len(image.data), deadline, caller):
            return self._process(encode_request(job, image.take()), deadline)

    def _process(self, request: bytes, deadline: float) -> pb.ProcessReply:
        try:
            return self._call(request, timeout=deadline - time.monotonic())
        except grpc.RpcError as exc:
            remaining = deadline - time.monotonic()
            if not _reissuable(exc, remaining):
                raise _failed(exc) from None
            accesslog.note(processor_reissued=_describe(exc))
        try:
            return self._call(request, timeout=remaining)
        except grpc.RpcError as exc:
            raise _failed(exc) from None


def _reissuable(exc: grpc.RpcError, remaining: float) -> bool:
    return exc.code() in REISSUE_CODES and remaining >= MIN_REISSUE_SECONDS  # type: ignore[attr-defined]


def _describe(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]


def _failed(exc: grpc.RpcError) -> ServiceError:
    """The operator's detail (e.g. which TLS check failed) goes to the access log only."""
    accesslog.note(processor_error=_describe(exc))
    return translate(exc)


def translate(exc: grpc.RpcError) -> ServiceError:
    """Map the processor's status to what the public caller should see."""
    code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "at capacity" in details:
            return Overloaded("image processors are at capacity; retry shortly")
        return TooLarge(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("deadline exceeded while processing the image")
    if code == grpc.StatusCode.UNAVAILABLE and "health check" in details:
        # gRPC's own wording when client-side health checks fail on every replica.
        return Unavailable(
            "image processor unavailable: no replica passes its health check (all draining, "
            "or refusing the API's identity)"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable("image processor unavailable (no connection or TLS handshake failed)")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return Unavailable("image processor refused the API's identity (mTLS misconfiguration)")
    return Unavailable(f"image processor failed ({code.name.lower()})")
