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


async def test_readme_separate_services_recipe_runs_as_written(tmp_path: Path) -> None:
    """The recipe for separate tool services with shared memory: its ports swapped for free ones, its processes
    stopped at the end."""
    from imageflow.common.shm import SHM_DIR
    from imageflow.testing.local import free_port

    ports = {str(port): str(free_port()) for port in (50061, 50062, 50063, 50051)}
    section = README[README.index("frames between them in shared memory") :]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    for old, new in ports.items():
        script = script.replace(old, new)
    script = script.replace(".venv/bin/", f"{BIN}/").replace("samples/", f"{ROOT}/samples/")
    before = {p.name for p in SHM_DIR.glob("imageflow-*")}
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "IMAGEFLOW_PORT": ports["50051"],
        "IMAGEFLOW_TARGET": f"127.0.0.1:{ports['50051']}",
        "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'recipe.db'}",
    }
    code, output = await run(
        "bash", "-c", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script, env=env, cwd=tmp_path
    )
    assert code == 0, output
    for port in list(ports.values())[:3]:
        assert f"127.0.0.1:{port}" in output  # tools listed at each service's address
    assert "SUCCEEDED" in output and (tmp_path / "half-gray.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in SHM_DIR.glob("imageflow-*")} <= before  # nothing left in /dev/shm
