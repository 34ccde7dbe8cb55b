"""Start a reference tool service (standalone or embedded in the control plane)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import typer
from imageflow.common.allocator import DEFAULT_MMAP_THRESHOLD, tune_allocator
from imageflow.common.serving import (
    GrpcServer,
    configure_logging,
    install_stop_signals,
    loop_factory,
    loop_name,
    start_grpc_server,
)
from imageflow.common.tls import server_credentials
from imageflow.tools.catalog import DEFAULT_MODEL_REPOSITORY, SERVICES, catalog
from imageflow.tools.detection import InferenceBackend
from imageflow.tools.imaging import ImageLimits
from imageflow.tools.plane import ToolPlane
from imageflow.tools.servicer import SERVICE_NAME, ToolServicer, add_to_server
from imageflow.tools.triton_backend import TritonBackend

log = logging.getLogger(__name__)
# Raw 100-megapixel RGB frames travel between steps: tool channels allow more than the public API.
DEFAULT_TOOL_MESSAGE_BYTES = 512 * 1024 * 1024


@dataclass
class ToolServer:
    """A running tool service."""

    kind: str
    grpc: GrpcServer
    servicer: ToolServicer
    triton: TritonBackend | None = None
    watcher: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """Loopback address of the service."""
        return f"127.0.0.1:{self.grpc.port}"

    async def stop(self, grace: float = 2.0) -> None:
        """Drain and stop."""
        if self.watcher is not None:
            self.watcher.cancel()
            await asyncio.gather(self.watcher, return_exceptions=True)
        await self.grpc.stop(grace)
        self.servicer.close()
        if self.triton is not None:
            self.triton.close()


async def _watch_triton(server: GrpcServer, triton: TritonBackend, interval_s: float) -> None:
    """NOT_SERVING while Triton is unreachable, SERVING again once it answers."""
    serving: bool | None = None
    while True:
        ready = await asyncio.to_thread(triton.ready)
        if ready != serving:
            serving = ready
            await server.set_serving(ready)
            if not ready:
                log.warning("Triton is unreachable: reporting NOT_SERVING")
        await asyncio.sleep(interval_s)


async def start_tool_server(
    kind: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: ImageLimits | None = None,
    max_message_bytes: int = DEFAULT_TOOL_MESSAGE_BYTES,
    model_repository: Path = DEFAULT_MODEL_REPOSITORY,
    backend: InferenceBackend | None = None,
    cv_threads: int | None = 1,
    triton_url: str | None = None,
    triton_shared_memory: bool = False,
    triton_check_interval_s: float = 2.0,
    credentials: grpc.ServerCredentials | None = None,
) -> ToolServer:
    """Start one of `resize`, `filter`, `detection` on `host:port` (0 = any free port).

    `cv_threads` caps OpenCV's own threads per call (process-wide): the service already runs requests in parallel
    on its worker pool, so one thread per call keeps concurrent requests (parallel DAG branches) from fighting over
    cores. None leaves OpenCV's default.
    """
    if cv_threads is not None:
        cv2.setNumThreads(cv_threads)
    triton = None
    if kind == "detection" and triton_url and backend is None:
        triton = TritonBackend(triton_url, shared_memory=triton_shared_memory)
        backend = triton
    served = catalog(kind, model_repository, backend)
    servicer = ToolServicer(ToolPlane(served.service, served.tools, limits or ImageLimits()), max_message_bytes)

    def register(server: grpc.aio.Server) -> None:
        add_to_server(servicer, server)

    handle = await start_grpc_server(
        host=host,
        port=port,
        max_message_bytes=max_message_bytes,
        register=register,
        service_names=[SERVICE_NAME],
        credentials=credentials,
    )
    watcher = None
    if triton is not None:
        watcher = asyncio.create_task(_watch_triton(handle, triton, triton_check_interval_s))
    return ToolServer(kind, handle, servicer, triton, watcher)


app = typer.Typer(add_completion=False, help="Run one ImageFlow reference tool service.")


@app.command()
def main(
    kind: str = typer.Argument(..., help="resize | filter | detection"),
    port: int = typer.Option(50061, help="port to listen on"),
    host: str = typer.Option("0.0.0.0", help="address to bind"),
    max_pixels: int = typer.Option(100_000_000, help="largest decoded image, in pixels"),
    max_encoded_bytes: int = typer.Option(64 * 1024 * 1024, help="largest encoded input, in bytes"),
    model_repository: Path = typer.Option(
        DEFAULT_MODEL_REPOSITORY, envvar="IMAGEFLOW_MODEL_REPOSITORY", help="Triton-layout model repository"
    ),
    cv_threads: int = typer.Option(1, help="OpenCV threads per call (0 = OpenCV default)"),
    triton_url: str | None = typer.Option(
        None, envvar="IMAGEFLOW_TRITON_URL", help="detection: infer through Triton (host:port)"
    ),
    triton_shm: bool = typer.Option(
        False, envvar="IMAGEFLOW_TRITON_SHARED_MEMORY", help="detection: system shared memory with a local Triton"
    ),
    tls_cert: Path | None = typer.Option(
        None, envvar="IMAGEFLOW_TLS_CERT_FILE", help="serve TLS with this certificate"
    ),
    tls_key: Path | None = typer.Option(None, envvar="IMAGEFLOW_TLS_KEY_FILE", help="the certificate's key"),
    tls_client_ca: Path | None = typer.Option(
        None, envvar="IMAGEFLOW_TLS_CLIENT_CA_FILE", help="require client certificates signed by this CA (mTLS)"
    ),
    malloc_mmap_threshold: int = typer.Option(
        DEFAULT_MMAP_THRESHOLD,
        envvar="IMAGEFLOW_MALLOC_MMAP_THRESHOLD",
        help="glibc: allocations up to this many bytes reuse heap memory instead of fresh mmaps (0 = glibc default)",
    ),
    event_loop: str = typer.Option(
        "auto", envvar="IMAGEFLOW_EVENT_LOOP", help="auto (uvloop where installed) | uvloop | asyncio"
    ),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve until SIGTERM or SIGINT."""
    if kind not in SERVICES:
        raise typer.BadParameter(f"choose one of {', '.join(SERVICES)}")
    try:
        loop = loop_factory(event_loop)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--event-loop / IMAGEFLOW_EVENT_LOOP") from None
    try:
        configure_logging(log_level)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--log-level") from None
    tune_allocator(malloc_mmap_threshold)
    try:
        credentials = server_credentials(tls_cert, tls_key, tls_client_ca)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    async def serve() -> None:
        server = await start_tool_server(
            kind,
            host=host,
            port=port,
            limits=ImageLimits(max_pixels=max_pixels, max_encoded_bytes=max_encoded_bytes),
            model_repository=model_repository,
            cv_threads=cv_threads or None,
            triton_url=triton_url,
            triton_shared_memory=triton_shm,
            credentials=credentials,
        )
        running = loop_name(asyncio.get_running_loop())
        typer.echo(f"imageflow-tool {kind} serving on {host}:{server.grpc.port} (event loop: {running})", err=True)
        stop = asyncio.Event()
        install_stop_signals(stop)
        await stop.wait()
        await server.stop()

    with asyncio.Runner(loop_factory=loop) as runner:
        runner.run(serve())
