"""The compile path: every violation reported together, with step and field; wiring and depends_on derived."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imageflow.common.errors import ErrorKind, ImageflowError
from imageflow.server.domain.compiler import compile_pipeline
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.tools import filters, geometry
from imageflow.tools.detection import Detector, OnnxRuntimeBackend, detect_tool
from imageflow.tools.servicer import tool_message
from imageflow.v1 import pipeline_pb2

SPECS = [*geometry.TOOLS, *filters.TOOLS, detect_tool(Detector(OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)))]


def registry() -> dict[str, RegisteredTool]:
    tools = {}
    for spec in SPECS:
        manifest = tool_message(spec)
        manifest.address = "127.0.0.1:1"
        tools[spec.name] = RegisteredTool.of(manifest)
    return tools


TOOLS = registry()


def pipeline(*steps: dict) -> pipeline_pb2.Pipeline:  # type: ignore[type-arg]
    result = pipeline_pb2.Pipeline(name="t")
    for step in steps:
        added = result.steps.add(id=step["id"], tool=step["tool"], depends_on=step.get("after", []))
        added.params.update(step.get("params", {}))
        for port, ref in step.get("inputs", {}).items():
            added.inputs[port] = ref
    return result


def violations(definition: pipeline_pb2.Pipeline, **kw: int) -> dict[str, str]:
    with pytest.raises(ImageflowError) as caught:
        compile_pipeline(definition, TOOLS, **kw)
    assert caught.value.kind == ErrorKind.INVALID_ARGUMENT
    return {v.field: v.description for v in caught.value.violations}


def test_chain_gets_depends_on_and_detections_wiring() -> None:
    compiled = compile_pipeline(
        pipeline(
            {"id": "small", "tool": "resize", "params": {"scale": 0.5}},
            {"id": "find", "tool": "detect", "params": {"classes": ["face"]}, "after": ["small"]},
            {"id": "gray", "tool": "grayscale", "after": ["find"]},
            {"id": "hide", "tool": "blur_regions", "after": ["gray"]},
        ),
        TOOLS,
    )
    assert compiled.order == ("small", "find", "gray", "hide")
    assert compiled.steps["hide"].inputs["detections"].render() == "find.detections"
    assert set(compiled.steps["hide"].depends_on) == {"gray", "find"}
    assert compiled.steps["small"].inputs["image"].pipeline_input == "image"
    assert compiled.outputs == ("hide",)
    assert list(compiled.definition.steps[3].depends_on) == ["gray", "find"]


def test_explicit_wiring_derives_dependencies() -> None:
    compiled = compile_pipeline(
        pipeline(
            {"id": "a", "tool": "grayscale"},
            {"id": "b", "tool": "edge_detect", "inputs": {"image": "a.image"}},
        ),
        TOOLS,
    )
    assert compiled.steps["b"].depends_on == ("a",)


def test_all_violations_named_by_step_and_field() -> None:
    found = violations(
        pipeline(
            {"id": "a", "tool": "resize", "params": {"scale": "half"}},
            {"id": "a", "tool": "blur"},
            {"id": "Bad Id", "tool": "grayscale"},
            {"id": "c", "tool": "teleport"},
            {"id": "d", "tool": "rotate", "params": {}},
            {"id": "e", "tool": "grayscale", "after": ["ghost"]},
        )
    )
    assert "steps[0].params.scale" in found
    assert "steps[1].id" in found and "duplicate" in found["steps[1].id"]
    assert "steps[2].id" in found
    assert "steps[3].tool" in found and "teleport" in found["steps[3].tool"]
    assert "steps[4].params" in found and "angle" in found["steps[4].params"]
    assert "steps[5].depends_on[0]" in found


def test_cycle_is_reported() -> None:
    found = violations(
        pipeline({"id": "a", "tool": "grayscale", "after": ["b"]}, {"id": "b", "tool": "blur", "after": ["a"]})
    )
    assert any("cycle" in text for text in found.values())


def test_detections_need_a_detector_and_types_must_match() -> None:
    found = violations(pipeline({"id": "draw", "tool": "draw_boxes"}))
    assert "steps[0].inputs.detections" in found
    found = violations(
        pipeline(
            {"id": "g", "tool": "grayscale"}, {"id": "draw", "tool": "draw_boxes", "inputs": {"detections": "g.image"}}
        )
    )
    assert "steps[1].inputs.detections" in found
    found = violations(pipeline({"id": "g", "tool": "grayscale", "inputs": {"image": "nowhere.image"}}))
    assert "steps[0].inputs.image" in found


def test_limits() -> None:
    huge = pipeline(*({"id": f"s{i}", "tool": "grayscale"} for i in range(10_000)))
    assert "steps" in violations(huge)
    assert "steps" in violations(pipeline())
    long_name = pipeline({"id": "a", "tool": "grayscale"})
    long_name.name = "x" * 100_000
    assert "name" in violations(long_name)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "id": st.text(min_size=0, max_size=8),
                "tool": st.sampled_from([*TOOLS, "", "rm -rf", "x" * 70]),
                "after": st.lists(st.text(max_size=4), max_size=3),
                "params": st.dictionaries(
                    st.sampled_from(["scale", "width", "angle", "radius", "classes", "color", "zzz"]),
                    st.one_of(
                        st.integers(-5, 5000),
                        st.floats(),
                        st.text(max_size=5),
                        st.booleans(),
                        st.lists(st.text(max_size=3), max_size=2),
                    ),
                    max_size=3,
                ),
            }
        ),
        max_size=8,
    )
)
def test_generated_definitions_only_give_clear_errors(steps: list[dict]) -> None:  # type: ignore[type-arg]
    try:
        compile_pipeline(pipeline(*steps), TOOLS)
    except ImageflowError as error:
        assert error.kind == ErrorKind.INVALID_ARGUMENT
        assert error.violations


@pytest.mark.parametrize(
    ("field", "seconds", "nanos"),
    [("timeout", 10**14, 0), ("timeout", 1, -5), ("initial_backoff", 0, 0), ("timeout", 1, 2_000_000_000)],
)
def test_hostile_policy_durations_are_field_violations(field: str, seconds: int, nanos: int) -> None:
    definition = pipeline({"id": "a", "tool": "grayscale"})
    duration = getattr(definition.steps[0].policy, field)
    duration.seconds, duration.nanos = seconds, nanos
    found = violations(definition)
    assert f"steps[0].policy.{field}" in found and "at most" in found[f"steps[0].policy.{field}"]
