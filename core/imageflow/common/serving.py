"""Start and stop a grpc.aio server with health, reflection and the error-mapping interceptor; the event loop it runs
on."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from imageflow.common.grpc_errors import ErrorMappingInterceptor

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
EventLoop = Literal["auto", "uvloop", "asyncio"]
"""The event loops a server can run on (`loop_factory`)."""
EVENT_LOOPS: tuple[str, ...] = get_args(EventLoop)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the event loop a server runs on (for `asyncio.Runner`), None for asyncio's own.

    "uvloop" (libuv) spends fewer microseconds per turn of the loop than asyncio's own, and one execution takes
    dozens of turns (about 0.5 ms of a 1080p chain's 20 ms here, docs/PERFORMANCE.md); "auto" takes it when it is
    installed (it is not on Windows) and asyncio's otherwise; "asyncio" keeps asyncio's. Raises ValueError for any
    other choice, and for "uvloop" where it is not installed."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"event loop {choice!r} is not one of {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(
                "event loop 'uvloop' is not installed here: install uvloop, or choose auto or asyncio"
            ) from None
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """The package of `loop`'s class, "uvloop" or "asyncio" (for the startup log)."""
    return type(loop).__module__.split(".")[0]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message-size options for a server or channel, both directions."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass
class GrpcServer:
    """A started server: its bound port and health servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        """Mark the server and each service SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, stop accepting calls and give in-flight calls `grace` seconds."""
        await self.set_serving(False)
        await self.server.stop(grace)


async def start_grpc_server(
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    serving: bool = True,
    credentials: grpc.ServerCredentials | None = None,
    reflection_enabled: bool = True,
    request_parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
) -> GrpcServer:
    """Create, bind and start a server; port 0 picks a free port. With `credentials` the port speaks TLS only.
    A port that cannot be bound (in use, or not an address of this host) raises OSError saying so.
    `request_parsers` (method path -> parser) replace the generated request deserializers of those methods."""
    server = grpc.aio.server(
        # error mapping outermost, so the other interceptors' refusals are domain errors like any other
        interceptors=[ErrorMappingInterceptor(request_parsers), *interceptors],
        # a second server on a port in use must fail, not silently share it (grpc enables SO_REUSEPORT by default)
        options=[*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(service_names)
    if reflection_enabled:
        reflection.enable_server_reflection((*names, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(target)
        else:
            bound = server.add_secure_port(target, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(
            f"cannot listen on {target}: the port is in use (another imageflow process?) or the address is not "
            "one of this host's; choose another port or stop the other process"
        )
    await server.start()
    handle = GrpcServer(server=server, port=bound, health=health, service_names=names)
    await handle.set_serving(serving)
    return handle


def install_stop_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def known_log_level(level: str) -> str:
    """`level` as `configure_logging` takes it (any case), or ValueError naming the levels there are."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    return level.lower()


def configure_logging(level: str) -> None:
    """Structured (key=value) logs on stderr; ValueError for a level that is not one of LOG_LEVELS."""
    logging.basicConfig(
        level=known_log_level(level).upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )
