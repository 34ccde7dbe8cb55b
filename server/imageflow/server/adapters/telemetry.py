"""OpenTelemetry traces and metrics: API calls everywhere (no-ops until configured), OTLP export when asked."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from opentelemetry import metrics, trace

log = logging.getLogger(__name__)

tracer = trace.get_tracer("imageflow.server")
meter = metrics.get_meter("imageflow.server")

executions_finished = meter.create_counter(
    "imageflow.executions.finished", description="Executions that reached a final state, by state"
)
step_duration = meter.create_histogram(
    "imageflow.step.duration", unit="s", description="Duration of successful step attempts, by tool"
)
step_retries = meter.create_counter("imageflow.step.retries", description="Step attempts retried, by tool and code")
step_failures = meter.create_counter("imageflow.step.failures", description="Steps failed for good, by tool and code")


def configure_from_environment(service_name: str = "imageflow-server") -> Callable[[], None]:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, export traces and metrics over OTLP/gRPC; returns a shutdown hook."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return lambda: None
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
    )
    metrics.set_meter_provider(meter_provider)
    log.info("OpenTelemetry export to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])

    def shutdown() -> None:
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return shutdown
