"""Take a photo's bytes field out of a received protobuf message with one copy.

gRPC hands a request over as one ``bytes`` object. Parsing it copies the image into the
message (upb) and reading the field copies it again: two copies of 2.45 MB on every W1
request, each ~0.4 ms in a busy server (docs/benchmarks.md). Slicing the field out of the
received bytes copies it once; the rest of the message, a few bytes, is parsed as usual.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)
LENGTH_DELIMITED = 2
_FIXED = {1: 8, 5: 4}  # wire type -> width (64-bit, 32-bit)


def split(raw: bytes, *path: int) -> tuple[bytes, bytes] | None:
    """``(raw without the field, the field's value)`` for the field at ``path`` (field
    numbers, outermost first: ``1, 1`` is field 1 of the message in field 1), or None where
    this shortcut stops: a field on the path absent, repeated or not length-delimited, a
    group, anything malformed. The caller then parses ``raw`` whole and gets protobuf's own
    result or error."""
    return _split(raw, 0, len(raw), path)


def take(raw: bytes, message_type: type[M], *path: int) -> tuple[M, bytes] | None:
    """``raw`` parsed as ``message_type`` with the bytes field at ``path`` taken out:
    ``(message without it, its value)``, the value copied once where :func:`split` applies
    and read by protobuf where it does not (empty when absent). None when protobuf refuses
    ``raw``: the caller answers INVALID_ARGUMENT (gRPC would answer a deserializer's exception
    with INTERNAL, as if the server had failed)."""
    try:
        parts = split(raw, *path)
        if parts is not None:
            rest, value = parts
            return message_type.FromString(rest), value
        message = message_type.FromString(raw)
    except DecodeError:
        return None
    holder: Message = message
    for number in path[:-1]:
        name = holder.DESCRIPTOR.fields_by_number[number].name
        if not holder.HasField(name):
            return message, b""  # reading through would create the absent submessage
        holder = getattr(holder, name)
    name = holder.DESCRIPTOR.fields_by_number[path[-1]].name
    value = getattr(holder, name)
    holder.ClearField(name)
    return message, value


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int) -> bytes:
    """The key of a length-delimited field."""
    return varint(field << 3 | LENGTH_DELIMITED)


def _split(raw: bytes, start: int, end: int, path: tuple[int, ...]) -> tuple[bytes, bytes] | None:
    span = _find(raw, start, end, path[0])
    if span is None:
        return None
    key_at, value_at, stop = span
    if len(path) == 1:
        return raw[start:key_at] + raw[stop:end], raw[value_at:stop]
    inner = _split(raw, value_at, stop, path[1:])
    if inner is None:
        return None
    rest, value = inner
    enclosing = tag(path[0]) + varint(len(rest)) + rest
    return raw[start:key_at] + enclosing + raw[stop:end], value


def _find(raw: bytes, pos: int, end: int, field: int) -> tuple[int, int, int] | None:
    """(key, value, end) offsets of the single length-delimited ``field`` in raw[pos:end]."""
    found = None
    while pos < end:
        key, start = _read_varint(raw, pos, end)
        wire, number = key & 7, key >> 3
        if number == 0:
            return None
        if wire == 0:
            _, stop = _read_varint(raw, start, end)
        elif wire == LENGTH_DELIMITED:
            length, start = _read_varint(raw, start, end)
            stop = start + length
        elif wire in _FIXED:
            stop = start + _FIXED[wire]
        else:
            return None  # groups (deprecated) or invalid: leave them to protobuf
        if stop < 0 or stop > end:
            return None
        if number == field:
            if wire != LENGTH_DELIMITED or found is not None:
                return None
            found = (pos, start, stop)
        pos = stop
    return found


def _read_varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; a truncated or over-long one reads
    as position -1, which :func:`_find` refuses."""
    value = shift = 0
    for i in range(pos, min(pos + 10, end)):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return 0, -1
