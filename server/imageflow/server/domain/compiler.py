"""The one compile path: parse -> validate -> plan (used by Save, Validate, Execute and the planners)."""

from __future__ import annotations

import graphlib
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from imageflow.common.errors import FieldViolation, invalid_argument
from imageflow.common.params import normalize_numbers, param_violations
from imageflow.common.structs import dict_to_struct, struct_to_dict
from imageflow.server.domain.tool_records import DETECTIONS_PORT, IMAGE_PORT, RegisteredTool
from imageflow.v1 import pipeline_pb2

STEP_ID = re.compile(r"^[a-z0-9_-]{1,63}$")
INPUT_NAME = re.compile(r"^[a-z0-9_-]{1,63}$")
DEFAULT_INPUT = "image"
MAX_NAME = 200
MAX_DESCRIPTION = 4000
MAX_ATTEMPTS = 10
MAX_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Source:
    """Where an input port's value comes from: a step's output port, or a pipeline input."""

    step: str | None
    port: str
    pipeline_input: str | None = None

    def render(self) -> str:
        """The wiring string (`STEP.PORT` or `$INPUT`)."""
        return f"${self.pipeline_input}" if self.step is None else f"{self.step}.{self.port}"


@dataclass(frozen=True)
class CompiledStep:
    """A validated step with its resolved wiring."""

    id: str
    tool: RegisteredTool
    params: dict[str, Any]
    params_struct: struct_pb2.Struct
    depends_on: tuple[str, ...]
    inputs: dict[str, Source]
    max_attempts: int
    timeout_s: float
    initial_backoff_s: float


@dataclass(frozen=True)
class CompiledPipeline:
    """A pipeline ready to run: normalised definition, steps by id, a topological order, output steps."""

    definition: pipeline_pb2.Pipeline
    steps: dict[str, CompiledStep]
    order: tuple[str, ...]
    outputs: tuple[str, ...]
    pipeline_inputs: tuple[str, ...]
    dependents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Runs of consecutive steps one tool service can take in one call (ToolService.ProcessChain), by first step."""
    luma_steps: frozenset[str] = frozenset()
    """Steps whose image goes only to tools that read luma (not outputs): asked for raw gray, not raw RGB."""
    unread_images: frozenset[str] = frozenset()
    """Steps whose image nobody reads (not outputs; their dependents read only their detections, or wait on them):
    the tool is asked to omit it from its answer."""


@dataclass(frozen=True)
class StepDefaults:
    """Server defaults for step policies."""

    max_attempts: int = 3
    timeout_s: float = 60.0
    initial_backoff_s: float = 0.1


def compile_pipeline(
    pipeline: pipeline_pb2.Pipeline,
    tools: Mapping[str, RegisteredTool],
    *,
    max_steps: int = 64,
    defaults: StepDefaults | None = None,
    chains: bool = True,
    chain_group: Callable[[str], str] | None = None,
) -> CompiledPipeline:
    """Validate everything at once; raise INVALID_ARGUMENT listing every violation by field path. `chain_group` names
    the service a tool address belongs to for chaining (default: the address itself; the embedded resize and filter
    services of this process are one group)."""
    defaults = defaults or StepDefaults()
    problems: list[FieldViolation] = []

    def bad(path: str, description: str) -> None:
        problems.append(FieldViolation(path, description))

    if len(pipeline.name) > MAX_NAME:
        bad("name", f"longer than {MAX_NAME} characters")
    if len(pipeline.description) > MAX_DESCRIPTION:
        bad("description", f"longer than {MAX_DESCRIPTION} characters")
    if not pipeline.steps:
        bad("steps", "a pipeline needs at least one step")
    if len(pipeline.steps) > max_steps:
        bad("steps", f"{len(pipeline.steps)} steps, over the limit of {max_steps}")
        raise _invalid(problems)

    index_of: dict[str, int] = {}
    for i, step in enumerate(pipeline.steps):
        if not STEP_ID.match(step.id):
            bad(f"steps[{i}].id", f"{_clip(step.id)!r} must match [a-z0-9_-]{{1,63}}")
        elif step.id in index_of:
            bad(f"steps[{i}].id", f"duplicate step id {step.id!r} (also steps[{index_of[step.id]}])")
        else:
            index_of[step.id] = i

    known = {step_id: tools.get(pipeline.steps[i].tool) for step_id, i in index_of.items()}
    params_by_id: dict[str, dict[str, Any]] = {}
    explicit: dict[str, dict[str, Source]] = {}
    deps: dict[str, list[str]] = {}
    for i, step in enumerate(pipeline.steps):
        path = f"steps[{i}]"
        tool = tools.get(step.tool)
        if not step.tool:
            bad(f"{path}.tool", "tool is required")
        elif tool is None:
            bad(f"{path}.tool", f"unknown tool {_clip(step.tool)!r}; registered tools: {', '.join(sorted(tools))}")
        elif not tool.manifest.enabled:
            bad(f"{path}.tool", f"tool {step.tool!r} is disabled")
        params = struct_to_dict(step.params)
        if tool is not None:
            params = normalize_numbers(tool.schema, params)
            problems.extend(param_violations(tool.schema, params, f"{path}.params", tool.validator))
        params_by_id[step.id] = params
        _check_policy(step.policy, path, bad)
        step_deps: list[str] = []
        for j, dep in enumerate(step.depends_on):
            if dep == step.id:
                bad(f"{path}.depends_on[{j}]", "a step cannot depend on itself")
            elif dep not in index_of:
                bad(f"{path}.depends_on[{j}]", f"unknown step {_clip(dep)!r}")
            elif dep not in step_deps:
                step_deps.append(dep)
        wiring: dict[str, Source] = {}
        for port_name, ref in sorted(step.inputs.items()):
            source = _parse_source(ref)
            port_path = f"{path}.inputs.{port_name}"
            if source is None:
                bad(port_path, f"{_clip(ref)!r} is not STEP, STEP.PORT or $INPUT")
                continue
            want = tool.input_type(port_name) if tool else None
            if tool is not None and want is None:
                bad(port_path, f"tool {tool.name!r} has no input {port_name!r}")
                continue
            if source.step is not None:
                upstream = known.get(source.step)
                if source.step not in index_of:
                    bad(port_path, f"unknown step {source.step!r}")
                    continue
                if source.step == step.id:
                    bad(port_path, "a step cannot read its own output")
                    continue
                if upstream is not None and want is not None:
                    have = upstream.output_type(source.port)
                    if have is None:
                        bad(port_path, f"step {source.step!r} ({upstream.name}) has no output {source.port!r}")
                        continue
                    if have != want:
                        bad(port_path, f"type mismatch: {source.render()} is not what input {port_name!r} takes")
                        continue
                if source.step not in step_deps:
                    step_deps.append(source.step)
            elif want is not None and want != IMAGE_PORT:
                bad(port_path, "pipeline inputs are images; detections must come from a detecting step")
                continue
            wiring[port_name] = source
        deps[step.id] = step_deps
        explicit[step.id] = wiring

    order: tuple[str, ...] = ()
    sorter = graphlib.TopologicalSorter({step_id: deps.get(step_id, []) for step_id in index_of})
    try:
        order = tuple(sorter.static_order())
    except graphlib.CycleError as cycle:
        members = list(cycle.args[1])
        first = index_of.get(members[0], 0)
        bad(f"steps[{first}].depends_on", "dependency cycle: " + " -> ".join(members))

    if problems:
        raise _invalid(problems)

    steps: dict[str, CompiledStep] = {}
    for step_id in order:
        i = index_of[step_id]
        step = pipeline.steps[i]
        tool = tools[step.tool]
        wiring = dict(explicit[step_id])
        for port in tool.manifest.inputs:
            if port.name in wiring:
                continue
            if port.type == IMAGE_PORT:
                feeder = deps[step_id][0] if deps[step_id] else None
                wiring[port.name] = Source(feeder, "image") if feeder else Source(None, "image", DEFAULT_INPUT)
            elif port.type == DETECTIONS_PORT:
                found = _nearest_detector(step_id, deps, steps)
                if found is None:
                    if port.required:
                        problems.append(
                            FieldViolation(
                                f"steps[{i}].inputs.{port.name}",
                                f"tool {tool.name!r} needs detections: add a detect step before it",
                            )
                        )
                    continue
                wiring[port.name] = Source(found, "detections")
                if found not in deps[step_id]:
                    deps[step_id].append(found)
        policy = step.policy
        steps[step_id] = CompiledStep(
            id=step_id,
            tool=tool,
            params=params_by_id[step_id],
            params_struct=dict_to_struct(params_by_id[step_id]),
            depends_on=tuple(deps[step_id]),
            inputs=wiring,
            max_attempts=policy.max_attempts or defaults.max_attempts,
            timeout_s=_seconds(policy.timeout) if policy.HasField("timeout") else defaults.timeout_s,
            initial_backoff_s=(
                _seconds(policy.initial_backoff) if policy.HasField("initial_backoff") else defaults.initial_backoff_s
            ),
        )
    for j, output in enumerate(pipeline.outputs):
        if output not in index_of:
            problems.append(FieldViolation(f"outputs[{j}]", f"unknown step {_clip(output)!r}"))
    if problems:
        raise _invalid(problems)

    dependents: dict[str, list[str]] = {step_id: [] for step_id in order}
    for step_id in order:
        for dep in steps[step_id].depends_on:
            dependents[dep].append(step_id)
    sinks = tuple(s for s in order if not dependents[s])
    outputs = tuple(pipeline.outputs) or sinks
    inputs_used = sorted(
        {src.pipeline_input for s in steps.values() for src in s.inputs.values() if src.pipeline_input}
    )
    frozen_dependents = {k: tuple(v) for k, v in dependents.items()}
    return CompiledPipeline(
        definition=_normalised(pipeline, steps),
        steps=steps,
        order=order,
        outputs=outputs,
        pipeline_inputs=tuple(inputs_used),
        dependents=frozen_dependents,
        chains=find_chains(steps, order, outputs, frozen_dependents, chain_group) if chains else {},
        luma_steps=find_luma_steps(steps, order, outputs, frozen_dependents),
        unread_images=frozenset(
            step_id
            for step_id in order
            if step_id not in outputs and not image_reads(step_id, steps, frozen_dependents)
        ),
    )


def image_reads(
    step_id: str, steps: Mapping[str, CompiledStep], dependents: Mapping[str, tuple[str, ...]]
) -> list[tuple[str, CompiledStep]]:
    """The (input port, reading step) pairs that read `step_id`'s image, whatever its tool names the image output
    (`a`, `a.image`, `a.result`): every wired source from that step but its detections."""
    tool = steps[step_id].tool
    return [
        (port, steps[d])
        for d in dependents[step_id]
        for port, source in steps[d].inputs.items()
        if source.step == step_id and tool.output_type(source.port) != DETECTIONS_PORT
    ]


def find_luma_steps(
    steps: Mapping[str, CompiledStep],
    order: tuple[str, ...],
    outputs: tuple[str, ...],
    dependents: Mapping[str, tuple[str, ...]],
) -> frozenset[str]:
    """Steps (not outputs) whose image is read, and read only through the `image` port of tools whose manifest says
    `reads_luma`, or of tools that say `keeps_luma` and are such steps themselves (looked at from the sinks back, the
    way a tool service looks through a chain): their image may travel as raw gray (a third of raw RGB) and be decoded
    as luma alone. Chained or step by step, the same steps decode luma, so the bytes do not depend on chaining."""
    found: set[str] = set()
    for step_id in reversed(order):
        if step_id in outputs:
            continue
        reads = image_reads(step_id, steps, dependents)
        if reads and all(
            port == "image" and (reader.tool.reads_luma or (reader.tool.keeps_luma and reader.id in found))
            for port, reader in reads
        ):
            found.add(step_id)
    return frozenset(found)


def find_chains(
    steps: Mapping[str, CompiledStep],
    order: tuple[str, ...],
    outputs: tuple[str, ...],
    dependents: Mapping[str, tuple[str, ...]],
    chain_group: Callable[[str], str] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Maximal runs a → b → … where every step is served by a chainable tool at the same address (or in the same
    `chain_group`), each next step depends on the previous one alone and takes only its image, and every step but the
    last feeds nothing else and is not an output. Such a run can travel in one call, frames never leaving the tool
    service (or, for the embedded tools, the worker thread)."""
    group = chain_group or (lambda address: address)

    def follows(prev: CompiledStep, nxt: CompiledStep) -> bool:
        return (
            nxt.tool.chainable
            and group(nxt.tool.address) == group(prev.tool.address)
            and nxt.depends_on == (prev.id,)
            and set(nxt.inputs) == {"image"}
            and nxt.inputs["image"].step == prev.id
            and dependents[prev.id] == (nxt.id,)
            and prev.id not in outputs
        )

    chains: dict[str, tuple[str, ...]] = {}
    taken: set[str] = set()
    for step_id in order:
        head = steps[step_id]
        if step_id in taken or not head.tool.chainable:
            continue
        run = [head]
        while len(dependents[run[-1].id]) == 1 and follows(run[-1], steps[dependents[run[-1].id][0]]):
            run.append(steps[dependents[run[-1].id][0]])
        if len(run) > 1:
            chains[step_id] = tuple(s.id for s in run)
            taken.update(chains[step_id])
    return chains


def _nearest_detector(step_id: str, deps: Mapping[str, list[str]], compiled: Mapping[str, CompiledStep]) -> str | None:
    """The closest ancestor (breadth first along depends_on) that outputs detections."""
    queue = deque(deps[step_id])
    seen: set[str] = set()
    while queue:
        current = queue.popleft()
        if current in seen:
            continue
        seen.add(current)
        if compiled[current].tool.produces_detections:
            return current
        queue.extend(deps[current])
    return None


def _parse_source(ref: str) -> Source | None:
    if ref.startswith("$"):
        name = ref[1:]
        return Source(None, "image", name) if INPUT_NAME.match(name) else None
    step, _, port = ref.partition(".")
    if not STEP_ID.match(step) or (port and not INPUT_NAME.match(port)):
        return None
    return Source(step, port or "image")


def _check_policy(policy: pipeline_pb2.StepPolicy, path: str, bad: Any) -> None:
    if policy.max_attempts < 0 or policy.max_attempts > MAX_ATTEMPTS:
        bad(f"{path}.policy.max_attempts", f"must be between 1 and {MAX_ATTEMPTS}")
    for name in ("timeout", "initial_backoff"):
        if policy.HasField(name):
            duration = getattr(policy, name)
            seconds = _seconds(duration)
            if not 0 <= duration.nanos < 1_000_000_000 or seconds <= 0 or seconds > MAX_TIMEOUT_S:
                bad(
                    f"{path}.policy.{name}",
                    f"must be positive and at most {MAX_TIMEOUT_S:.0f} s (got {duration.seconds} s {duration.nanos} ns)",
                )


def _seconds(duration: duration_pb2.Duration) -> float:
    """A Duration in seconds without datetime (which overflows on hostile values)."""
    return duration.seconds + duration.nanos / 1e9


def _normalised(pipeline: pipeline_pb2.Pipeline, steps: Mapping[str, CompiledStep]) -> pipeline_pb2.Pipeline:
    """The definition with depends_on filled and params normalised; order of steps kept."""
    result = pipeline_pb2.Pipeline()
    result.CopyFrom(pipeline)
    for step in result.steps:
        compiled = steps[step.id]
        del step.depends_on[:]
        step.depends_on.extend(compiled.depends_on)
        step.params.CopyFrom(compiled.params_struct)
    return result


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _invalid(problems: list[FieldViolation]) -> Exception:
    shown = "; ".join(f"{p.field}: {p.description}" for p in problems[:10])
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    return invalid_argument("PIPELINE_INVALID", f"invalid pipeline: {shown}{more}", problems[:100])
