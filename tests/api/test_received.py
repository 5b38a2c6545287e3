"""The API's request deserializer must see exactly what protobuf would parse."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from api.pb import imagescaler_pb2 as pb
from api.service import read_request
from processor import wire

PHOTO = bytes(range(256)) * 700
URL = pb.ImageSource(http_uri="http://127.0.0.1:9/photo.jpg")


def field(number: int, payload: bytes) -> bytes:
    return wire.tag(number) + wire.varint(len(payload)) + payload


def image(*parts: bytes) -> bytes:
    return field(pb.ScaleImageRequest.IMAGE_FIELD_NUMBER, b"".join(parts))


CONTENT = field(pb.Image.CONTENT_FIELD_NUMBER, PHOTO)
SOURCE = field(pb.Image.SOURCE_FIELD_NUMBER, URL.SerializeToString())
DELIVERY = pb.ScaleImageRequest(delivery=pb.DELIVERY_URL_AND_INLINE).SerializeToString()
UNKNOWN = field(77, b"opaque") + wire.varint(88 << 3) + wire.varint(5)


@pytest.mark.parametrize(
    "raw",
    [
        pb.ScaleImageRequest(image=pb.Image(content=PHOTO)).SerializeToString(),
        image(CONTENT) + DELIVERY,
        DELIVERY + image(SOURCE, CONTENT, UNKNOWN) + UNKNOWN,
        image(UNKNOWN, CONTENT),
        image(SOURCE),  # a URL only: protobuf's own parse
        image(CONTENT) + image(SOURCE),  # two Image fields: protobuf merges them
        image(CONTENT, field(pb.Image.CONTENT_FIELD_NUMBER, b"later")),  # the last one wins
        DELIVERY,  # no image at all: the service says so
        b"",
    ],
    ids=[
        "serialized",
        "delivery after",
        "everything",
        "unknown first",
        "url only",
        "merged images",
        "repeated content",
        "no image",
        "empty",
    ],
)
def test_read_request_matches_protobuf(raw: bytes) -> None:
    whole = pb.ScaleImageRequest.FromString(raw)
    received = read_request(raw)
    assert received.content == whole.image.content
    assert received.message.HasField("image") == whole.HasField("image")
    if whole.HasField("image"):
        whole.image.ClearField("content")
    assert received.message == whole
    assert not received.message.image.content
    assert not received.malformed


def test_content_is_taken_out_by_the_shortcut() -> None:
    """The common request takes the one-copy path (protobuf's parse would also pass the
    equality test above): the nested split finds the content and leaves the rest intact."""
    raw = DELIVERY + image(SOURCE, CONTENT)
    parts = wire.split(raw, pb.ScaleImageRequest.IMAGE_FIELD_NUMBER, pb.Image.CONTENT_FIELD_NUMBER)
    assert parts is not None
    rest, content = parts
    assert content == PHOTO
    assert rest == DELIVERY + image(SOURCE)


@pytest.mark.parametrize(
    "raw",
    [image(CONTENT)[:-1], image(CONTENT, field(pb.Image.SOURCE_FIELD_NUMBER, b"\xff"))],
    ids=["truncated", "broken source"],
)
def test_broken_requests_are_marked_where_protobuf_fails(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.ScaleImageRequest.FromString(raw)
    received = read_request(raw)
    assert received.malformed and not received.content
