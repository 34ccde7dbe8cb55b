"""Security from the outside, through real servers: authentication (API keys, JWT), roles, TLS and mTLS (SDK, CLI,
Node, and the control plane to a tool service), the closed registry, untrusted manifests, bounded work, safe
defaults and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import jwt
import numpy as np
import pytest
import pytest_asyncio
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imageflow.client import ImageflowClient, ImageflowClientError, tls_credentials
from imageflow.common.errors import ImageflowError
from imageflow.common.serving import start_grpc_server
from imageflow.common.structs import dict_to_struct
from imageflow.common.tls import channel_credentials, server_credentials
from imageflow.server.adapters.api.auth import METHOD_ROLES, api_methods
from imageflow.server.adapters.storage import open_store
from imageflow.server.app import ConfigurationError, ControlPlane, start_control_plane
from imageflow.server.domain.access import Principal, RateLimiter, Role
from imageflow.server.domain.allowlist import AddressAllowlist
from imageflow.server.domain.registry import Registry
from imageflow.server.domain.store import ToolRow
from imageflow.server.settings import Settings
from imageflow.testing.local import free_port
from imageflow.tools.server import start_tool_server
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

from tests.conftest import ROOT, sample
from tests.test_clients import BIN, run

KEYS = {"viewer": "view-key-3f9a1c", "operator": "ops-key-77b2e0", "admin": "admin-key-c41d9e"}
ISSUER, AUDIENCE = "https://id.example.test", "imageflow"
S = execution_pb2


@dataclass
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@imageflow.test")
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    server.private_key_pem.write_to_path(str(root / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
    client.private_key_pem.write_to_path(str(root / "client.key"))
    client.cert_chain_pems[0].write_to_path(str(root / "client.pem"))
    return Pki(root / "ca.pem", root / "server.pem", root / "server.key", root / "client.pem", root / "client.key")


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _token(key: Any, *, roles: Any = ("operator",), aud: str = AUDIENCE, exp: float = 300, kid: str = "k1") -> str:
    claims = {"sub": "alice", "iss": ISSUER, "aud": aud, "exp": int(time.time() + exp), "roles": list(roles)}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


class ScriptedTools(tool_service_pb2_grpc.ToolServiceServicer):
    """A real ToolService whose Describe answers whatever manifests a test sets (a hostile or careless provider)."""

    def __init__(self) -> None:
        self.tools: list[tool_pb2.Tool] = []
        self.gate = asyncio.Event()

    async def Describe(self, request: Any, context: Any) -> tool_service_pb2.DescribeResponse:
        return tool_service_pb2.DescribeResponse(service="scripted", tools=self.tools)

    async def Process(self, request: tool_service_pb2.ProcessRequest, context: Any) -> tool_service_pb2.ProcessResponse:
        if request.tool == "hold":  # holds its step until the test opens the gate
            await self.gate.wait()
        return tool_service_pb2.ProcessResponse(image=request.image)


def manifest(name: str, schema: dict[str, Any], **extra: Any) -> tool_pb2.Tool:
    fields: dict[str, Any] = {"version": "1", "description_ja": name, "description_en": name, **extra}
    return tool_pb2.Tool(
        name=name, params_schema=dict_to_struct(schema),
        inputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)],
        outputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE)], **fields,
    )  # fmt: skip


@dataclass
class Listener:
    """A plain TCP listener that counts the connections it sees (proof that nothing was dialled)."""

    server: asyncio.Server
    port: int
    connections: list[int] = field(default_factory=list)


@pytest_asyncio.fixture(loop_scope="session")
async def listener() -> AsyncIterator[Listener]:
    seen: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield Listener(server, server.sockets[0].getsockname()[1], seen)
    server.close()
    await server.wait_closed()


@dataclass
class Secured:
    """A control plane with API keys, JWT, TLS, an allowlist of two loopback ports, and a scripted tool service."""

    plane: ControlPlane
    pki: Pki
    scripted: ScriptedTools
    scripted_address: str
    target: str
    last_error: grpc.aio.AioRpcError | None = None

    def channel(self, **kw: Any) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.target, channel_credentials(self.pki.ca, **kw))

    def registry(self, channel: grpc.aio.Channel) -> tool_registry_service_pb2_grpc.ToolRegistryServiceStub:
        return tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel)

    def pipelines(self, channel: grpc.aio.Channel) -> pipeline_service_pb2_grpc.PipelineServiceStub:
        return pipeline_service_pb2_grpc.PipelineServiceStub(channel)


def bearer(role: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {KEYS[role]}"),)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secured(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, signing_key: rsa.RSAPrivateKey
) -> AsyncIterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    keys = root / "api-keys"
    keys.write_text(
        "# role sha256:hex name\n"
        + "".join(
            f"{role} sha256:{hashlib.sha256(k.encode()).hexdigest()} {role[:3]}-bot\n" for role, k in KEYS.items()
        )
    )
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key()))
    (root / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    scripted = ScriptedTools()
    tools = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(scripted, s),
    )  # fmt: skip
    settings = Settings(
        host="127.0.0.1", port=0, database_url=f"sqlite:///{root / 'db.sqlite'}", api_keys_file=keys,
        jwks_file=root / "jwks.json", jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
        tool_allowlist=f"tools.internal,*.svc.cluster.local,127.0.0.1:{tools.port}", max_executions_per_principal=1,
    )  # fmt: skip
    plane = await start_control_plane(settings)
    yield Secured(plane, pki, scripted, f"127.0.0.1:{tools.port}", f"127.0.0.1:{plane.port}")
    await plane.stop(0.5)
    await tools.stop(0.1)


def code_of(excinfo: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return excinfo.value.code()


# --- authentication and roles ------------------------------------------------------------------------------------


def test_every_rpc_has_a_role() -> None:
    assert set(api_methods()) == set(METHOD_ROLES)


async def test_no_or_bad_token_is_unauthenticated_and_health_stays_open(secured: Secured) -> None:
    async with secured.channel() as chan:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await secured.registry(chan).ListTools(tool_registry_service_pb2.ListToolsRequest())
        assert code_of(missing) == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in (missing.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await secured.registry(chan).ListTools(
                tool_registry_service_pb2.ListToolsRequest(), metadata=(("authorization", "Bearer not-a-key"),)
            )
        assert code_of(wrong) == grpc.StatusCode.UNAUTHENTICATED
        assert "not-a-key" not in (wrong.value.details() or "")
        health = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_viewer_reads_but_cannot_execute(secured: Secured) -> None:
    async with secured.channel() as chan:
        listed = await secured.registry(chan).ListTools(
            tool_registry_service_pb2.ListToolsRequest(), metadata=bearer("viewer")
        )
        assert "resize" in {t.name for t in listed.tools}
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline=_gray_pipeline(), inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
        )
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            async for _ in secured.pipelines(chan).ExecutePipeline(request, metadata=bearer("viewer")):
                pass
        assert code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
        assert "operator" in (denied.value.details() or "")
        for token in ("viewer", None):  # nor upload
            # as the contract asks (and the SDKs do): nothing is written before the server accepts the call; a grpc.aio
            # client still writing when a refused call ends may get INTERNAL in place of the status (grpc/grpc#36066)
            call = secured.pipelines(chan).ExecutePipelineUpload(metadata=bearer(token) if token else None)
            await asyncio.wait_for(call.initial_metadata(), 10)  # a refusal ends the call: this returns at once
            assert call.done()  # refused before the server read a byte
            expected = grpc.StatusCode.PERMISSION_DENIED if token else grpc.StatusCode.UNAUTHENTICATED
            assert await call.code() == expected
            if token:
                assert "operator" in await call.details()


async def test_operator_cannot_register_or_replace_tools(secured: Secured, listener: Listener) -> None:
    async with secured.channel() as chan:
        for replace in (False, True):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await secured.registry(chan).RegisterTool(
                    tool_registry_service_pb2.RegisterToolRequest(address=secured.scripted_address, replace=replace),
                    metadata=bearer("operator"),
                )
            assert code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as removal:
            await secured.registry(chan).RemoveTool(
                tool_registry_service_pb2.RemoveToolRequest(name="grayscale"), metadata=bearer("operator")
            )
        assert code_of(removal) == grpc.StatusCode.PERMISSION_DENIED


async def test_replace_needs_admin_in_the_registry_itself(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'r.db'}")

    class Describer:
        async def describe(self, address: str) -> list[tool_pb2.Tool]:
            return [manifest("gray2", {"type": "object"})]

        async def forget(self, address: str) -> None:
            pass

    registry = Registry(store, Describer())
    await registry.register("127.0.0.1:7001")
    with pytest.raises(ImageflowError) as refused:
        await registry.register("127.0.0.1:7002", replace=True, actor=Principal("ops", Role.OPERATOR))
    assert refused.value.reason == "REPLACE_NEEDS_ADMIN"
    await registry.register("127.0.0.1:7002", replace=True, actor=Principal("root", Role.ADMIN))
    assert registry.get("gray2").address == "127.0.0.1:7002"
    await store.close()


async def test_saved_pipelines_and_executions_record_who_made_them(secured: Secured) -> None:
    async with secured.channel() as chan:
        pipelines = secured.pipelines(chan)
        saved = await pipelines.SavePipeline(
            pipeline_service_pb2.SavePipelineRequest(pipeline=_gray_pipeline(created_by="mallory")),
            metadata=bearer("operator"),
        )
        assert saved.pipeline.created_by == "ope-bot"
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline_id=saved.pipeline_id, inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
        )
        events = [r.event async for r in pipelines.ExecutePipeline(request, metadata=bearer("operator"))]
        got = await pipelines.GetExecution(
            pipeline_service_pb2.GetExecutionRequest(execution_id=events[0].execution_id), metadata=bearer("viewer")
        )
        assert got.execution.created_by == "ope-bot"
        listed = await pipelines.ListPipelines(pipeline_service_pb2.ListPipelinesRequest(), metadata=bearer("viewer"))
        assert {p.created_by for p in listed.pipelines if p.id == saved.pipeline_id} == {"ope-bot"}


async def test_jwt_roles_issuer_audience_and_expiry(secured: Secured, signing_key: rsa.RSAPrivateKey) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with secured.channel() as chan:
        registry = secured.registry(chan)

        async def list_tools(token: str) -> grpc.StatusCode:
            try:
                await registry.ListTools(
                    tool_registry_service_pb2.ListToolsRequest(), metadata=(("authorization", f"Bearer {token}"),)
                )
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        assert await list_tools(_token(signing_key)) == grpc.StatusCode.OK
        assert await list_tools(_token(signing_key, aud="someone-else")) == grpc.StatusCode.UNAUTHENTICATED
        assert await list_tools(_token(signing_key, exp=-60)) == grpc.StatusCode.UNAUTHENTICATED
        assert await list_tools(_token(other_key)) == grpc.StatusCode.UNAUTHENTICATED
        assert await list_tools(_token(signing_key, roles=["superuser"])) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await registry.RegisterTool(
                tool_registry_service_pb2.RegisterToolRequest(address=secured.scripted_address),
                metadata=(("authorization", f"Bearer {_token(signing_key, roles=['viewer', 'operator'])}"),),
            )
        assert code_of(denied) == grpc.StatusCode.PERMISSION_DENIED


async def test_per_caller_execution_limit(secured: Secured) -> None:
    secured.scripted.tools = [manifest("hold", {"type": "object"})]
    async with secured.channel() as chan:
        await secured.registry(chan).RegisterTool(
            tool_registry_service_pb2.RegisterToolRequest(address=secured.scripted_address), metadata=bearer("admin")
        )
        pipelines = secured.pipelines(chan)
        image = image_pb2.Image(data=sample("chelsea.jpg"))
        held = pipeline_pb2.Pipeline(name="held")
        held.steps.add(id="hold", tool="hold")
        secured.scripted.gate.clear()
        first = pipelines.ExecutePipeline(
            pipeline_service_pb2.ExecutePipelineRequest(pipeline=held, inputs={"image": image}),
            metadata=bearer("operator"),
        )
        started = await first.read()
        assert started.event.WhichOneof("kind") == "execution_started"
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            async for _ in pipelines.ExecutePipeline(
                pipeline_service_pb2.ExecutePipelineRequest(pipeline=_gray_pipeline(), inputs={"image": image}),
                metadata=bearer("operator"),
            ):
                pass
        assert code_of(limited) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit per caller is 1" in (limited.value.details() or "")
        secured.scripted.gate.set()
        last = started.event
        while (reply := await first.read()) is not grpc.aio.EOF:
            last = reply.event
        assert last.execution_finished.state == S.EXECUTION_STATE_SUCCEEDED


def test_rate_limiter_names_the_limit() -> None:
    limiter = RateLimiter(rate=2.0, burst=2)
    limiter.check("a", now=0.0)
    limiter.check("a", now=0.0)
    with pytest.raises(ImageflowError) as limited:
        limiter.check("a", now=0.1)
    assert limited.value.reason == "RATE_LIMITED" and "2 requests/s" in limited.value.message
    limiter.check("b", now=0.1)  # per caller
    limiter.check("a", now=0.6)  # refilled


# --- the closed registry -----------------------------------------------------------------------------------------


async def test_an_address_outside_the_allowlist_is_never_dialled(
    secured: Secured, listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imageflow.audit")
    async with secured.channel() as chan:
        messages = []
        for address in (f"127.0.0.1:{listener.port}", f"127.0.0.1:{free_port()}"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await secured.registry(chan).RegisterTool(
                    tool_registry_service_pb2.RegisterToolRequest(address=address), metadata=bearer("admin")
                )
            assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED
            messages.append((refused.value.details() or "").replace(address, "ADDR"))
        await asyncio.sleep(0.2)
    assert listener.connections == []
    assert messages[0] == messages[1]  # a listening and a closed port are refused alike: no reachability oracle
    assert "IMAGEFLOW_TOOL_ALLOWLIST" in messages[0]
    assert any("actor=adm-bot" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


def test_allowlist_forms() -> None:
    allow = AddressAllowlist("10.0.0.0/8, tools.internal:50061, *.svc.cluster.local, [::1]:7000, 192.168.1.5")
    assert allow.allows("10.2.3.4:1") and allow.allows("192.168.1.5:9")
    assert allow.allows("tools.internal:50061") and not allow.allows("tools.internal:50062")
    assert allow.allows("resize.default.svc.cluster.local:50061") and not allow.allows("svc.cluster.local:1")
    assert allow.allows("[::1]:7000") and not allow.allows("[::1]:7001")
    assert not allow.allows("127.0.0.1:50061") and not allow.allows("evil.internal:50061")
    assert not allow.allows("tools.internal.evil.com:50061")


async def test_registry_changes_are_audited_and_removed_addresses_forgotten(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imageflow.audit")
    secured.scripted.tools = [manifest("echo_tool", {"type": "object"})]
    async with secured.channel() as chan:
        registry = secured.registry(chan)
        await registry.RegisterTool(
            tool_registry_service_pb2.RegisterToolRequest(address=secured.scripted_address), metadata=bearer("admin")
        )
        assert secured.scripted_address in secured.plane.pool
        listed = await registry.ListTools(tool_registry_service_pb2.ListToolsRequest(), metadata=bearer("viewer"))
        for tool in listed.tools:
            if tool.address == secured.scripted_address:
                await registry.RemoveTool(
                    tool_registry_service_pb2.RemoveToolRequest(name=tool.name), metadata=bearer("admin")
                )
    assert secured.scripted_address not in secured.plane.pool
    lines = [r.getMessage() for r in caplog.records if r.name == "imageflow.audit"]
    assert any("actor=adm-bot action=register" in line and "echo_tool" in line for line in lines)
    assert any("actor=adm-bot action=remove tool=echo_tool" in line for line in lines)


# --- manifests are untrusted input -------------------------------------------------------------------------------


async def _register(secured: Secured, *tools: tool_pb2.Tool) -> grpc.StatusCode:
    secured.scripted.tools = list(tools)
    async with secured.channel() as chan:
        try:
            await secured.registry(chan).RegisterTool(
                tool_registry_service_pb2.RegisterToolRequest(address=secured.scripted_address),
                metadata=bearer("admin"),
            )
        except grpc.aio.AioRpcError as error:
            secured.last_error = error
            return error.code()
    return grpc.StatusCode.OK


async def test_a_remote_ref_is_refused_and_nothing_is_fetched(secured: Secured, listener: Listener) -> None:
    schema = {"type": "object", "properties": {"x": {"$ref": f"http://127.0.0.1:{listener.port}/schema.json"}}}
    assert await _register(secured, manifest("remote_ref", schema)) == grpc.StatusCode.INVALID_ARGUMENT
    assert "nothing is fetched" in _details(secured.last_error)
    file_ref = {"type": "object", "properties": {"x": {"$ref": "file:///etc/passwd"}}}
    assert await _register(secured, manifest("file_ref", file_ref)) == grpc.StatusCode.INVALID_ARGUMENT
    await asyncio.sleep(0.2)
    assert listener.connections == []


@pytest.mark.parametrize(
    ("tool", "needle"),
    [
        (manifest("bad_type", {"type": "object", "properties": {"x": {"type": "strin"}}}), "not a valid JSON Schema"),
        (manifest("backref", {"type": "object", "properties": {"x": {"type": "string", "pattern": "(a)\\1"}}}), "RE2"),
        (manifest("wordy", {"type": "object"}, description_ja="無視して" * 100), "over the limit of 300"),
        (
            manifest("deep", {"type": "object", "properties": {"x": json.loads('{"not":' * 20 + "{}" + "}" * 20)}}),
            "deeper",
        ),
    ],
)
async def test_bad_manifests_are_invalid_argument_at_registration(
    secured: Secured, tool: tool_pb2.Tool, needle: str
) -> None:
    assert await _register(secured, tool) == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in _details(secured.last_error)


async def test_a_redos_pattern_cannot_stall_the_server(secured: Secured) -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string", "pattern": "^(a+)+$"}}}
    assert await _register(secured, manifest("matcher", schema)) == grpc.StatusCode.OK
    pipeline = pipeline_pb2.Pipeline(name="redos")
    step = pipeline.steps.add(id="m", tool="matcher")
    step.params.update({"text": "a" * 100_000 + "!"})
    async with secured.channel() as chan:
        health = health_pb2_grpc.HealthStub(chan)
        latencies: list[float] = []
        stop = asyncio.Event()

        async def ping() -> None:
            while not stop.is_set():
                began = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest())
                latencies.append(time.perf_counter() - began)
                await asyncio.sleep(0.005)

        pinger = asyncio.create_task(ping())
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            for _ in range(5):
                pipeline.name = f"redos-{_}"  # a new definition each time: no compile cache
                await secured.pipelines(chan).ValidatePipeline(
                    pipeline_service_pb2.ValidatePipelineRequest(pipeline=pipeline), metadata=bearer("operator")
                )
        stop.set()
        await pinger
    assert code_of(invalid) == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps[0].params.text" in (invalid.value.details() or "")
    assert latencies and max(latencies) < 0.1, f"health took up to {max(latencies) * 1000:.0f} ms"


async def test_a_stored_hostile_manifest_is_not_served_after_restart(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'h.db'}")
    hostile = manifest(
        "hostile", {"type": "object", "properties": {"x": {"$ref": "https://evil.test/s.json"}}}, enabled=True
    )
    fine = manifest("fine", {"type": "object"}, enabled=True)
    from datetime import UTC, datetime

    await store.upsert_tools(
        [ToolRow(t.name, "127.0.0.1:7001", t.SerializeToString(), datetime.now(UTC)) for t in (hostile, fine)]
    )
    registry = Registry(store, None)  # type: ignore[arg-type]
    await registry.load()
    assert set(registry.snapshot()) == {"fine"}
    await store.close()


# --- TLS and mTLS ------------------------------------------------------------------------------------------------


async def test_tls_round_trips_from_sdk_cli_and_node(secured: Secured) -> None:
    def sdk() -> tuple[set[str], str]:  # the blocking SDK runs on a thread: the server shares this event loop
        with ImageflowClient(
            secured.target, token=KEYS["viewer"], credentials=tls_credentials(secured.pki.ca)
        ) as client:
            names = {t.name for t in client.tools()}
        with ImageflowClient(secured.target, token=KEYS["viewer"]) as plaintext:
            try:
                plaintext.tools()
            except ImageflowClientError as error:
                return names, error.code
        return names, "OK"

    names, plaintext_code = await asyncio.to_thread(sdk)
    assert "resize" in names and plaintext_code == "UNAVAILABLE"
    code, output = await run(
        str(BIN / "imageflow"), "--ca", str(secured.pki.ca), "--token", KEYS["viewer"], "tools", "-t", secured.target
    )
    assert code == 0 and "resize" in output, output
    code, output = await run(str(BIN / "imageflow"), "--ca", str(secured.pki.ca), "tools", "-t", secured.target)
    assert code == 2 and "UNAUTHENTICATED" in output, output
    code, output = await run(
        "node", "--test", "test/", cwd=ROOT / "clients" / "node",
        env={"IMAGEFLOW_TARGET": secured.target, "IMAGEFLOW_CA_FILE": str(secured.pki.ca), "IMAGEFLOW_TOKEN": KEYS["operator"]},
    )  # fmt: skip
    # the one skipped needs a control plane with a 1 MiB message limit: test_clients runs it
    assert code == 0 and "# pass 8" in output and "# skipped 1" in output, output


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mtls_plane(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> AsyncIterator[ControlPlane]:
    """No embedded tools; mTLS on the public port and to its one tool service (which itself requires mTLS)."""
    root = tmp_path_factory.mktemp("mtls")
    tool = await start_tool_server("filter", credentials=server_credentials(pki.server_cert, pki.server_key, pki.ca))
    settings = Settings(
        host="127.0.0.1", port=0, database_url=f"sqlite:///{root / 'db.sqlite'}", embedded_tools=False,
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca,
        tool_tls_ca_file=pki.ca, tool_tls_cert_file=pki.client_cert, tool_tls_key_file=pki.client_key,
    )  # fmt: skip
    plane = await start_control_plane(settings)
    await plane.registry.register(tool.address)
    yield plane
    await plane.stop(0.5)
    await tool.stop(0.1)


async def test_mtls_round_trips_and_mtls_to_the_tool_service(
    mtls_plane: ControlPlane, pki: Pki, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{mtls_plane.port}"

    def sdk() -> tuple[int, str]:
        with ImageflowClient(target, credentials=tls_credentials(pki.ca, pki.client_cert, pki.client_key)) as client:
            events = list(client.execute(_gray_pipeline(), {"image": image_pb2.Image(data=sample("chelsea.jpg"))}))
        with ImageflowClient(target, credentials=tls_credentials(pki.ca)) as no_cert:
            try:
                no_cert.tools()
            except ImageflowClientError as error:
                return events[-1].execution_finished.state, error.code
        return events[-1].execution_finished.state, "OK"

    state, no_cert_code = await asyncio.to_thread(sdk)
    assert state == S.EXECUTION_STATE_SUCCEEDED  # through the mTLS tool service
    assert no_cert_code == "UNAVAILABLE"
    tls = ["--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    code, output = await run(str(BIN / "imageflow"), *tls, "tools", "-t", target)
    assert code == 0 and "grayscale" in output, output
    code, output = await run(
        "node", "--test", "--test-name-pattern", "refusal", "test/", cwd=ROOT / "clients" / "node",
        env={"IMAGEFLOW_TARGET": target, "IMAGEFLOW_CA_FILE": str(pki.ca),
             "IMAGEFLOW_CLIENT_CERT_FILE": str(pki.client_cert), "IMAGEFLOW_CLIENT_KEY_FILE": str(pki.client_key)},
    )  # fmt: skip
    assert code == 0 and "# pass 1" in output, output


# --- bounded work ------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_12_gb_resize_is_refused_fast_with_flat_memory(pipelines) -> None:  # type: ignore[no-untyped-def]
    gradient = np.tile(np.linspace(0, 255, 4000, dtype=np.uint8), (4000, 1))
    _, jpeg = cv2.imencode(".jpg", cv2.merge([gradient, gradient.T, gradient]), [cv2.IMWRITE_JPEG_QUALITY, 80])
    pipeline = pipeline_pb2.Pipeline(name="huge")
    pipeline.steps.add(id="big", tool="resize").params.update({"scale": 16})
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=pipeline, inputs={"image": image_pb2.Image(data=jpeg.tobytes())}
    )
    before = _rss_bytes()
    began = time.perf_counter()
    events = [r.event async for r in pipelines.ExecutePipeline(request)]
    elapsed = time.perf_counter() - began
    grown = _rss_bytes() - before
    (failed,) = [e.step_failed for e in events if e.WhichOneof("kind") == "step_failed"]
    assert failed.code == "RESOURCE_EXHAUSTED" and failed.attempts == 1  # a size limit is not retried
    assert "64000x64000" in failed.message and "over the limit of 100000000 pixels" in failed.message
    assert events[-1].execution_finished.state == S.EXECUTION_STATE_FAILED
    assert elapsed < 0.1, f"refused after {elapsed * 1000:.0f} ms"
    assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB"


# --- safe defaults and secrets -----------------------------------------------------------------------------------


def _server(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "imageflow-server"), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "IMAGEFLOW_EMBEDDED_TOOLS": "false", **(env or {})},
    )  # fmt: skip


def test_the_default_bind_is_loopback() -> None:
    assert Settings().host == "127.0.0.1"


def test_a_public_bind_without_auth_refuses_to_start(tmp_path: Path) -> None:
    done = _server("--host", "0.0.0.0", "--port", str(free_port()), "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in done.stderr
    assert "IMAGEFLOW_API_KEYS_FILE" in done.stderr and "IMAGEFLOW_ALLOW_INSECURE" in done.stderr


async def test_start_control_plane_refuses_a_public_bind_without_auth(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        await start_control_plane(Settings(host="0.0.0.0", port=0, database_url=f"sqlite:///{tmp_path / 'y.db'}"))


async def test_a_second_server_on_a_used_port_fails(secured: Secured, tmp_path: Path) -> None:
    done = await asyncio.to_thread(
        _server, "--port", str(secured.plane.port), "--database-url", f"sqlite:///{tmp_path / 'z.db'}"
    )
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{secured.plane.port}: the port is in use" in done.stderr


def test_secrets_stay_out_of_logs_and_errors(tmp_path: Path) -> None:
    llm_key, api_key = "sk-llm-secret-5b8e2d", "api-secret-0c6f1a"
    (tmp_path / "llm-key").write_text(llm_key)
    (tmp_path / "keys").write_text(f"operator sha256:{hashlib.sha256(api_key.encode()).hexdigest()}\n")
    port = free_port()
    env = {
        "IMAGEFLOW_API_KEYS_FILE": str(tmp_path / "keys"), "IMAGEFLOW_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "IMAGEFLOW_LLM_MODEL": "m", "IMAGEFLOW_LLM_API_KEY_FILE": str(tmp_path / "llm-key"), "IMAGEFLOW_LLM_TIMEOUT_S": "1",
        "IMAGEFLOW_LLM_MAX_RETRIES": "0", "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_LOG_LEVEL": "debug",
        "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}",
    }  # fmt: skip
    log_file = (tmp_path / "server.log").open("w")  # a file, not a pipe: debug logs must never block the server
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "imageflow-server")], env={**os.environ, **env},
        stdout=log_file, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    replies: list[str] = []
    try:
        _wait_for_port(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(chan)
            for token in (api_key, api_key + "x", llm_key):
                try:
                    stub.GeneratePipeline(
                        pipeline_service_pb2.GeneratePipelineRequest(instruction="画像を白黒にして"),
                        metadata=(("authorization", f"Bearer {token}"),), timeout=30,
                    )  # fmt: skip
                    replies.append("OK")
                except grpc.RpcError as error:
                    replies.append(f"{error.code()} {error.details()}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()
    logs = (tmp_path / "server.log").read_text()
    assert replies[0] == "OK" and "UNAUTHENTICATED" in replies[1] and "UNAUTHENTICATED" in replies[2]
    assert "llm" in logs.lower()  # the LLM was tried (and failed over): its key was in use
    for secret in (llm_key, api_key):
        assert secret not in logs and all(secret not in reply for reply in replies)


def _wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}")
            try:
                grpc.channel_ready_future(chan).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
    raise RuntimeError("server did not start")


# --- helpers -----------------------------------------------------------------------------------------------------


def _gray_pipeline(created_by: str = "") -> pipeline_pb2.Pipeline:
    pipeline = pipeline_pb2.Pipeline(name="gray", created_by=created_by)
    pipeline.steps.add(id="gray", tool="grayscale")
    return pipeline


def _details(error: grpc.aio.AioRpcError | None) -> str:
    assert error is not None
    return error.details() or ""
