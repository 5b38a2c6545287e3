"""The hand-written request readers (processor.wire) against protobuf itself, on generated and
mangled messages: whatever protobuf parses, they must give back the same message and image;
whatever protobuf refuses, they must mark malformed (the caller gets INVALID_ARGUMENT)."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import service as api_service
from api.pb import imagescaler_pb2 as apb
from processor import service as processor_service
from processor import wire
from processor.pb import processor_pb2 as ppb

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NUMBERS = st.one_of(st.integers(1, 6), st.integers(7, 2**29 - 1))


def _varint_field(number: int, value: int) -> bytes:
    return wire.varint(number << 3) + wire.varint(value)


def _fixed_field(number: int, wire_type: int) -> bytes:
    return wire.varint(number << 3 | wire_type) + b"\x01" * (8 if wire_type == 1 else 4)


def _delimited(number: int, payload: bytes) -> bytes:
    return wire.tag(number) + wire.varint(len(payload)) + payload


def _fields(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(_varint_field, NUMBERS, st.integers(0, 2**64 - 1)),
        st.builds(_fixed_field, NUMBERS, st.sampled_from([1, 5])),
        st.builds(_delimited, NUMBERS, payloads),
    )


# Messages nest (an Image inside a ScaleImageRequest), so payloads are themselves messages,
# valid UTF-8 text (for string fields), or arbitrary bytes.
_LEAF = st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode))
MESSAGES = st.recursive(
    st.lists(_fields(_LEAF), max_size=6).map(b"".join),
    lambda inner: st.lists(_fields(st.one_of(_LEAF, inner)), max_size=6).map(b"".join),
    max_leaves=12,
)


UNKNOWN = _fields(_LEAF).filter(lambda f: f[0] >= 10 << 3)  # field numbers no message uses


@st.composite
def _shuffled(draw: st.DrawFn, known: list[bytes]) -> bytes:
    return b"".join(draw(st.permutations(known + draw(st.lists(UNKNOWN, max_size=3)))))


@st.composite
def process_requests(draw: st.DrawFn) -> bytes:
    """Near-real ProcessRequests: an image, a job, unknown fields, in any order."""
    job = ppb.ProcessRequest(
        grayscale=draw(st.booleans()),
        quality=draw(st.integers(0, 120)),
        scaling=ppb.Scaling(width=draw(st.integers(0, 5000)), height=draw(st.integers(0, 5000))),
    ).SerializeToString()
    return draw(_shuffled([_delimited(1, draw(st.binary(max_size=80))), job]))


@st.composite
def scale_requests(draw: st.DrawFn) -> bytes:
    """Near-real ScaleImageRequests: an Image holding content (and maybe a source), a
    delivery, unknown fields at both levels, in any order."""
    image = [_delimited(1, draw(st.binary(max_size=80)))]
    if draw(st.booleans()):
        source = apb.ImageSource(http_uri=draw(st.text(max_size=30)))
        image.append(_delimited(2, source.SerializeToString()))
    top = [_delimited(1, draw(_shuffled(image))), _varint_field(2, draw(st.integers(0, 3)))]
    return draw(_shuffled(top))


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A generated message, then maybe cut short, with a byte changed, or with junk added."""
    raw = draw(st.one_of(MESSAGES, process_requests(), scale_requests()))
    change = draw(st.sampled_from(["none", "truncate", "flip", "append"]))
    if change == "truncate" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if change == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    if change == "append":
        return raw + draw(st.binary(min_size=1, max_size=8))
    return raw


def _parsed(message_type: type[Message], raw: bytes) -> Message | None:
    try:
        return message_type.FromString(raw)
    except DecodeError:
        return None


def _same(got: Message, expected: Message) -> None:
    assert got == expected
    assert got.SerializeToString() == expected.SerializeToString()


@PROPERTY
@given(mangled())
def test_processor_reads_what_protobuf_reads(raw: bytes) -> None:
    received = processor_service.read_request(raw)
    expected = _parsed(ppb.ProcessRequest, raw)
    if expected is None:
        assert received.malformed
        return
    assert not received.malformed
    assert received.image == expected.image
    expected.ClearField("image")
    _same(received.job, expected)


@PROPERTY
@given(mangled())
def test_api_reads_what_protobuf_reads(raw: bytes) -> None:
    received = api_service.read_request(raw)
    expected = _parsed(apb.ScaleImageRequest, raw)
    if expected is None:
        assert received.malformed
        return
    assert not received.malformed
    assert received.content == expected.image.content
    if expected.HasField("image"):
        expected.image.ClearField("content")
    _same(received.message, expected)


@pytest.mark.parametrize("path", [(1,), (1, 1), (2, 1)])
@PROPERTY
@given(raw=mangled())
def test_split_invents_nothing(path: tuple[int, ...], raw: bytes) -> None:
    """Where the shortcut answers, the value is a piece of the input and, with the rest, no
    longer than it (the headers it drops or re-encodes only shrink); checked without protobuf."""
    parts = wire.split(raw, *path)
    if parts is None:
        return
    rest, value = parts
    assert value in raw
    assert len(rest) + len(value) < len(raw)
