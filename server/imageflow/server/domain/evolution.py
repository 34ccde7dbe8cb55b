"""Tool schema evolution: how a re-registered manifest differs from the registered one, change by change.

A change is *compatible* when every pipeline step valid against the old manifest stays valid against the new one (a
new optional param, a widened type, range or enum, a new output port, new words), and *breaking* otherwise (a removed
or renamed param, a narrowed type, range, length or enum, a new required param, a new or changed pattern, a removed or
retyped port). The classification is reported and logged; whether a breaking change is accepted depends on the saved
pipelines it would actually break (the registry asks the pipeline catalog), unless an admin forces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imageflow.common.structs import struct_to_dict
from imageflow.v1 import tool_pb2

JsonObject = dict[str, Any]

_NUMBER_TYPES = {"integer", "number"}


@dataclass(frozen=True)
class Change:
    """One difference: where (`params.scale`, `inputs.detections`), whether it can break a valid step, and what."""

    field: str
    breaking: bool
    description: str


def _types(schema: JsonObject) -> set[str] | None:
    """The JSON types a property accepts (None: any)."""
    declared = schema.get("type")
    if declared is None:
        return None
    names = {declared} if isinstance(declared, str) else set(declared)
    if "number" in names:
        names.add("integer")  # every integer is a number
    return names


def _compare_bound(field: str, old: JsonObject, new: JsonObject, key: str, lower: bool) -> list[Change]:
    """A lower bound that rises, or an upper bound that falls (or appears), narrows; the opposite widens."""
    before, after = old.get(key), new.get(key)
    if before == after:
        return []
    if after is None:
        return [Change(field, False, f"{key} {before} removed")]
    if before is None:
        return [Change(field, True, f"{key} {after} added")]
    narrowed = after > before if lower else after < before
    return [Change(field, narrowed, f"{key} {before} -> {after}")]


_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems")
_KNOWN = {"type", "enum", "const", "pattern", "default", "description", "title", "examples", *_LOWER_BOUNDS,
          *_UPPER_BOUNDS}  # fmt: skip


def compare_property(field: str, old: JsonObject, new: JsonObject) -> list[Change]:
    """The changes of one param's schema."""
    changes: list[Change] = []
    old_types, new_types = _types(old), _types(new)
    if old_types != new_types:
        if new_types is None or (old_types is not None and old_types <= new_types):
            changes.append(Change(field, False, f"type widened {sorted(old_types or [])} -> {sorted(new_types or [])}"))
        else:
            changes.append(Change(field, True, f"type narrowed {sorted(old_types or [])} -> {sorted(new_types or [])}"))
    old_enum, new_enum = old.get("enum"), new.get("enum")
    if old_enum != new_enum:
        if new_enum is None:
            changes.append(Change(field, False, "enum removed (any value of the type)"))
        elif old_enum is None:
            changes.append(Change(field, True, f"enum {new_enum} added"))
        else:
            removed = [v for v in old_enum if v not in new_enum]
            added = [v for v in new_enum if v not in old_enum]
            if removed:
                changes.append(Change(field, True, f"enum values removed: {removed}"))
            if added:
                changes.append(Change(field, False, f"enum values added: {added}"))
    if old.get("const") != new.get("const"):
        changes.append(Change(field, "const" in new, f"const {old.get('const')!r} -> {new.get('const')!r}"))
    if old.get("pattern") != new.get("pattern"):
        changes.append(Change(field, "pattern" in new, f"pattern {old.get('pattern')!r} -> {new.get('pattern')!r}"))
    for key in _LOWER_BOUNDS:
        changes += _compare_bound(field, old, new, key, lower=True)
    for key in _UPPER_BOUNDS:
        changes += _compare_bound(field, old, new, key, lower=False)
    if old.get("default") != new.get("default"):
        changes.append(Change(field, False, f"default {old.get('default')!r} -> {new.get('default')!r}"))
    other_old = {k: v for k, v in old.items() if k not in _KNOWN}
    other_new = {k: v for k, v in new.items() if k not in _KNOWN}
    if other_old != other_new:
        # keywords this comparison does not model (items, oneOf, format, ...): cannot prove it compatible
        changes.append(Change(field, True, "schema keywords changed that cannot be compared; treated as breaking"))
    return changes


def compare_schemas(old: JsonObject, new: JsonObject) -> list[Change]:
    """The changes between two object params schemas."""
    changes: list[Change] = []
    old_props: JsonObject = old.get("properties", {})
    new_props: JsonObject = new.get("properties", {})
    old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
    closed_before = old.get("additionalProperties") is False
    closed_after = new.get("additionalProperties") is False
    for name in sorted(set(old_props) - set(new_props)):
        # a closed schema refuses the param outright; an open one ignores it, but a step relying on it changes meaning
        changes.append(Change(f"params.{name}", True, "param removed (or renamed)"))
    for name in sorted(set(new_props) - set(old_props)):
        if name in new_required:
            changes.append(Change(f"params.{name}", True, "new required param"))
        elif not closed_before:
            changes.append(Change(f"params.{name}", True, "new param constrains values the open schema accepted"))
        else:
            changes.append(Change(f"params.{name}", False, "new optional param"))
    for name in sorted(set(old_props) & set(new_props)):
        changes += compare_property(f"params.{name}", old_props[name], new_props[name])
        if name in new_required and name not in old_required:
            changes.append(Change(f"params.{name}", True, "param became required"))
        elif name in old_required and name not in new_required:
            changes.append(Change(f"params.{name}", False, "param became optional"))
    if closed_after and not closed_before:
        changes.append(Change("params", True, "unknown params are now refused (additionalProperties false)"))
    elif closed_before and not closed_after:
        changes.append(Change("params", False, "unknown params are now accepted"))
    other = ("oneOf", "anyOf", "allOf", "not", "if", "then", "else", "dependentRequired", "patternProperties")
    for key in other:
        if old.get(key) != new.get(key):
            changes.append(Change("params", key in new, f"{key} changed"))
    return changes


def compare_ports(kind: str, old: list[tool_pb2.Port], new: list[tool_pb2.Port]) -> list[Change]:
    """Input or output ports: removed or retyped ones break wiring, new required inputs break steps, new outputs do
    not."""
    changes: list[Change] = []
    before = {p.name: p for p in old}
    after = {p.name: p for p in new}
    for name in sorted(set(before) - set(after)):
        changes.append(Change(f"{kind}.{name}", True, "port removed"))
    for name in sorted(set(after) - set(before)):
        required = kind == "inputs" and after[name].required
        changes.append(Change(f"{kind}.{name}", required, "new required input" if required else "new port"))
    for name in sorted(set(before) & set(after)):
        if before[name].type != after[name].type:
            changes.append(Change(f"{kind}.{name}", True, "port type changed"))
        elif kind == "inputs" and after[name].required and not before[name].required:
            changes.append(Change(f"{kind}.{name}", True, "input became required"))
    return changes


def classify(old: tool_pb2.Tool, new: tool_pb2.Tool) -> list[Change]:
    """Every change from the registered manifest `old` to the offered `new` (empty: nothing that matters)."""
    changes = compare_schemas(struct_to_dict(old.params_schema), struct_to_dict(new.params_schema))
    changes += compare_ports("inputs", list(old.inputs), list(new.inputs))
    changes += compare_ports("outputs", list(old.outputs), list(new.outputs))
    for label in ("version", "description_ja", "description_en"):
        if getattr(old, label) != getattr(new, label):
            changes.append(Change(label, False, f"{label} changed"))
    if list(old.phrases_ja) != list(new.phrases_ja):
        changes.append(Change("phrases_ja", False, "phrases changed (the offline planner's lexicon follows)"))
    if old.chainable != new.chainable:
        changes.append(Change("chainable", False, f"chainable {old.chainable} -> {new.chainable}"))
    for flag in ("reads_luma", "keeps_luma", "streams_frames", "takes_branches"):
        if getattr(old, flag) != getattr(new, flag):
            changes.append(Change(flag, False, f"{flag} {getattr(old, flag)} -> {getattr(new, flag)}"))
    return changes
