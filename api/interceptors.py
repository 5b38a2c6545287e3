"""Authentication for the public API: the one place where bearer tokens are read.

Every method except health checks and reflection needs ``authorization: Bearer <jwt>``.
The interceptor wraps each method's handler; the wrapped behaviour, which gRPC runs in a
worker thread, verifies the token, looks the tenant up and runs the real behaviour with
:data:`current_principal` set. Refusals abort from that behaviour with ``UNAUTHENTICATED``
(bad token), ``PERMISSION_DENIED`` (unknown or disabled tenant) or ``UNAVAILABLE``
(revocation store down). Checking in the worker rather than in ``intercept_service`` keeps
signature checks and Redis round trips off gRPC's single call-dispatching thread, which
runs every interceptor under the server's lock.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from api import accesslog
from auth.tenants import SCOPE_CONTENT, SCOPE_URL, Tenant, TenantLookup
from auth.tokens import AuthError, Claims, TokenVerifier
from processor.errors import PermissionDenied, ServiceError, retry_hints, status_code

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MAX_AUTHORIZATION_BYTES = 8192
LEGACY_TENANT = "legacy"

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the registered tenant, the verified claims and what they may use."""

    tenant: Tenant
    claims: Claims
    scopes: frozenset[str]  # token scopes that the tenant also allows
    anonymous: bool = False  # --auth none

    @property
    def tenant_id(self) -> str:
        return self.tenant.id


current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")


def current() -> Principal:
    """The caller of the RPC being served; PermissionDenied outside an authenticated call."""
    principal = current_principal.get(None)
    if principal is None:
        raise PermissionDenied("no authenticated caller")
    return principal


def require_scope(scope: str) -> None:
    """PermissionDenied naming ``scope`` unless the caller holds it (an ``api.service``
    Authorizer)."""
    if scope not in current().scopes:
        raise PermissionDenied(f"missing scope: {scope}")


def bearer_token(metadata: Metadata) -> str:
    """The token of the single ``authorization: Bearer`` entry; AuthError otherwise."""
    values = [value for key, value in metadata if key == "authorization"]
    if not values:
        raise AuthError("missing bearer token")
    if len(values) > 1:
        raise AuthError("several authorization headers")
    value = values[0]
    if not isinstance(value, str) or len(value) > MAX_AUTHORIZATION_BYTES:
        raise AuthError("authorization header too large")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("not a bearer token")
    token = token.strip()
    if not token or " " in token:
        raise AuthError("malformed authorization header")
    return token


class Authenticator:
    """Metadata -> Principal: token verification, then the tenant registry."""

    def __init__(self, verifier: TokenVerifier, tenants: TenantLookup) -> None:
        self._verifier = verifier
        self._tenants = tenants

    def authenticate(self, metadata: Metadata) -> Principal:
        claims = self._verifier.verify(bearer_token(metadata))
        tenant = self._tenants.get(claims.tenant)
        if tenant is None:
            raise PermissionDenied(f"unknown tenant: {claims.tenant}")
        if not tenant.enabled:
            raise PermissionDenied(f"tenant disabled: {claims.tenant}")
        return Principal(tenant, claims, claims.scopes & tenant.scopes)


class _PrincipalInterceptor(grpc.ServerInterceptor):
    """Runs every method but health and reflection with the principal ``_enter`` returns."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        return _wrap(handler, lambda context: self._enter(details.method, context))

    def _enter(self, method: str, context: grpc.ServicerContext) -> Principal:
        raise NotImplementedError


class AuthInterceptor(_PrincipalInterceptor):
    """Requires a valid bearer token on every method but health and reflection."""

    def __init__(self, verifier: TokenVerifier, tenants: TenantLookup) -> None:
        self._authenticator = Authenticator(verifier, tenants)

    def _enter(self, method: str, context: grpc.ServicerContext) -> Principal:
        """The caller's principal, or abort the call with the refusal's status."""
        try:
            return self._authenticator.authenticate(context.invocation_metadata())
        except ServiceError as exc:
            _log_refusal(method, context, exc)
            if isinstance(exc, AuthError):
                accesslog.note(auth_failure=exc.reason)
            if exc.retry_after is not None:  # e.g. the revocation store's pause after a failure
                context.set_trailing_metadata(
                    retry_hints(exc.retry_after, context.time_remaining())
                )
            context.abort(status_code(exc), str(exc))
            raise  # unreachable: abort raises


def _log_refusal(method: str, context: grpc.ServicerContext, exc: ServiceError) -> None:
    """Reason and kid/jti (both checked for shape before they get here), never the token."""
    kid = getattr(exc, "kid", None)
    jti = getattr(exc, "jti", None)
    unavailable = status_code(exc) is grpc.StatusCode.UNAVAILABLE
    level = logging.ERROR if unavailable else logging.WARNING
    log.log(level, "refused %s from %s: %s (kid=%s jti=%s)", method, context.peer(), exc, kid, jti)


class AnonymousInterceptor(_PrincipalInterceptor):
    """``--auth none``: every call runs as the ``legacy`` tenant. Loud on purpose."""

    def __init__(self, tenants: TenantLookup | None = None) -> None:
        self._tenants = tenants
        log.warning(
            "AUTHENTICATION IS OFF (--auth none): every caller is served as tenant %r "
            "without a token. Use this only for legacy clients and development.",
            LEGACY_TENANT,
        )

    def _enter(self, method: str, context: grpc.ServicerContext) -> Principal:
        accesslog.note(auth="none")  # the request's log line becomes a warning
        try:
            return legacy_principal(self._tenants)
        except PermissionDenied as exc:
            context.abort(status_code(exc), str(exc))
            raise


def legacy_principal(tenants: TenantLookup | None = None) -> Principal:
    """The anonymous caller of ``--auth none``; a registry entry ``legacy`` sets its policy."""
    tenant = tenants.get(LEGACY_TENANT) if tenants is not None else None
    if tenant is None:
        tenant = Tenant(LEGACY_TENANT, scopes=frozenset({SCOPE_CONTENT, SCOPE_URL}))
    if not tenant.enabled:
        raise PermissionDenied(f"tenant disabled: {LEGACY_TENANT}")
    claims = Claims(
        tenant=LEGACY_TENANT,
        subject="anonymous",
        scopes=tenant.scopes,
        jti="anonymous",
        issued_at=0.0,
        expires_at=math.inf,
        kid="none",
    )
    return Principal(tenant, claims, tenant.scopes, anonymous=True)


_FACTORIES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _wrap(
    handler: grpc.RpcMethodHandler, enter: Callable[[grpc.ServicerContext], Principal]
) -> grpc.RpcMethodHandler:
    """The same handler, its behaviour preceded by ``enter`` and run with the principal set."""
    for kind, factory in _FACTORIES:
        inner = getattr(handler, kind)
        if inner is not None:
            return factory(
                _behaviour(inner, enter, handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _behaviour(
    inner: Callable[[Any, grpc.ServicerContext], Any],
    enter: Callable[[grpc.ServicerContext], Principal],
    response_streaming: bool,
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
        scope = contextvars.copy_context()  # a copy: nothing leaks to the pooled thread
        principal = enter(context)
        accesslog.note(tenant=principal.tenant_id)
        scope.run(current_principal.set, principal)
        result = scope.run(inner, request, context)
        return _in_context(scope, result) if response_streaming else result

    return behaviour


def _in_context(scope: contextvars.Context, responses: Any) -> Iterator[Any]:
    """A response stream whose every step runs with the principal set."""
    iterator = scope.run(iter, responses)
    while True:
        try:
            yield scope.run(next, iterator)
        except StopIteration:
            return
