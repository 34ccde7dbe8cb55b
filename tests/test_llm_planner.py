"""GeneratePipeline through the real `openai` SDK against a real OpenAI-compatible HTTP endpoint with scripted answers."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from imageflow.common.structs import struct_to_dict
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc

from tests.conftest import aio_channel
from tests.fake_llm import FakeLlm, Reply

SECRET = "sk-test-DO-NOT-LEAK-4242"


def answer(*steps: dict[str, Any]) -> str:
    return json.dumps(
        {"steps": [{"depends_on": [], "params": {}, "explanation": "説明", **s} for s in steps]}, ensure_ascii=False
    )


GOOD = answer(
    {"id": "small", "tool": "resize", "params": {"scale": 0.5}},
    {"id": "gray", "tool": "grayscale", "depends_on": ["small"], "explanation": "白黒にする"},
)


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLlm]:
    fake = FakeLlm()
    fake.start()
    yield fake
    fake.stop()


async def _plane(tmp_path_factory: pytest.TempPathFactory, llm: FakeLlm, *, fallback: bool) -> ControlPlane:
    workdir = tmp_path_factory.mktemp("llm")
    key_file = workdir / "api-key"
    key_file.write_text(SECRET + "\n")
    settings = Settings(
        host="127.0.0.1", port=0, database_url=f"sqlite:///{workdir}/db.sqlite", llm_base_url=llm.base_url,
        llm_model="test-model", llm_api_key_file=key_file, llm_timeout_s=1.0, llm_max_retries=1, llm_fallback=fallback,
    )  # fmt: skip
    return await start_control_plane(settings)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def strict_stub(
    tmp_path_factory: pytest.TempPathFactory, llm: FakeLlm
) -> AsyncIterator[pipeline_service_pb2_grpc.PipelineServiceStub]:
    """A server whose LLM failures are errors (no offline fallback)."""
    plane = await _plane(tmp_path_factory, llm, fallback=False)
    async with aio_channel(plane.address) as channel:
        yield pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    await plane.stop(0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fallback_stub(
    tmp_path_factory: pytest.TempPathFactory, llm: FakeLlm
) -> AsyncIterator[pipeline_service_pb2_grpc.PipelineServiceStub]:
    """A server that falls back to the offline planner."""
    plane = await _plane(tmp_path_factory, llm, fallback=True)
    async with aio_channel(plane.address) as channel:
        yield pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    await plane.stop(0.5)


async def generate(
    stub: pipeline_service_pb2_grpc.PipelineServiceStub, instruction: str
) -> pipeline_service_pb2.GeneratePipelineResponse:
    return await stub.GeneratePipeline(pipeline_service_pb2.GeneratePipelineRequest(instruction=instruction))  # type: ignore[no-any-return]


async def test_valid_answer_becomes_a_validated_pipeline(strict_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(GOOD))
    response = await generate(strict_stub, "半分にして白黒に (1)")
    assert response.planner == "llm:test-model"
    assert [(s.id, s.tool, list(s.depends_on)) for s in response.pipeline.steps] == [
        ("small", "resize", []),
        ("gray", "grayscale", ["small"]),
    ]
    assert response.explanations[1].text == "白黒にする"
    request = llm.requests[0]
    assert request["model"] == "test-model"
    assert request["response_format"]["type"] == "json_schema"
    system = request["messages"][0]["content"]
    assert "blur_regions" in system and "max_side" in system  # the live registry's tools and schemas are in the prompt
    assert llm.headers[0]["authorization"] == f"Bearer {SECRET}"


async def test_answers_are_cached_per_instruction(strict_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(GOOD))
    await generate(strict_stub, "半分にして白黒に (cache)")
    again = await generate(strict_stub, "半分にして白黒に (cache)")
    assert len(llm.requests) == 1
    assert again.planner == "llm:test-model"


@pytest.mark.parametrize(
    ("first", "needle"),
    [
        ("これは JSON ではありません", "JSON"),
        (answer({"id": "x", "tool": "teleport"}), "teleport"),
        (answer({"id": "small", "tool": "resize", "params": {"scale": "half"}}), "steps[0].params.scale"),
        (answer({"id": "hide", "tool": "blur_regions"}), "detections"),
    ],
)
async def test_bad_answers_are_repaired(strict_stub, llm: FakeLlm, first: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(first), Reply(GOOD))
    response = await generate(strict_stub, f"半分にして白黒に ({needle})")
    assert [s.tool for s in response.pipeline.steps] == ["resize", "grayscale"]
    assert len(llm.requests) == 2
    repair = llm.requests[1]["messages"][-1]["content"]
    assert needle in repair
    assert "grayscale" in repair  # the list of valid tools goes back too


async def test_repair_exhausted_is_a_clear_error(strict_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    bad = answer({"id": "x", "tool": "shell"})
    llm.script(Reply(bad), Reply(bad), Reply(bad))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(strict_stub, "何かして (exhausted)")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 回修正しても" in (caught.value.details() or "")
    assert len(llm.requests) == 3


async def test_unregistered_tool_never_becomes_a_pipeline(strict_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(*(Reply(answer({"id": "x", "tool": "run_shell", "params": {"cmd": "rm -rf /"}})) for _ in range(3)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(strict_stub, "画像を処理して (unregistered)")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_model_refusal_is_invalid_argument(strict_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(json.dumps({"steps": [], "refusal": "画像処理ではありません"}, ensure_ascii=False)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(strict_stub, "株価を予想して")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "画像処理ではありません" in (caught.value.details() or "")


async def test_rate_limit_is_retried(strict_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(status=429), Reply(GOOD))
    response = await generate(strict_stub, "半分にして白黒に (429)")
    assert len(llm.requests) == 2
    assert response.planner == "llm:test-model"


async def test_server_errors_exhaust_to_unavailable(strict_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(status=503), Reply(status=503))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(strict_stub, "半分にして白黒に (503)")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "503" in (caught.value.details() or "")


async def test_timeout_falls_back_to_the_offline_planner(fallback_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(Reply(GOOD, delay_s=2.5), Reply(GOOD, delay_s=2.5))
    response = await generate(fallback_stub, "画像を半分に縮小して")
    assert response.planner == "offline"
    assert any("LLM_TIMEOUT" in w for w in response.warnings)
    assert struct_to_dict(response.pipeline.steps[0].params) == {"scale": 0.5}


async def test_endpoint_without_json_schema_support_falls_back_to_json_mode(fallback_stub, llm: FakeLlm) -> None:  # type: ignore[no-untyped-def]
    llm.script(
        Reply(status=400, body={"error": {"message": "response_format json_schema unsupported"}}),
        Reply("```json\n" + GOOD + "\n```"),
    )
    response = await generate(fallback_stub, "半分にして白黒に (json mode)")
    assert response.planner == "llm:test-model"
    assert llm.requests[1]["response_format"]["type"] == "json_object"
    assert llm.requests[1]["response_format"]["schema"]["required"] == ["steps"]


async def test_llama_cpp_style_500_on_json_schema_steps_down_to_json_object_with_schema(llm: FakeLlm) -> None:
    """llama.cpp's server answers HTTP 500 (not 400) to the json_schema response format."""
    from imageflow.server.adapters.llm_planner import LlmPlanner
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=llm.base_url, api_key="unused", max_retries=2)
    planner = LlmPlanner(client, "test-model", lambda pipeline: None)
    refused = Reply(status=500, body={"error": {"message": "unsupported response_format type"}})
    llm.script(refused, refused, refused, Reply(GOOD))  # the SDK retries a 500 twice before giving up
    before = len(llm.requests)
    draft = await planner.plan("半分にして白黒に (llama.cpp)", None, {}, 1)
    assert [s.tool for s in draft.pipeline.steps] == ["resize", "grayscale"]
    sent = [r["response_format"] for r in llm.requests[before:]]
    assert [f["type"] for f in sent] == ["json_schema"] * 3 + ["json_object"] and "schema" in sent[-1]


async def test_key_is_never_logged(fallback_stub, llm: FakeLlm, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    llm.script(
        Reply(status=401, body={"error": {"message": "bad key"}}),
        Reply("not json"),
        Reply("not json"),
        Reply("not json"),
    )
    await generate(fallback_stub, "画像を半分に縮小して (logs)")
    assert caplog.records
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    assert SECRET not in caplog.text
