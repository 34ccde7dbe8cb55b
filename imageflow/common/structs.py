"""google.protobuf.Struct <-> plain dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict; whole numbers come back as ints."""
    return {key: _plain(value) for key, value in json_format.MessageToDict(message).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dict_to_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    """A dict as a Struct."""
    message = struct_pb2.Struct()
    message.update(dict(values))
    return message
