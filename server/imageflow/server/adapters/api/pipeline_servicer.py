"""imageflow.v1.PipelineService: translation only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from imageflow.common.errors import ImageflowError, invalid_argument
from imageflow.common.pieces import drain
from imageflow.server.adapters.api.executions import execution_message
from imageflow.server.adapters.api.requests import ReceivedExecute
from imageflow.server.adapters.api.uploads import (
    MIN_RATE,
    Upload,
    UploadBudget,
    UploadLimits,
    add_piece,
    finish_uploads,
    start_uploads,
    upload_idle,
)
from imageflow.server.domain.access import current_principal
from imageflow.server.domain.compiler import CompiledPipeline
from imageflow.server.domain.events import EventHub
from imageflow.server.domain.executor import Executor
from imageflow.server.domain.frames import InputImage
from imageflow.server.domain.pipelines import PipelineCatalog
from imageflow.server.domain.planner.service import PlannerService
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
MAX_INSTRUCTION = 2000


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """Maps each RPC onto the catalog, planner, executor and event hub."""

    def __init__(
        self,
        catalog: PipelineCatalog,
        planner: PlannerService,
        executor: Executor,
        hub: EventHub,
        upload_limits: UploadLimits | None = None,
    ) -> None:
        self._catalog = catalog
        self._limits = upload_limits or UploadLimits()
        self._budget = UploadBudget(self._limits)
        self._planner = planner
        self._executor = executor
        self._hub = hub
        self._background: set[asyncio.Task[bool]] = set()

    async def GeneratePipeline(
        self, request: pipeline_service_pb2.GeneratePipelineRequest, context: Context
    ) -> pipeline_service_pb2.GeneratePipelineResponse:
        """Instruction -> validated pipeline."""
        if len(request.instruction) > MAX_INSTRUCTION:
            raise invalid_argument(
                "INSTRUCTION_TOO_LONG",
                f"指示が長すぎます（{len(request.instruction)} 文字。{MAX_INSTRUCTION} 文字まで）",
            )
        base: pipeline_pb2.Pipeline | None = None
        if request.HasField("base_pipeline_id"):
            base = await self._catalog.get(request.base_pipeline_id, request.base_pipeline_version)
        elif request.HasField("base_pipeline"):
            base = request.base_pipeline
        result = await self._planner.generate(request.instruction, base)
        return pipeline_service_pb2.GeneratePipelineResponse(
            pipeline=result.pipeline,
            explanations=[pipeline_pb2.StepExplanation(step_id=k, text=v) for k, v in result.explanations.items()],
            planner=result.planner,
            warnings=result.warnings,
        )

    async def ValidatePipeline(
        self, request: pipeline_service_pb2.ValidatePipelineRequest, context: Context
    ) -> pipeline_service_pb2.ValidatePipelineResponse:
        """Compile without saving."""
        compiled = await self._catalog.compile_async(request.pipeline)
        return pipeline_service_pb2.ValidatePipelineResponse(
            pipeline=compiled.definition, execution_order=list(compiled.order)
        )

    async def SavePipeline(
        self, request: pipeline_service_pb2.SavePipelineRequest, context: Context
    ) -> pipeline_service_pb2.SavePipelineResponse:
        """Store a new version."""
        stored = await self._catalog.save(request.pipeline, current_principal().name)
        return pipeline_service_pb2.SavePipelineResponse(pipeline_id=stored.id, version=stored.version, pipeline=stored)

    async def GetPipeline(
        self, request: pipeline_service_pb2.GetPipelineRequest, context: Context
    ) -> pipeline_service_pb2.GetPipelineResponse:
        """One version, with the violations it has against the current registry (none when it validates)."""
        pipeline = await self._catalog.get(request.pipeline_id, request.version)
        return pipeline_service_pb2.GetPipelineResponse(
            pipeline=pipeline,
            violations=[
                pipeline_pb2.FieldViolation(field=v.field, description=v.description)
                for v in self._catalog.violations(pipeline)
            ],
        )

    async def ListPipelines(
        self, request: pipeline_service_pb2.ListPipelinesRequest, context: Context
    ) -> pipeline_service_pb2.ListPipelinesResponse:
        """A page of summaries."""
        rows, token = await self._catalog.list(request.page_size, request.page_token)
        response = pipeline_service_pb2.ListPipelinesResponse(next_page_token=token)
        for row in rows:
            stale = bool(self._catalog.violations(self._catalog.from_row(row)))
            if request.only_stale and not stale:
                continue
            summary = response.pipelines.add(
                id=row.pipeline_id,
                latest_version=row.version,
                name=row.name,
                step_count=row.step_count,
                created_by=row.created_by,
                stale=stale,
            )
            summary.update_time.FromDatetime(row.created_at)
        return response

    async def DeletePipeline(
        self, request: pipeline_service_pb2.DeletePipelineRequest, context: Context
    ) -> pipeline_service_pb2.DeletePipelineResponse:
        """Delete all versions."""
        return pipeline_service_pb2.DeletePipelineResponse(
            deleted_versions=await self._catalog.delete(request.pipeline_id)
        )

    async def ExecutePipeline(
        self, received: pipeline_service_pb2.ExecutePipelineRequest | ReceivedExecute, context: Context
    ) -> AsyncIterator[pipeline_service_pb2.ExecutePipelineResponse]:
        """Start (or attach to) an execution and stream its events. The server parses this request with
        `parse_execute_request` (inputs stay views of the received bytes); a plain message works the same."""
        request = received.without_inputs if isinstance(received, ReceivedExecute) else received
        inputs: dict[str, image_pb2.Image | InputImage] = dict(received.inputs)
        compiled = await self._compile(request)
        async for reply in self._run(request, compiled, inputs, context, pipeline_service_pb2.ExecutePipelineResponse):
            yield reply

    async def ExecutePipelineUpload(
        self, requests: AsyncIterator[pipeline_service_pb2.ExecutePipelineUploadRequest], context: Context
    ) -> AsyncIterator[pipeline_service_pb2.ExecutePipelineUploadResponse]:
        """ExecutePipeline with the inputs received in pieces. The call is accepted (initial metadata) before anything
        is read; the head is checked (the pipeline compiled, the lengths against the limits) before a byte of the
        inputs is kept; a refusal part-way lets the client finish writing first, so it reads the status it is given."""
        await context.send_initial_metadata(GO_AHEAD_METADATA)
        received = _Received()
        try:
            # closed with this generator (a call cancelled at the yield), not left to the garbage collector: the
            # upload's budget goes back with it
            async with contextlib.aclosing(self._receive_upload(requests, received)) as receiving:
                async for go_ahead in receiving:
                    yield go_ahead
        except ImageflowError as error:
            # a stalled client: nothing worth draining; a head that waits for the go-ahead: nothing more comes
            if error.reason not in ("UPLOAD_IDLE", "UPLOAD_TOO_SLOW") and not received.waiting:
                await drain(requests)
            raise
        head, compiled, inputs = received.head, received.compiled, received.inputs
        assert head is not None and compiled is not None  # set when _receive_upload ends without raising
        reply_type = pipeline_service_pb2.ExecutePipelineUploadResponse
        async for reply in self._run(head, compiled, inputs, context, reply_type):
            yield reply

    async def _receive_upload(
        self, requests: AsyncIterator[pipeline_service_pb2.ExecutePipelineUploadRequest], received: _Received
    ) -> AsyncGenerator[pipeline_service_pb2.ExecutePipelineUploadResponse, None]:
        """Receive the head and the pieces into `received`; yields the go-ahead once the head is accepted, when the
        head asked for it."""
        head: pipeline_service_pb2.ExecutePipelineRequest | None = None
        compiled: CompiledPipeline | None = None
        uploads: dict[str, Upload] = {}
        messages = aiter(requests)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limits.idle_s  # then, once the lengths are known, at least MIN_RATE on the whole
        try:
            while True:
                try:
                    async with asyncio.timeout(min(self._limits.idle_s, deadline - loop.time())):
                        message = await anext(messages)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    too_slow = loop.time() >= deadline and head is not None
                    raise upload_idle(self._limits.idle_s, too_slow, MIN_RATE) from None
                if head is None:
                    if not message.HasField("head"):
                        raise invalid_argument("UPLOAD_HEAD_MISSING", "the first message must carry `head`")
                    head = message.head
                    received.waiting = message.await_go_ahead
                    compiled = await self._compile(head)
                    declared = dict(message.input_bytes)
                    uploads = start_uploads(head, declared, compiled.pipeline_inputs, self._budget, self._limits)
                    deadline = loop.time() + self._limits.idle_s + sum(declared.values()) / MIN_RATE
                    if message.await_go_ahead:
                        received.waiting = False
                        yield pipeline_service_pb2.ExecutePipelineUploadResponse(go_ahead=True)
                elif message.HasField("head"):
                    raise invalid_argument("UPLOAD_HEAD_REPEATED", "only the first message may carry `head`")
                else:
                    add_piece(uploads, message.piece.input, message.piece.data)
            if head is None or compiled is None:
                raise invalid_argument("UPLOAD_HEAD_MISSING", "the stream ended before `head`")
            inputs: dict[str, image_pb2.Image | InputImage] = dict(finish_uploads(uploads))
        finally:  # from here the execution's own limits bound what the inputs hold
            self._budget.release(sum(upload.reserved for upload in uploads.values()))
        head.ClearField("inputs")
        received.head, received.compiled, received.inputs = head, compiled, inputs

    async def _compile(self, request: pipeline_service_pb2.ExecutePipelineRequest) -> CompiledPipeline:
        """The pipeline the request names, compiled; the request's own fields checked."""
        source = request.WhichOneof("source")
        if source == "pipeline_id":
            pipeline = await self._catalog.get(request.pipeline_id, request.pipeline_version)
        elif source == "pipeline":
            pipeline = request.pipeline
        else:
            raise invalid_argument("PIPELINE_MISSING", "set pipeline_id or an inline pipeline")
        if len(request.request_id) > 200:
            raise invalid_argument(
                "REQUEST_ID_TOO_LONG", f"request_id is {len(request.request_id)} characters, over the limit of 200"
            )
        return await self._catalog.compile_async(pipeline)

    async def _run(
        self,
        request: pipeline_service_pb2.ExecutePipelineRequest,
        compiled: CompiledPipeline,
        inputs: dict[str, image_pb2.Image | InputImage],
        context: Context,
        reply_type: type[Reply],
    ) -> AsyncIterator[Reply]:
        execution_id, _ = await self._executor.start(
            compiled,
            inputs,
            request_id=request.request_id,
            deadline_s=context.time_remaining(),
            step_events=not request.omit_step_events,
            created_by=current_principal().name,
        )
        # Dropped here: an uploaded input then lives in the execution alone, which releases it after the last step
        # that reads it (a unary request's bytes stay with gRPC's copy of the request for the call's life anyway).
        inputs.clear()
        streamed_to_the_end = False
        try:
            async for batch in self._hub.watch_batches(execution_id, 0):
                for reply in _replies(reply_type, batch, request.batch_events):
                    yield reply
            streamed_to_the_end = True
        finally:
            # The client went away: cancelled while waiting, or closed at a yield (GeneratorExit).
            if request.cancel_on_disconnect and not streamed_to_the_end:
                task = asyncio.get_running_loop().create_task(self._executor.cancel(execution_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def WatchExecution(
        self, request: pipeline_service_pb2.WatchExecutionRequest, context: Context
    ) -> AsyncIterator[pipeline_service_pb2.WatchExecutionResponse]:
        """Replay then follow."""
        async for batch in self._hub.watch_batches(request.execution_id, request.after_sequence):
            for reply in _replies(pipeline_service_pb2.WatchExecutionResponse, batch, request.batch_events):
                yield reply

    async def GetExecution(
        self, request: pipeline_service_pb2.GetExecutionRequest, context: Context
    ) -> pipeline_service_pb2.GetExecutionResponse:
        """Current state."""
        row, events = await self._executor.get(request.execution_id)
        return pipeline_service_pb2.GetExecutionResponse(execution=execution_message(row, events))

    async def ReadExecutionOutput(
        self, request: pipeline_service_pb2.ReadExecutionOutputRequest, context: Context
    ) -> AsyncIterator[pipeline_service_pb2.ReadExecutionOutputResponse]:
        """An output's bytes in pieces; the first message says how many there are in all."""
        first = True
        async for size, piece in self._hub.read_output(request.execution_id, request.blob_ref, request.offset):
            yield pipeline_service_pb2.ReadExecutionOutputResponse(data=piece, data_bytes=size if first else 0)
            first = False

    async def CancelExecution(
        self, request: pipeline_service_pb2.CancelExecutionRequest, context: Context
    ) -> pipeline_service_pb2.CancelExecutionResponse:
        """Cancel if running; return the state."""
        row, events = await self._executor.cancel_and_report(request.execution_id)
        return pipeline_service_pb2.CancelExecutionResponse(execution=execution_message(row, events))


GO_AHEAD_METADATA = (("imageflow-go-ahead", "1"),)
"""ExecutePipelineUpload's initial metadata: this server answers a head that asks (`await_go_ahead`) with `go_ahead`."""


@dataclass
class _Received:
    """What ExecutePipelineUpload received: the request, its pipeline compiled, its inputs."""

    head: pipeline_service_pb2.ExecutePipelineRequest | None = None
    compiled: CompiledPipeline | None = None
    inputs: dict[str, image_pb2.Image | InputImage] = field(default_factory=dict)
    waiting: bool = False
    """The head asked for the go-ahead and has not had it: the client sends nothing more until it does, so a refusal
    is sent at once (nothing to read first)."""


Reply = TypeVar(
    "Reply",
    pipeline_service_pb2.ExecutePipelineResponse,
    pipeline_service_pb2.ExecutePipelineUploadResponse,
    pipeline_service_pb2.WatchExecutionResponse,
)


def _replies(reply: type[Reply], batch: list[execution_pb2.ExecutionEvent], batched: bool) -> list[Reply]:
    """A batch of events as stream messages: one carrying them all (`batch_events`), else one per event."""
    return [reply(events=batch)] if batched else [reply(event=event) for event in batch]
