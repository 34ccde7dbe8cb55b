"""Just enough protobuf wire format to move image bytes through messages without copying them.

Parsing an `Image` into a message and copying it into the next request costs two full copies of the frame (hundreds
of milliseconds and megabytes for an 8K frame); slicing the serialized sub-message out of one message and splicing it
into the next costs one. The control plane relays frames between tools this way, and the tool services take their
input and send their output this way.
"""

from __future__ import annotations

Buffer = bytes | memoryview

LENGTH_DELIMITED = 2
VARINT = 0
_FIXED_SIZES = {1: 8, 5: 4}
"""Wire type -> value size in bytes (fixed64, fixed32)."""


def _varint(data: Buffer, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def encode_varint(value: int) -> bytes:
    """Base-128 varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _walk(data: Buffer) -> list[tuple[int, int, int, int, int]]:
    """Top-level fields as (number, wire type, start of the field's key, start of value, end of value); varints give
    (value, -1) for the last two. Raises ValueError on field number 0, an unknown wire type or truncated data."""
    found: list[tuple[int, int, int, int, int]] = []
    position = 0
    while position < len(data):
        field_start = position
        key, position = _varint(data, position)
        if position - field_start > 5 or key > 0xFFFFFFFF:  # protobuf refuses such keys: so does this reader
            raise ValueError("field key too long")
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == VARINT:
            value, position = _varint(data, position)
            found.append((number, wire_type, field_start, value, -1))
            continue
        if wire_type == LENGTH_DELIMITED:
            length, position = _varint(data, position)
        elif wire_type in _FIXED_SIZES:
            length = _FIXED_SIZES[wire_type]
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        end = position + length
        if end > len(data):
            raise ValueError("truncated field")
        found.append((number, wire_type, field_start, position, end))
        position = end
    return found


def fields(data: Buffer) -> list[tuple[int, int, int, int]]:
    """Top-level fields as (number, wire type, start of value, end of value); varints give (value, -1)."""
    return [(number, wire_type, start, end) for number, wire_type, _, start, end in _walk(data)]


def length_delimited(number: int, value: Buffer) -> list[Buffer]:
    """The pieces of one length-delimited field (join them with the rest of a message)."""
    return [encode_varint(number << 3 | LENGTH_DELIMITED), encode_varint(len(value)), value]


def split_field(message: Buffer, number: int) -> tuple[memoryview, bytes]:
    """One length-delimited field's value (zero-copy; the last occurrence, as parsers merge) and the message without
    it."""
    values, rest = split_repeated(message, number)
    return (values[-1] if values else memoryview(message)[0:0]), rest


def split_repeated(message: Buffer, number: int) -> tuple[list[memoryview], bytes]:
    """Every occurrence of one length-delimited field, in order (zero-copy views), and the message without them."""
    view = memoryview(message)
    values: list[memoryview] = []
    rest: list[Buffer] = []
    cursor = 0
    for field_number, wire_type, field_start, start, end in _walk(view):
        if field_number == number and wire_type == LENGTH_DELIMITED:
            values.append(view[start:end])
            rest.append(view[cursor:field_start])
            cursor = end
    rest.append(view[cursor:])
    return values, b"".join(rest)


def map_entries(message: Buffer, number: int) -> tuple[dict[str, memoryview], bytes] | None:
    """A `map<string, message>` field: key -> the value's serialized bytes (zero-copy views; a repeated key keeps its
    last value, as parsers do), and the message without the field. None when an entry is anything but one key and one
    value, both length-delimited (protobuf merges or drops such entries: leave those to a full parse). Raises
    ValueError on malformed wire data or a key that is not UTF-8."""
    entries, rest = split_repeated(message, number)
    found: dict[str, memoryview] = {}
    for entry in entries:
        parts = fields(entry)
        numbers = sorted((field_number, wire_type) for field_number, wire_type, _, _ in parts)
        if numbers not in ([(1, LENGTH_DELIMITED), (2, LENGTH_DELIMITED)], [(2, LENGTH_DELIMITED)]):
            return None
        key, value = "", entry[0:0]
        for field_number, _, start, end in parts:
            if field_number == 1:
                key = bytes(entry[start:end]).decode("utf-8")
            else:
                value = entry[start:end]
        found[key] = value
    return found, rest
