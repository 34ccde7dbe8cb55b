"""Triton models as pipeline tools: import image-to-image models from a Triton server and run them as steps
(executor -> Triton ModelInfer over the shared channel pool, raw UINT8 HWC tensors)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
from imageflow.common.errors import ImageflowError, failed_precondition, unavailable
from imageflow.common.media import RAW_ANY, RAW_TYPES
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters.transport import ChannelPool
from imageflow.server.domain.executor import ToolCallError, ToolResult
from imageflow.server.domain.frames import Frame, ImageHeader, inline
from imageflow.v1 import image_pb2, tool_pb2, tool_service_pb2

if TYPE_CHECKING:  # numpy, tritonclient and the imaging code load on first use (the `triton` extra)
    from imageflow.tools.imaging import ImageLimits
    from tritonclient.grpc import service_pb2, service_pb2_grpc

EMPTY_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}


def _is_image_tensor(tensor: service_pb2.ModelMetadataResponse.TensorMetadata) -> bool:
    """UINT8, height x width x 3 (RGB)."""
    return tensor.datatype == "UINT8" and len(tensor.shape) == 3 and tensor.shape[2] in (3, -1)


class TritonModels:
    """Reads a Triton repository and calls its image models; every channel comes from the shared pool."""

    def __init__(self, pool: ChannelPool, limits: ImageLimits | None = None) -> None:
        self._pool = pool
        self._limits = limits
        self._tensors: dict[tuple[str, str], tuple[str, str]] = {}

    def _stub(self, address: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
        from tritonclient.grpc import service_pb2_grpc

        return service_pb2_grpc.GRPCInferenceServiceStub(self._pool.channel(address))

    async def image_models(self, address: str, names: list[str]) -> list[tool_pb2.Tool]:
        """Manifests for the ready models whose input and output are RGB image tensors."""
        from tritonclient.grpc import service_pb2

        stub = self._stub(address)
        try:
            index = await stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
            tools = []
            for model in index.models:
                if names and model.name not in names:
                    continue
                metadata = await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model.name), timeout=10)
                if len(metadata.inputs) != 1 or not _is_image_tensor(metadata.inputs[0]):
                    continue
                outputs = [o for o in metadata.outputs if _is_image_tensor(o)]
                if not outputs:
                    continue
                config = await stub.ModelConfig(service_pb2.ModelConfigRequest(name=model.name), timeout=10)
                parameters = config.config.parameters
                description_ja = parameters["description_ja"].string_value if "description_ja" in parameters else ""
                description_en = parameters["description_en"].string_value if "description_en" in parameters else ""
                phrases = parameters["phrases_ja"].string_value.split(",") if "phrases_ja" in parameters else []
                self._tensors[(address, model.name)] = (metadata.inputs[0].name, outputs[0].name)
                tools.append(
                    tool_pb2.Tool(
                        name=model.name,
                        version=model.version or "1",
                        description_ja=description_ja or f"Triton モデル {model.name}（画像 → 画像）",
                        description_en=description_en or f"Triton model {model.name} (image to image)",
                        params_schema=dict_to_struct(EMPTY_SCHEMA),
                        inputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)],
                        outputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE)],
                        phrases_ja=[p.strip() for p in phrases if p.strip()][:20],
                    )
                )
        except grpc.aio.AioRpcError as error:
            raise unavailable(
                "TRITON_UNREACHABLE", f"cannot read the Triton repository at {address}: {error.code().name}"
            ) from None
        if not tools:
            raise failed_precondition(
                "NO_IMAGE_MODELS", f"Triton at {address} serves no ready model with an RGB image input and output"
            )
        return tools

    async def _tensor_names(self, address: str, model: str) -> tuple[str, str]:
        names = self._tensors.get((address, model))
        if names is None:
            await self.image_models(address, [model])
            names = self._tensors[(address, model)]
        return names

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image_bytes: Frame, timeout_s: float
    ) -> ToolResult:
        """One step: decode if needed, ModelInfer with raw bytes, encode as asked."""
        import numpy as np
        from imageflow.tools.imaging import ImageLimits, decode, encode, encoded_type, to_rgb
        from tritonclient.grpc import service_pb2

        if self._limits is None:
            self._limits = ImageLimits()
        source = image_pb2.Image.FromString(bytes(inline(image_bytes)))
        try:
            image = await asyncio.to_thread(
                decode,
                source.data,
                source.media_type,
                source.width,
                source.height,
                self._limits,
            )
            pixels = to_rgb(image.pixels)
            input_name, output_name = await self._tensor_names(address, request.tool)
        except ImageflowError as error:
            raise ToolCallError(error.kind.value, error.message) from None
        infer = service_pb2.ModelInferRequest(model_name=request.tool)
        infer.inputs.add(name=input_name, datatype="UINT8", shape=list(pixels.shape))
        infer.outputs.add(name=output_name)
        infer.raw_input_contents.append(np.ascontiguousarray(pixels).tobytes())
        try:
            response = await self._stub(address).ModelInfer(infer, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise ToolCallError(error.code().name, f"Triton: {error.details() or ''}"[:500]) from None
        shape = list(response.outputs[0].shape)
        output = np.frombuffer(response.raw_output_contents[0], dtype=np.uint8).reshape(shape)
        wanted = request.output_media_type or image.source_media_type
        if not request.output_media_type and wanted in RAW_TYPES:
            wanted = RAW_ANY  # the input's own kind: raw, in the model output's channel count
        if request.omit_output_image:  # nobody reads this step's image: its type and size alone
            data, media_type = b"", encoded_type(output, wanted)
        else:
            data, media_type = await asyncio.to_thread(encode, output, wanted, request.output_quality)
        result = image_pb2.Image(data=data, media_type=media_type, width=shape[1], height=shape[0])
        return ToolResult(
            result.SerializeToString(),
            ImageHeader(media_type, shape[1], shape[0]),
            metadata=dict_to_struct({"triton_model": request.tool}),
        )

    def keeps_frames(self, address: str) -> bool:
        """Frames to Triton travel over the network."""
        return False
