"""The API's side of the processor protocol: channel, deadlines and error translation."""

from __future__ import annotations

import json
from typing import Any

import grpc

from processor import serving
from processor.errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    ServiceError,
    TooLarge,
    Unavailable,
)
from processor.pb import processor_pb2 as pb
from processor.pb import processor_pb2_grpc

SERVICE = "imagescaler.processor.v1.Processor"

# Per-request balancing across every resolved replica, transparent retries of UNAVAILABLE
# (Process is idempotent), and client-side health checks so draining replicas get no calls.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": SERVICE},
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(
    max_message: int, service_config: dict[str, Any] | None = None
) -> list[tuple[str, Any]]:
    """Message limits, the service config, keepalive matching the processor's, retry buffers."""
    return serving.message_options(
        max_message,
        [
            ("grpc.service_config", json.dumps(service_config or SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            # Retries replay the request: buffer a whole image, not gRPC's default 256 KiB.
            ("grpc.per_rpc_retry_buffer_size", max_message + serving.ENVELOPE),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )


class ProcessorClient:
    """Calls ``Process``; every processor failure leaves here as a domain error."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = processor_pb2_grpc.ProcessorStub(channel)

    def process(self, request: pb.ProcessRequest, timeout: float) -> pb.ProcessReply:
        try:
            return self._stub.Process(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate(exc) from None


def translate(exc: grpc.RpcError) -> ServiceError:
    """Map the processor's status to what the public caller should see."""
    code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "Concurrent RPC limit" in details:
            return Overloaded("image processors are at capacity; retry shortly")
        return TooLarge(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("deadline exceeded while processing the image")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable("image processor unavailable (no connection or TLS handshake failed)")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return Unavailable("image processor refused the API's identity (mTLS misconfiguration)")
    return Unavailable(f"image processor failed ({code.name.lower()})")
