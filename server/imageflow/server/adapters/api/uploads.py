"""ExecutePipelineUpload's inputs: declared up front, received in pieces, each copied into one buffer laid out as the
serialized Image the first tool is sent (its other fields, then `data`), so an input is held once."""

from __future__ import annotations

from dataclasses import dataclass

from imageflow.common.errors import invalid_argument, resource_exhausted
from imageflow.common.pieces import Assembly, PieceError
from imageflow.server.adapters.wire import LENGTH_DELIMITED, encode_varint
from imageflow.server.domain.frames import InputImage
from imageflow.v1 import image_pb2, pipeline_service_pb2

_DATA_KEY = encode_varint(image_pb2.Image.DESCRIPTOR.fields_by_name["data"].number << 3 | LENGTH_DELIMITED)


@dataclass
class Upload:
    """One input being received: its declared fields and its bytes so far."""

    header: image_pb2.Image
    assembly: Assembly


def start_uploads(
    head: pipeline_service_pb2.ExecutePipelineRequest, declared: dict[str, int], limit: int
) -> dict[str, Upload]:
    """A buffer per input, allocated at its declared length. INVALID_ARGUMENT for inline data, an input without a
    length or a length without an input; RESOURCE_EXHAUSTED when the lengths add up to more than `limit`."""
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
    if total > limit:
        raise resource_exhausted(
            "UPLOAD_TOO_LARGE",
            f"the inputs declare {total} bytes, over the limit of {limit} bytes (IMAGEFLOW_MAX_UPLOAD_BYTES)",
        )
    uploads = {}
    for name, image in head.inputs.items():
        prefix = b"".join([image.SerializeToString(), _DATA_KEY, encode_varint(declared[name])])
        uploads[name] = Upload(image, Assembly(declared[name], prefix, mapped=True))
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


def finish_upload(name: str, upload: Upload) -> InputImage:
    """The complete input as the executor holds it; INVALID_ARGUMENT when fewer bytes than declared arrived."""
    try:
        buffer = upload.assembly.result()
    except PieceError as error:
        raise invalid_argument("UPLOAD_LENGTH_MISMATCH", f"input {name!r}: {error}") from None
    data = buffer[len(buffer) - upload.assembly.declared :]
    header = upload.header
    return InputImage(buffer, data, header.media_type, header.width, header.height)
