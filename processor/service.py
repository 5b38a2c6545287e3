"""The processor's gRPC servicer: protobuf in, pipeline job, protobuf out."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import grpc

from processor import imaging, memory, serving, wire
from processor.errors import Caller, InvalidInput, Overloaded, ServiceError, check_caller
from processor.metrics import PipelineMetrics
from processor.pb import processor_pb2 as pb

log = logging.getLogger(__name__)

MODES = {
    pb.FIT_MODE_UNSPECIFIED: "pad",
    pb.FIT_MODE_FIT: "fit",
    pb.FIT_MODE_FILL: "fill",
    pb.FIT_MODE_PAD: "pad",
    pb.FIT_MODE_STRETCH: "stretch",
}
MODE_ENUMS = {
    "fit": pb.FIT_MODE_FIT,
    "fill": pb.FIT_MODE_FILL,
    "pad": pb.FIT_MODE_PAD,
    "stretch": pb.FIT_MODE_STRETCH,
}
FORMATS = {
    pb.FORMAT_UNSPECIFIED: "jpeg",
    pb.FORMAT_JPEG: "jpeg",
    pb.FORMAT_PNG: "png",
    pb.FORMAT_WEBP: "webp",
}
FORMAT_ENUMS = {"jpeg": pb.FORMAT_JPEG, "png": pb.FORMAT_PNG, "webp": pb.FORMAT_WEBP}
MAX_SIDE = 16384
DEFAULT_QUALITY = 85
QUEUE_CHECK = 0.05  # seconds between a queued call's looks at whether its caller is still there
QUEUED = "was queued"


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Processor"].full_name


@dataclass(frozen=True)
class Received:
    """A ``ProcessRequest`` as it arrived: its parameters, and the image taken out once."""

    job: pb.ProcessRequest  # ``image`` unset
    image: bytes
    malformed: bool = False  # not a ProcessRequest at all: INVALID_ARGUMENT, not INTERNAL


MALFORMED = f"malformed request: not a valid {pb.ProcessRequest.DESCRIPTOR.full_name} message"


def read_request(raw: bytes) -> Received:
    """The request deserializer: the image taken out of the received bytes with one copy
    (:func:`processor.wire.take`); bytes that do not parse come back ``malformed``."""
    taken = wire.take(raw, pb.ProcessRequest, pb.ProcessRequest.IMAGE_FIELD_NUMBER)
    if taken is None:
        return Received(pb.ProcessRequest(), b"", malformed=True)
    return Received(*taken)


def add_to_server(service: ProcessorService, server: grpc.Server) -> None:
    """What ``add_ProcessorServicer_to_server`` does, with :func:`read_request`."""
    serving.add_unary_method(
        server,
        SERVICE_NAME,
        "Process",
        service.Process,
        read_request,
        pb.ProcessReply.SerializeToString,
    )


def job_from_request(request: pb.ProcessRequest) -> imaging.Job:
    """Validate the request's parameters; the image bytes are the pipeline's business."""
    if request.format not in FORMATS:
        raise InvalidInput(f"unknown output format {request.format}")
    if request.quality > 100:
        raise InvalidInput(f"quality must be 1-100, got {request.quality}")
    size = None
    mode = "pad"
    pad_color = (0, 0, 0)
    if request.HasField("scaling"):
        scaling = request.scaling
        if not (0 < scaling.width <= MAX_SIDE and 0 < scaling.height <= MAX_SIDE):
            raise InvalidInput(f"target size must be 1-{MAX_SIDE} on each side")
        if scaling.mode not in MODES:
            raise InvalidInput(f"unknown fit mode {scaling.mode}")
        size, mode = (scaling.width, scaling.height), MODES[scaling.mode]
        color = scaling.pad_color & 0xFFFFFF
        pad_color = (color >> 16, (color >> 8) & 0xFF, color & 0xFF)
    return imaging.Job(
        size=size,
        mode=mode,
        pad_color=pad_color,
        grayscale=request.grayscale,
        format=FORMATS[request.format],
        quality=request.quality or DEFAULT_QUALITY,
    )


def reply_from_result(result: imaging.Result) -> pb.ProcessReply:
    """The pipeline's dataclasses carry the proto's field names, so they copy by name."""
    return pb.ProcessReply(
        image=result.data,
        geometry=pb.Geometry(**asdict(result.geometry)),
        format=FORMAT_ENUMS[result.format],
        scaled=result.scaled,
        grayscale=result.grayscale,
        mode=MODE_ENUMS[result.mode] if result.scaled and result.mode else pb.FIT_MODE_UNSPECIFIED,
        color=result.color,
        passthrough=result.passthrough,
        timings=pb.Timings(**asdict(result.timings)),
        input_format=result.input_format,
    )


class Admission:
    """At most ``workers`` images in work and ``queue`` waiting; beyond that, refuse at once.

    Images in work also hold their estimated decode memory in ``memory`` (see
    :mod:`processor.memory`): a count alone lets two big WebPs exceed the pod's limit.

    Not gRPC's ``maximum_concurrent_rpcs``: that also counts health checks and the API's
    long-lived health watches, so a busy processor would refuse a new API connection's health
    check and look down rather than busy.
    """

    def __init__(
        self, workers: int, queue: int, memory_budget: int = memory.DEFAULT_BUDGET
    ) -> None:
        self._slots = threading.BoundedSemaphore(workers + queue)
        self._work = threading.BoundedSemaphore(workers)
        self.memory = memory.Budget(memory_budget)

    @contextlib.contextmanager
    def admit(self, caller: Caller | None = None) -> Iterator[None]:
        """A slot, then a worker. A queued call whose caller has gone (cancelled, deadline
        passed, drained) leaves the queue: it would take a worker, and refuse live calls
        meanwhile, for a result nobody waits for."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded(memory.AT_CAPACITY)
        try:
            while not self._work.acquire(timeout=QUEUE_CHECK):
                check_caller(caller, QUEUED)
            try:
                check_caller(caller, QUEUED)
                yield
            finally:
                self._work.release()
        finally:
            self._slots.release()


class ProcessorService:
    """Runs the pipeline for each request; domain errors become precise status codes."""

    def __init__(
        self, limits: imaging.Limits, metrics: PipelineMetrics, admission: Admission | None = None
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.admission = admission or Admission(workers=2, queue=8)

    def Process(self, request: Received, context: grpc.ServicerContext) -> pb.ProcessReply:
        started = time.perf_counter()
        image = request.image
        log.debug("started", extra={"bytes_in": len(image)})
        try:
            if request.malformed:
                raise InvalidInput(MALFORMED)
            with self.admission.admit(context):
                job = job_from_request(request.job)
                result = imaging.process(image, job, self.limits, self.admission.memory)
        except ServiceError as exc:
            log.info(
                "refused", extra={"code": exc.code.name, "reason": str(exc), "bytes_in": len(image)}
            )
            context.abort(exc.code, str(exc))
        if log.isEnabledFor(logging.DEBUG):
            ms = round((time.perf_counter() - started) * 1000, 2)
            log.debug(
                "processed",
                extra={
                    "bytes_in": len(image),
                    "bytes_out": len(result.data),
                    "ms": ms,
                    "scaled": result.scaled,
                },
            )
        t, g = result.timings, result.geometry
        self.metrics.observe(
            t.decode_ms,
            t.transform_ms,
            t.encode_ms,
            g.original_width * g.original_height / 1e6,
            result.scaled,
            result.grayscale,
            result.passthrough,
        )
        return reply_from_result(result)
