"""The service's few domain errors and their one mapping to gRPC status codes.

Code below the RPC boundary raises these; servicers and interceptors translate them with
:func:`status_code`. Messages are shown to callers, so they never carry secrets or
internal network details.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: the message is safe to return to the caller."""

    code = grpc.StatusCode.INTERNAL


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


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def status_code(exc: ServiceError) -> grpc.StatusCode:
    return exc.code
