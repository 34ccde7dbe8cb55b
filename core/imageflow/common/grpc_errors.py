"""The one table from domain errors to gRPC status codes, with google.rpc.Status details (via grpcio-status)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from imageflow.common.errors import ErrorKind, ImageflowError, invalid_argument
from imageflow.common.pieces import drain

log = logging.getLogger(__name__)

ERROR_DOMAIN = "imageflow.dev"
INTERNAL_MESSAGE = "internal error; see the server log"

STATUS_BY_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
}


def status_details(error: ImageflowError) -> status_pb2.Status:
    """Build the rich google.rpc.Status for an error: ErrorInfo, plus BadRequest when fields are named."""
    code = STATUS_BY_KIND[error.kind]
    status = status_pb2.Status(code=code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    status.details.append(packed)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        status.details.append(packed)
    return status


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ImageflowError) -> None:
    """Abort the call with the error's code, message and details."""
    status = rpc_status.to_status(status_details(error))
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


async def _abort_unknown(context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    log.exception("unhandled error in %s", method)
    status = rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE))
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""


UNDECODABLE = _Undecodable()
UNDECODABLE_ERROR = invalid_argument(
    "REQUEST_UNDECODABLE", "the request is not a valid protobuf message (for example a string with invalid UTF-8)"
)


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the caller's bad input
            return UNDECODABLE

    return parse


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if request is UNDECODABLE:
                raise UNDECODABLE_ERROR
            return await behavior(request, context)
        except ImageflowError as error:
            await abort_with(context, error)
        except Exception as error:
            if _is_abort(error):
                raise
            await _abort_unknown(context, method)
        return None  # pragma: no cover - abort raises

    return wrapped


def _wrap_stream(method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            if request is UNDECODABLE:
                raise UNDECODABLE_ERROR
            if hasattr(request, "__aiter__"):  # a streaming request: each message is checked as it arrives
                request = _decodable(request)
            async for item in behavior(request, context):
                yield item
        except ImageflowError as error:
            await abort_with(context, error)
        except Exception as error:
            if _is_abort(error):
                raise
            await _abort_unknown(context, method)

    return wrapped


async def _decodable(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is UNDECODABLE:
            await drain(requests)  # the caller may still be writing: let it finish, then it reads this status
            raise UNDECODABLE_ERROR
        yield request


def _is_abort(error: BaseException) -> bool:
    # context.abort raises grpc.aio.AbortError (a BaseException subclass in some versions); let it through.
    return isinstance(error, grpc.aio.AbortError)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns domain errors into statuses with details and unknown exceptions into a generic INTERNAL. `request_parsers`
    (method path -> parser) replace the generated deserializer of those methods; their failures are bad input too."""

    def __init__(self, request_parsers: Mapping[str, Callable[[bytes], Any]] | None = None) -> None:
        self._parsers = dict(request_parsers or {})

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        wrapped = rewrap_handler(
            handler,
            lambda behavior: _wrap_unary(method, behavior),
            lambda behavior: _wrap_stream(method, behavior),
            _safe_deserializer(self._parsers.get(method, handler.request_deserializer)),
        )
        return handler if wrapped is None else wrapped


Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap_handler(
    handler: grpc.RpcMethodHandler,  # type: ignore[type-arg]
    unary: Wrap,
    stream: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
    """The same handler with its behaviour wrapped (`unary` for unary-unary, `stream` for unary-stream and
    stream-stream, whose behaviour gets the request iterator) and its serializers kept (the request deserializer
    replaced when given); None for a client-streaming handler, which the API does not have."""
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            stream(handler.stream_stream),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return None


def error_from_rpc(error: grpc.aio.AioRpcError | grpc.RpcError) -> tuple[str, str, list[tuple[str, str]]]:
    """Code name, message and field violations of a failed call (client side)."""
    code = error.code()
    message = error.details() or ""
    violations: list[tuple[str, str]] = []
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details that disagree with the call's own code or message: ignore them
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
    return (code.name if code is not None else "UNKNOWN"), message, violations


def error_reason(error: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call, or "" when it carries none."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        return ""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""
