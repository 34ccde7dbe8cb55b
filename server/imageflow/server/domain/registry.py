"""The tool registry: the sandbox of tools a pipeline may use and the only addresses the executor dials."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from imageflow.common.errors import (
    FieldViolation,
    ImageflowError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
)
from imageflow.common.params import JsonObject
from imageflow.common.structs import struct_to_dict
from imageflow.server.domain.access import ANONYMOUS, Principal, Role
from imageflow.server.domain.allowlist import LOOPBACK_ONLY, AddressAllowlist
from imageflow.server.domain.evolution import Change, classify
from imageflow.server.domain.schemas import check_untrusted_schema
from imageflow.server.domain.store import Store, ToolRow
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.v1 import tool_pb2

log = logging.getLogger(__name__)
audit = logging.getLogger("imageflow.audit")

ADDRESS = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")
TOOL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class ToolDescriber(Protocol):
    """Asks a tool service for its manifests (transport lives outside the domain)."""

    async def describe(self, address: str) -> list[tool_pb2.Tool]:
        """Call ToolService/Describe at `address`."""
        ...  # pragma: no cover

    async def forget(self, address: str) -> None:
        """Drop any connection kept to `address` (failed or no longer registered)."""
        ...  # pragma: no cover


def check_address(address: str) -> None:
    """`host:port` with a valid port, or INVALID_ARGUMENT."""
    if not ADDRESS.match(address) or not 0 < int(address.rsplit(":", 1)[1]) < 65536:
        raise invalid_argument("ADDRESS_INVALID", f"address {address[:100]!r} is not host:port")


MAX_PHRASES = 20
MAX_PHRASE_CHARS = 40
MAX_DESCRIPTION_CHARS = 300
MAX_VERSION_CHARS = 40
MAX_PORTS = 8
PORT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _check_manifest(tool: tool_pb2.Tool, index: int) -> None:
    """A manifest comes from whoever runs the tool service: every field that reaches the planner prompt, the
    compiler or the validator is bounded here, so a bad one is INVALID_ARGUMENT now and never INTERNAL later."""
    if not TOOL_NAME.match(tool.name):
        raise invalid_argument("MANIFEST_INVALID", f"tools[{index}].name {tool.name[:80]!r} is not a valid tool name")
    for label, text in (("description_ja", tool.description_ja), ("description_en", tool.description_en)):
        if len(text) > MAX_DESCRIPTION_CHARS:
            raise invalid_argument(
                "MANIFEST_INVALID",
                f"tool {tool.name!r} {label} is {len(text)} characters, over the limit of {MAX_DESCRIPTION_CHARS}",
            )
    if len(tool.version) > MAX_VERSION_CHARS:
        raise invalid_argument("MANIFEST_INVALID", f"tool {tool.name!r} version is over {MAX_VERSION_CHARS} characters")
    for label, ports in (("inputs", tool.inputs), ("outputs", tool.outputs)):
        if len(ports) > MAX_PORTS or any(not PORT_NAME.match(p.name) for p in ports):
            raise invalid_argument(
                "MANIFEST_INVALID", f"tool {tool.name!r} {label}: at most {MAX_PORTS} ports named like 'image'"
            )
    if not any(p.name == "image" for p in tool.inputs):
        raise invalid_argument("MANIFEST_INVALID", f"tool {tool.name!r} has no image input")
    schema: JsonObject = struct_to_dict(tool.params_schema)
    if schema.get("type") != "object":
        raise invalid_argument("MANIFEST_INVALID", f"tool {tool.name!r} params_schema is not an object schema")
    check_untrusted_schema(schema, f"tool {tool.name!r} params_schema")
    if len(tool.phrases_ja) > MAX_PHRASES or any(not p.strip() or len(p) > MAX_PHRASE_CHARS for p in tool.phrases_ja):
        raise invalid_argument(
            "MANIFEST_INVALID",
            f"tool {tool.name!r} phrases_ja: at most {MAX_PHRASES} non-empty phrases of at most {MAX_PHRASE_CHARS} "
            f"characters (got {len(tool.phrases_ja)}, longest {max((len(p) for p in tool.phrases_ja), default=0)})",
        )


@dataclass(frozen=True)
class Affected:
    """A saved pipeline version that would no longer validate: where and why."""

    pipeline_id: str
    version: int
    violation: FieldViolation

    def __str__(self) -> str:
        return f"{self.pipeline_id} v{self.version} {self.violation.field}: {self.violation.description}"


ImpactCheck = Callable[[dict[str, RegisteredTool], set[str]], Awaitable[list[Affected]]]
"""Given the registry as it would be and the tools changing, the saved pipeline versions that would break."""


@dataclass
class Registration:
    """What a registration stored, and how the manifests of tools registered before changed."""

    tools: list[tool_pb2.Tool]
    changes: dict[str, list[Change]] = field(default_factory=dict)


MAX_LISTED_AFFECTED = 20


class TritonInspector(Protocol):
    """Lists a Triton server's image models as tool manifests (transport outside the domain)."""

    async def image_models(self, address: str, names: list[str]) -> list[tool_pb2.Tool]:
        """Manifests for the qualifying models."""
        ...  # pragma: no cover


class Registry:
    """Registered tools, cached in memory and persisted in the store; `version` changes on every change."""

    def __init__(
        self,
        store: Store,
        describer: ToolDescriber,
        triton: TritonInspector | None = None,
        allowlist: AddressAllowlist | None = None,
    ) -> None:
        self._store = store
        self._describer = describer
        self._triton = triton
        self._allowlist = allowlist or AddressAllowlist(LOOPBACK_ONLY)
        self._impact: ImpactCheck | None = None
        self._tools: dict[str, RegisteredTool] = {}
        self._addresses: frozenset[str] = frozenset()
        """The addresses of `_tools`, kept with it: the executor checks one before every call."""
        self._streaming: frozenset[str] = frozenset()
        """The addresses whose tools take frames in pieces."""
        self._branching: frozenset[str] = frozenset()
        """The addresses all of whose tools run several chains on one image in one call."""
        self._version = 0

    async def load(self) -> None:
        """Read the registry from the store. A stored tool that today's checks refuse (registered by an older
        version, or its address no longer allowed) is not served; the log says why."""
        rows, version = await self._store.list_tools()
        tools: dict[str, RegisteredTool] = {}
        for row in rows:
            manifest = tool_pb2.Tool.FromString(row.manifest)
            try:
                _check_manifest(manifest, 0)
            except ImageflowError as error:
                log.warning("not serving stored tool %r: %s", row.name, error.message)
                continue
            if not self._allowlist.allows(row.address):
                log.warning("not serving stored tool %r: its address is outside IMAGEFLOW_TOOL_ALLOWLIST", row.name)
                continue
            tools[row.name] = RegisteredTool.of(manifest)
        # swapped whole, with the version and the addresses: a load that fails part way changes nothing
        self._tools, self._version = tools, version
        self._tools_changed()

    def check_impact_with(self, impact: ImpactCheck) -> None:
        """Ask `impact` which saved pipelines a breaking manifest change would break (the pipeline catalog)."""
        self._impact = impact

    @property
    def version(self) -> int:
        """Registry version (the planner caches on it)."""
        return self._version

    def snapshot(self) -> dict[str, RegisteredTool]:
        """The enabled tools by name."""
        return {name: tool for name, tool in self._tools.items() if tool.manifest.enabled}

    def addresses(self) -> frozenset[str]:
        """Every address the executor may dial."""
        return self._addresses

    def streams_frames(self, address: str) -> bool:
        """Whether the service at `address` takes frames in pieces (ToolService.ProcessChainStream)."""
        return address in self._streaming

    def takes_branches(self, address: str) -> bool:
        """Whether the service at `address` runs several chains on one image in one call (ToolService.ProcessBranches):
        all its tools say so."""
        return address in self._branching

    def _tools_changed(self) -> None:
        self._addresses = frozenset(tool.address for tool in self._tools.values())
        self._streaming = frozenset(tool.address for tool in self._tools.values() if tool.streams_frames)
        self._branching = self._addresses - {tool.address for tool in self._tools.values() if not tool.takes_branches}

    def _admit(self, address: str, replace: bool, actor: Principal, trusted: bool) -> None:
        """Address syntax, the allowlist (before anything is dialled) and who may move a name."""
        check_address(address)
        if not trusted and not self._allowlist.allows(address):
            audit.warning("actor=%s action=register address=%s outcome=refused_not_allowlisted", actor.name, address)
            raise permission_denied(
                "ADDRESS_NOT_ALLOWED",
                f"address {address[:100]!r} is not in the tool allowlist (IMAGEFLOW_TOOL_ALLOWLIST); "
                "an administrator of this server can add it",
            )
        if replace and not actor.may(Role.ADMIN):
            raise permission_denied("REPLACE_NEEDS_ADMIN", "replace moves a tool name to another address: admin only")

    async def register(
        self,
        address: str,
        *,
        replace: bool = False,
        kind: int = tool_pb2.TOOL_KIND_SERVICE,
        actor: Principal = ANONYMOUS,
        trusted: bool = False,
        force: bool = False,
    ) -> Registration:
        """Describe the service at `address` and store its tools (same name at another address: ALREADY_EXISTS
        unless `replace`; a breaking change that saved pipelines do not survive: FAILED_PRECONDITION unless
        `force`). `trusted` skips the allowlist (the embedded tools this process started)."""
        self._admit(address, replace, actor, trusted)
        try:
            manifests = await self._describer.describe(address)
        except ImageflowError:
            await self._forget_if_unused(address)
            raise
        if not manifests:
            raise invalid_argument("MANIFEST_EMPTY", f"the service at {address} lists no tools")
        return await self.store_manifests(manifests, address, replace=replace, kind=kind, actor=actor, force=force)

    async def import_triton(
        self, address: str, names: list[str], *, replace: bool = True, actor: Principal = ANONYMOUS
    ) -> Registration:
        """Register the image models of the Triton server at `address` as TRITON_MODEL tools."""
        self._admit(address, replace, actor, trusted=False)
        if self._triton is None:
            raise failed_precondition("TRITON_IMPORT_DISABLED", "this server has no Triton client configured")
        try:
            manifests = await self._triton.image_models(address, names)
        except ImageflowError:
            await self._forget_if_unused(address)
            raise
        return await self.store_manifests(
            manifests, address, replace=replace, kind=tool_pb2.TOOL_KIND_TRITON_MODEL, actor=actor
        )

    async def _forget_if_unused(self, address: str) -> None:
        if address not in self.addresses():
            await self._describer.forget(address)

    def is_triton_model(self, name: str) -> bool:
        """Whether a registered tool is served by Triton directly."""
        tool = self._tools.get(name)
        return tool is not None and tool.manifest.kind == tool_pb2.TOOL_KIND_TRITON_MODEL

    async def store_manifests(
        self,
        manifests: list[tool_pb2.Tool],
        address: str,
        *,
        replace: bool,
        kind: int,
        actor: Principal = ANONYMOUS,
        force: bool = False,
    ) -> Registration:
        """Validate and persist manifests served at `address`; a changed manifest gets the next revision."""
        now = datetime.now(UTC)
        stamp = Timestamp()
        stamp.FromDatetime(now)
        stored: list[tool_pb2.Tool] = []
        changes: dict[str, list[Change]] = {}
        for index, manifest in enumerate(manifests):
            _check_manifest(manifest, index)
            current = self._tools.get(manifest.name)
            if current is not None and current.address != address and not replace:
                raise already_exists(
                    "TOOL_NAME_TAKEN",
                    f"tool {manifest.name!r} is already served at {current.address}; pass replace to move it",
                )
            entry = tool_pb2.Tool()
            entry.CopyFrom(manifest)
            entry.address = address
            entry.kind = kind  # type: ignore[assignment]
            entry.enabled = True
            entry.revision = 1
            if current is not None:
                entry.revision = current.manifest.revision or 1
                diff = classify(current.manifest, entry)
                if diff:
                    entry.revision += 1
                    changes[entry.name] = diff
            entry.register_time.CopyFrom(stamp)
            stored.append(entry)
        registered = {t.name: RegisteredTool.of(t) for t in stored}
        await self._check_breaking(registered, changes, actor, force)
        self._version = await self._store.upsert_tools(
            [ToolRow(t.name, address, t.SerializeToString(), now, t.revision) for t in stored]
        )
        moved_from = {self._tools[t.name].address for t in stored if t.name in self._tools} - {address}
        self._tools.update(registered)
        self._tools_changed()
        for old in moved_from:
            await self._forget_if_unused(old)
        audit.info(
            "actor=%s action=register address=%s tools=%s replace=%s registry_version=%d",
            actor.name, address, ",".join(t.name for t in stored), replace, self._version,
        )  # fmt: skip
        for name, diff in changes.items():
            audit.info(
                "actor=%s action=change tool=%s revision=%d breaking=%s changes=%s", actor.name, name,
                self._tools[name].manifest.revision, any(c.breaking for c in diff),
                "; ".join(f"{c.field}: {c.description}" for c in diff),
            )  # fmt: skip
        return Registration(stored, changes)

    async def _check_breaking(
        self, registered: dict[str, RegisteredTool], changes: dict[str, list[Change]], actor: Principal, force: bool
    ) -> None:
        """Refuse (FAILED_PRECONDITION) a breaking change that saved pipelines would not survive, unless forced."""
        breaking = {name for name, diff in changes.items() if any(c.breaking for c in diff)}
        if not breaking or self._impact is None:
            return
        candidate = {**self.snapshot(), **registered}
        affected = await self._impact(candidate, breaking)
        if not affected:
            return
        listed = "; ".join(str(a) for a in affected[:MAX_LISTED_AFFECTED])
        more = f" (and {len(affected) - MAX_LISTED_AFFECTED} more)" if len(affected) > MAX_LISTED_AFFECTED else ""
        if force:
            audit.warning(
                "actor=%s action=force_breaking tools=%s breaks=%s%s", actor.name, sorted(breaking), listed, more
            )
            return
        error = failed_precondition(
            "TOOL_CHANGE_BREAKS_PIPELINES",
            f"the new manifest of {', '.join(sorted(breaking))} breaks {len(affected)} saved pipeline step(s): "
            f"{listed}{more}; an admin may register it with force",
        )
        error.violations.extend(
            FieldViolation(f"{a.pipeline_id}/v{a.version}/{a.violation.field}", a.violation.description)
            for a in affected[:MAX_LISTED_AFFECTED]
        )
        raise error

    def list(self) -> list[tool_pb2.Tool]:
        """All tools by name."""
        return [self._tools[name].manifest for name in sorted(self._tools)]

    def get(self, name: str) -> tool_pb2.Tool:
        """One tool, or NOT_FOUND."""
        if not name:
            raise invalid_argument("NAME_MISSING", "name is required")
        tool = self._tools.get(name)
        if tool is None:
            raise not_found("TOOL_NOT_FOUND", f"tool {name[:80]!r} is not registered")
        return tool.manifest

    async def remove(self, name: str, actor: Principal = ANONYMOUS) -> int:
        """Remove one tool; returns the registry version."""
        self.get(name)
        version = await self._store.remove_tool(name)
        if version is None:
            raise not_found("TOOL_NOT_FOUND", f"tool {name[:80]!r} is not registered")
        self._version = version
        removed = self._tools.pop(name, None)
        self._tools_changed()
        if removed is not None:
            await self._forget_if_unused(removed.address)
        audit.info("actor=%s action=remove tool=%s registry_version=%d", actor.name, name, version)
        return version
