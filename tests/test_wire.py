"""The wire splicing the executor relies on agrees with protobuf itself."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from imageflow.common.structs import dict_to_struct
from imageflow.common.wire import length_delimited, split_field
from imageflow.server.adapters.api.requests import parse_execute_request
from imageflow.server.adapters.wire import image_header
from imageflow.tools.servicer import Spliced, receiver, sender
from imageflow.v1 import image_pb2, pipeline_service_pb2, tool_service_pb2


@given(
    data=st.binary(max_size=5000),
    media_type=st.sampled_from(["", "image/png", "image/x-raw-rgb8"]),
    width=st.integers(0, 2**31 - 1),
    height=st.integers(0, 2**31 - 1),
    labels=st.lists(st.text(max_size=10), max_size=3),
)
def test_split_and_splice_round_trip(data: bytes, media_type: str, width: int, height: int, labels: list[str]) -> None:
    image = image_pb2.Image(data=data, media_type=media_type, width=width, height=height)
    response = tool_service_pb2.ProcessResponse(
        image=image,
        detections=[image_pb2.Detection(label=label, score=0.5) for label in labels],
        metadata=dict_to_struct({"k": 1}),
    )
    sliced, rest = split_field(response.SerializeToString(), 1)
    assert image_pb2.Image.FromString(bytes(sliced)) == image
    header = image_header(sliced)
    assert (header.media_type, header.width, header.height) == (media_type, width, height)
    small = tool_service_pb2.ProcessResponse.FromString(rest)
    assert not small.HasField("image") and [d.label for d in small.detections] == labels
    request = tool_service_pb2.ProcessRequest(tool="blur", output_media_type="image/x-raw")
    spliced = tool_service_pb2.ProcessRequest.FromString(
        b"".join([request.SerializeToString(), *length_delimited(3, sliced)])
    )
    assert spliced.image == image and spliced.tool == "blur"


images = st.builds(
    image_pb2.Image,
    data=st.binary(max_size=3000),
    media_type=st.sampled_from(["", "image/png", "image/x-raw-rgb8"]),
    width=st.integers(0, 2**31 - 1),
    height=st.integers(0, 2**31 - 1),
)


@given(
    inputs=st.dictionaries(st.text(max_size=12), images, max_size=4),
    request_id=st.text(max_size=20),
    omit=st.booleans(),
    batch=st.booleans(),
)
def test_execute_requests_parse_like_protobuf_with_inputs_left_in_place(
    inputs: dict[str, image_pb2.Image], request_id: str, omit: bool, batch: bool
) -> None:
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline_id="pl_1", inputs=inputs, request_id=request_id, omit_step_events=omit, batch_events=batch
    )
    received_bytes = request.SerializeToString()
    received = parse_execute_request(received_bytes)
    assert received.without_inputs == pipeline_service_pb2.ExecutePipelineRequest(
        pipeline_id="pl_1", request_id=request_id, omit_step_events=omit, batch_events=batch
    )
    assert set(received.inputs) == set(inputs)
    for name, image in inputs.items():
        held = received.inputs[name]
        assert image_pb2.Image.FromString(bytes(held.serialized)) == image
        assert (bytes(held.data), held.media_type, held.width, held.height) == (
            image.data,
            image.media_type,
            image.width,
            image.height,
        )
        # views of the received bytes, not copies
        assert isinstance(held.serialized, memoryview) and held.serialized.obj is received_bytes
        assert isinstance(held.data, memoryview) and held.data.obj is received_bytes


def test_a_repeated_input_key_keeps_the_last_value_as_protobuf_does() -> None:
    first = pipeline_service_pb2.ExecutePipelineRequest(inputs={"image": image_pb2.Image(data=b"first")})
    second = pipeline_service_pb2.ExecutePipelineRequest(inputs={"image": image_pb2.Image(data=b"second")})
    wire = first.SerializeToString() + second.SerializeToString()  # concatenated messages merge
    assert pipeline_service_pb2.ExecutePipelineRequest.FromString(wire).inputs["image"].data == b"second"
    assert bytes(parse_execute_request(wire).inputs["image"].data) == b"second"


@pytest.mark.parametrize(
    "wire",
    [
        pipeline_service_pb2.ExecutePipelineRequest(
            inputs={"image": image_pb2.Image(data=b"x" * 100)}
        ).SerializeToString()[:-10],  # truncated inside the image
        b"\x22\x06\x0a\x02\xff\xfe\x12\x00",  # inputs entry whose key is not UTF-8
        b"\x22\x04\x12\x02\x12\x01",  # an image whose media_type field is cut short
        b"\x0f",  # a wire type that does not exist
    ],
)
def test_bytes_protobuf_refuses_are_refused(wire: bytes) -> None:
    with pytest.raises((ValueError, DecodeError)):
        pipeline_service_pb2.ExecutePipelineRequest.FromString(wire)
    with pytest.raises((ValueError, DecodeError)):
        parse_execute_request(wire)


def _entry(*parts: bytes) -> bytes:
    body = b"".join(parts)
    return b"\x22" + bytes([len(body)]) + body


IMAGE_X = image_pb2.Image(data=b"x").SerializeToString()
IMAGE_PNG = image_pb2.Image(media_type="image/png").SerializeToString()


@pytest.mark.parametrize(
    "wire",
    [
        _entry(b"\x0a\x01a", b"\x12" + bytes([len(IMAGE_X)]) + IMAGE_X) + b"\x19\x00",  # a fixed64 cut short
        _entry(b"\x0a\x01a", b"\x12" + bytes([len(IMAGE_X)]) + IMAGE_X, b"\x18\x07"),  # unknown field in the entry
        _entry(b"\x0a\x01a", b"\x12" + bytes([len(IMAGE_X)]) + IMAGE_X, b"\x12" + bytes([len(IMAGE_PNG)]) + IMAGE_PNG),
        _entry(b"\x0a\x01a", b"\x10\x05"),  # the value sent as a varint
        _entry(b"\x0a\x01a", b"\x12\x05\x0a\x01x\x1b\x1c"),  # a group inside the image
        _entry(b"\x0a\x01a", b"\x12" + bytes([len(IMAGE_X)]) + IMAGE_X) + b"\x2b\x2c",  # a group at the top level
        b"\x02\x00",  # field number 0
        _entry(b"\x0a\x01a"),  # a key without a value
    ],
)
def test_unusual_wire_data_gets_what_protobuf_gives(wire: bytes) -> None:
    """Whatever protobuf makes of odd bytes (refuse, merge, drop, keep as unknown), the inputs parser makes too."""
    try:
        expected = pipeline_service_pb2.ExecutePipelineRequest.FromString(wire)
    except DecodeError:
        with pytest.raises((ValueError, DecodeError)):
            parse_execute_request(wire)
        return
    received = parse_execute_request(wire)
    assert {name: image_pb2.Image.FromString(bytes(held.serialized)) for name, held in received.inputs.items()} == dict(
        expected.inputs
    )
    for name, held in received.inputs.items():
        assert bytes(held.data) == expected.inputs[name].data
    expected.ClearField("inputs")
    assert received.without_inputs.SerializeToString() == expected.SerializeToString()


chain_steps = st.lists(st.builds(tool_service_pb2.ChainStep, tool=st.sampled_from(["blur", "flip"])), max_size=2)


@pytest.mark.parametrize("message_type", [tool_service_pb2.ProcessRequest, tool_service_pb2.ProcessChainRequest])
@given(image=images, split=st.booleans(), omit=st.booleans(), steps=chain_steps)
def test_a_tool_takes_a_request_apart_as_protobuf_parses_it(
    message_type: type[tool_service_pb2.ProcessRequest | tool_service_pb2.ProcessChainRequest],
    image: image_pb2.Image,
    split: bool,
    omit: bool,
    steps: list[tool_service_pb2.ChainStep],
) -> None:
    fields = {"steps": steps} if message_type is tool_service_pb2.ProcessChainRequest else {"tool": "blur"}
    request = message_type(output_media_type="image/x-raw", omit_output_image=omit, **fields)  # type: ignore[arg-type]
    wire = request.SerializeToString()
    number = message_type.DESCRIPTOR.fields_by_name["image"].number
    if split:  # the image as two occurrences, its data first: protobuf merges them
        rest = image_pb2.Image()
        rest.CopyFrom(image)
        rest.ClearField("data")
        wire += b"".join(
            [*length_delimited(number, image_pb2.Image(data=image.data).SerializeToString()),
             *length_delimited(number, rest.SerializeToString())]
        )  # fmt: skip
    else:
        wire += b"".join(length_delimited(number, image.SerializeToString()))
    received = receiver(message_type)(wire)
    whole = message_type()
    whole.CopyFrom(received.request)
    if received.data:
        whole.image.data = bytes(received.data)
    assert whole == message_type.FromString(wire)
    if not split and image.data:  # a view of the received bytes, not a copy
        assert isinstance(received.data, memoryview) and received.data.obj is wire
        assert received.request.image.data == b""


@pytest.mark.parametrize("message_type", [tool_service_pb2.ProcessResponse, tool_service_pb2.ProcessChainResponse])
@given(image=images, failed=st.booleans())
def test_a_tool_splices_its_response_as_protobuf_serializes_it(
    message_type: type[tool_service_pb2.ProcessResponse | tool_service_pb2.ProcessChainResponse],
    image: image_pb2.Image,
    failed: bool,
) -> None:
    response = message_type()
    response.image.CopyFrom(image)
    if message_type is tool_service_pb2.ProcessChainResponse:
        response.results.add(width=image.width, media_type="image/png")
        if failed:
            response.failure.CopyFrom(tool_service_pb2.ChainFailure(step_index=1, code="INVALID_ARGUMENT"))
    else:
        response.detections.add(label="face", score=0.5)
    apart = message_type()
    apart.CopyFrom(response)
    apart.image.ClearField("data")
    kept = message_type()
    kept.CopyFrom(apart)
    out = Spliced(apart, image.data)
    wire = sender(message_type)(out)
    assert message_type.FromString(wire) == response
    assert apart == kept and sender(message_type)(out) == wire  # the response is left as it was
    sliced, _ = split_field(wire, 1)  # the control plane's reader: the image's last occurrence is all of it
    assert image_pb2.Image.FromString(bytes(sliced)) == image


@pytest.mark.parametrize(
    "wire",
    [
        tool_service_pb2.ProcessRequest(image=image_pb2.Image(data=b"x" * 100)).SerializeToString()[:-10],  # cut short
        b"\x1a\x02\x12\x01",  # an image whose media_type field is cut short
        b"\x0f",  # a wire type that does not exist
        b"\x1a\x03\x0a\x01x\x2b\x2c",  # a group after the image
        b"\x9a\x80\x80\x80\x80\x00\x03\x0a\x01x",  # the image's key in six bytes (protobuf takes five at most)
        b"\x1a\x08\x8a\x80\x80\x80\x80\x00\x01x",  # the same for the data's key inside the image
        b"\x1a\x03\x12\x01\xff",  # a media type that is not UTF-8: refused by the parse of the image's other fields
        b"\x0a\x01\xff\x1a\x03\x0a\x01x",  # a tool name that is not UTF-8: refused by the parse of the rest
        b"\x1a\x05\x0a\x01x\x28\x07\x1a\x02\x0a\x00",  # unknown fields, a repeated data, then a second image
        b"\x1a\x06\x0a\x01x\x0a\x01y",  # the data twice in one image: the last counts
        b"\x52\x02\x08\x01\x1a\x03\x0a\x01x",  # an unknown field before the image, kept
    ],
)
def test_bytes_protobuf_refuses_a_tool_refuses(wire: bytes) -> None:
    try:
        expected = tool_service_pb2.ProcessRequest.FromString(wire)
    except DecodeError:
        with pytest.raises((ValueError, DecodeError)):
            receiver(tool_service_pb2.ProcessRequest)(wire)
        return
    received = receiver(tool_service_pb2.ProcessRequest)(wire)  # accepted by protobuf: the same message
    whole = tool_service_pb2.ProcessRequest()
    whole.CopyFrom(received.request)
    if received.data:
        whole.image.data = bytes(received.data)
    assert whole == expected
