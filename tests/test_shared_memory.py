"""Opt-in shared memory between the control plane and tool services on one host: raw frames between steps stay in
/dev/shm (handles in the messages), the bytes are the same as inline, nothing is left behind, and a tool reads only
objects ImageFlow made."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from imageflow.common import shm
from imageflow.common.errors import ImageflowError
from imageflow.common.shm import SHM_DIR, UNLINKER, Unlinker, map_region, sweep_regions, unlink_region, write_region
from imageflow.common.structs import dict_to_struct
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.v1 import (
    image_pb2,
    pipeline_pb2,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

from tests.conftest import aio_channel, execute_outputs, sample

STEPS: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("small", "resize", {"scale": 0.5}, []),
    ("gray", "grayscale", {}, ["small"]),
    ("turn", "rotate", {"angle": 90}, ["gray"]),
    ("soft", "blur", {"radius": 2}, ["turn"]),
]


def objects() -> set[str]:
    return {p.name for p in SHM_DIR.glob("imageflow-*")}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[bool, ControlPlane]]:
    made = {}
    for shared in (True, False):
        db = tmp_path_factory.mktemp(f"shm-{shared}") / "db.sqlite"
        made[shared] = await start_control_plane(
            Settings(
                host="127.0.0.1",
                port=0,
                database_url=f"sqlite:///{db}",
                embedded_in_process=False,
                tool_shared_memory=shared,
            )
        )
    yield made
    for plane in made.values():
        await plane.stop(0.5)


async def outputs(plane: ControlPlane) -> dict[str, image_pb2.Image]:
    definition = pipeline_pb2.Pipeline(name="shm")
    for step_id, tool, params, deps in STEPS:
        definition.steps.add(id=step_id, tool=tool, params=dict_to_struct(params), depends_on=deps)
    return await execute_outputs(plane.address, definition, sample("astronaut.jpg"))


async def test_frames_through_shared_memory_give_the_same_bytes_and_leave_nothing(
    planes: dict[bool, ControlPlane],
) -> None:
    before = objects()
    assert await outputs(planes[True]) == await outputs(planes[False])
    gc.collect()
    UNLINKER.settle()  # the control plane unlinks off its event loop
    assert objects() == before


async def test_a_tool_returns_a_handle_and_reads_one(planes: dict[bool, ControlPlane]) -> None:
    address = next(s.address for s in planes[True].tool_servers if s.kind == "filter")
    async with aio_channel(address) as channel:
        stub = tool_service_pb2_grpc.ToolServiceStub(channel)
        first = await stub.Process(tool_service_pb2.ProcessRequest(
            tool="grayscale", image=image_pb2.Image(data=sample("chelsea.jpg")), output_media_type="image/x-raw",
            output_to_shared_memory=True))  # fmt: skip
        region = first.image.shared_memory
        assert first.image.data == b"" and region.byte_size == 451 * 300
        try:
            second = await stub.Process(
                tool_service_pb2.ProcessRequest(tool="blur", image=first.image, output_media_type="image/png")
            )
            assert second.image.data.startswith(b"\x89PNG") and (second.image.width, second.image.height) == (451, 300)
        finally:
            (SHM_DIR / region.name).unlink()


@pytest.mark.parametrize(
    ("tool", "params"),
    [("flip", {"direction": "horizontal"}), ("crop", {"x": 3, "y": 5, "width": 101, "height": 77})],
)
async def test_a_frame_written_from_its_pixels_holds_the_inline_bytes(
    planes: dict[bool, ControlPlane], tool: str, params: dict[str, Any]
) -> None:
    address = next(s.address for s in planes[True].tool_servers if s.kind == "resize")
    source = image_pb2.Image(data=sample("chelsea.jpg"))
    async with aio_channel(address) as channel:
        stub = tool_service_pb2_grpc.ToolServiceStub(channel)
        for media_type in ("image/x-raw", "image/x-raw-rgb8", "image/x-raw-gray8"):
            one = tool_service_pb2.ProcessRequest(tool=tool, params=dict_to_struct(params), image=source,
                                                  output_media_type=media_type)  # fmt: skip
            inline = (await stub.Process(one)).image
            one.output_to_shared_memory = True
            chained = tool_service_pb2.ProcessChainRequest(
                steps=[tool_service_pb2.ChainStep(tool=tool, params=one.params)], image=source,
                output_media_type=media_type, output_to_shared_memory=True,
            )  # fmt: skip
            for shared in ((await stub.Process(one)).image, (await stub.ProcessChain(chained)).image):
                region = shared.shared_memory
                try:
                    assert (shared.media_type, shared.width, shared.height) == (
                        inline.media_type, inline.width, inline.height)  # fmt: skip
                    assert (SHM_DIR / region.name).read_bytes() == inline.data and region.byte_size == len(inline.data)
                finally:
                    unlink_region(region.name)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("imageflow-" + "0" * 32, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_a_tool_reads_only_objects_imageflow_made(
    planes: dict[bool, ControlPlane], name: str, code: grpc.StatusCode
) -> None:
    address = next(s.address for s in planes[True].tool_servers if s.kind == "filter")
    image = image_pb2.Image(media_type="image/x-raw-gray8", width=2, height=2)
    image.shared_memory.name, image.shared_memory.byte_size = name, 4
    async with aio_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tool_service_pb2_grpc.ToolServiceStub(channel).Process(
                tool_service_pb2.ProcessRequest(tool="blur", image=image)
            )
    assert refused.value.code() == code


def test_a_mapped_frame_reads_the_bytes_and_outlives_the_unlink() -> None:
    frame = bytes(range(256)) * 4096
    name, size = write_region(frame)
    try:
        view = map_region(name, size)
        with pytest.raises(ImageflowError) as mismatch:
            map_region(name, size + 1)
    finally:
        unlink_region(name)
    assert mismatch.value.reason == "SHARED_MEMORY_SIZE_MISMATCH" and f"{size} bytes" in mismatch.value.message
    assert not (SHM_DIR / name).exists() and view.readonly
    assert view == frame  # the writer's unlink does not take the pixels from a reader that has them
    with pytest.raises(ImageflowError) as missing:
        map_region(name, size)
    assert missing.value.reason == "SHARED_MEMORY_MISSING"


@pytest.mark.parametrize("kind", ["others may write it", "a symbolic link"])
def test_a_tool_maps_only_a_file_this_user_alone_may_write(tmp_path: Path, kind: str) -> None:
    name, size = write_region(b"frame")
    victim = tmp_path / "victim"
    victim.write_bytes(b"frame")
    try:
        if kind == "others may write it":
            (SHM_DIR / name).chmod(0o666)  # anyone could truncate it under the mapping (SIGBUS in the reader)
        else:
            (SHM_DIR / name).unlink()
            (SHM_DIR / name).symlink_to(victim)
        with pytest.raises(ImageflowError) as refused:
            map_region(name, size)
        assert refused.value.reason == "SHARED_MEMORY_FOREIGN"
    finally:
        unlink_region(name)


def test_frames_queued_when_the_process_exits_are_unlinked() -> None:
    script = (
        "from imageflow.common.shm import UNLINKER, write_region\n"
        "names = [write_region(b'frame')[0] for _ in range(300)]\n"
        "for name in names:\n"
        "    UNLINKER.unlink(name)\n"
        "print(' '.join(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    names = done.stdout.split()
    assert len(names) == 300 and not [n for n in names if (SHM_DIR / n).exists()]


def test_frames_are_unlinked_off_the_caller_and_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []

    def unlink(name: str) -> None:
        threads.append(threading.current_thread().name)
        shm.unlink_region(name)

    unlinker = Unlinker()
    monkeypatch.setattr(unlinker, "_unlink_now", unlink)
    first, second = write_region(b"first")[0], write_region(b"second")[0]
    unlinker.unlink(first)
    unlinker.settle()
    assert not (SHM_DIR / first).exists() and threads == ["imageflow-shm-unlink"]
    unlinker.drain()  # what the exit hook does; afterwards each frame goes on the caller's thread, at once
    unlinker.unlink(second)
    assert not (SHM_DIR / second).exists() and threads[1:] == [threading.current_thread().name]


def test_the_sweep_removes_old_frames_only_and_nothing_else() -> None:
    old, fresh = write_region(b"old frame"), write_region(b"fresh frame")
    stranger = SHM_DIR / "imageflow-not-one-of-ours"  # a name the sweep's pattern does not match
    other = SHM_DIR / f"someone-else-{os.getpid()}"
    stranger.write_bytes(b"x")
    other.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for path in (SHM_DIR / old[0], stranger, other):
        os.utime(path, (hour_ago, hour_ago))
    try:
        assert sweep_regions(600) >= 1  # ours, and any frame an earlier crash left here
        assert not (SHM_DIR / old[0]).exists()
        assert (SHM_DIR / fresh[0]).exists() and stranger.exists() and other.exists()
    finally:
        for path in (SHM_DIR / fresh[0], stranger, other):
            path.unlink(missing_ok=True)


async def test_a_control_plane_with_shared_memory_sweeps_at_start(tmp_path: Path) -> None:
    left = write_region(b"left by a crash")[0]
    hour_ago = time.time() - 3600
    os.utime(SHM_DIR / left, (hour_ago, hour_ago))
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db'}", tool_shared_memory=True,
                 shm_sweep_age_s=600, embedded_tools=False)
    )  # fmt: skip
    try:
        for _ in range(100):  # the sweep runs in the background as the plane starts
            if not (SHM_DIR / left).exists():
                break
            await asyncio.sleep(0.02)
    finally:
        await plane.stop(0.1)
    assert not (SHM_DIR / left).exists()
