"""Chooses a planner, guards against unsafe instructions, and validates every answer through the compiler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from imageflow.common.errors import ImageflowError, invalid_argument
from imageflow.server.domain.pipelines import PipelineCatalog
from imageflow.server.domain.planner.guard import check_instruction
from imageflow.server.domain.registry import Registry
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.v1 import pipeline_pb2

log = logging.getLogger(__name__)


@dataclass
class Draft:
    """A planner's answer before validation."""

    pipeline: pipeline_pb2.Pipeline
    explanations: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PlanResult:
    """A validated pipeline with explanations."""

    pipeline: pipeline_pb2.Pipeline
    explanations: dict[str, str]
    planner: str
    warnings: list[str]


class Planner(Protocol):
    """Turns an instruction into a draft pipeline."""

    name: str

    async def plan(
        self,
        instruction: str,
        base: pipeline_pb2.Pipeline | None,
        tools: dict[str, RegisteredTool],
        registry_version: int,
    ) -> Draft:
        """Plan; raise ImageflowError to refuse."""
        ...  # pragma: no cover


MAX_NAME_CHARS = 32


def short_name(instruction: str) -> str:
    """A pipeline name from its instruction: one line, at most MAX_NAME_CHARS characters, no trailing punctuation."""
    text = " ".join(instruction.split()).rstrip("。、.,!！?？ ")
    return text if len(text) <= MAX_NAME_CHARS else text[: MAX_NAME_CHARS - 1].rstrip("、, ") + "…"


class PlannerService:
    """Which planner answers: `llm` mode asks the LLM first and falls back to the offline planner; `hybrid` mode
    asks the offline planner first and the LLM when the offline grammar found nothing it could plan (the LLM's plan
    then comes with a warning saying so); a partial offline plan keeps its warnings. Without an LLM the offline
    planner answers alone."""

    def __init__(
        self,
        catalog: PipelineCatalog,
        registry: Registry,
        offline: Planner,
        llm: Planner | None = None,
        *,
        fallback: bool = True,
        mode: str = "llm",
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._offline = offline
        self._llm = llm
        self._fallback = fallback
        self._mode = mode

    async def generate(self, instruction: str, base: pipeline_pb2.Pipeline | None) -> PlanResult:
        """Plan, validate, explain."""
        text = instruction.strip()
        if not text:
            raise invalid_argument("INSTRUCTION_EMPTY", "指示が空です。画像処理の内容を日本語で書いてください。")
        check_instruction(text)
        tools = self._registry.snapshot()
        warnings: list[str] = []
        if self._llm is not None and self._mode == "hybrid":
            return await self._hybrid(text, base, tools, self._llm)
        if self._llm is not None:
            try:
                draft = await self._llm.plan(text, base, tools, self._registry.version)
                return self._finish(draft, self._llm.name, warnings, text, base)
            except ImageflowError as error:
                if error.reason in ("INSTRUCTION_REFUSED", "INSTRUCTION_OUT_OF_SCOPE") or not self._fallback:
                    raise
                log.warning("LLM planner failed (%s); falling back to the offline planner", error.reason)
                warnings.append(f"LLM が使えなかったため、オフラインの planner で生成しました（{error.reason}）")
        draft = await self._offline.plan(text, base, tools, self._registry.version)
        return self._finish(draft, self._offline.name, warnings, text, base)

    async def _hybrid(
        self, text: str, base: pipeline_pb2.Pipeline | None, tools: dict[str, RegisteredTool], llm: Planner
    ) -> PlanResult:
        try:
            draft = await self._offline.plan(text, base, tools, self._registry.version)
        except ImageflowError as refused:
            if refused.reason != "INSTRUCTION_NOT_DOABLE":
                raise
            try:  # phrasing the offline grammar does not know: the LLM may
                asked = await llm.plan(text, base, tools, self._registry.version)
                result = self._finish(asked, f"{llm.name} (hybrid)", [], text, base)
            except ImageflowError as error:
                log.info("hybrid: the LLM could not plan it either (%s)", error.reason)
                raise refused from None
            note = "オフラインの planner では計画できなかったため、LLM が計画しました。結果を確認してください"
            result.warnings.insert(0, note)
            return result
        # A partial offline plan keeps its warnings: a small model asked to fill the gap substitutes look-alike
        # tools (measured: 7 of 8 partial cases), which would be a silent change of what was asked.
        return self._finish(draft, self._offline.name, [], text, base)

    def _finish(
        self, draft: Draft, planner: str, warnings: list[str], text: str, base: pipeline_pb2.Pipeline | None
    ) -> PlanResult:
        if draft.pipeline.name in ("", "generated"):  # a name people can find it by in a list
            draft.pipeline.name = base.name if base is not None and base.name else short_name(text)
        compiled = self._catalog.compile(draft.pipeline)
        definition = compiled.definition
        explanations = {step.id: draft.explanations.get(step.id, "") for step in definition.steps}
        return PlanResult(definition, explanations, planner, [*warnings, *draft.warnings])
