"""The floor under the API's cost: a bare gRPC pass-through for imagescaler-bench.

It serves ``ScaleImage`` by reading the image and forwarding it to the processor over mutual
TLS with a fixed job, as the API does (:func:`api.service.read_request`,
:func:`api.forwarding.encode_request`), and returning the result. No authentication, rate
limits, header probe, access log or metrics: what one Python gRPC hop costs before any of
our code runs. Never deploy it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc

from api.forwarding import METHOD, encode_request
from api.pb import imagescaler_pb2 as pb
from api.service import MALFORMED, Received, add_to_server
from processor import serving
from processor.logs import configure
from processor.pb import processor_pb2 as ppb
from tools.client import MAX_MESSAGE

log = logging.getLogger("imagescaler.floorproxy")


class PassThrough:
    """ScaleImage as a forward of the image with a fixed job, and nothing else."""

    def __init__(self, process: grpc.UnaryUnaryMultiCallable, job: ppb.ProcessRequest) -> None:
        self._process, self._job = process, job

    def ScaleImage(self, request: Received, context: grpc.ServicerContext) -> pb.ScaleImageReply:
        if request.malformed:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        reply = self._process(encode_request(self._job, request.content), timeout=30)
        return pb.ScaleImageReply(content=reply.image)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--processor", required=True, help="host:port")
    p.add_argument("--processor-ca", required=True, type=Path)
    p.add_argument("--processor-cert", required=True, type=Path)
    p.add_argument("--processor-key", required=True, type=Path)
    p.add_argument("--size", help="WxH to scale to (default: grayscale only)")
    args = p.parse_args(argv)
    configure("info")

    job = ppb.ProcessRequest(grayscale=True, format=ppb.FORMAT_JPEG, quality=85)
    if args.size:
        width, height = (int(v) for v in args.size.split("x"))
        job.scaling.CopyFrom(ppb.Scaling(width=width, height=height, mode=ppb.FIT_MODE_PAD))
    credentials = grpc.ssl_channel_credentials(
        args.processor_ca.read_bytes(),
        args.processor_key.read_bytes(),
        args.processor_cert.read_bytes(),
    )
    options = serving.message_options(MAX_MESSAGE, client=True)
    channel = grpc.secure_channel(args.processor, credentials, options=options)
    process = channel.unary_unary(METHOD, response_deserializer=ppb.ProcessReply.FromString)

    server = serving.new_server(8, None, serving.message_options(MAX_MESSAGE))
    add_to_server(PassThrough(process, job).ScaleImage, server)
    port = serving.bind(server, "127.0.0.1:0", None)
    server.start()
    serving.freeze_startup_heap()  # as the API does, so the floor stays comparable
    log.info("serving", extra={"port": port})
    serving.wait_for_signal()
    server.stop(1).wait()
    channel.close()


if __name__ == "__main__":
    main()
