"""OpenTelemetry export: OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set (the instruments live in domain/instruments)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from opentelemetry import metrics, trace

log = logging.getLogger(__name__)


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
