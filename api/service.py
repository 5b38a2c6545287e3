"""The public ``imagescaler.ImageScaler`` servicer: source, decision, forwarding, reply."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from api import accesslog
from api.config import ApiSettings
from api.decision import decide
from api.fetch import Fetcher
from api.forwarding import Body, ProcessorClient
from api.interceptors import current, require_scope
from api.pb import imagescaler_pb2 as pb
from api.ratelimit import Limiter, LimitError, abort_for
from api.results import ResultStore
from auth.tenants import SCOPE_CONTENT, SCOPE_STORE, SCOPE_URL, Tenant
from processor import headers, serving, wire
from processor.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    PermissionDenied,
    ServiceError,
    Unavailable,
    check_caller,
)
from processor.pb import processor_pb2 as ppb
from processor.service import FORMAT_ENUMS, MODE_ENUMS, MODES

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
FORMAT_NAMES = {v: k for k, v in FORMAT_ENUMS.items()}
NO_DEADLINE = 365 * 86400.0  # seconds; see Deadline.of


@dataclass(frozen=True)
class Deadline:
    """The caller's deadline (or our default), capped; each stage gets what is left."""

    expires: float

    @classmethod
    def of(cls, context: grpc.ServicerContext, default: float, cap: float) -> Deadline:
        """A call without a deadline gets ``default``: grpcio reports it as ~9.2e18 s left,
        never None, so anything beyond a year counts as "none set"."""
        remaining = context.time_remaining()
        unset = remaining is None or remaining > NO_DEADLINE
        budget = default if unset else min(remaining, cap)
        return cls(time.monotonic() + budget)

    def remaining(self) -> float:
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded")
        return left


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageScaler"].full_name


@dataclass(frozen=True)
class Received:
    """A ``ScaleImageRequest`` as it arrived: the image's bytes taken out once."""

    message: pb.ScaleImageRequest  # ``image.content`` unset
    body: Body  # ``image.content``, emptied once forwarded (every frame up the stack keeps self)
    malformed: bool = False  # not a ScaleImageRequest at all: INVALID_ARGUMENT, not INTERNAL

    @property
    def content(self) -> bytes:
        return self.body.data


MALFORMED = f"malformed request: not a valid {pb.ScaleImageRequest.DESCRIPTOR.full_name} message"


def read_request(raw: bytes) -> Received:
    """The request deserializer: ``image.content`` taken out of the received bytes with one
    copy (:func:`processor.wire.take`); bytes that do not parse come back ``malformed``."""
    taken = wire.take(
        raw,
        pb.ScaleImageRequest,
        pb.ScaleImageRequest.IMAGE_FIELD_NUMBER,
        pb.Image.CONTENT_FIELD_NUMBER,
    )
    if taken is None:
        return Received(pb.ScaleImageRequest(), Body(b""), malformed=True)
    message, content = taken
    return Received(message, Body(content))


def add_to_server(
    scale_image: Callable[[Received, grpc.ServicerContext], pb.ScaleImageReply],
    server: grpc.Server,
) -> None:
    """What ``add_ImageScalerServicer_to_server`` does, with :func:`read_request`."""
    serving.add_unary_method(
        server,
        SERVICE_NAME,
        "ScaleImage",
        scale_image,
        read_request,
        pb.ScaleImageReply.SerializeToString,
    )


class ScalerService:
    def __init__(
        self,
        settings: ApiSettings,
        processor: ProcessorClient,
        fetcher: Fetcher,
        limiter: Limiter,
        store: ResultStore,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.fetcher = fetcher
        self.limiter = limiter
        self.store = store

    def ScaleImage(self, request: Received, context: grpc.ServicerContext) -> pb.ScaleImageReply:
        try:
            return self._scale(request, context)
        except ServiceError as exc:
            accesslog.note(reason=str(exc))
            if isinstance(exc, LimitError):  # the pixel limit: a refusal, as at admission
                accesslog.note(retry_after=exc.retry_after)
            abort_for(context, exc)

    def _scale(self, request: Received, context: grpc.ServicerContext) -> pb.ScaleImageReply:
        if request.malformed:
            raise InvalidInput(MALFORMED)
        s = self.settings
        deadline = Deadline.of(context, s.deadline, s.max_deadline)
        asked = request.message.delivery
        # Before the tenant's policy (no grant can help) and before any fetch, charge or work;
        # a registry with `storage: require` is refused at start without a store.
        if asked in URL_DELIVERIES and not s.result_store:
            raise FailedPrecondition("result storage is not configured on this service")
        delivery = delivery_for(asked, current().tenant)
        body = self._source(request.message.image, request.body, deadline, context)
        header = headers.probe(body.data, s.max_input_bytes, s.max_pixels)
        self.limiter.charge_pixels(current().tenant_id, header.pixels / 1e6)
        decision = decide(header.oriented_size, s.target_size, s.margin, s.grayscale)
        accesslog.note(
            bytes_in=len(body.data),
            input_format=header.format,
            input_size=f"{header.oriented_size[0]}x{header.oriented_size[1]}",
            megapixels=round(header.pixels / 1e6, 3),
            scaled=decision.scale,
            grayscale=decision.grayscale,
        )
        reply = self.processor.process(
            self._job(decision.scale), body, deadline.remaining(), context
        )
        check_caller(context, "was processed")  # no upload, nor an OK logged, for a gone caller
        accesslog.note(bytes_out=len(reply.image), passthrough=reply.passthrough)
        out = pb.ScaleImageReply(info=info_from(reply))
        if delivery.store:
            self._store(out, reply.image, deadline, delivery.url_asked)
        if delivery.inline or out.storage_fallback:
            out.content = reply.image
        return out

    def _store(
        self, out: pb.ScaleImageReply, image: bytes, deadline: Deadline, url_asked: bool
    ) -> None:
        """Upload and sign; on storage trouble fall back to inline delivery if configured, or
        if the caller never asked for a URL (an old client of a tenant that requires storage
        gets what it always got)."""
        started = time.perf_counter()
        try:
            stored = self.store.put(
                current().tenant_id,
                image,
                out.info.content_type,
                out.info.format,
                deadline.expires,
            )
        except Unavailable:
            if url_asked and not self.settings.result_fallback_inline:
                raise
            accesslog.note(storage="fallback-inline")
            out.storage_fallback = True
            return
        accesslog.note(upload_ms=round((time.perf_counter() - started) * 1000, 1))
        out.stored.CopyFrom(
            pb.StoredResult(
                url=stored.url,
                expires_unix=stored.expires_unix,
                size=stored.size,
                content_type=stored.content_type,
                sha256=stored.sha256,
            )
        )

    def _source(
        self, image: pb.Image, content: Body, deadline: Deadline, context: grpc.ServicerContext
    ) -> Body:
        """Inline bytes win over a URL, as the contract says; a fetch stops when the call ends
        (a cancelled call held its tenant's slot for the whole --fetch-timeout)."""
        if content.data:
            require_scope(SCOPE_CONTENT)
            accesslog.note(source="content")
            return content
        if image.HasField("source") and image.source.http_uri:
            require_scope(SCOPE_URL)
            accesslog.note(source="url")
            fetched = self.fetcher.fetch(image.source.http_uri, deadline.remaining(), context)
            accesslog.note(fetch_ms=round(fetched.elapsed * 1000, 1))
            return Body(fetched.data)
        raise InvalidInput("no image: set image.content or image.source.http_uri")

    def _job(self, scale: bool) -> ppb.ProcessRequest:
        """What to do with the image; the image itself joins it on the way out."""
        s = self.settings
        request = ppb.ProcessRequest(
            grayscale=s.grayscale, format=FORMAT_ENUMS[s.format], quality=s.quality
        )
        if scale:
            request.scaling.CopyFrom(
                ppb.Scaling(
                    width=s.target_size[0],
                    height=s.target_size[1],
                    mode=MODE_ENUMS[s.fit],
                    pad_color=s.pad_color,
                )
            )
        return request


@dataclass(frozen=True)
class Delivery:
    store: bool
    inline: bool
    url_asked: bool  # False: stored only because the tenant requires it


URL_DELIVERIES = (pb.DELIVERY_URL, pb.DELIVERY_URL_AND_INLINE)


def delivery_for(asked: int, tenant: Tenant) -> Delivery:
    """What the caller gets, from what it asked and its tenant's storage policy.

    A tenant that requires storage still gets inline bytes when it did not ask for a URL, so
    its old clients keep working.
    """
    if asked not in (pb.DELIVERY_INLINE, pb.DELIVERY_URL, pb.DELIVERY_URL_AND_INLINE):
        raise InvalidInput(f"unknown delivery {asked}")
    if asked == pb.DELIVERY_INLINE:
        return Delivery(store=tenant.storage == "require", inline=True, url_asked=False)
    if tenant.storage == "forbid":
        raise PermissionDenied(f"result storage is not enabled for tenant {tenant.id}")
    require_scope(SCOPE_STORE)
    return Delivery(store=True, inline=asked == pb.DELIVERY_URL_AND_INLINE, url_asked=True)


def info_from(reply: ppb.ProcessReply) -> pb.ProcessingInfo:
    """The processor's geometry fields have the same names in the public reply."""
    fmt = FORMAT_NAMES.get(reply.format, "jpeg")
    t = reply.timings
    info = pb.ProcessingInfo(
        scaled=reply.scaled,
        grayscale=reply.grayscale,
        format=fmt,
        content_type=CONTENT_TYPES[fmt],
        fit=MODES[reply.mode] if reply.scaled else "",
        color=reply.color,
        passthrough=reply.passthrough,
        processing_ms=t.decode_ms + t.transform_ms + t.encode_ms,
    )
    for field in ppb.Geometry.DESCRIPTOR.fields:
        setattr(info, field.name, getattr(reply.geometry, field.name))
    return info
