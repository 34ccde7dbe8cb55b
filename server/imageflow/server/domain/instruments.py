"""The control plane's traces and metrics, through the OpenTelemetry API only (no-ops until an exporter is set up)."""

from __future__ import annotations

from opentelemetry import metrics, trace

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
kafka_dropped = meter.create_counter(
    "imageflow.kafka.dropped", description="Execution events not delivered to Kafka (buffer full or too large)"
)
