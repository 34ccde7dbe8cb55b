"""Tool params schemas are untrusted input: checked once at registration, validated in bounded time afterwards.

A registered tool's JSON Schema comes from whoever runs the tool service. Nothing in it may make the control plane
fetch a URL or read a file (`$ref` stays inside the schema; the validator's registry retrieves nothing), stall on a
regular expression (patterns run on RE2, which is linear in the input), or fail later with INTERNAL (the schema must
pass the 2020-12 metaschema and the size limits below when it is registered).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import re2
import referencing
import referencing.exceptions
from imageflow.common.errors import ImageflowError, invalid_argument
from jsonschema import ValidationError
from jsonschema.protocols import Validator

MAX_SCHEMA_BYTES = 16 * 1024
MAX_SCHEMA_DEPTH = 12
MAX_PATTERN_CHARS = 256
_REF_KEYWORDS = ("$ref", "$dynamicRef")
_OPTIONS = re2.Options()
_OPTIONS.max_mem = 1 << 20  # a pattern whose compiled program needs more than 1 MiB is refused
_OPTIONS.log_errors = False


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"{instance[:80]!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, properties: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        regex = _compiled(pattern)
        for key, value in instance.items():
            if regex.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


_CACHE: dict[str, Any] = {}


def _compiled(pattern: str) -> Any:
    regex = _CACHE.get(pattern)
    if regex is None:
        regex = re2.compile(pattern, _OPTIONS)
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[pattern] = regex
    return regex


_Re2Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator, {"pattern": _pattern, "patternProperties": _pattern_properties}
)


def _no_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


_EMPTY_REGISTRY: referencing.Registry[Any] = referencing.Registry(retrieve=_no_retrieval)  # type: ignore[call-arg]


def safe_validator(schema: dict[str, Any]) -> Validator:
    """A validator that never leaves the schema for a `$ref` and matches patterns with RE2."""
    return _Re2Validator(schema, registry=_EMPTY_REGISTRY)  # type: ignore[no-any-return]


def check_untrusted_schema(schema: dict[str, Any], where: str) -> None:
    """INVALID_ARGUMENT (naming `where` and the problem) unless the schema is small, valid 2020-12, refers only to
    itself and has only RE2-compatible, short patterns."""
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise _bad(where, f"is {size} bytes, over the limit of {MAX_SCHEMA_BYTES} bytes")
    _walk(schema, where, "", 0)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        path = "/".join(str(p) for p in error.absolute_path)
        raise _bad(where, f"is not a valid JSON Schema (2020-12) at /{path}: {str(error.message)[:200]}") from None


def _walk(node: Any, where: str, path: str, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise _bad(where, f"nests deeper than {MAX_SCHEMA_DEPTH} levels (at {path or '/'})")
    if isinstance(node, list):
        for index, item in enumerate(node):
            _walk(item, where, f"{path}/{index}", depth + 1)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = f"{path}/{key}"
        if key in _REF_KEYWORDS and (not isinstance(value, str) or not value.startswith("#")):
            raise _bad(
                where,
                f"has {key} {str(value)[:100]!r} at {here}: only references inside the schema ('#/...') "
                "are allowed; nothing is fetched",
            )
        if key == "$id" and isinstance(value, str) and not value.startswith("#"):
            raise _bad(where, f"has $id {value[:100]!r} at {here}: schemas may not name other resources")
        if key == "pattern" and isinstance(value, str):
            _check_pattern(value, where, here)
        if key == "patternProperties" and isinstance(value, dict):
            for pattern in value:
                _check_pattern(pattern, where, f"{here}/{pattern}")
        _walk(value, where, here, depth + 1)


def _check_pattern(pattern: str, where: str, path: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _bad(
            where, f"has a pattern of {len(pattern)} characters at {path}, over the limit of {MAX_PATTERN_CHARS}"
        )
    try:
        _compiled(pattern)
    except re2.error:
        raise _bad(
            where, f"has a pattern at {path} that RE2 cannot run in linear time (back-references, look-around?)"
        ) from None


def _bad(where: str, problem: str) -> ImageflowError:
    return invalid_argument("MANIFEST_SCHEMA_INVALID", f"{where} {problem}")
