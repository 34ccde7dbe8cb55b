"""Execution states as the API defines them (shared by the control plane and its clients)."""

from __future__ import annotations

from imageflow.v1 import execution_pb2

TERMINAL_STATES = frozenset(
    {
        execution_pb2.EXECUTION_STATE_SUCCEEDED,
        execution_pb2.EXECUTION_STATE_PARTIALLY_SUCCEEDED,
        execution_pb2.EXECUTION_STATE_FAILED,
        execution_pb2.EXECUTION_STATE_CANCELLED,
    }
)
"""States an execution never leaves."""
