"""A corpus of bad requests against a live server: each gets a clear status (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, ...) or, for an execution, a failed step with one; never INTERNAL or UNKNOWN, never a crash."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2

from tests.conftest import sample

JPEG = sample("chelsea.jpg")
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _pipeline(*steps: dict[str, Any], **fields: Any) -> pipeline_pb2.Pipeline:
    pipeline = pipeline_pb2.Pipeline(name="bad", **fields)
    for step in steps:
        added = pipeline.steps.add(id=step["id"], tool=step["tool"], depends_on=step.get("after", []))
        added.params.update(step.get("params", {}))
        if "policy" in step:
            added.policy.CopyFrom(step["policy"])
        for port, source in step.get("inputs", {}).items():
            added.inputs[port] = source
    return pipeline


GRAY = {"id": "g", "tool": "grayscale"}
CASES: list[tuple[str, pipeline_pb2.Pipeline, dict[str, image_pb2.Image]]] = [
    ("negative max_attempts", _pipeline({**GRAY, "policy": pipeline_pb2.StepPolicy(max_attempts=-1)}), {}),
    ("huge max_attempts", _pipeline({**GRAY, "policy": pipeline_pb2.StepPolicy(max_attempts=10**9)}), {}),
    ("negative timeout", _pipeline({**GRAY, "policy": pipeline_pb2.StepPolicy(timeout=duration_pb2.Duration(seconds=-5))}), {}),
    ("absurd backoff", _pipeline({**GRAY, "policy": pipeline_pb2.StepPolicy(initial_backoff=duration_pb2.Duration(seconds=10**9))}), {}),
    ("a cycle", _pipeline({"id": "a", "tool": "grayscale", "after": ["b"]}, {"id": "b", "tool": "grayscale", "after": ["a"]}), {}),
    ("depends on itself", _pipeline({"id": "a", "tool": "grayscale", "after": ["a"]}), {}),
    ("duplicate ids", _pipeline(GRAY, GRAY), {}),
    ("unknown tool", _pipeline({"id": "x", "tool": "teleport"}), {}),
    ("unknown input port", _pipeline({**GRAY, "inputs": {"sound": "$image"}}), {}),
    ("input from a missing step", _pipeline({**GRAY, "inputs": {"image": "ghost"}}), {}),
    ("NaN param", _pipeline({"id": "b", "tool": "blur", "params": {"radius": float("nan")}}), {}),
    ("string for a number", _pipeline({"id": "r", "tool": "resize", "params": {"scale": "half"}}), {}),
    ("unknown output step", _pipeline(GRAY, outputs=["nope"]), {}),
    ("no steps", _pipeline(), {}),
    ("empty image", _pipeline(GRAY), {"image": image_pb2.Image(data=b"")}),
    ("not an image", _pipeline(GRAY), {"image": image_pb2.Image(data=b"hello, world" * 100)}),
    ("half a JPEG", _pipeline(GRAY), {"image": image_pb2.Image(data=JPEG[: len(JPEG) // 2])}),
    ("raw without size", _pipeline(GRAY), {"image": image_pb2.Image(data=bytes(300), media_type="image/x-raw-rgb8")}),
    ("raw with a wrong size", _pipeline(GRAY), {"image": image_pb2.Image(data=bytes(300), media_type="image/x-raw-rgb8", width=100, height=100)}),
    ("unsupported media type", _pipeline(GRAY), {"image": image_pb2.Image(data=JPEG, media_type="image/gif")}),
    ("a crop outside the image", _pipeline({"id": "c", "tool": "crop", "params": {"x": 5000, "y": 5000, "width": 10, "height": 10}}), {}),
    ("blur_regions without detections", _pipeline({"id": "b", "tool": "blur_regions"}), {}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "pipeline", "inputs"), CASES, ids=[c[0] for c in CASES])
async def test_bad_executions_never_answer_internal(
    pipelines, name: str, pipeline: pipeline_pb2.Pipeline, inputs: dict[str, image_pb2.Image]
) -> None:  # type: ignore[no-untyped-def]
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=pipeline, inputs=inputs or {"image": image_pb2.Image(data=JPEG)}
    )
    try:
        events = [r.event async for r in pipelines.ExecutePipeline(request, timeout=60)]
    except grpc.aio.AioRpcError as error:
        assert error.code() not in NEVER, f"{name}: {error.code()} {error.details()}"
        assert error.details()
        return
    finished = events[-1].execution_finished
    failures = [e.step_failed for e in events if e.WhichOneof("kind") == "step_failed"]
    assert finished.state != execution_pb2.EXECUTION_STATE_SUCCEEDED or not failures, name
    assert all(f.code not in ("INTERNAL", "UNKNOWN") for f in failures), f"{name}: {failures}"


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.WatchExecution(pipeline_service_pb2.WatchExecutionRequest(execution_id="ex_nope")),
        lambda p: p.WatchExecution(pipeline_service_pb2.WatchExecutionRequest(execution_id="", after_sequence=-1)),
        lambda p: p.GetPipeline(pipeline_service_pb2.GetPipelineRequest(pipeline_id="pl_x", version=-3)),
        lambda p: p.ListPipelines(pipeline_service_pb2.ListPipelinesRequest(page_size=-1)),
        lambda p: p.ListPipelines(pipeline_service_pb2.ListPipelinesRequest(page_token="%%%not-base64")),
        lambda p: p.GeneratePipeline(pipeline_service_pb2.GeneratePipelineRequest(instruction="縮小" * 5000)),
        lambda p: p.GeneratePipeline(pipeline_service_pb2.GeneratePipelineRequest(instruction="   ")),
        lambda p: p.GeneratePipeline(pipeline_service_pb2.GeneratePipelineRequest(instruction="x", base_pipeline_id="pl_nope")),
        lambda p: p.CancelExecution(pipeline_service_pb2.CancelExecutionRequest(execution_id="ex_nope")),
        lambda p: p.DeletePipeline(pipeline_service_pb2.DeletePipelineRequest(pipeline_id="")),
    ],
    ids=["watch unknown", "watch negative", "negative version", "negative page", "bad token", "long instruction",
         "blank instruction", "unknown base", "cancel unknown", "delete empty id"],
)  # fmt: skip
async def test_bad_calls_never_answer_internal(pipelines, call: Any) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        result = call(pipelines)
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert refused.value.code() not in NEVER and refused.value.details()
