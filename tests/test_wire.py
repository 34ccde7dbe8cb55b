"""The wire splicing the executor relies on agrees with protobuf itself."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters.wire import image_header, length_delimited, split_field
from imageflow.v1 import image_pb2, tool_service_pb2


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
