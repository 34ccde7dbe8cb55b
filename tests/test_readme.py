"""The README's examples, run as written against a live server: the CLI lines, the grpcurl lines, the SDK example."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from imageflow.server.app import ControlPlane

from tests.conftest import ROOT
from tests.test_clients import BIN, run

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _block(after_heading: str, language: str) -> str:
    section = README[README.index(after_heading) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block after {after_heading!r}"
    return match.group(1)


async def test_readme_cli_lines_run_as_written(plane: ControlPlane, tmp_path: Path) -> None:
    lines = [line for line in _block("## The CLI", "bash").splitlines() if line.startswith(".venv/bin/imageflow ")]
    assert len(lines) >= 8
    env = {"IMAGEFLOW_TARGET": plane.address, "PATH": f"{BIN}:/usr/bin:/bin"}
    for line in lines:
        command = line.split("  #")[0].strip().replace(".venv/bin/", f"{BIN}/").replace("samples/", f"{ROOT}/samples/")
        code, output = await run("bash", "-c", command, env=env, cwd=tmp_path)
        assert code == 0, f"{line}\n{output}"
        if " run " in command:  # what the README says to take from run's output
            env["PIPELINE_ID"] = re.search(r"保存しました: (pl_\w+)", output).group(1)  # type: ignore[union-attr]
            env["EXECUTION_ID"] = re.search(r"実行 ID: (ex_\w+)", output).group(1)  # type: ignore[union-attr]
            assert "cat" in output and (tmp_path / "boxes.jpg").exists()
    assert (tmp_path / "out.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


async def test_readme_grpcurl_lines_run_as_written(plane: ControlPlane, tmp_path: Path) -> None:
    script = (
        _block("## grpcurl", "bash").replace("127.0.0.1:50051", plane.address).replace("samples/", f"{ROOT}/samples/")
    )
    code, output = await run("bash", "-ec", script, env={"PATH": f"{BIN}:/usr/bin:/bin"}, cwd=tmp_path)
    assert code == 0, output
    assert '"SERVING"' in output and "EXECUTION_STATE_SUCCEEDED" in output


async def test_readme_sdk_example_runs(plane: ControlPlane) -> None:
    code, output = await run(
        sys.executable, "-c", _block("## Python SDK", "python"), env={"IMAGEFLOW_TARGET": plane.address}
    )
    assert code == 0, output
    assert "done: detect 1 detections" in output
    assert "detect ['cat'] 0 bytes" in output and re.search(r"draw_boxes \[\] [1-9]\d* bytes", output)
