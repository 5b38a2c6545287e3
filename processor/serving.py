"""What every gRPC server of ours shares: health, reflection, limits and a graceful drain."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
S = TypeVar("S")
R = TypeVar("R")

# Room for the protobuf envelope around a maximum-size image.
ENVELOPE = 64 * 1024


# Replies are bounded by the output size, not the input limit: a small JPEG can come back as
# a larger PNG. This is the cap on a reply (and on what a client accepts as one).
MAX_REPLY = 64 * 1024 * 1024


def message_options(
    max_request: int, extra: Iterable[tuple[str, Any]] = (), client: bool = False
) -> list[tuple[str, Any]]:
    """Explicit limits (gRPC's 4 MiB default is too small for photos): requests are held to
    the input limit, replies to :data:`MAX_REPLY`. ``client`` swaps the directions."""
    request = max_request + ENVELOPE
    reply = max(MAX_REPLY, request)
    receive, send = (reply, request) if client else (request, reply)
    return [
        ("grpc.max_receive_message_length", receive),
        ("grpc.max_send_message_length", send),
        *extra,
    ]


def new_server(
    workers: int,
    max_concurrent: int | None,
    options: list[tuple[str, Any]],
    interceptors: Iterable[grpc.ServerInterceptor] = (),
) -> grpc.Server:
    """A thread-pool server; RPCs beyond ``max_concurrent`` get RESOURCE_EXHAUSTED at once."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=list(interceptors),
        # A second server on a port in use must fail, not silently share it.
        options=[*options, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent,
    )


def add_unary_method(
    server: grpc.Server,
    service: str,
    method: str,
    behaviour: Callable[[Any, grpc.ServicerContext], Any],
    request_deserializer: Callable[[bytes], Any],
    response_serializer: Callable[[Any], bytes],
) -> None:
    """Register one unary method as generated ``add_*Servicer_to_server`` code does, with a
    request deserializer of our own."""
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=request_deserializer,
            response_serializer=response_serializer,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_health_and_reflection(server: grpc.Server, services: Iterable[str]) -> DrainingHealth:
    """Register grpc.health.v1 (every service SERVING) and server reflection."""
    names = list(services)
    servicer = DrainingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


# gRPC's send for a non-blocking stream waits until the message is written, and the server's
# poller thread is what sees the write complete. grpc_health sends while holding its lock,
# and the poller thread takes that lock to forget a watch whose call ended: a send made
# inline could wait for the poller while the poller waited for the lock. That deadlock hung a
# drain (and a CI run). Responses therefore leave from this one thread, in order, and the
# health lock is only held to queue them. Health responses are a few bytes each: one
# client's full flow-control window would take thousands of status changes.
_SENDER = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-send")


class _WatchStream:
    """A ``Watch`` stream's response callback that can be ended once; later sends are dropped.

    Sends are queued to :data:`_SENDER`, never made by the caller's thread."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self._send, self._ended, self._lock = send, False, threading.Lock()

    def send(self, response: Any) -> None:
        with self._lock:
            if not self._ended:
                self._ended = response is None
                _SENDER.submit(self._deliver, response)

    def end(self) -> None:
        self.send(None)  # gRPC sends status OK: the stream is over

    def _deliver(self, response: Any) -> None:
        try:
            self._send(response)
        except Exception:  # the call ended under it: nothing left to tell that client
            log.debug("health watch send failed", exc_info=True)


class DrainingHealth(health.HealthServicer):
    """The standard health service, plus :meth:`end_watches` for the drain.

    ``Watch`` streams (client-side health checking) are the only calls of ours that never end
    by themselves. Ending them lets ``server.stop(grace)`` wait for exactly the other calls.
    """

    def __init__(self) -> None:
        super().__init__()  # non-blocking Watch: an open stream holds no thread
        self._watches: set[Callable[[], None]] = set()
        self._watches_lock = threading.Lock()
        self._ending = False

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
        if send_response_callback is None:  # run as a blocking stream: a wrapper hid the flag
            watcher = super().Watch(request, context)
            self._track(watcher.close, context)
            return watcher
        stream = _WatchStream(send_response_callback)
        super().Watch(request, context, stream.send)
        self._track(stream.end, context)
        return None

    def _track(self, end: Callable[[], None], context: grpc.ServicerContext) -> None:
        with self._watches_lock:
            if not self._ending:
                self._watches.add(end)
                if context.add_callback(lambda: self._forget(end)):
                    return
                self._watches.discard(end)  # the call is already over
        end()  # draining: this watch has had its NOT_SERVING, end it too

    def _forget(self, end: Callable[[], None]) -> None:
        with self._watches_lock:
            self._watches.discard(end)

    def end_watches(self) -> None:
        """End every open ``Watch`` with status OK (after NOT_SERVING), and new ones at once."""
        with self._watches_lock:
            self._ending = True
            ends, self._watches = list(self._watches), set()
        for end in ends:
            end()


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind and return the port actually bound (tests listen on port 0)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


Behaviour = Callable[[Any, grpc.ServicerContext], Any]


class UnaryInterceptor(grpc.ServerInterceptor):
    """Base for interceptors that wrap each single-response call's behaviour; response
    streams pass untouched.

    The wrapper runs on the worker thread with the call's context, unlike
    ``intercept_service`` itself, which gRPC runs on its dispatch thread. It passes the
    request on unread, so it also wraps the request-streaming handlers that
    ``api.lazyrequest`` makes of the API's unary methods.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.response_streaming or not self.applies(method):
            return handler
        if handler.unary_unary is not None:
            factory, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        else:
            factory, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        return factory(
            self.wrap(method, behaviour),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def applies(self, method: str) -> bool:
        return True

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        raise NotImplementedError


class InFlight(UnaryInterceptor):
    """Counts unary calls being handled, for the drain's log lines (see :func:`drain`)."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        def counted(request: Any, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self._count += 1
            # Counted until the call has terminated, i.e. its response has been sent too.
            if not context.add_callback(self._done):
                self._done()
            return behaviour(request, context)

        return counted

    def _done(self) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count


def drain(
    server: grpc.Server,
    servicer: health.HealthServicer,
    grace: float,
    in_flight: InFlight | None = None,
    delay: float = 0.0,
) -> None:
    """Report NOT_SERVING, refuse new RPCs and let every accepted one finish within ``grace``.

    ``delay`` gives clients that watch our health (the API's balancer, a load balancer's
    readiness probe) time to route new calls elsewhere before this server refuses them.

    ``server.stop(grace)`` waits for every call gRPC has accepted, including one whose request
    is still arriving or that waits for a thread; only when ``grace`` runs out does it cancel
    them. What it cannot end are health ``Watch`` streams, so those are ended here. (Never
    ``stop(None)`` early: it cancels every call, and a call is only visible to an interceptor
    once its whole request has arrived. Calls a client sends in the instant of the stop itself,
    before it has seen the GOAWAY, are cancelled by gRPC's core whatever we do: the ``delay``
    is what keeps health-aware clients from sending them.)
    """
    servicer.enter_graceful_shutdown()
    if delay:
        time.sleep(delay)
    stopped = server.stop(grace)
    if isinstance(servicer, DrainingHealth):
        servicer.end_watches()
    calls = in_flight.count if in_flight is not None else None
    log.info("draining", extra={"grace_seconds": grace, "calls_in_handlers": calls})
    if not stopped.wait(grace + 1.0):  # gRPC cancels what is left when grace runs out
        log.warning("drain: grace period over, calls cancelled")
        stopped.wait()


def build_or_exit(build: Callable[[S], R], settings: S) -> R:
    """What stops a server that the flags could not show (a file that does not parse, a key
    that does not match its certificate, a port in use): one JSON line and exit status 2,
    not a traceback. The process exits, so whatever was half started goes with it."""
    try:
        return build(settings)
    except (ValueError, OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None


def freeze_startup_heap() -> int:
    """Move what start-up built into the collector's permanent generation; returns its size.

    Otherwise every full collection walks all the modules, classes and functions imported at
    start (gRPC, protobuf, Pillow, cryptography, redis): 20-70 ms holding the GIL, which stalls
    every call in flight in the process and sets the p99 of a 6 ms request
    (docs/benchmarks.md). Frozen objects are never scanned again, so a full collection walks
    only what requests leave behind. Call it once the server is built, before it is busy.
    """
    gc.collect()  # cycles already garbage would otherwise be kept for good
    gc.freeze()
    return gc.get_freeze_count()


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT.

    The signals arrive through a pipe that Python's C-level handler writes to
    (``signal.set_wakeup_fd``); the Python handlers do nothing. A handler that set an
    ``Event`` deadlocked the main thread when a second signal came while the first was being
    handled (a process group's SIGTERM, then a supervisor's: the second ``Event.set`` waited
    for the lock the first one held), and the server never drained. The C handler writes the
    pipe in whichever thread the kernel interrupts, so the untimed read always returns.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)  # and stays: a repeated signal must not cut the drain short
    try:
        os.read(read_end, 1)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A Python handler must exist for the wakeup pipe to be written; the pipe is the signal."""
