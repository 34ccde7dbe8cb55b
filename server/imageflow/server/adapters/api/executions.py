"""Execution summaries rebuilt from stored events."""

from __future__ import annotations

from imageflow.server.domain.store import ExecutionRow
from imageflow.v1 import execution_pb2

S = execution_pb2


def execution_message(row: ExecutionRow, events: list[execution_pb2.ExecutionEvent]) -> execution_pb2.Execution:
    """The Execution message: state from the row, per-step states and outputs from the events."""
    message = S.Execution(
        id=row.execution_id,
        pipeline_id=row.pipeline_id,
        pipeline_version=row.pipeline_version,
        state=S.ExecutionState.Value("EXECUTION_STATE_" + row.state),
        last_sequence=row.last_sequence,
        request_id=row.request_id or "",
        message=row.message,
        created_by=row.created_by,
    )
    message.create_time.FromDatetime(row.created_at)
    if row.finished_at is not None:
        message.finish_time.FromDatetime(row.finished_at)
    steps: dict[str, execution_pb2.StepStatus] = {}
    for event in events:
        kind = event.WhichOneof("kind")
        if kind == "execution_started":
            for step_id in event.execution_started.step_ids:
                steps[step_id] = S.StepStatus(step_id=step_id, state=S.STEP_STATE_PENDING)
        elif kind == "step_started":
            status = steps.setdefault(event.step_started.step_id, S.StepStatus(step_id=event.step_started.step_id))
            status.state = S.STEP_STATE_RUNNING
            status.attempts = event.step_started.attempt
        elif kind == "step_succeeded":
            steps[event.step_succeeded.step_id].state = S.STEP_STATE_SUCCEEDED
        elif kind == "step_failed":
            status = steps.setdefault(event.step_failed.step_id, S.StepStatus(step_id=event.step_failed.step_id))
            status.state = S.STEP_STATE_FAILED
            status.message = f"{event.step_failed.code}: {event.step_failed.message}"
        elif kind == "step_skipped":
            status = steps.setdefault(event.step_skipped.step_id, S.StepStatus(step_id=event.step_skipped.step_id))
            status.state = S.STEP_STATE_SKIPPED
            status.message = event.step_skipped.reason
        elif kind == "execution_finished":
            message.outputs.extend(event.execution_finished.outputs)
    message.steps.extend(steps.values())
    return message
