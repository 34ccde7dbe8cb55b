"""The CLI and SDKs as a person uses them, through the real CLI and real servers: edits, names, --json, wrapping,
detections in events, and the sync and async SDKs at parity."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from pathlib import Path

import grpc
import pytest
from imageflow.client import AsyncImageflowClient, ImageflowClient, ImageflowClientError, image_from_file
from imageflow.server.app import ControlPlane
from imageflow.v1 import execution_pb2, pipeline_pb2

from tests.conftest import SAMPLES, aio_channel
from tests.test_clients import BIN, run

CLI = str(BIN / "imageflow")
KINDS = {f.name for f in execution_pb2.ExecutionEvent.DESCRIPTOR.oneofs_by_name["kind"].fields}
CAT = str(SAMPLES / "chelsea.jpg")


async def test_run_prints_detections_and_says_when_no_image_is_written(plane: ControlPlane) -> None:
    code, output = await run(CLI, "run", "猫を検出して赤い枠で囲んで", "-i", CAT, "-t", plane.address)
    assert code == 0, output
    assert re.search(r"│ detect\s+│ cat\s+│ 0\.\d\d", output), output  # the detections table
    assert "出力画像 1 枚は書き出していません（-o PATH で保存できます）" in output


async def test_run_json_streams_events_with_detections(plane: ControlPlane, tmp_path: Path) -> None:
    code, output = await run(
        CLI,
        "run",
        "猫を検出して赤い枠で囲んで",
        "-i",
        CAT,
        "-o",
        str(tmp_path / "b.jpg"),
        "--json",
        "-t",
        plane.address,
    )
    assert code == 0, output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    kinds = [next(k for k in e if k in KINDS) for e in events]
    assert kinds[0] == "execution_started" and kinds[-1] == "execution_finished"
    detect = next(e["step_succeeded"] for e in events if e.get("step_succeeded", {}).get("step_id") == "detect")
    assert [d["label"] for d in detect["detections"]] == ["cat"]
    outputs = {o["step_id"]: o for o in events[-1]["execution_finished"]["outputs"]}
    (image,) = [o["image"] for o in outputs.values() if "image" in o]  # the last step (an encode, for -o b.jpg)
    assert image["data_bytes"] > 1000 and "data" not in image
    assert [d["label"] for d in outputs["detect"]["detections"]] == ["cat"]  # a detecting step that is not an output
    assert (tmp_path / "b.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


async def test_edit_saves_a_new_version_and_names_come_from_the_instruction(plane: ControlPlane) -> None:
    code, output = await run(CLI, "run", "猫を検出して赤い枠で囲んで", "-i", CAT, "-t", plane.address)
    pipeline_id = re.search(r"保存しました: (pl_\w+) v1", output).group(1)  # type: ignore[union-attr]
    code, output = await run(CLI, "edit", pipeline_id, "枠を青にして", "--json", "-t", plane.address)
    assert code == 0, output
    edited = json.loads(output)
    assert edited["id"] == pipeline_id and edited["version"] == 2
    assert edited["name"] == "猫を検出して赤い枠で囲んで"
    boxes = next(s for s in edited["steps"] if s["tool"] == "draw_boxes")
    assert boxes["params"]["color"] in ("blue", "#0000ff")
    code, output = await run(CLI, "run", "グレースケールにして", "--base", pipeline_id, "-i", CAT, "-t", plane.address)
    assert code == 0 and f"保存しました: {pipeline_id} v3" in output, output


async def test_every_listing_command_has_json(plane: ControlPlane) -> None:
    code, output = await run(CLI, "tools", "--json", "-t", plane.address)
    assert code == 0 and "resize" in {t["name"] for t in json.loads(output)}
    code, output = await run(CLI, "pipelines", "list", "--json", "-t", plane.address)
    assert code == 0 and isinstance(json.loads(output).get("pipelines", []), list)
    code, output = await run(CLI, "generate", "右に90度回転して", "--json", "-t", plane.address)
    assert code == 0 and json.loads(output)["pipeline"]["steps"][0]["tool"] == "rotate"


async def test_tables_wrap_instead_of_cutting_when_piped(plane: ControlPlane) -> None:
    code, output = await run(CLI, "tools", "-t", plane.address, env={"COLUMNS": "80"})
    assert code == 0, output
    described = re.sub(r"\s", "", next(t for t in plane.registry.list() if t.name == "resize").description_ja)
    remaining = iter(output)  # every character of the description, in order (folded over lines between the
    assert all(char in remaining for char in described)  # other columns), none cut away behind an ellipsis
    assert "…" not in output


def _public(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_sync_and_async_clients_offer_the_same_calls() -> None:
    assert _public(ImageflowClient) == _public(AsyncImageflowClient)
    for name in _public(ImageflowClient):
        sync_params = list(inspect.signature(getattr(ImageflowClient, name)).parameters)
        async_params = list(inspect.signature(getattr(AsyncImageflowClient, name)).parameters)
        assert sync_params == async_params, name


async def test_async_client_end_to_end_on_a_channel_it_does_not_own(plane: ControlPlane) -> None:
    async with aio_channel(plane.address) as channel:
        async with AsyncImageflowClient(channel=channel) as client:
            generated = await client.generate("猫を検出して赤い枠で囲んで")
            assert generated.pipeline.name == "猫を検出して赤い枠で囲んで"
            saved = await client.save(generated.pipeline)
            assert (await client.get(saved.id)).version == 1 and await client.violations(saved.id) == []
            assert saved.id in {p.id for p in (await client.list_pipelines(1000)).pipelines}
            events = [e async for e in client.execute(saved.id, {"image": image_from_file(CAT)})]
            execution_id = events[0].execution_id
            replay = [e async for e in client.watch(execution_id, 2)]
            assert [e.sequence for e in replay] == [e.sequence for e in events[2:]]
            assert (await client.get_execution(execution_id)).state == events[-1].execution_finished.state
            assert (await client.cancel(execution_id)).id == execution_id
            assert "grayscale" in {t.name for t in await client.tools()}
            assert (await client.get_tool("grayscale")).name == "grayscale"
            with pytest.raises(ImageflowClientError) as invalid:
                await client.validate(pipeline_pb2.Pipeline(steps=[pipeline_pb2.Step(id="x", tool="resize")]))
            assert invalid.value.code == "INVALID_ARGUMENT" and invalid.value.violations
            assert await client.delete(saved.id) == 1
        # closing the client left the channel open: it still answers
        await channel.channel_ready()
        assert channel.get_state() == grpc.ChannelConnectivity.READY


async def test_sync_client_end_to_end(plane: ControlPlane) -> None:
    def session() -> tuple[str, int, str, list[tuple[str, str]]]:
        with ImageflowClient(plane.address) as client:
            saved = client.save(client.generate("グレースケールにして").pipeline)
            events = list(client.execute(saved.id, {"image": image_from_file(CAT)}))
            state = client.get_execution(events[0].execution_id).state
            try:
                client.validate(pipeline_pb2.Pipeline(steps=[pipeline_pb2.Step(id="x", tool="nope")]))
            except ImageflowClientError as error:
                return saved.name, state, error.code, error.violations
        raise AssertionError("validate accepted an unknown tool")

    name, state, code, violations = await asyncio.to_thread(session)  # the server shares this event loop
    assert name == "グレースケールにして" and state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert code == "INVALID_ARGUMENT" and violations[0][0] == "steps[0].tool"
