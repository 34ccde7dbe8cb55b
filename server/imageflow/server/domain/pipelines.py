"""Pipeline definitions: validate through the compiler, store immutable versions, page through them."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from google.protobuf import json_format
from imageflow.common.errors import FieldViolation, ImageflowError, invalid_argument, not_found
from imageflow.server.domain.compiler import CompiledPipeline, StepDefaults, compile_pipeline
from imageflow.server.domain.registry import Affected, Registry
from imageflow.server.domain.store import PipelineRow, Store
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.v1 import pipeline_pb2

COMPILE_CACHE_SIZE = 256
PIPELINE_ID_PREFIX = "pl_"
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


class PipelineCatalog:
    """Save, get, list and delete pipeline versions; every definition goes through the compile path first."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        max_steps: int,
        defaults: StepDefaults,
        chains: bool = True,
        chain_group: Callable[[str], str] | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._max_steps = max_steps
        self._defaults = defaults
        self._chains = chains
        self._chain_group = chain_group
        self._compiled: OrderedDict[tuple[bytes, int], CompiledPipeline] = OrderedDict()

    def compile(self, pipeline: pipeline_pb2.Pipeline) -> CompiledPipeline:
        """Validate against the live registry; a definition compiled before under the same registry version comes
        from the cache (compiled pipelines are never mutated)."""
        key, cached = self._cached(pipeline)
        if cached is not None:
            return cached
        return self._remember(key, self._compile(pipeline))

    async def compile_async(self, pipeline: pipeline_pb2.Pipeline) -> CompiledPipeline:
        """`compile` with a cache miss validated on a worker thread: params are checked against schemas that came
        from tool services, so their validation (bounded: RE2 patterns, size-capped schemas) stays off the loop."""
        key, cached = self._cached(pipeline)
        if cached is not None:
            return cached
        return self._remember(key, await asyncio.to_thread(self._compile, pipeline))

    def _cached(self, pipeline: pipeline_pb2.Pipeline) -> tuple[tuple[bytes, int], CompiledPipeline | None]:
        key = (pipeline.SerializeToString(deterministic=True), self._registry.version)
        cached = self._compiled.get(key)
        if cached is not None:
            self._compiled.move_to_end(key)
        return key, cached

    def _compile(
        self, pipeline: pipeline_pb2.Pipeline, tools: dict[str, RegisteredTool] | None = None
    ) -> CompiledPipeline:
        return compile_pipeline(
            pipeline,
            self._registry.snapshot() if tools is None else tools,
            max_steps=self._max_steps,
            defaults=self._defaults,
            chains=self._chains,
            chain_group=self._chain_group,
        )

    def violations(self, pipeline: pipeline_pb2.Pipeline) -> list[FieldViolation]:
        """Why a (saved) definition no longer validates against the current registry; empty when it does."""
        try:
            self.compile(pipeline)
        except ImageflowError as error:
            return error.violations or [FieldViolation("pipeline", error.message)]
        return []

    async def broken_by(self, tools: dict[str, RegisteredTool], changed: set[str]) -> list[Affected]:
        """The saved pipeline versions whose steps using a `changed` tool would not validate against `tools` (the
        registry as a registration would leave it). Only new violations on those steps count: a version already
        broken (by an earlier forced change, say) is not this change's doing."""
        affected: list[Affected] = []
        for row in await self._store.list_pipeline_versions():
            pipeline = _from_row(row)
            indexes = {i for i, step in enumerate(pipeline.steps) if step.tool in changed}
            if not indexes:
                continue
            try:
                await asyncio.to_thread(self._compile, pipeline, tools)
            except ImageflowError as error:
                before = {v.field for v in self.violations(pipeline)}
                for violation in error.violations:
                    on_changed_step = any(violation.field.startswith(f"steps[{i}]") for i in indexes)
                    if on_changed_step and violation.field not in before:
                        affected.append(Affected(row.pipeline_id, row.version, violation))
        return affected

    def _remember(self, key: tuple[bytes, int], compiled: CompiledPipeline) -> CompiledPipeline:
        self._compiled[key] = compiled
        if len(self._compiled) > COMPILE_CACHE_SIZE:
            self._compiled.popitem(last=False)
        return compiled

    async def save(self, pipeline: pipeline_pb2.Pipeline, created_by: str = "") -> pipeline_pb2.Pipeline:
        """Store a new version; returns the stored definition with id, version, create_time and created_by."""
        compiled = await self.compile_async(pipeline)
        definition = pipeline_pb2.Pipeline()
        definition.CopyFrom(compiled.definition)
        new = not pipeline.id
        pipeline_id = pipeline.id or PIPELINE_ID_PREFIX + uuid.uuid4().hex[:16]
        definition.id = pipeline_id
        definition.ClearField("version")
        definition.ClearField("create_time")
        definition.ClearField("created_by")
        definition.ClearField("tool_revisions")
        for step in compiled.steps.values():
            definition.tool_revisions[step.tool.name] = step.tool.manifest.revision
        row = await self._store.save_pipeline(
            pipeline_id,
            definition.name,
            json_format.MessageToJson(definition),
            len(definition.steps),
            new=new,
            created_by=created_by,
        )
        if row is None:
            raise not_found(
                "PIPELINE_NOT_FOUND", f"pipeline {pipeline.id[:80]!r} does not exist; omit id to create one"
            )
        return _from_row(row)

    async def get(self, pipeline_id: str, version: int = 0) -> pipeline_pb2.Pipeline:
        """One version (0 = latest)."""
        if not pipeline_id:
            raise invalid_argument("PIPELINE_ID_MISSING", "pipeline_id is required")
        if version < 0:
            raise invalid_argument("VERSION_INVALID", "version must be 0 (latest) or positive")
        row = await self._store.get_pipeline(pipeline_id, version)
        if row is None:
            what = f"pipeline {pipeline_id[:80]!r}" + (f" version {version}" if version else "")
            raise not_found("PIPELINE_NOT_FOUND", f"{what} does not exist")
        return _from_row(row)

    async def list(self, page_size: int, page_token: str) -> tuple[list[PipelineRow], str]:
        """A page of latest versions and the next token."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise invalid_argument("PAGE_SIZE_INVALID", f"page_size must be between 0 and {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        cursor = _decode_token(page_token) if page_token else None
        rows = await self._store.list_pipelines(size + 1, cursor)
        page, more = rows[:size], len(rows) > size
        token = _encode_token(page[-1].created_at, page[-1].pipeline_id) if more and page else ""
        return page, token

    @staticmethod
    def from_row(row: PipelineRow) -> pipeline_pb2.Pipeline:
        """A stored version as a Pipeline message."""
        return _from_row(row)

    async def delete(self, pipeline_id: str) -> int:
        """Delete all versions."""
        if not pipeline_id:
            raise invalid_argument("PIPELINE_ID_MISSING", "pipeline_id is required")
        deleted = await self._store.delete_pipeline(pipeline_id)
        if deleted == 0:
            raise not_found("PIPELINE_NOT_FOUND", f"pipeline {pipeline_id[:80]!r} does not exist")
        return deleted


def _from_row(row: PipelineRow) -> pipeline_pb2.Pipeline:
    pipeline = json_format.Parse(row.definition, pipeline_pb2.Pipeline())
    pipeline.id = row.pipeline_id
    pipeline.version = row.version
    pipeline.create_time.FromDatetime(row.created_at)
    pipeline.created_by = row.created_by
    return pipeline


def _encode_token(created_at: datetime, pipeline_id: str) -> str:
    raw = json.dumps({"t": created_at.isoformat(), "id": pipeline_id}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(data["t"]), str(data["id"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise invalid_argument("PAGE_TOKEN_INVALID", "page_token is not one this server issued") from None
