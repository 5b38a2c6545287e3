"""The image taken out of a received request must leave exactly what protobuf would parse."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from processor import wire
from processor.pb import processor_pb2 as pb
from processor.service import read_request

IMAGE = pb.ProcessRequest.IMAGE_FIELD_NUMBER


varint = wire.varint


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == 2:
        payload = varint(len(payload)) + payload
    return varint(number << 3 | wire_type) + payload


SCALING = pb.ProcessRequest(
    scaling=pb.Scaling(width=1024, height=768, mode=pb.FIT_MODE_PAD, pad_color=0x123456)
).SerializeToString()
OPTIONS = pb.ProcessRequest(grayscale=True, format=pb.FORMAT_PNG, quality=77).SerializeToString()
JOB = SCALING + OPTIONS
PHOTO = bytes(range(256)) * 700  # a multi-byte length varint
UNKNOWN = (
    field(90, 0, varint(2**63))  # varint
    + field(91, 1, b"\x01" * 8)  # 64-bit
    + field(92, 5, b"\x02" * 4)  # 32-bit
    + field(93, 2, b"opaque")  # length-delimited
)


@pytest.mark.parametrize(
    "raw",
    [
        field(IMAGE, 2, PHOTO),
        field(IMAGE, 2, b""),
        JOB + field(IMAGE, 2, PHOTO),  # how the API sends it
        field(IMAGE, 2, PHOTO) + JOB,  # how protobuf serializes it
        SCALING + field(IMAGE, 2, PHOTO) + OPTIONS + UNKNOWN,
        UNKNOWN + field(IMAGE, 2, PHOTO) + JOB,
    ],
    ids=["image only", "empty image", "image last", "image first", "middle", "unknown fields"],
)
def test_split_leaves_what_protobuf_parses(raw: bytes) -> None:
    parts = wire.split(raw, IMAGE)
    assert parts is not None
    rest, image = parts
    whole = pb.ProcessRequest.FromString(raw)
    assert image == whole.image
    assert pb.ProcessRequest.FromString(rest + field(IMAGE, 2, image)) == whole
    received = read_request(raw)
    assert received.image == whole.image
    whole.ClearField("image")
    assert received.job == whole


@pytest.mark.parametrize(
    "raw",
    [
        JOB,  # no image
        field(IMAGE, 2, b"first") + field(IMAGE, 2, b"second"),  # repeated: protobuf keeps last
        field(IMAGE, 0, varint(5)),  # wrong wire type for the field
        field(IMAGE, 2, PHOTO)[:-1],  # truncated value
        varint(IMAGE << 3 | 2) + b"\xff" * 11,  # length varint never ends
        field(IMAGE, 2, PHOTO) + b"\x80",  # tag cut short
        field(7, 3, b"") + field(IMAGE, 2, PHOTO),  # a group
        field(0, 0, b"\x00") + field(IMAGE, 2, PHOTO),  # field number 0
        field(IMAGE, 2, PHOTO) + field(9, 0, b"\xff" * 10 + b"\x01"),  # over-long varint
    ],
    ids=[
        "absent",
        "repeated",
        "wire type",
        "truncated",
        "endless length",
        "cut tag",
        "group",
        "field zero",
        "long varint",
    ],
)
def test_split_leaves_unusual_shapes_to_protobuf(raw: bytes) -> None:
    assert wire.split(raw, IMAGE) is None


def test_read_request_falls_back_to_protobuf() -> None:
    raw = field(IMAGE, 2, b"first") + JOB + field(IMAGE, 2, b"second")
    received = read_request(raw)
    assert received.image == b"second"  # protobuf's rule: the last one wins
    assert received.job == pb.ProcessRequest.FromString(JOB)
    assert not received.job.image


@pytest.mark.parametrize(
    "raw",
    [
        field(IMAGE, 2, PHOTO)[:-1],  # truncated: the shortcut stops, protobuf refuses
        field(IMAGE, 2, PHOTO) + field(2, 2, b"\xff"),  # the shortcut passes, a broken Scaling
    ],
    ids=["truncated", "broken scaling"],
)
def test_read_request_marks_what_protobuf_rejects(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.ProcessRequest.FromString(raw)
    received = read_request(raw)
    assert received.malformed and not received.image
    assert not read_request(JOB + field(IMAGE, 2, PHOTO)).malformed
