"""Clients as users run them: the imageflow CLI, the Node client (node --test) and grpcurl, against a live server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from PIL import Image as PILImage

from tests.conftest import ROOT, SAMPLES

BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or "grpcurl"


async def run(
    *command: str, stdin: bytes | None = None, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> tuple[int, str]:
    """Run a command without blocking the event loop the server lives on."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd,
    )  # fmt: skip
    output, _ = await proc.communicate(stdin)
    return proc.returncode or 0, output.decode()


async def test_cli_run_writes_a_gray_image(plane: ControlPlane, tmp_path: Path) -> None:
    out = tmp_path / "gray.png"
    code, output = await run(
        str(BIN / "imageflow"),
        "run",
        "グレースケールにして",
        "-i",
        str(SAMPLES / "chelsea.jpg"),
        "-o",
        str(out),
        "-t",
        plane.address,
    )
    assert code == 0, output
    assert "SUCCEEDED" in output and "完了" in output
    image = PILImage.open(out)
    assert image.format == "PNG" and image.size == (451, 300)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() == 0  # really gray


async def test_cli_generate_json_and_errors(plane: ControlPlane) -> None:
    code, output = await run(str(BIN / "imageflow"), "generate", "右に90度回転して", "--json", "-t", plane.address)
    assert code == 0, output
    response = json.loads(output)  # the whole GeneratePipelineResponse: pipeline, explanations, planner, warnings
    assert response["pipeline"]["steps"][0]["params"] == {"angle": -90.0} and response["planner"] == "offline"
    code, output = await run(str(BIN / "imageflow"), "generate", "明日の天気を教えて", "-t", plane.address)
    assert code == 2
    assert "INVALID_ARGUMENT" in output and "Traceback" not in output
    code, output = await run(str(BIN / "imageflow"), "pipelines", "show", "pl_missing", "-t", plane.address)
    assert code == 2 and "NOT_FOUND" in output


async def test_cli_execute_saved_pipeline_and_list(plane: ControlPlane, tmp_path: Path) -> None:
    code, output = await run(
        str(BIN / "imageflow"),
        "run",
        "左右反転して",
        "-i",
        str(SAMPLES / "coffee.jpg"),
        "-o",
        str(tmp_path / "a.jpg"),
        "-t",
        plane.address,
    )
    assert code == 0, output
    pipeline_id = next(word for word in output.split() if word.startswith("pl_"))
    code, output = await run(
        str(BIN / "imageflow"),
        "execute",
        pipeline_id,
        "-i",
        str(SAMPLES / "coffee.jpg"),
        "-o",
        str(tmp_path / "b.jpg"),
        "-t",
        plane.address,
    )
    assert code == 0, output
    assert (tmp_path / "b.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    code, output = await run(str(BIN / "imageflow"), "pipelines", "list", "-t", plane.address)
    assert code == 0 and pipeline_id in output


async def test_node_client(plane: ControlPlane, tmp_path: Path) -> None:
    node_dir = ROOT / "clients" / "node"
    if not (node_dir / "node_modules").exists():
        pytest.fail("clients/node/node_modules is missing: run `make install`")
    # and a control plane whose message limit is its least (1 MiB), for an output read apart in pieces
    small = await start_control_plane(
        Settings(
            host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'small.db'}", max_message_bytes=1024 * 1024
        )
    )
    try:
        env = {"IMAGEFLOW_TARGET": plane.address, "IMAGEFLOW_SMALL_MESSAGES_TARGET": small.address}
        code, output = await run("node", "--test", "test/", env=env, cwd=node_dir)
    finally:
        await small.stop(0.5)
    assert code == 0, output
    # the test of a call without the token needs a server with authentication: test_security runs it
    assert "# pass 8" in output and "# skipped 1" in output


async def test_grpcurl_list_describe_health(plane: ControlPlane) -> None:
    code, output = await run(GRPCURL, "-plaintext", plane.address, "list")
    assert code == 0, output
    assert {"imageflow.v1.PipelineService", "imageflow.v1.ToolRegistryService", "grpc.health.v1.Health"} <= set(
        output.split()
    )
    code, output = await run(GRPCURL, "-plaintext", plane.address, "describe", "imageflow.v1.PipelineService")
    assert code == 0 and "rpc ExecutePipeline" in output
    code, output = await run(GRPCURL, "-plaintext", plane.address, "grpc.health.v1.Health/Check")
    assert code == 0 and '"SERVING"' in output


async def test_grpcurl_generate_and_execute(plane: ControlPlane) -> None:
    code, output = await run(
        GRPCURL, "-plaintext", "-d", json.dumps({"instruction": "右に90度回転して"}), plane.address,
        "imageflow.v1.PipelineService/GeneratePipeline",
    )  # fmt: skip
    assert code == 0, output
    steps = json.loads(output)["pipeline"]["steps"]
    assert steps[0]["tool"] == "rotate" and steps[0]["params"]["angle"] == -90
    request = {
        "pipeline": {"steps": [{"id": "gray", "tool": "grayscale"}]},
        "inputs": {"image": {"data": base64.b64encode((SAMPLES / "chelsea.jpg").read_bytes()).decode()}},
    }
    code, output = await run(GRPCURL, "-plaintext", "-max-msg-sz", str(64 << 20), "-d", "@", plane.address,
                             "imageflow.v1.PipelineService/ExecutePipeline", stdin=json.dumps(request).encode())  # fmt: skip
    assert code == 0, output
    decoder = json.JSONDecoder()
    events, index = [], 0
    while index < len(output.strip()):
        event, index = decoder.raw_decode(output, index)
        events.append(event["event"])
        while index < len(output) and output[index].isspace():
            index += 1
    finished = events[-1].get("executionFinished") or events[-1]["execution_finished"]  # grpcurl versions differ
    assert finished["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    code, output = await run(
        GRPCURL,
        "-plaintext",
        "-d",
        json.dumps({"pipeline_id": "nope"}),
        plane.address,
        "imageflow.v1.PipelineService/GetPipeline",
    )
    assert code != 0 and "NotFound" in output


async def test_cli_prints_the_execution_id_resumes_any_watch_and_names_files_by_format(
    plane: ControlPlane, tmp_path: Path
) -> None:
    asked = tmp_path / "out.jpg"  # the pipeline ends in PNG: the file must say so
    code, output = await run(str(BIN / "imageflow"), "run", "白黒にしてPNGで保存して", "-i", str(SAMPLES / "chelsea.jpg"),
                             "-o", str(asked), "-t", plane.address)  # fmt: skip
    assert code == 0, output
    written = tmp_path / "out.png"
    assert not asked.exists() and PILImage.open(written).format == "PNG" and ".png" in output
    execution_id = next(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("実行 ID:"))
    assert execution_id.startswith("ex_")
    for after in (1, 3, 50):
        code, output = await run(str(BIN / "imageflow"), "watch", execution_id, "--after", str(after),
                                 "-t", plane.address)  # fmt: skip
        assert code == 0 and "Traceback" not in output and "SUCCEEDED" in output, (after, output)
