"""Params against a tool's JSON Schema: violations with field paths, defaults, number normalisation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jsonschema
from imageflow.common.errors import FieldViolation, invalid_argument
from jsonschema.protocols import Validator

JsonObject = dict[str, Any]


def check_params(schema: JsonObject, params: Mapping[str, Any], prefix: str) -> None:
    """Raise INVALID_ARGUMENT naming each bad field (e.g. ``params.scale``)."""
    violations = param_violations(schema, params, prefix)
    if violations:
        raise invalid_argument(
            "PARAMS_INVALID", "; ".join(f"{v.field}: {v.description}" for v in violations), violations
        )


def param_violations(
    schema: JsonObject, params: Mapping[str, Any], prefix: str, validator: Validator | None = None
) -> list[FieldViolation]:
    """Every schema violation, each with a field path under `prefix`; `validator` (built for `schema`) replaces the
    default one, e.g. one hardened for untrusted schemas."""
    validator = validator or _validator(schema)
    violations = [
        FieldViolation(f"{prefix}.{name}", "must be a finite number")
        for name, value in params.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]
    for error in sorted(validator.iter_errors(dict(params)), key=lambda e: list(map(str, e.path))):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
        field_name = prefix + path
        if error.validator == "additionalProperties" and not error.path:
            extras = sorted(set(params) - set(schema.get("properties", {})))
            for extra in extras:
                violations.append(FieldViolation(f"{prefix}.{extra}", f"unknown parameter {extra!r}"))
            continue
        violations.append(FieldViolation(field_name, _describe(error)))
    return violations


_VALIDATORS: dict[int, tuple[JsonObject, jsonschema.Draft202012Validator]] = {}


def _validator(schema: JsonObject) -> jsonschema.Draft202012Validator:
    """One compiled validator per schema object (manifests are long-lived); identity-checked."""
    cached = _VALIDATORS.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    validator = jsonschema.Draft202012Validator(schema)
    if len(_VALIDATORS) > 1024:
        _VALIDATORS.clear()
    _VALIDATORS[id(schema)] = (schema, validator)
    return validator


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "oneOf" and isinstance(error.validator_value, list):
        choices = [" and/or ".join(_required_names(branch)) for branch in error.validator_value]
        return "give exactly one of: " + ", ".join(choices)
    return str(error.message)[:300]


def _required_names(branch: Any) -> list[str]:
    if not isinstance(branch, dict):
        return []
    names = list(branch.get("required", []))
    for alternative in branch.get("anyOf", []):
        names += _required_names(alternative)
    return names


def with_defaults(schema: JsonObject, params: Mapping[str, Any]) -> JsonObject:
    """Params plus the defaults of properties not given."""
    filled = dict(params)
    for name, prop in schema.get("properties", {}).items():
        if name not in filled and "default" in prop:
            filled[name] = prop["default"]
    return filled


def normalize_numbers(schema: JsonObject, params: Mapping[str, Any]) -> JsonObject:
    """Whole floats become ints where the schema asks for integers (protobuf Struct carries every number as double)."""
    normalized = dict(params)
    for name, prop in schema.get("properties", {}).items():
        value = normalized.get(name)
        if prop.get("type") == "integer" and isinstance(value, float) and value.is_integer():
            normalized[name] = int(value)
    return normalized
