"""Wiring: store, registry, executor, planners, embedded tools and the grpc.aio server; start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import typer
from imageflow.common.allocator import tune_allocator
from imageflow.common.serving import (
    GrpcServer,
    configure_logging,
    install_stop_signals,
    loop_factory,
    loop_name,
    start_grpc_server,
)
from imageflow.common.shm import sweep_regions
from imageflow.common.tls import channel_credentials, server_credentials
from imageflow.server.adapters.api.auth import (
    Authenticator,
    AuthInterceptor,
    JwtSettings,
    JwtVerifier,
    load_api_keys,
    refusal_for_insecure_bind,
)
from imageflow.server.adapters.api.pipeline_servicer import PipelineServicer
from imageflow.server.adapters.api.registry_servicer import ToolRegistryServicer
from imageflow.server.adapters.api.requests import REQUEST_PARSERS
from imageflow.server.adapters.api.uploads import UploadLimits
from imageflow.server.adapters.storage import open_store
from imageflow.server.adapters.telemetry import configure_from_environment
from imageflow.server.adapters.transport import ChannelPool, GrpcToolDescriber, GrpcToolInvoker, RoutingInvoker
from imageflow.server.adapters.triton_models import TritonModels
from imageflow.server.domain.access import RateLimiter
from imageflow.server.domain.allowlist import AddressAllowlist
from imageflow.server.domain.compiler import StepDefaults
from imageflow.server.domain.events import EventHub, EventSink
from imageflow.server.domain.executor import Executor, ExecutorLimits, ToolInvoker
from imageflow.server.domain.outputs import RESULT_SLACK_BYTES
from imageflow.server.domain.pipelines import PipelineCatalog
from imageflow.server.domain.planner.offline import OfflinePlanner
from imageflow.server.domain.planner.service import PlannerService
from imageflow.server.domain.registry import Registry
from imageflow.server.domain.store import Store
from imageflow.server.settings import Settings
from imageflow.v1 import (
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
)
from pydantic import ValidationError

if TYPE_CHECKING:
    from imageflow.tools.server import ToolServer

log = logging.getLogger(__name__)

PIPELINE_SERVICE = pipeline_service_pb2.DESCRIPTOR.services_by_name["PipelineService"].full_name
REGISTRY_SERVICE = tool_registry_service_pb2.DESCRIPTOR.services_by_name["ToolRegistryService"].full_name


@dataclass
class ControlPlane:
    """A running control plane."""

    settings: Settings
    store: Store
    registry: Registry
    executor: Executor
    pool: ChannelPool
    server: GrpcServer
    catalog: PipelineCatalog
    tool_servers: list[ToolServer] = field(default_factory=list)
    sinks: list[EventSink] = field(default_factory=list)
    housekeeping: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The bound port."""
        return self.server.port

    @property
    def address(self) -> str:
        """Loopback address."""
        return f"127.0.0.1:{self.server.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, new executions refused (UNAVAILABLE), running ones given `grace` seconds to finish and
        the rest ended FAILED (interrupted) with their finished events delivered; then stop serving and close."""
        grace_s = self.settings.grace_period_s if grace is None else grace
        await self.server.set_serving(False)
        await self.executor.drain(grace_s)
        await self.server.stop(min(grace_s, 1.0))  # streams already have their finished events: let them flush
        for task in self.housekeeping:
            task.cancel()
        await asyncio.gather(*self.housekeeping, return_exceptions=True)
        for tool_server in self.tool_servers:
            await tool_server.stop(0.5)
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                await close()
        await self.pool.close()
        await self.store.close()


class ConfigurationError(Exception):
    """Settings that must not start a server; the message says what to change."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the port on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_authenticator(settings: Settings) -> Authenticator:
    """API keys and/or JWT verification from the settings (files read once, at start)."""
    try:
        keys = load_api_keys(settings.api_keys_file) if settings.api_keys_file else {}
        verifier = None
        if settings.jwks_file or settings.jwks_url:
            verifier = JwtVerifier(
                JwtSettings(
                    settings.jwks_file,
                    settings.jwks_url,
                    settings.jwt_issuer,
                    settings.jwt_audience,
                    settings.jwt_roles_claim,
                )
            )
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"authentication settings: {error}") from None
    return Authenticator(keys, verifier)


def check_bind(settings: Settings, authenticator: Authenticator) -> None:
    """Refuse a non-loopback bind without authentication unless explicitly allowed."""
    if not authenticator.enabled and not is_loopback(settings.host) and not settings.allow_insecure:
        raise ConfigurationError(refusal_for_insecure_bind(settings.host))


async def start_control_plane(settings: Settings) -> ControlPlane:
    """Open the store, start embedded tools, register them, recover interrupted runs, then serve."""
    authenticator = build_authenticator(settings)
    check_bind(settings, authenticator)
    try:
        public_tls = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        tool_tls = (
            channel_credentials(settings.tool_tls_ca_file, settings.tool_tls_cert_file, settings.tool_tls_key_file)
            if settings.tool_tls_enabled
            else None
        )
        allowlist = AddressAllowlist(settings.tool_allowlist)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    async with contextlib.AsyncExitStack() as stack:  # a failed start closes what it opened (then the process exits)
        store = await open_store(settings.database_url)
        stack.push_async_callback(store.close)
        pool = ChannelPool(settings.tool_max_message_bytes, tool_tls)
        stack.push_async_callback(pool.close)
        triton_models = TritonModels(pool)
        registry = Registry(store, GrpcToolDescriber(pool), triton_models, allowlist)
        await registry.load()
        tool_servers: list[ToolServer] = []
        local: ToolInvoker | None = None
        chain_group: Callable[[str], str] | None = None  # steps on the embedded tools chain across services
        if settings.embedded_tools:
            from imageflow.server.adapters.embedded import EmbeddedInvoker, start_embedded_tools

            tool_servers = await start_embedded_tools(settings)
            for tool_server in tool_servers:
                stack.push_async_callback(tool_server.stop, 0.5)
                pool.allow_plaintext(tool_server.address)
                await registry.register(tool_server.address, replace=True, trusted=True)
            if settings.embedded_in_process:
                embedded = EmbeddedInvoker(tool_servers)
                local, chain_group = embedded, embedded.chain_group
        sinks: list[EventSink] = []
        if settings.kafka_bootstrap:
            from imageflow.server.adapters.kafka import KafkaEventSink

            kafka = KafkaEventSink(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_buffer_events)
            await kafka.start()
            stack.push_async_callback(kafka.close)
            sinks.append(kafka)
        hub = EventHub(store, sinks, settings.max_message_bytes - RESULT_SLACK_BYTES)
        executor = Executor(
            store,
            hub,
            RoutingInvoker(
                GrpcToolInvoker(
                    pool,
                    shared_memory=settings.tool_shared_memory,
                    stream_bytes=settings.tool_stream_bytes,
                    streams=registry.streams_frames,
                    branches=registry.takes_branches,
                    max_frame_bytes=settings.tool_max_message_bytes,
                ),
                triton_models,
                registry.is_triton_model,
                local,
            ),
            lambda address: address in registry.addresses(),
            ExecutorLimits(
                steps_per_execution=settings.max_steps_in_flight_per_execution,
                steps_total=settings.max_steps_in_flight,
                executions=settings.max_executions_in_flight,
                executions_per_principal=settings.max_executions_per_principal,
                lease_s=settings.replica_lease_s,
                max_backoff_s=settings.step_max_backoff_s,
                raw_intermediate_max_pixels=settings.raw_intermediate_max_pixels,
            ),
        )
        await executor.recover()
        catalog = PipelineCatalog(
            store,
            registry,
            max_steps=settings.max_pipeline_steps,
            defaults=StepDefaults(settings.step_max_attempts, settings.step_timeout_s, settings.step_initial_backoff_s),
            chains=settings.chain_steps,
            chain_group=chain_group,
        )
        registry.check_impact_with(catalog.broken_by)
        llm = None
        if settings.llm_base_url:
            from imageflow.server.adapters.llm_planner import LlmPlanner

            llm = LlmPlanner.from_settings(settings, catalog.compile)
        planner = PlannerService(
            catalog, registry, OfflinePlanner(), llm, fallback=settings.llm_fallback, mode=settings.planner_mode
        )

        def register(server: grpc.aio.Server) -> None:
            pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(
                PipelineServicer(
                    catalog,
                    planner,
                    executor,
                    hub,
                    UploadLimits(
                        settings.max_upload_bytes, settings.max_upload_bytes_in_flight, settings.upload_idle_s
                    ),
                ),
                server,
            )
            tool_registry_service_pb2_grpc.add_ToolRegistryServiceServicer_to_server(
                ToolRegistryServicer(registry), server
            )

        server = await start_grpc_server(
            host=settings.host,
            port=settings.port,
            max_message_bytes=settings.max_message_bytes,
            register=register,
            service_names=[PIPELINE_SERVICE, REGISTRY_SERVICE],
            # authentication and rate limits off: every caller is ANONYMOUS (admin), no interceptor in the call path
            interceptors=[
                AuthInterceptor(
                    authenticator,
                    RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
                    reflection_open=settings.reflection,
                )
            ]
            if authenticator.enabled or settings.rate_limit_per_s > 0
            else [],
            credentials=public_tls,
            reflection_enabled=settings.reflection,
            request_parsers=REQUEST_PARSERS,
        )
        log.info(
            "imageflow-server serving on %s:%d (tools: %d, tls: %s, auth: %s, frames to tools: %s, event loop: %s)",
            settings.host,
            server.port,
            len(registry.list()),
            "mtls" if settings.tls_client_ca_file else "on" if public_tls else "off",
            "on" if authenticator.enabled else "off",
            "shared memory" if settings.tool_shared_memory else "inline",
            loop_name(asyncio.get_running_loop()),
        )
        stack.pop_all()  # started: ControlPlane.stop closes everything from here on
    housekeeping = [
        asyncio.create_task(expire_outputs(store, settings.output_retention_s), name="expire-outputs"),
        *(
            [asyncio.create_task(sweep_shared_memory(settings.shm_sweep_age_s), name="sweep-shared-memory")]
            if settings.tool_shared_memory and settings.shm_sweep_age_s > 0
            else []
        ),
        asyncio.create_task(executor.keep_leases(), name="execution-leases"),
    ]
    return ControlPlane(settings, store, registry, executor, pool, server, catalog, tool_servers, sinks, housekeeping)


async def sweep_shared_memory(age_s: float) -> None:
    """Remove shared-memory frames older than `age_s`, now and then (those a crash or an abandoned call left)."""
    while True:
        try:
            removed = await asyncio.to_thread(sweep_regions, age_s)
            if removed:
                log.info("shared memory: removed %d frames older than %.0f s from /dev/shm", removed, age_s)
        except OSError as error:
            log.warning("shared memory: could not sweep /dev/shm (%s); will retry", error)
        await asyncio.sleep(min(600.0, max(1.0, age_s / 4)))


async def expire_outputs(store: Store, retention_s: float) -> None:
    """Drop output images older than the retention, now and then (events keep their references)."""
    if retention_s <= 0:
        return
    while True:
        try:
            dropped = await store.delete_blobs_before(datetime.now(UTC) - timedelta(seconds=retention_s))
            if dropped:
                log.info("retention: dropped %d output images older than %.0f s", dropped, retention_s)
        except Exception as error:  # noqa: BLE001 - a store outage must not end housekeeping
            log.warning("retention: could not drop old outputs (%s); will retry", error)
        await asyncio.sleep(min(3600.0, max(1.0, retention_s / 10)))


app = typer.Typer(add_completion=False, help="The ImageFlow control plane (settings also from IMAGEFLOW_* variables).")


@app.command()
def main(
    port: int | None = typer.Option(None, help="IMAGEFLOW_PORT"),
    host: str | None = typer.Option(None, help="IMAGEFLOW_HOST"),
    database_url: str | None = typer.Option(None, help="IMAGEFLOW_DATABASE_URL"),
    embedded_tools: bool | None = typer.Option(None, help="IMAGEFLOW_EMBEDDED_TOOLS"),
    model_repository: Path | None = typer.Option(None, help="IMAGEFLOW_MODEL_REPOSITORY"),
    log_level: str | None = typer.Option(None, help="IMAGEFLOW_LOG_LEVEL"),
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and exit 0."""
    overrides = {
        key: value
        for key, value in {
            "port": port,
            "host": host,
            "database_url": database_url,
            "embedded_tools": embedded_tools,
            "model_repository": model_repository,
            "log_level": log_level,
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:  # names each setting and what it takes
        print(f"imageflow-server: invalid settings: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        event_loop = loop_factory(settings.event_loop)
    except ValueError as error:
        print(f"imageflow-server: IMAGEFLOW_EVENT_LOOP: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    tune_allocator(settings.malloc_mmap_threshold)  # before the first frame is allocated

    async def serve() -> None:
        shutdown_telemetry = configure_from_environment()
        try:
            plane = await start_control_plane(settings)
        except (ConfigurationError, OSError) as error:
            print(f"imageflow-server: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        print(f"imageflow-server listening on {settings.host}:{plane.port}", flush=True)
        stop = asyncio.Event()
        install_stop_signals(stop)
        await stop.wait()
        log.info("stopping: draining for up to %.1f s", settings.grace_period_s)
        await plane.stop()
        shutdown_telemetry()

    with asyncio.Runner(loop_factory=event_loop) as runner:
        runner.run(serve())
