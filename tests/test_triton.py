"""Detection through a real tritonserver (the bundled CPU build): gRPC binary tensors, shared memory, Triton down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import cv2
import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imageflow.common.structs import dict_to_struct
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.testing.local import free_port
from imageflow.testing.triton import TritonProcess, start_triton
from imageflow.tools.server import start_tool_server
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from tests.conftest import aio_channel, sample

MODELS = ("ssd_mobilenetv2_oidv4", "blazeface_short_range")


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonProcess]:
    server = start_triton(free_port(), free_port(), free_port(), timeout=120)
    yield server
    server.stop()


def inference_counts(triton: TritonProcess) -> dict[str, int]:
    with grpc.insecure_channel(triton.grpc_address) as channel:
        stats = triton_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            triton_pb2.ModelStatisticsRequest(name="")
        )
    return {s.name: int(s.inference_count) for s in stats.model_stats}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def triton_plane(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    db = tmp_path_factory.mktemp("triton") / "db.sqlite"
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{db}", triton_url=triton.grpc_address)
    )
    yield plane
    await plane.stop(0.5)


async def test_detect_steps_run_on_triton(triton: TritonProcess, triton_plane: ControlPlane) -> None:
    before = inference_counts(triton)
    pipeline = pipeline_pb2.Pipeline(name="triton", outputs=["detect"])
    pipeline.steps.add(id="detect", tool="detect", params=dict_to_struct({"classes": ["person", "face"]}))
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=pipeline, inputs={"image": image_pb2.Image(data=sample("astronaut.jpg"))}
    )
    async with aio_channel(triton_plane.address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        events = [reply.event async for reply in stub.ExecutePipeline(request)]
    finished = events[-1].execution_finished
    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
    assert sorted(d.label for d in finished.outputs[0].detections) == ["face", "person"]
    after = inference_counts(triton)
    for model in MODELS:
        assert after[model] == before.get(model, 0) + 1


async def test_shared_memory_path_gives_the_same_detections(triton: TritonProcess) -> None:
    results = {}
    for shm in (False, True):
        server = await start_tool_server("detection", triton_url=triton.grpc_address, triton_shared_memory=shm)
        try:
            async with aio_channel(server.address) as channel:
                stub = tool_service_pb2_grpc.ToolServiceStub(channel)
                before = inference_counts(triton)
                reply = await stub.Process(
                    tool_service_pb2.ProcessRequest(tool="detect", image=image_pb2.Image(data=sample("astronaut.jpg")))
                )
                assert inference_counts(triton)["blazeface_short_range"] == before["blazeface_short_range"] + 1
                results[shm] = [(d.label, round(d.score, 3), round(d.box.x), round(d.box.y)) for d in reply.detections]
        finally:
            await server.stop(0.1)
    assert results[True] == results[False]
    assert {label for label, *_ in results[True]} >= {"person", "face"}


async def test_triton_down_is_not_serving_and_unavailable() -> None:
    server = await start_tool_server("detection", triton_url=f"127.0.0.1:{free_port()}", triton_check_interval_s=0.1)
    try:
        async with aio_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(10):
                while (
                    await health.Check(health_pb2.HealthCheckRequest())
                ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                    await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tool_service_pb2_grpc.ToolServiceStub(channel).Process(
                    tool_service_pb2.ProcessRequest(tool="detect", image=image_pb2.Image(data=sample("astronaut.jpg")))
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Triton" in (caught.value.details() or "")
    finally:
        await server.stop(0.1)


async def test_step_on_dead_triton_retries_then_fails_honestly(tmp_path_factory: pytest.TempPathFactory) -> None:
    db = tmp_path_factory.mktemp("dead-triton") / "db.sqlite"
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{db}", triton_url=f"127.0.0.1:{free_port()}",
                 step_initial_backoff_s=0.01, step_max_attempts=3)
    )  # fmt: skip
    try:
        pipeline = pipeline_pb2.Pipeline(name="dead")
        pipeline.steps.add(id="detect", tool="detect")
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline=pipeline, inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
        )
        async with aio_channel(plane.address) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            events = [reply.event async for reply in stub.ExecutePipeline(request)]
        kinds = [e.WhichOneof("kind") for e in events]
        assert kinds.count("step_retrying") == 2
        failed = next(e.step_failed for e in events if e.WhichOneof("kind") == "step_failed")
        assert failed.code == "UNAVAILABLE" and failed.attempts == 3
        assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED
    finally:
        await plane.stop(0.5)


async def test_triton_model_imported_as_a_tool_runs_as_a_step(
    triton: TritonProcess, triton_plane: ControlPlane
) -> None:
    async with aio_channel(triton_plane.address) as channel:
        registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel)
        imported = await registry.ImportTritonModels(
            tool_registry_service_pb2.ImportTritonModelsRequest(address=triton.grpc_address)
        )
        assert [t.name for t in imported.tools] == ["sepia_tone"]  # the float-tensor detectors are not image models
        tool = imported.tools[0]
        assert tool.kind == tool_pb2.TOOL_KIND_TRITON_MODEL and tool.description_ja == "セピア調にする"
        assert list(tool.phrases_ja) == ["セピア", "セピア調", "古い写真風"]
        # the imported model's phrases join the offline planner's lexicon
        planned = await pipeline_service_pb2_grpc.PipelineServiceStub(channel).GeneratePipeline(
            pipeline_service_pb2.GeneratePipelineRequest(instruction="半分に縮小してセピア調にして")
        )
        assert [s.tool for s in planned.pipeline.steps] == ["resize", "sepia_tone"] and not planned.warnings
        before = inference_counts(triton)["sepia_tone"]
        pipeline = pipeline_pb2.Pipeline(name="sepia")
        pipeline.steps.add(id="small", tool="resize", params=dict_to_struct({"scale": 0.5}))
        pipeline.steps.add(id="tone", tool="sepia_tone", depends_on=["small"])
        pipeline.steps.add(id="png", tool="encode", params=dict_to_struct({"format": "png"}), depends_on=["tone"])
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline=pipeline, inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
        )
        events = [reply.event async for reply in stub.ExecutePipeline(request)]
        finished = events[-1].execution_finished
        assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
        assert inference_counts(triton)["sepia_tone"] == before + 1
        out = cv2.imdecode(np.frombuffer(finished.outputs[0].image.data, np.uint8), cv2.IMREAD_COLOR)
        assert out.shape == (150, 226, 3)
        blue, green, red = (float(out[..., i].mean()) for i in range(3))
        assert red > green > blue  # sepia: warm tones
        # a Triton model step as the first step decodes the encoded pipeline input itself
        first = pipeline_pb2.Pipeline(name="sepia-first")
        first.steps.add(id="tone", tool="sepia_tone")
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline=first, inputs={"image": image_pb2.Image(data=sample("coffee.jpg"))}
        )
        events = [reply.event async for reply in stub.ExecutePipeline(request)]
        output = events[-1].execution_finished.outputs[0].image
        assert (output.media_type, output.width, output.height) == ("image/jpeg", 600, 400)


@pytest.mark.parametrize(
    ("asked", "media_type", "channels"),
    [("image/x-raw-gray8", "image/x-raw-gray8", 1), ("image/x-raw-rgb8", "image/x-raw-rgb8", 3), ("", "image/jpeg", 0)],
)
@pytest.mark.parametrize("omit", [False, True])
async def test_a_triton_model_step_answers_the_output_type_asked(
    triton: TritonProcess, asked: str, media_type: str, channels: int, omit: bool
) -> None:
    """The executor asks a step whose image goes only to luma readers for raw gray; a Triton model step answers
    exactly what was asked (empty: the input's own format). Asked to omit the image (nobody reads it), it answers
    the type and size alone."""
    from imageflow.server.adapters.transport import ChannelPool
    from imageflow.server.adapters.triton_models import TritonModels

    pool = ChannelPool(64 * 1024 * 1024)
    try:
        models = TritonModels(pool)
        request = tool_service_pb2.ProcessRequest(tool="sepia_tone", output_media_type=asked, omit_output_image=omit)
        source = image_pb2.Image(data=sample("chelsea.jpg")).SerializeToString()
        result = await models.process(triton.grpc_address, request, source, 30.0)
    finally:
        await pool.close()
    assert (result.header.media_type, result.header.width, result.header.height) == (media_type, 451, 300)
    data = image_pb2.Image.FromString(bytes(result.image)).data
    if omit:
        assert data == b""
    elif channels:
        assert len(data) == 451 * 300 * channels
    else:
        assert data.startswith(b"\xff\xd8")
