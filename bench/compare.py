#!/usr/bin/env python3
"""The working tree side by side with an older commit, in one run: `python bench/compare.py REV [ROUNDS]`.

Both sides run at once on this machine, their samples interleaved, so both see the same machine state (absolute
times here move ±30 % between runs; a comparison across runs says little). The other side is `git archive REV`
unpacked in a temporary folder and put first on `PYTHONPATH` of its processes: the same venv, the older code. A
commit whose dependencies differ from the venv's cannot be compared this way. ROUNDS (default 3) sets the samples:
20 × ROUNDS per tool call and 4 × ROUNDS per pipeline and side; a run takes about a minute per round here.

1. tool calls with raw frames (the resize and filter services of each side, called directly): what moving a frame
   in and out of a tool costs;
2., 3. pipelines through a control plane of each side with separate tool services, frames inline (2) and in shared
   memory (3): the diamond of `make bench`, its single branch path and the 1080p chain of `bench/speed.py`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from imageflow.common.allocator import tune_allocator
from imageflow.common.shm import unlink_region, write_region
from imageflow.common.structs import dict_to_struct
from imageflow.testing.local import free_port, wait_serving
from imageflow.v1 import image_pb2, pipeline_service_pb2_grpc, tool_service_pb2, tool_service_pb2_grpc
from rich.console import Console
from rich.table import Table
from run import make_image  # bench/ (this script's folder) is on sys.path
from speed import CHAIN, OPTIONS, control_plane, execute, interleaved, photo_1080p, pipeline, tool_command

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "server", "tools", "clients/python", "testing")
console = Console()


@contextlib.contextmanager
def older_code(rev: str) -> Iterator[str]:
    """`git archive REV` unpacked; yields the PYTHONPATH that puts its packages first."""
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "rev.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        yield os.pathsep.join(str(Path(folder) / package) for package in PACKAGES)


@contextlib.contextmanager
def on_path(path: str | None) -> Iterator[None]:
    """PYTHONPATH for the processes started inside (None: this tree's code)."""
    saved = os.environ.get("PYTHONPATH")
    if path is not None:
        os.environ["PYTHONPATH"] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@contextlib.contextmanager
def tool_service(kind: str) -> Iterator[tool_service_pb2_grpc.ToolServiceStub]:
    port = free_port()
    proc = subprocess.Popen(tool_command(kind, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}", process=proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            yield tool_service_pb2_grpc.ToolServiceStub(channel)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def table(title: str, samples: dict[str, list[float]], cases: list[str]) -> None:
    out = Table(title=title)
    for column in ("case", "older p50", "this tree p50", "this ÷ older"):
        out.add_column(column, justify="left" if column == "case" else "right")
    for case in cases:
        older, now = statistics.median(samples[f"older {case}"]), statistics.median(samples[f"now {case}"])
        out.add_row(case, f"{older:.2f} ms", f"{now:.2f} ms", f"{now / older:.3f}")
    console.print(out)


def tool_calls(paths: dict[str, str | None], rounds: int) -> None:
    jpeg = make_image(1920, 1080, ".jpg")
    with contextlib.ExitStack() as stack:
        stubs: dict[tuple[str, str], tool_service_pb2_grpc.ToolServiceStub] = {}
        for side, path in paths.items():
            with on_path(path):
                for kind in ("resize", "filter"):
                    stubs[side, kind] = stack.enter_context(tool_service(kind))
        flip = dict_to_struct({"direction": "horizontal"})
        rgb = stubs["now", "resize"].Process(tool_service_pb2.ProcessRequest(
            tool="flip", params=flip, image=image_pb2.Image(data=jpeg), output_media_type="image/x-raw")).image  # fmt: skip
        gray = stubs["now", "filter"].Process(tool_service_pb2.ProcessRequest(
            tool="grayscale", image=image_pb2.Image(data=jpeg), output_media_type="image/x-raw-gray8")).image  # fmt: skip
        name, size = write_region(rgb.data)
        stack.callback(unlink_region, name)
        shared = image_pb2.Image(media_type=rgb.media_type, width=rgb.width, height=rgb.height)
        shared.shared_memory.name, shared.shared_memory.byte_size = name, size
        crop = dict_to_struct({"width": 64, "height": 64, "anchor": "center"})
        cases = {
            "flip, JPEG in, raw 6 MB out": ("resize", tool_service_pb2.ProcessRequest(
                tool="flip", params=flip, image=image_pb2.Image(data=jpeg), output_media_type="image/x-raw")),
            "flip, raw 6 MB in and out": ("resize", tool_service_pb2.ProcessRequest(
                tool="flip", params=flip, image=rgb, output_media_type="image/x-raw")),
            "grayscale, raw 2 MB in and out": ("filter", tool_service_pb2.ProcessRequest(
                tool="grayscale", image=gray, output_media_type="image/x-raw-gray8")),
            "crop to a 64×64 JPEG, 6 MB in shared memory": ("resize", tool_service_pb2.ProcessRequest(
                tool="crop", params=crop, image=shared, output_media_type="image/jpeg")),
        }  # fmt: skip
        fns: dict[str, Callable[[], object]] = {
            f"{side} {case}": (lambda s=stubs[side, kind], r=request: s.Process(r))  # type: ignore[misc]
            for side in paths
            for case, (kind, request) in cases.items()
        }
        table("1. tool calls (a blocking client; p50)", interleaved(fns, rounds * 20), list(cases))


def pipelines(paths: dict[str, str | None], rounds: int) -> None:
    jpeg, photo = make_image(1920, 1080, ".jpg"), photo_1080p()
    branch = {"method": "gaussian", "radius": 12}
    diamond = pipeline(
        ("root", "flip", {"direction": "horizontal"}, []),
        ("left", "blur", branch, ["root"]),
        ("right", "blur", {**branch, "radius": 12.5}, ["root"]),
        ("join", "grayscale", {}, ["left", "right"]),
    )
    single = pipeline(
        ("root", "flip", {"direction": "horizontal"}, []),
        ("right", "blur", {**branch, "radius": 12.5}, ["root"]),
        ("join", "grayscale", {}, ["right"]),
    )
    modes = (("frames inline", {}), ("shared memory", {"IMAGEFLOW_TOOL_SHARED_MEMORY": "true"}))
    for section, (label, extra) in enumerate(modes, start=2):
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            fns: dict[str, Callable[[], object]] = {}
            for side, path in paths.items():
                with on_path(path):
                    address, _, _ = stack.enter_context(control_plane(Path(tmp), embedded=False, extra=extra))
                channel = stack.enter_context(grpc.insecure_channel(address, options=OPTIONS))
                stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
                fns[f"{side} diamond"] = lambda s=stub: execute(s, diamond, jpeg, batch=False)  # type: ignore[misc]
                fns[f"{side} its longer branch alone"] = lambda s=stub: execute(s, single, jpeg, batch=False)  # type: ignore[misc]
                fns[f"{side} 1080p chain"] = lambda s=stub: execute(s, CHAIN, photo)  # type: ignore[misc]
            cases = ["diamond", "its longer branch alone", "1080p chain"]
            table(f"{section}. pipelines, separate services, {label} (p50)", interleaved(fns, rounds * 4), cases)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rev, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tune_allocator()  # as the services do: the client's copies reuse heap memory
    with older_code(rev) as older:
        paths: dict[str, str | None] = {"older": older, "now": None}
        console.print(f"[bold]this tree against {rev}[/bold], samples interleaved")
        tool_calls(paths, rounds)
        pipelines(paths, rounds)


if __name__ == "__main__":
    main()
