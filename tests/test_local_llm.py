"""The LLM planner against a real model: Qwen2.5-Coder-1.5B-Instruct behind llama.cpp's OpenAI-compatible server
(`imageflow-llm`), through the real `openai` SDK. Slow answers (~2 s each on two cores), so few cases and one eval."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.testing.llm import MODEL_ALIAS, LocalLlm, start_llm
from imageflow.testing.local import free_port
from imageflow.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from openai import OpenAI

from tests.conftest import ROOT, aio_channel

EVAL = ROOT.parent / "shared" / "eval"


@pytest.fixture(scope="module")
def llm() -> Iterator[LocalLlm]:
    server = start_llm(free_port())
    yield server
    server.stop()


async def _plane(tmp: Path, llm: LocalLlm, mode: str) -> ControlPlane:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        database_url=f"sqlite:///{tmp / 'db.sqlite'}",
        llm_base_url=llm.base_url,
        llm_model=MODEL_ALIAS,
        llm_timeout_s=180,
        llm_fallback=False,
        planner_mode=mode,  # type: ignore[arg-type]
    )
    return await start_control_plane(settings)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llm_first(tmp_path_factory: pytest.TempPathFactory, llm: LocalLlm) -> AsyncIterator[ControlPlane]:
    plane = await _plane(tmp_path_factory.mktemp("llm"), llm, "llm")
    yield plane
    await plane.stop(0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hybrid(tmp_path_factory: pytest.TempPathFactory, llm: LocalLlm) -> AsyncIterator[ControlPlane]:
    plane = await _plane(tmp_path_factory.mktemp("hybrid"), llm, "hybrid")
    yield plane
    await plane.stop(0.5)


def test_the_local_server_speaks_the_openai_api(llm: LocalLlm) -> None:
    client = OpenAI(base_url=llm.base_url, api_key="unused")
    assert MODEL_ALIAS in [model.id for model in client.models.list()]
    schema = {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]}
    reply = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "What is 2+3? Answer as JSON with the key sum."}],
        response_format={"type": "json_object", "schema": schema},  # type: ignore[typeddict-unknown-key]
        max_tokens=20,
        temperature=0,
    )
    assert json.loads(reply.choices[0].message.content or "") == {"sum": 5}


async def test_the_llm_planner_plans_with_the_real_model(llm_first: ControlPlane) -> None:
    async with aio_channel(llm_first.address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        response = await stub.GeneratePipeline(
            pipeline_service_pb2.GeneratePipelineRequest(instruction="画像を半分に縮小して、グレースケールにして")
        )
    assert response.planner == f"llm:{MODEL_ALIAS}"
    assert [step.tool for step in response.pipeline.steps] == ["resize", "grayscale"]
    assert list(response.pipeline.steps[1].depends_on) == [response.pipeline.steps[0].id]


async def test_hybrid_asks_the_llm_only_for_what_the_grammar_cannot_plan(hybrid: ControlPlane) -> None:
    async with aio_channel(hybrid.address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        known = await stub.GeneratePipeline(pipeline_service_pb2.GeneratePipelineRequest(instruction="白黒にして"))
        partial = await stub.GeneratePipeline(
            pipeline_service_pb2.GeneratePipelineRequest(instruction="空を青くして、半分に縮小して")
        )
    assert known.planner == "offline" and [s.tool for s in known.pipeline.steps] == ["grayscale"]
    assert partial.planner == "offline" and any("空を青くして" in w for w in partial.warnings)


@pytest.mark.skipif(not (EVAL / "score.py").exists(), reason="shared/eval is not beside the checkout")
@pytest.mark.parametrize("cases", ["public.jsonl", "public2.jsonl"])
async def test_hybrid_with_the_local_llm_scores_at_least_95_percent(hybrid: ControlPlane, cases: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EVAL / "score.py"), "--target", hybrid.address, "--timeout", "300", str(EVAL / cases),
        "--min-accuracy", "0.95", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
