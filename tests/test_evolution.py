"""Tool schema evolution: a tool service changes its manifest and re-registers; saved pipelines never break silently.
Real tool services and a real control plane; the change classification case by case and as a property."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jsonschema
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from imageflow.common.serving import start_grpc_server
from imageflow.common.structs import dict_to_struct
from imageflow.server.app import ControlPlane
from imageflow.server.domain.evolution import classify, compare_schemas
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    tool_pb2,
    tool_registry_service_pb2,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

from tests.conftest import sample

S = execution_pb2
IMAGE_IN = tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)
IMAGE_OUT = tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE)


def schema(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": False}


def tool(params: dict[str, Any], *, outputs: list[tool_pb2.Port] | None = None, name: str = "tint") -> tool_pb2.Tool:
    return tool_pb2.Tool(
        name=name, version="1", description_ja="色味を付ける", description_en="tint",
        params_schema=dict_to_struct(params), inputs=[IMAGE_IN], outputs=outputs or [IMAGE_OUT],
    )  # fmt: skip


class EvolvingTools(tool_service_pb2_grpc.ToolServiceServicer):
    """A real tool service whose manifest the test changes between registrations (a provider shipping versions)."""

    def __init__(self) -> None:
        self.manifest = tool(schema(level={"type": "integer", "minimum": 0, "maximum": 100}))

    async def Describe(self, request: Any, context: Any) -> tool_service_pb2.DescribeResponse:
        return tool_service_pb2.DescribeResponse(service="evolving", tools=[self.manifest])

    async def Process(self, request: tool_service_pb2.ProcessRequest, context: Any) -> tool_service_pb2.ProcessResponse:
        return tool_service_pb2.ProcessResponse(image=request.image)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def evolving(plane: ControlPlane) -> AsyncIterator[tuple[EvolvingTools, str]]:
    servicer = EvolvingTools()
    server = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
    )  # fmt: skip
    yield servicer, f"127.0.0.1:{server.port}"
    await server.stop(0.1)


async def _register(registry, address: str, *, force: bool = False):  # type: ignore[no-untyped-def]
    return await registry.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(address=address, force=force))


async def _save(pipelines, level: int) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    pipeline = pipeline_pb2.Pipeline(name=f"tint {level}")
    pipeline.steps.add(id="tint", tool="tint").params.update({"level": level})
    saved = await pipelines.SavePipeline(pipeline_service_pb2.SavePipelineRequest(pipeline=pipeline))
    return saved.pipeline_id, saved.version


async def _run(pipelines, pipeline_id: str) -> int:  # type: ignore[no-untyped-def]
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline_id=pipeline_id, inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
    )
    events = [r.event async for r in pipelines.ExecutePipeline(request)]
    return int(events[-1].execution_finished.state)


async def test_schema_evolution_end_to_end(plane: ControlPlane, pipelines, registry, evolving) -> None:  # type: ignore[no-untyped-def]
    servicer, address = evolving
    first = await _register(registry, address)
    assert first.tools[0].revision == 1 and not first.changes
    high_id, high_version = await _save(pipelines, 90)
    low_id, _ = await _save(pipelines, 10)
    got = await pipelines.GetPipeline(pipeline_service_pb2.GetPipelineRequest(pipeline_id=high_id))
    assert dict(got.pipeline.tool_revisions) == {"tint": 1} and not got.violations

    # compatible: a new optional param and a wider range; old pipelines still run
    servicer.manifest = tool(
        schema(level={"type": "integer", "minimum": 0, "maximum": 200}, hue={"type": "string", "default": "red"})
    )
    compatible = await _register(registry, address)
    assert compatible.tools[0].revision == 2
    assert {(c.field, c.breaking) for c in compatible.changes} == {("params.level", False), ("params.hue", False)}
    assert await _run(pipelines, high_id) == S.EXECUTION_STATE_SUCCEEDED

    # breaking: the range narrows below a saved pipeline's value -> refused, naming it; nothing changes
    servicer.manifest = tool(schema(level={"type": "integer", "minimum": 0, "maximum": 50}, hue={"type": "string"}))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _register(registry, address)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details() or ""
    assert f"{high_id} v{high_version} steps[0].params.level" in message and low_id not in message
    assert (await registry.GetTool(tool_registry_service_pb2.GetToolRequest(name="tint"))).tool.revision == 2
    assert await _run(pipelines, high_id) == S.EXECUTION_STATE_SUCCEEDED

    # forced by an admin: accepted; the broken pipeline says so on Get, List (only_stale) and Validate
    forced = await _register(registry, address, force=True)
    assert forced.tools[0].revision == 3 and any(c.breaking for c in forced.changes)
    got = await pipelines.GetPipeline(pipeline_service_pb2.GetPipelineRequest(pipeline_id=high_id))
    assert [v.field for v in got.violations] == ["steps[0].params.level"]
    assert not (await pipelines.GetPipeline(pipeline_service_pb2.GetPipelineRequest(pipeline_id=low_id))).violations
    stale = await pipelines.ListPipelines(pipeline_service_pb2.ListPipelinesRequest(page_size=1000, only_stale=True))
    assert high_id in {p.id for p in stale.pipelines} and low_id not in {p.id for p in stale.pipelines}
    assert all(p.stale for p in stale.pipelines)
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await pipelines.ValidatePipeline(pipeline_service_pb2.ValidatePipelineRequest(pipeline=got.pipeline))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.level" in (
        invalid.value.details() or ""
    )
    assert await _run(pipelines, low_id) == S.EXECUTION_STATE_SUCCEEDED

    # a breaking change that no saved pipeline trips over (a new output port is fine; removing hue breaks nobody)
    servicer.manifest = tool(schema(level={"type": "integer", "minimum": 0, "maximum": 50}))
    quiet = await _register(registry, address)
    assert [(c.field, c.breaking) for c in quiet.changes] == [("params.hue", True)] and quiet.tools[0].revision == 4
    history = await plane.store.list_tool_revisions("tint")
    assert [row.revision for row in history] == [1, 2, 3, 4]
    assert tool_pb2.Tool.FromString(history[0].manifest).params_schema["properties"]["level"]["maximum"] == 100


# --- the classification, case by case ----------------------------------------------------------------------------

INT = {"type": "integer", "minimum": 0, "maximum": 10}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (schema(a=INT), schema(a=INT, b={"type": "string"}), [("params.b", False)]),
        (schema(a=INT), {**schema(a=INT, b={"type": "string"}), "required": ["b"]}, [("params.b", True)]),
        (schema(a=INT, b={"type": "string"}), schema(a=INT), [("params.b", True)]),
        (schema(a=INT), schema(a={**INT, "maximum": 20}), [("params.a", False)]),
        (schema(a=INT), schema(a={**INT, "maximum": 5}), [("params.a", True)]),
        (schema(a=INT), schema(a={**INT, "minimum": 1}), [("params.a", True)]),
        (schema(a=INT), schema(a={**INT, "type": "number"}), [("params.a", False)]),
        (schema(a={"type": "number"}), schema(a={"type": "integer"}), [("params.a", True)]),
        (schema(a={"enum": ["x", "y"]}), schema(a={"enum": ["x", "y", "z"]}), [("params.a", False)]),
        (schema(a={"enum": ["x", "y"]}), schema(a={"enum": ["x"]}), [("params.a", True)]),
        (schema(a={"type": "string"}), schema(a={"type": "string", "pattern": "^x"}), [("params.a", True)]),
        (schema(a={"type": "string", "maxLength": 9}), schema(a={"type": "string"}), [("params.a", False)]),
        (schema(a=INT), {**schema(a=INT), "required": ["a"]}, [("params.a", True)]),
        ({**schema(a=INT), "additionalProperties": True}, schema(a=INT), [("params", True)]),
        (schema(a={**INT, "default": 1}), schema(a={**INT, "default": 2}), [("params.a", False)]),
    ],
)
def test_change_classification(old: dict[str, Any], new: dict[str, Any], expected: list[tuple[str, bool]]) -> None:
    assert [(c.field, c.breaking) for c in compare_schemas(old, new)] == expected


def test_port_changes() -> None:
    dets = tool_pb2.Port(name="detections", type=tool_pb2.PORT_TYPE_DETECTIONS)
    base = tool(schema())
    assert [(c.field, c.breaking) for c in classify(base, tool(schema(), outputs=[IMAGE_OUT, dets]))] == [
        ("outputs.detections", False)
    ]
    assert [(c.field, c.breaking) for c in classify(tool(schema(), outputs=[IMAGE_OUT, dets]), base)] == [
        ("outputs.detections", True)
    ]
    needs = tool(schema())
    needs.inputs.add(name="detections", type=tool_pb2.PORT_TYPE_DETECTIONS, required=True)
    assert [(c.field, c.breaking) for c in classify(base, needs)] == [("inputs.detections", True)]


def test_flag_changes_are_recorded_and_not_breaking() -> None:
    base = tool(schema())
    flagged = tool(schema())
    flagged.chainable, flagged.reads_luma, flagged.takes_branches = True, True, True
    assert [(c.field, c.breaking) for c in classify(base, flagged)] == [
        ("chainable", False),
        ("reads_luma", False),
        ("takes_branches", False),
    ]


# --- the classification as a property: "compatible" never rejects params the old schema accepted -----------------

BOUNDS = st.integers(min_value=-50, max_value=50)


@st.composite
def number_property(draw: st.DrawFn) -> dict[str, Any]:
    low, high = sorted((draw(BOUNDS), draw(BOUNDS)))
    prop: dict[str, Any] = {"type": draw(st.sampled_from(["integer", "number"]))}
    if draw(st.booleans()):
        prop["minimum"] = low
    if draw(st.booleans()):
        prop["maximum"] = high
    return prop


@st.composite
def enum_property(draw: st.DrawFn) -> dict[str, Any]:
    return {"enum": draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True))}


PROPERTY = st.one_of(number_property(), enum_property())
NAMES = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def object_schema(draw: st.DrawFn) -> dict[str, Any]:
    properties = draw(st.dictionaries(NAMES, PROPERTY, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True)) if properties else []
    return {**schema(**properties), **({"required": required} if required else {})}


def _value(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in prop:
        return st.sampled_from(prop["enum"])
    low, high = prop.get("minimum", -100), prop.get("maximum", 100)
    if prop["type"] == "integer":
        return st.integers(min_value=low, max_value=high)
    return st.floats(min_value=low, max_value=high, allow_nan=False)


@st.composite
def schema_pair_and_params(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    old = draw(object_schema())
    new = copy.deepcopy(old)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):  # random edits: some widen, some narrow
        name = draw(NAMES)
        edit = draw(st.sampled_from(["replace", "drop", "add", "require", "unrequire"]))
        if edit in ("replace", "add"):
            new["properties"][name] = draw(PROPERTY)
        elif edit == "drop":
            new["properties"].pop(name, None)
        elif edit == "require" and name in new["properties"]:
            new["required"] = sorted({*new.get("required", []), name})
        elif edit == "unrequire":
            new["required"] = [n for n in new.get("required", []) if n != name]
        new["required"] = [n for n in new.get("required", []) if n in new["properties"]]
        if not new["required"]:
            new.pop("required")
    params = {}
    for name, prop in old["properties"].items():
        if name in old.get("required", []) or draw(st.booleans()):
            params[name] = draw(_value(prop))
    return old, new, params


@settings(max_examples=300, deadline=None)
@given(schema_pair_and_params())
def test_compatible_changes_keep_every_valid_params(
    case: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    old, new, params = case
    assert jsonschema.Draft202012Validator(old).is_valid(params)
    if not any(c.breaking for c in compare_schemas(old, new)):
        assert jsonschema.Draft202012Validator(new).is_valid(params), (old, new, params)
