"""Inference through NVIDIA Triton: ModelInfer over gRPC with raw binary tensors, or system shared memory."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Sequence

import grpc
import numpy as np
from imageflow.common.errors import unavailable
from imageflow.tools.detection import FloatArray
from tritonclient.grpc import service_pb2, service_pb2_grpc

MIB = 1024 * 1024


class TritonBackend:
    """Calls Triton's GRPCInferenceService; tensors travel as raw bytes (never JSON)."""

    def __init__(self, url: str, *, shared_memory: bool = False, timeout_s: float = 30.0) -> None:
        self._url = url
        self._channel = grpc.insecure_channel(
            url, options=[("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._shared_memory = shared_memory
        self._regions = threading.local()
        self._all_sets: list[_ShmSet] = []
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """Whether Triton answers ServerReady."""
        try:
            return bool(self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2).ready)
        except grpc.RpcError:
            return False

    def infer(self, model: str, input_name: str, tensor: FloatArray, outputs: Sequence[str]) -> dict[str, FloatArray]:
        """One ModelInfer call."""
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="FP32", shape=list(tensor.shape))
        for name in outputs:
            request.outputs.add(name=name)
        shm = self._shm_for(model, tensor, outputs) if self._shared_memory else None
        if shm is None:
            request.raw_input_contents.append(np.ascontiguousarray(tensor, dtype=np.float32).tobytes())
        else:
            shm.attach(request, tensor)
        try:
            response = self._stub.ModelInfer(request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            raise unavailable(
                "TRITON_UNAVAILABLE", f"Triton at {self._url} failed: {code.name if code else 'error'}"
            ) from None
        if shm is not None:
            return shm.read(response)
        results: dict[str, FloatArray] = {}
        for index, output in enumerate(response.outputs):
            data = np.frombuffer(response.raw_output_contents[index], dtype=np.float32)
            results[output.name] = data.reshape(list(output.shape))
        return results

    def _shm_for(self, model: str, tensor: FloatArray, outputs: Sequence[str]) -> _ShmSet | None:
        cache: dict[str, _ShmSet] = getattr(self._regions, "sets", None) or {}
        self._regions.sets = cache
        if model not in cache:
            created = _ShmSet.create(self._stub, model, tensor.nbytes, outputs, self._timeout_s)
            cache[model] = created
            with self._lock:
                self._all_sets.append(created)
        return cache[model]

    def close(self) -> None:
        """Unregister and destroy shared memory regions, close the channel."""
        with self._lock:
            sets, self._all_sets = self._all_sets, []
        for shm_set in sets:
            shm_set.destroy()
        self._channel.close()


class _ShmSet:
    """Per-thread, per-model system shared memory regions for one input and the outputs, registered with Triton."""

    def __init__(
        self,
        stub: service_pb2_grpc.GRPCInferenceServiceStub,
        regions: dict[str, tuple[str, object, int]],
    ) -> None:
        self._stub = stub
        self._regions = regions

    @classmethod
    def create(
        cls,
        stub: service_pb2_grpc.GRPCInferenceServiceStub,
        model: str,
        input_size: int,
        outputs: Sequence[str],
        timeout: float,
    ) -> _ShmSet:
        from tritonclient.utils import shared_memory as shm

        metadata = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model), timeout=timeout)
        sizes = {o.name: int(np.prod(list(o.shape))) * 4 for o in metadata.outputs}
        regions: dict[str, tuple[str, object, int]] = {}
        for role, size in [("__input__", input_size), *((name, sizes[name]) for name in outputs)]:
            name = f"imageflow-{model}-{uuid.uuid4().hex[:12]}"
            handle = shm.create_shared_memory_region(name, f"/{name}", size)
            stub.SystemSharedMemoryRegister(
                service_pb2.SystemSharedMemoryRegisterRequest(name=name, key=f"/{name}", offset=0, byte_size=size),
                timeout=timeout,
            )
            regions[role] = (name, handle, size)
        return cls(stub, regions)

    def attach(self, request: service_pb2.ModelInferRequest, tensor: FloatArray) -> None:
        from tritonclient.utils import shared_memory as shm

        name, handle, size = self._regions["__input__"]
        shm.set_shared_memory_region(handle, [np.ascontiguousarray(tensor, dtype=np.float32)])
        request.inputs[0].parameters["shared_memory_region"].string_param = name
        request.inputs[0].parameters["shared_memory_byte_size"].int64_param = size
        for output in request.outputs:
            out_name, _, out_size = self._regions[output.name]
            output.parameters["shared_memory_region"].string_param = out_name
            output.parameters["shared_memory_byte_size"].int64_param = out_size

    def destroy(self) -> None:
        from tritonclient.utils import shared_memory as shm

        for name, handle, _ in self._regions.values():
            with contextlib.suppress(grpc.RpcError):  # Triton already gone: the region is ours to free either way
                self._stub.SystemSharedMemoryUnregister(
                    service_pb2.SystemSharedMemoryUnregisterRequest(name=name), timeout=2
                )
            shm.destroy_shared_memory_region(handle)

    def read(self, response: service_pb2.ModelInferResponse) -> dict[str, FloatArray]:
        from tritonclient.utils import shared_memory as shm

        results: dict[str, FloatArray] = {}
        for output in response.outputs:
            _, handle, _ = self._regions[output.name]
            shape = list(output.shape)
            results[output.name] = np.array(shm.get_contents_as_numpy(handle, np.float32, shape))
        return results
