"""The workspace as users install it: each member pulls only its own dependencies, the control plane without
embedded tools loads no imaging stack, and the deploy manifests are valid."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

UV = ROOT / ".tools" / "uv" / "bin" / "uv"
IMAGING = {"opencv-python-headless", "onnxruntime", "numpy"}
PLANNER_AND_STORES = {"sudachipy", "sudachidict-core", "asyncpg", "aiokafka", "openai"}


def locked_dependencies(package: str, *extras: str) -> set[str]:
    """Names of what installing `package` (with extras) pulls, read from uv.lock."""
    command = [str(UV), "export", "--frozen", "--no-dev", "--no-hashes", "--no-header", "--no-annotate"]
    command += ["--package", package, *(f"--extra={extra}" for extra in extras)]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==", line)
        if match:
            names.add(match.group(1).lower().replace("_", "-"))
    return names


def test_python_client_pulls_no_imaging_planner_or_llm() -> None:
    pulled = locked_dependencies("imageflow-client", "cli")
    assert "grpcio" in pulled and "typer" in pulled
    assert not pulled & (IMAGING | PLANNER_AND_STORES), pulled & (IMAGING | PLANNER_AND_STORES)


def test_tool_service_pulls_no_planner_store_or_llm() -> None:
    pulled = locked_dependencies("imageflow-tools")
    assert {"onnxruntime", "opencv-python-headless"} <= pulled
    assert not pulled & PLANNER_AND_STORES, pulled & PLANNER_AND_STORES


def test_control_plane_extras_are_optional() -> None:
    bare = locked_dependencies("imageflow-server")
    assert "sudachipy" in bare
    assert not bare & ({"asyncpg", "aiokafka", "openai", "tritonclient"} | IMAGING), bare
    assert {"asyncpg", "aiokafka", "openai"} <= locked_dependencies("imageflow-server", "postgres", "kafka", "llm")


PROBE = """
import asyncio, json, sys
from imageflow.server.app import start_control_plane
from imageflow.server.settings import Settings

async def main():
    plane = await start_control_plane(Settings(host="127.0.0.1", port=0, embedded_tools=False,
                                               database_url="sqlite:///" + sys.argv[1]))
    await plane.stop(0)
    print(json.dumps(sorted(m for m in ("cv2", "numpy", "onnxruntime", "PIL.ImageFilter", "tritonclient") if m in sys.modules)))

asyncio.run(main())
"""


def test_control_plane_without_embedded_tools_imports_no_cv2_or_numpy(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "probe.db")], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_sdk_import_loads_no_server_or_imaging() -> None:
    code = "import sys, imageflow.client; print([m for m in ('cv2','numpy','sudachipy','imageflow.server') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def _k3s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((ROOT / "deploy" / "k3s").glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return docs


@pytest.mark.parametrize(("name", "doc"), _k3s_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_k3s_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.31.0", strict=True)


def test_k3s_triton_asks_for_a_gpu_and_services_use_their_own_images() -> None:
    deployments = {d["metadata"]["name"]: d for _, d in _k3s_documents() if d["kind"] == "Deployment"}
    triton = deployments["triton"]["spec"]["template"]["spec"]["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    images = {name: d["spec"]["template"]["spec"]["containers"][0]["image"] for name, d in deployments.items()}
    assert images["control-plane"].startswith("imageflow-server:")
    assert {images[k].split(":")[0] for k in ("resize", "filter", "detection")} == {"imageflow-tools"}


def _unquote(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip('"')
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items()}
    return value


def test_nomad_job_parses_and_reserves_one_gpu_for_triton() -> None:
    with (ROOT / "deploy" / "nomad" / "imageflow.nomad.hcl").open(encoding="utf-8") as handle:
        job = _unquote(hcl2.load(handle))["job"][0]["imageflow"]
    groups = {name: body for group in job["group"] for name, body in group.items()}
    assert set(groups) == {"control-plane", "tools", "triton"}
    triton_task = groups["triton"]["task"][0]["tritonserver"]
    assert triton_task["resources"][0]["device"][0]["nvidia/gpu"]["count"] == 1
    tool_tasks = {name: body for task in groups["tools"]["task"] for name, body in task.items()}
    assert {t["config"][0]["image"] for t in tool_tasks.values()} == {"imageflow-tools:0.2.0"}


def test_dockerfiles_install_from_the_lock_without_dev_dependencies() -> None:
    dockerfiles = sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile"))
    assert {p.name for p in dockerfiles} == {"control-plane.Dockerfile", "tools.Dockerfile", "triton.Dockerfile"}
    for path in dockerfiles:
        text = path.read_text(encoding="utf-8")
        assert "[dev]" not in text and "--group dev" not in text, path.name
        for sync in re.findall(r"uv sync[^\n]*(?:\\\n[^\n]*)*", text):
            assert "--frozen" in sync and "--no-dev" in sync, (path.name, sync)


def test_domain_code_imports_no_grpc() -> None:
    domain = ROOT / "server" / "imageflow" / "server" / "domain"
    offenders = [
        str(path.relative_to(ROOT))
        for path in domain.rglob("*.py")
        if re.search(r"^\s*(import grpc|from grpc\b|from imageflow\.server\.adapters)", path.read_text(), re.M)
    ]
    assert offenders == []
