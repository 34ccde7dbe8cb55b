"""Domain errors: a stable reason, a public message and optional field violations (no grpc here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

SIZE_LIMIT_REASONS = frozenset({"IMAGE_TOO_LARGE", "IMAGE_TOO_MANY_PIXELS", "OUTPUT_TOO_MANY_PIXELS"})
"""RESOURCE_EXHAUSTED reasons that a retry cannot cure: the input or the requested output is over a size limit."""


class ErrorKind(enum.Enum):
    """What went wrong, independent of the transport; the API edge maps each kind to one status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field, named by its path (e.g. ``steps[1].params.scale``)."""

    field: str
    description: str


@dataclass
class ImageflowError(Exception):
    """Base of every error whose message may be shown to a caller."""

    kind: ErrorKind
    reason: str
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def invalid_argument(reason: str, message: str, violations: list[FieldViolation] | None = None) -> ImageflowError:
    """A caller sent something unusable."""
    return ImageflowError(ErrorKind.INVALID_ARGUMENT, reason, message, violations or [])


def not_found(reason: str, message: str) -> ImageflowError:
    """The named thing does not exist."""
    return ImageflowError(ErrorKind.NOT_FOUND, reason, message)


def already_exists(reason: str, message: str) -> ImageflowError:
    """The thing to create exists already."""
    return ImageflowError(ErrorKind.ALREADY_EXISTS, reason, message)


def failed_precondition(reason: str, message: str) -> ImageflowError:
    """The system is not in a state that allows the operation."""
    return ImageflowError(ErrorKind.FAILED_PRECONDITION, reason, message)


def unavailable(reason: str, message: str) -> ImageflowError:
    """A dependency cannot be reached right now; retrying may help."""
    return ImageflowError(ErrorKind.UNAVAILABLE, reason, message)


def resource_exhausted(reason: str, message: str) -> ImageflowError:
    """A size or concurrency limit was hit."""
    return ImageflowError(ErrorKind.RESOURCE_EXHAUSTED, reason, message)


def unauthenticated(reason: str, message: str) -> ImageflowError:
    """The caller sent no credentials, or ones that do not verify."""
    return ImageflowError(ErrorKind.UNAUTHENTICATED, reason, message)


def permission_denied(reason: str, message: str) -> ImageflowError:
    """The caller is known but its role does not allow the operation."""
    return ImageflowError(ErrorKind.PERMISSION_DENIED, reason, message)
