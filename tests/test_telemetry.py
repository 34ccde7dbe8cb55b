"""OpenTelemetry: an execution leaves a trace (execution span, one span per step attempt) and metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import sample


@pytest.fixture(scope="module")
def telemetry() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)  # the executor's proxy tracer starts recording here
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    yield spans, reader


async def test_execution_trace_and_metrics(pipelines, telemetry) -> None:  # type: ignore[no-untyped-def]
    spans, reader = telemetry
    pipeline = pipeline_pb2.Pipeline(name="otel")
    pipeline.steps.add(id="gray", tool="grayscale")
    pipeline.steps.add(id="flip", tool="flip", depends_on=["gray"]).params.update({"direction": "horizontal"})
    events, finished, root = await _execute(pipelines, spans, pipeline)
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert root.attributes["imageflow.state"] == "SUCCEEDED"
    # grayscale (filter) -> flip (resize) on the embedded tools is one chain: the execution's child is the chain's
    # span, and each step has its own span under it, timed by the step's duration
    chains = [
        s
        for s in finished
        if s.name == "imageflow.chain" and s.parent is not None and s.parent.span_id == root.context.span_id
    ]
    assert [s.attributes["imageflow.chain"] for s in chains] == ["gray,flip"]
    steps = [
        s
        for s in finished
        if s.name == "imageflow.step" and s.parent is not None and s.parent.span_id == chains[0].context.span_id
    ]
    assert sorted(s.attributes["imageflow.step_id"] for s in steps) == ["flip", "gray"]
    gray, flip = sorted(steps, key=lambda s: s.start_time or 0)
    # laid end to end from the chain's start, in order, each as long as the step took, within the chain's span
    assert gray.attributes["imageflow.step_id"] == "gray" and gray.end_time == flip.start_time
    assert chains[0].start_time <= gray.start_time and flip.end_time <= chains[0].end_time  # type: ignore[operator]
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"imageflow.executions.finished", "imageflow.step.duration"} <= names


async def test_a_step_failing_inside_a_chain_gets_an_error_span(pipelines, telemetry) -> None:  # type: ignore[no-untyped-def]
    spans, _ = telemetry
    pipeline = pipeline_pb2.Pipeline(name="otel-fail")
    pipeline.steps.add(id="gray", tool="grayscale")
    # over the pixel limit at run time (the input's size is not known when compiling): the chain's second step fails
    pipeline.steps.add(id="huge", tool="resize", depends_on=["gray"]).params.update({"width": 60000})
    events, finished, root = await _execute(pipelines, spans, pipeline)
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED
    chain = next(s for s in finished if s.name == "imageflow.chain" and s.parent and s.parent.span_id == root.context.span_id)
    steps = {s.attributes["imageflow.step_id"]: s for s in finished
             if s.name == "imageflow.step" and s.parent and s.parent.span_id == chain.context.span_id}  # fmt: skip
    assert set(steps) == {"gray", "huge"}
    assert steps["gray"].status.is_ok and not steps["huge"].status.is_ok
    assert steps["huge"].attributes["rpc.grpc.status_code"] == "RESOURCE_EXHAUSTED"
    assert steps["gray"].end_time == steps["huge"].start_time


async def _execute(pipelines, spans, pipeline):  # type: ignore[no-untyped-def]
    """Run `pipeline` on the sample; its events, the finished spans and its execution's root span."""
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=pipeline, inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
    )
    events = [reply.event async for reply in pipelines.ExecutePipeline(request)]
    finished = spans.get_finished_spans()
    execution_id = events[0].execution_id
    root = next(
        s for s in finished if s.name == "imageflow.execution" and s.attributes["imageflow.execution_id"] == execution_id
    )
    return events, finished, root
