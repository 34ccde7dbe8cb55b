"""ExecutePipelineUpload's inputs: declared up front, received in pieces, each copied into one buffer laid out as the
serialized Image the first tool is sent (its other fields, then `data`), so an input is held once.

Bounded three ways: one upload's declared bytes (`max_bytes`), the bytes of every upload being received at once
(`max_in_flight`: the budget is taken when the head is accepted and given back when the inputs go to the execution or
the upload fails), and the time between two messages (`idle_s`). An input the pipeline does not read is counted, not
kept (a one-message request with such an input is accepted and the input ignored; so is this one)."""

from __future__ import annotations

from dataclasses import dataclass

from imageflow.common.errors import ErrorKind, ImageflowError, invalid_argument, resource_exhausted
from imageflow.common.pieces import Assembly, PieceError
from imageflow.common.wire import LENGTH_DELIMITED, encode_varint
from imageflow.server.domain.frames import InputImage
from imageflow.v1 import image_pb2, pipeline_service_pb2

MIB = 1024 * 1024
MIN_RATE = 256 * 1024
"""Bytes per second an upload must average (beyond IMAGEFLOW_UPLOAD_IDLE_S of slack), so a trickle cannot hold the
budget: 256 MiB get 17 minutes."""
MAPPED_FROM_BYTES = MIB
"""Inputs at least this large get a memory map of their own (returned to the system when the frame goes); smaller
ones live in the heap."""
_DATA_KEY = encode_varint(image_pb2.Image.DESCRIPTOR.fields_by_name["data"].number << 3 | LENGTH_DELIMITED)


@dataclass(frozen=True)
class UploadLimits:
    """IMAGEFLOW_MAX_UPLOAD_BYTES, IMAGEFLOW_MAX_UPLOAD_BYTES_IN_FLIGHT, IMAGEFLOW_UPLOAD_IDLE_S."""

    max_bytes: int = 256 * MIB
    max_in_flight: int = 1024 * MIB
    idle_s: float = 30.0


class UploadBudget:
    """The bytes that uploads being received hold, against `max_in_flight` (one event loop: no lock needed)."""

    def __init__(self, limits: UploadLimits) -> None:
        self._limit = limits.max_in_flight
        self.held = 0

    def reserve(self, size: int) -> None:
        """Take `size` bytes; RESOURCE_EXHAUSTED naming the limit when they are not there."""
        if self.held + size > self._limit:
            raise resource_exhausted(
                "UPLOADS_BUSY",
                f"uploads being received hold {self.held} bytes and this one declares {size}: over the limit of "
                f"{self._limit} bytes in flight (IMAGEFLOW_MAX_UPLOAD_BYTES_IN_FLIGHT); retry shortly",
            )
        self.held += size

    def release(self, size: int) -> None:
        """Give back what `reserve` took."""
        self.held -= size


def upload_idle(idle_s: float, too_slow: bool = False, rate: int = 0) -> ImageflowError:
    """DEADLINE_EXCEEDED for a client that stopped sending part-way, or sends slower than `rate` (default MIN_RATE)
    bytes per second on the whole."""
    rate = rate or MIN_RATE
    if too_slow:
        return ImageflowError(
            ErrorKind.DEADLINE_EXCEEDED,
            "UPLOAD_TOO_SLOW",
            f"the upload is slower than {rate // 1024} KiB/s on the whole (its time is "
            f"IMAGEFLOW_UPLOAD_IDLE_S = {idle_s:g} s plus one second per {rate // 1024} KiB declared)",
        )
    return ImageflowError(
        ErrorKind.DEADLINE_EXCEEDED,
        "UPLOAD_IDLE",
        f"no message for {idle_s:g} s in the middle of an upload (IMAGEFLOW_UPLOAD_IDLE_S)",
    )


@dataclass
class Upload:
    """One input being received: its declared fields, and its bytes so far (or only their count, for an input the
    pipeline does not read)."""

    header: image_pb2.Image
    assembly: Assembly
    kept: bool

    @property
    def reserved(self) -> int:
        """The bytes this input holds against the budget."""
        return self.assembly.declared if self.kept else 0


def start_uploads(
    head: pipeline_service_pb2.ExecutePipelineRequest,
    declared: dict[str, int],
    read: tuple[str, ...] | frozenset[str],
    budget: UploadBudget,
    limits: UploadLimits,
) -> dict[str, Upload]:
    """A buffer per input the pipeline reads (`read`), allocated at its declared length, the bytes taken from
    `budget`. INVALID_ARGUMENT for inline data, an input without a length or a length without an input, a length that
    is not positive; RESOURCE_EXHAUSTED when the lengths add up to more than `limits.max_bytes` or the budget is
    spent."""
    for name, image in head.inputs.items():
        if image.data or image.HasField("shared_memory"):
            raise invalid_argument(
                "UPLOAD_INLINE_DATA", f"head.inputs[{name!r}] carries its data: send it in pieces after the head"
            )
        if name not in declared:
            raise invalid_argument(
                "UPLOAD_LENGTH_MISSING", f"input_bytes[{name!r}] is missing: declare every input's length in bytes"
            )
    for name, length in declared.items():
        if name not in head.inputs:
            raise invalid_argument("UPLOAD_UNKNOWN_INPUT", f"input_bytes names {name!r}, which head.inputs does not")
        if length <= 0:
            raise invalid_argument("UPLOAD_BAD_LENGTH", f"input_bytes[{name!r}] is {length}; it must be positive")
    total = sum(declared.values())
    if total > limits.max_bytes:
        raise resource_exhausted(
            "UPLOAD_TOO_LARGE",
            f"the inputs declare {total} bytes, over the limit of {limits.max_bytes} bytes (IMAGEFLOW_MAX_UPLOAD_BYTES)",
        )
    kept = {name for name in head.inputs if name in read}
    reserved = sum(declared[name] for name in kept)
    budget.reserve(reserved)
    try:
        uploads = {}
        for name, image in head.inputs.items():
            if name in kept:
                prefix = b"".join([image.SerializeToString(), _DATA_KEY, encode_varint(declared[name])])
                assembly = Assembly(declared[name], prefix, mapped=declared[name] >= MAPPED_FROM_BYTES)
            else:
                assembly = Assembly(declared[name], counting=True)
            uploads[name] = Upload(image, assembly, name in kept)
    except OSError as error:  # the system refused the memory
        budget.release(reserved)
        raise resource_exhausted("UPLOAD_NO_MEMORY", f"cannot allocate the inputs' {reserved} bytes: {error}") from None
    except BaseException:
        budget.release(reserved)
        raise
    return uploads


def add_piece(uploads: dict[str, Upload], name: str, data: bytes) -> None:
    """Copy the next piece of input `name` into place; INVALID_ARGUMENT for an unknown input or one past its
    declared length."""
    upload = uploads.get(name)
    if upload is None:
        raise invalid_argument("UPLOAD_UNKNOWN_INPUT", f"a piece names input {name!r}, which head.inputs does not")
    try:
        upload.assembly.add(data)
    except PieceError as error:
        raise invalid_argument("UPLOAD_LENGTH_MISMATCH", f"input {name!r}: {error}") from None


def finish_uploads(uploads: dict[str, Upload]) -> dict[str, InputImage]:
    """The complete inputs the pipeline reads, as the executor holds them; INVALID_ARGUMENT when any input got fewer
    bytes than declared."""
    done = {}
    for name, upload in uploads.items():
        try:
            buffer = upload.assembly.result()
        except PieceError as error:
            raise invalid_argument("UPLOAD_LENGTH_MISMATCH", f"input {name!r}: {error}") from None
        if upload.kept:
            data = buffer[len(buffer) - upload.assembly.declared :]
            header = upload.header
            done[name] = InputImage(buffer, data, header.media_type, header.width, header.height)
    return done
