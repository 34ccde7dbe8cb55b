"""Execution outputs larger than a message: which images travel without their bytes (`Image.data_bytes` set,
`data` empty), and reading those bytes back in pieces (ReadExecutionOutput).

The rule is the same live and in replays: while the finished event would be larger than the limit, the largest output
image is left out. Its bytes are stored like any output's; the client reads them by `blob_ref`. Detections and
metadata cannot be left out: when they alone are over the limit, the outputs are dropped and the execution fails,
naming the limit and the size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from imageflow.common.errors import invalid_argument, not_found
from imageflow.server.domain.store import Store
from imageflow.v1 import execution_pb2

RESULT_SLACK_BYTES = 64 * 1024
"""Room left in a message for what wraps the finished event (the stream response; GetExecution adds up to 64 step
states, with their messages)."""
DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024 - RESULT_SLACK_BYTES
"""The largest finished event a stream message or GetExecution carries at gRPC's default-sized 64 MiB limit."""
OUTPUT_PIECE_BYTES = 1024 * 1024
"""The most bytes one ReadExecutionOutput message carries."""
_FIXED_BYTES = 64
"""The finished event's state, duration and tags."""
_REF_BYTES = 2 + 200 + 11
"""An image's `blob_ref` (at most 200 characters) and `data_bytes`, counted whether set yet or not: the live event
(before the log names its blobs) and a replay measure alike."""


def _base_size(output: execution_pb2.StepOutput) -> int:
    """What `output.ByteSize()` says without the image's bytes, give or take a few bytes, without encoding anything
    large (upb measures a message by encoding it: a 1.3 ms copy for a 6 MB image, and a buffer as large)."""
    image = output.image
    size = 48 + len(output.step_id) + len(image.media_type) + _REF_BYTES + image.shared_memory.ByteSize()
    for detection in output.detections:  # each a tag, a length and the message
        length = detection.ByteSize()
        size += 1 + (length.bit_length() + 6) // 7 + length
    return size


def _base(finished: execution_pb2.ExecutionFinished) -> int:
    """The finished event's size without its images' bytes (see `_base_size`)."""
    return sum(_base_size(output) for output in finished.outputs) + len(finished.message.encode()) + _FIXED_BYTES


def _kept(base: int, lengths: list[int], limit: int) -> set[int]:
    """Which images (by output index; length 0 = none) travel with their bytes: the smallest first, ties in output
    order, while the event stays within `limit`. The one rule for the live event and for replays."""
    kept: set[int] = set()
    room = limit - base
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if lengths[index] > room:
            break
        kept.add(index)
        room -= lengths[index]
    return kept


def fit_result(finished: execution_pb2.ExecutionFinished, limit: int) -> None:
    """Make a just-finished execution's result fit `limit`: the largest images are marked left out (`data_bytes` set;
    `data` stays until the log has stored it, then goes from what is sent). If detections and metadata alone are over
    the limit, the outputs are dropped, naming the limit, the size and the largest outputs, and an execution that
    would have succeeded fails (a cancelled or failed one keeps its state and its reason)."""
    base = _base(finished)
    lengths = [len(output.image.data) for output in finished.outputs]  # each a copy (upb): measured once
    if base + sum(lengths) <= limit:
        return
    if base <= limit:
        kept = _kept(base, lengths, limit)
        for index, output in enumerate(finished.outputs):
            if lengths[index] and index not in kept:
                output.image.data_bytes = lengths[index]
        return
    largest = sorted(((_base_size(o), o.step_id) for o in finished.outputs), reverse=True)[:3]
    sizes = ", ".join(f"{step_id!r} {bytes_} bytes" for bytes_, step_id in largest)
    refusal = (
        f"RESOURCE_EXHAUSTED: the result is {base} bytes without its images (outputs {sizes}), over the limit of "
        f"{limit} bytes one message may carry (IMAGEFLOW_MAX_MESSAGE_BYTES): fewer detections, or raise the limit on "
        "the server and its clients"
    )
    if finished.state in (
        execution_pb2.EXECUTION_STATE_SUCCEEDED,
        execution_pb2.EXECUTION_STATE_PARTIALLY_SUCCEEDED,
    ):
        finished.state, finished.message = execution_pb2.EXECUTION_STATE_FAILED, refusal
    else:
        finished.message = f"{finished.message}; {refusal}"
    del finished.outputs[:]


async def fill_outputs(store: Store, execution_id: str, finished: execution_pb2.ExecutionFinished, limit: int) -> None:
    """A stored finished event's output images get their bytes back from the store by the rule the live event
    followed (`_kept`); the others keep `data_bytes` (read them with ReadExecutionOutput). An output past its
    retention gets neither: its `blob_ref` stays, and `data` and `data_bytes` are empty. Only this execution's blobs
    are read."""
    own = f"{execution_id}/"
    images = [output.image for output in finished.outputs]
    wanted = [i for i, image in enumerate(images) if image.blob_ref.startswith(own) and not image.data]
    if not wanted:
        return
    fetched: dict[str, bytes] = {}
    unmeasured = [images[i] for i in wanted if not images[i].data_bytes]  # stored before sizes were: read to measure
    if unmeasured:
        fetched = await store.get_blobs([image.blob_ref for image in unmeasured])
        for image in unmeasured:
            if image.blob_ref in fetched:
                image.data_bytes = len(fetched[image.blob_ref])
    base = _base(finished)
    lengths = [image.data_bytes if i in wanted else 0 for i, image in enumerate(images)]
    kept = _kept(base, lengths, limit) & set(wanted)
    missing = [images[i].blob_ref for i in kept if images[i].blob_ref not in fetched and lengths[i]]
    if missing:
        fetched.update(await store.get_blobs(missing))
    for i in wanted:
        image = images[i]
        if i in kept and image.blob_ref in fetched:
            image.data = fetched[image.blob_ref]
            image.ClearField("data_bytes")
        elif image.data_bytes and (
            i in kept or await store.read_blob(execution_id, image.blob_ref, 0, 0) is None
        ):  # past its retention
            image.ClearField("data_bytes")


async def read_output(
    store: Store, execution_id: str, blob_ref: str, offset: int, piece_bytes: int = OUTPUT_PIECE_BYTES
) -> AsyncIterator[tuple[int, bytes]]:
    """An output's bytes from `offset`, in pieces of at most `piece_bytes`, each with the output's whole length.
    INVALID_ARGUMENT for an empty id or ref, a negative offset or one past the end; NOT_FOUND for an unknown execution
    or an output it does not have (or no longer has: past its retention)."""
    if not execution_id:
        raise invalid_argument("EXECUTION_ID_MISSING", "execution_id is required")
    if not blob_ref:
        raise invalid_argument("BLOB_REF_MISSING", "blob_ref is required: the output image's `blob_ref`")
    if offset < 0:
        raise invalid_argument("OFFSET_INVALID", f"offset must not be negative; got {offset}")
    position = offset
    while True:
        got = await store.read_blob(execution_id, blob_ref, position, piece_bytes)
        if got is None:
            if position == offset and await store.get_execution(execution_id) is None:
                raise not_found("EXECUTION_NOT_FOUND", f"execution {execution_id[:80]!r} does not exist")
            raise not_found(
                "OUTPUT_NOT_FOUND",
                f"execution {execution_id[:80]!r} has no output {blob_ref[:200]!r}: not one of its outputs' blob_ref, "
                "or dropped after the retention (IMAGEFLOW_OUTPUT_RETENTION_S)",
            )
        size, data = got
        if position > size:
            raise invalid_argument("OFFSET_PAST_END", f"offset {offset} is past the end of the output ({size} bytes)")
        yield size, data
        position += len(data)
        if position >= size or not data:
            return
