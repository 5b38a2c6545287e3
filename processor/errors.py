"""The service's few domain errors and their one mapping to gRPC status codes.

Code below the RPC boundary raises these; servicers and interceptors translate them with
:func:`status_code`. Messages are shown to callers, so they never carry secrets or
internal network details.
"""

from __future__ import annotations

from typing import Protocol

import grpc


class ServiceError(Exception):
    """Base class: the message is safe to return to the caller."""

    code = grpc.StatusCode.INTERNAL
    retry_after: int | None = None  # seconds after which a retry may succeed, if known


class InvalidInput(ServiceError):
    """The request or its image is malformed, unsupported or refused by policy."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooLarge(ServiceError):
    """A size limit (bytes, pixels, frames) was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(ServiceError):
    """No capacity right now; the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A dependency (processor, origin, storage, Redis) cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    """The source answered, but not with something we can use (e.g. HTTP 404)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServiceError):
    """The work did not finish within the caller's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    """The call was cancelled (by its caller, a lost connection or a drain) before it was done."""

    code = grpc.StatusCode.CANCELLED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def status_code(exc: ServiceError) -> grpc.StatusCode:
    return exc.code


# s: the server's time_remaining() runs ahead of the caller's clock (transit, and the timeout
# header's rounding), and the retried call needs some time of its own.
PUSHBACK_MARGIN = 0.25


def retry_hints(seconds: int, time_remaining: float | None) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for a refusal that may succeed after ``seconds``.

    ``retry-after`` is for people and clients that read it (``imagescaler-client --retry``).
    ``grpc-retry-pushback-ms`` is for gRPC's own retry policy (gRFC A6), which would otherwise
    retry UNAVAILABLE after 0.1 s into the same refusal. When the caller's deadline comes
    first, the pushback says "do not retry": gRPC would wait out the deadline and report
    DEADLINE_EXCEEDED instead of this refusal.
    """
    fits = time_remaining is None or time_remaining > seconds + PUSHBACK_MARGIN
    return (
        ("retry-after", str(seconds)),
        ("grpc-retry-pushback-ms", str(seconds * 1000) if fits else "-1"),
    )


class Caller(Protocol):
    """The part of ``grpc.ServicerContext`` a waiting call looks at."""

    def is_active(self) -> bool: ...

    def time_remaining(self) -> float | None: ...


DEADLINE_SLACK = 0.05  # s: gRPC ends a call on its own clock; time_remaining() reads another


def check_caller(caller: Caller | None, waiting: str) -> None:
    """Raise DeadlineExceeded or Cancelled if the call ended while it was ``waiting``.

    The two are told apart so that logs and metrics do not report cancelled calls (a client
    that gave up early, a drain) as deadlines that were too short.
    """
    if caller is None or caller.is_active():
        return
    left = caller.time_remaining()
    if left is not None and left <= DEADLINE_SLACK:
        raise DeadlineExceeded(f"the deadline passed while the call {waiting}")
    raise Cancelled(f"the call was cancelled while it {waiting}")
