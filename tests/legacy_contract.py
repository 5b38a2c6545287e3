"""The public contract exactly as existing clients were generated from it, and no more.

Built from the table in the contract rather than from our proto, so a test using it proves
that an old client (field 1 only, no metadata) still works.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

METHOD = "/imagescaler.ImageScaler/ScaleImage"


def _messages() -> tuple[type[Any], type[Any]]:
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="legacy_imagescaler.proto", package="imagescaler", syntax="proto3"
    )

    def message(name: str, *fields: tuple[str, int, int, str]) -> None:
        m = file.message_type.add(name=name)
        for field_name, number, kind, type_name in fields:
            field = m.field.add(name=field_name, number=number, type=kind, label=f.LABEL_OPTIONAL)
            if type_name:
                field.type_name = type_name

    message("ImageSource", ("http_uri", 1, f.TYPE_STRING, ""))
    message(
        "Image",
        ("content", 1, f.TYPE_BYTES, ""),
        ("source", 2, f.TYPE_MESSAGE, ".imagescaler.ImageSource"),
    )
    message("ScaleImageRequest", ("image", 1, f.TYPE_MESSAGE, ".imagescaler.Image"))
    message("ScaleImageReply", ("content", 1, f.TYPE_BYTES, ""))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("imagescaler.ScaleImageRequest")),
        get(pool.FindMessageTypeByName("imagescaler.ScaleImageReply")),
    )


Request, Reply = _messages()


def legacy_scale(target: str, content: bytes, timeout: float = 30.0) -> bytes:
    """Send only field 1 with no metadata; read only field 1."""
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=Request.SerializeToString,
            response_deserializer=Reply.FromString,
        )
        request = Request()
        request.image.content = content
        return call(request, timeout=timeout).content
