"""Real servers on loopback ports, a throwaway PostgreSQL cluster, sample images."""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from imageflow.common.serving import start_grpc_server
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.testing.local import free_port
from imageflow.tools.catalog import DEFAULT_MODEL_REPOSITORY, catalog
from imageflow.tools.imaging import ImageLimits
from imageflow.tools.plane import ToolPlane
from imageflow.tools.server import ToolServer, start_tool_server
from imageflow.tools.servicer import ToolServicer
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_registry_service_pb2_grpc,
    tool_service_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
MIB = 1024 * 1024


def sample(name: str) -> bytes:
    """Bytes of a sample image shipped in the repo."""
    return (SAMPLES / name).read_bytes()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (99 when they are equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def exif_rotated_jpeg(name: str = "chelsea.jpg") -> bytes:
    """A sample re-saved as JPEG with EXIF orientation 6 (shown rotated 90° clockwise: 451x300 becomes 300x451)."""
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(sample(name))) as image:
        exif = image.getexif()
        exif[0x0112] = 6
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def aio_channel(address: str) -> grpc.aio.Channel:
    """A client channel with large message limits."""
    return grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 512 * MIB), ("grpc.max_send_message_length", 512 * MIB)]
    )


async def execute_outputs(
    address: str, pipeline: pipeline_pb2.Pipeline, image: bytes
) -> dict[str, image_pb2.Image]:
    """ExecutePipeline to the end on `image`, which must succeed; the output images by step, without `blob_ref` (it
    names the execution; the pixels are what tests compare)."""
    request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=pipeline, inputs={"image": image_pb2.Image(data=image)})
    async with aio_channel(address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        events = [r.event async for r in stub.ExecutePipeline(request)]
    finished = events[-1].execution_finished
    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
    images = {output.step_id: output.image for output in finished.outputs if output.HasField("image")}
    for output_image in images.values():
        output_image.ClearField("blob_ref")
    return images


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    """The control plane on embedded defaults (SQLite, in-process tools, offline planner)."""
    db = tmp_path_factory.mktemp("db") / "imageflow.db"
    settings = Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{db}", step_initial_backoff_s=0.01)
    running = await start_control_plane(settings)
    yield running
    await running.stop(0.5)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def channel(plane: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the control plane."""
    async with aio_channel(plane.address) as chan:
        yield chan


@pytest.fixture(scope="session")
def pipelines(channel: grpc.aio.Channel) -> pipeline_service_pb2_grpc.PipelineServiceStub:
    """PipelineService stub."""
    return pipeline_service_pb2_grpc.PipelineServiceStub(channel)


@pytest.fixture(scope="session")
def registry(channel: grpc.aio.Channel) -> tool_registry_service_pb2_grpc.ToolRegistryServiceStub:
    """ToolRegistryService stub."""
    return tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return path


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a random loopback port (initdb as the postgres user, fsync off)."""

    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="imageflow-pg-")
        self.data = os.path.join(self.workdir, "data")
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.workdir, "postgres")
        subprocess.run(
            [*self.as_postgres, _pg_bin("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
        )
        subprocess.run(
            [*self.as_postgres, _pg_bin("pg_ctl"), "-D", self.data, "-o", options, "-l",
             os.path.join(self.workdir, "log"), "-w", "start"],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            [*self.as_postgres, _pg_bin("pg_ctl"), "-D", self.data, "-m", mode, "stop"], capture_output=True
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway cluster shared by the session."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.remove()


class Calls(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the calls a server receives by method name, those it does not implement included."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.methods.append(details.method.rsplit("/", 1)[-1])
        return await continuation(details)


@pytest_asyncio.fixture(loop_scope="session")
async def counted_filter() -> AsyncIterator[tuple[str, Calls]]:
    """The reference filter service with a count of the calls it gets."""
    served = catalog("filter", DEFAULT_MODEL_REPOSITORY, None)
    calls = Calls()
    servicer = ToolServicer(ToolPlane(served.service, served.tools, ImageLimits()))
    server = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 * MIB, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s), interceptors=[calls],
    )  # fmt: skip
    yield f"127.0.0.1:{server.port}", calls
    await server.stop(0.1)
    servicer.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def filter_service() -> AsyncIterator[ToolServer]:
    """The reference filter service on a loopback port (64 MiB messages), one per test module."""
    server = await start_tool_server("filter", max_message_bytes=64 * MIB)
    yield server
    await server.stop(0.1)
