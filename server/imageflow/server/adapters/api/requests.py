"""Request parsing that keeps image bytes where gRPC put them.

ExecutePipeline carries the pipeline's input images. Parsed the usual way, each input is copied into the message and
copied again when the executor serializes it for the first tool: for an 8K PNG, 36 MB on top of the 18 MB gRPC
received. `parse_execute_request` splits the `inputs` map out at the wire level instead: each input stays a view of
the received bytes (the serialized Image the first tool is sent, and its `data`), and only the rest is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError
from imageflow.common.wire import map_entries, split_field
from imageflow.server.domain.executor import input_image
from imageflow.server.domain.frames import InputImage
from imageflow.v1 import image_pb2, pipeline_service_pb2

EXECUTE_METHOD = "/imageflow.v1.PipelineService/ExecutePipeline"
_INPUTS = pipeline_service_pb2.ExecutePipelineRequest.DESCRIPTOR.fields_by_name["inputs"].number
_DATA = image_pb2.Image.DESCRIPTOR.fields_by_name["data"].number


@dataclass(frozen=True)
class ReceivedExecute:
    """An ExecutePipelineRequest as received: the inputs as views, everything else parsed (`without_inputs`, whose
    own `inputs` is empty)."""

    without_inputs: pipeline_service_pb2.ExecutePipelineRequest
    inputs: dict[str, InputImage]


def parse_execute_request(data: bytes) -> ReceivedExecute:
    """Raises (ValueError, DecodeError) on bytes a protobuf parser refuses. Anything unusual on the wire (an entry
    with extra or repeated fields, a group, an image that does not split cleanly) is parsed in full by protobuf
    instead, so both paths accept and refuse the same requests and see the same inputs."""
    try:
        split = map_entries(data, _INPUTS)
        if split is not None:
            entries, rest = split
            without_inputs = pipeline_service_pb2.ExecutePipelineRequest.FromString(rest)
            inputs: dict[str, InputImage] = {}
            for name, image in entries.items():
                pixels, fields = split_field(image, _DATA)
                header = image_pb2.Image.FromString(fields)  # checks the Image's other fields like a full parse
                inputs[name] = InputImage(image, pixels, header.media_type, header.width, header.height)
            return ReceivedExecute(without_inputs, inputs)
    except (ValueError, DecodeError):
        pass  # protobuf decides, below
    message = pipeline_service_pb2.ExecutePipelineRequest.FromString(data)
    inputs = {name: input_image(image) for name, image in message.inputs.items()}
    message.ClearField("inputs")
    return ReceivedExecute(message, inputs)


REQUEST_PARSERS = {EXECUTE_METHOD: parse_execute_request}
"""Methods whose requests are parsed here instead of by the generated deserializer."""
