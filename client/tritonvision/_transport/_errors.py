"""The one place where gRPC status codes become :mod:`tritonvision.exceptions` types."""

from __future__ import annotations

import grpc

from .. import exceptions as exc

# Decided by status code only. Triton reports a model that is not loaded as UNAVAILABLE on infer and
# NOT_FOUND on metadata calls; both mean "the classifier cannot serve".
STATUS_TO_ERROR: dict[grpc.StatusCode, type[exc.TritonVisionError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: exc.InvalidImageError,
    grpc.StatusCode.OUT_OF_RANGE: exc.InvalidImageError,
    grpc.StatusCode.UNAVAILABLE: exc.ServerUnavailableError,
    grpc.StatusCode.NOT_FOUND: exc.ModelNotReadyError,
    grpc.StatusCode.FAILED_PRECONDITION: exc.ModelNotReadyError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: exc.OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: exc.DeadlineExceededError,
    grpc.StatusCode.CANCELLED: exc.InternalServerError,
    grpc.StatusCode.INTERNAL: exc.InternalServerError,
    grpc.StatusCode.UNKNOWN: exc.InternalServerError,
    grpc.StatusCode.UNIMPLEMENTED: exc.InternalServerError,
    grpc.StatusCode.ABORTED: exc.InternalServerError,
    grpc.StatusCode.ALREADY_EXISTS: exc.InternalServerError,
    grpc.StatusCode.PERMISSION_DENIED: exc.ServerError,
    grpc.StatusCode.UNAUTHENTICATED: exc.ServerError,
    grpc.StatusCode.DATA_LOSS: exc.InternalServerError,
}


def status_code(error) -> grpc.StatusCode | None:
    """The gRPC status of a ``grpc.RpcError`` or of a tritonclient ``InferenceServerException``
    (whose ``status()`` is the string ``"StatusCode.X"``)."""
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        code = error.code()
        return code if isinstance(code, grpc.StatusCode) else None
    status = error.status() if callable(getattr(error, "status", None)) else None
    if not status:
        return None
    name = str(status).rsplit(".", 1)[-1]
    return grpc.StatusCode.__members__.get(name)


def _message(error) -> str:
    for attr in ("message", "details"):
        fn = getattr(error, attr, None)
        if callable(fn):
            text = fn()
            if text:
                return str(text)
    return str(error)


def map_error(error: BaseException) -> exc.TritonVisionError:
    """Translate a tritonclient/gRPC error into the SDK's hierarchy (call as ``raise map_error(e) from e``)."""
    if isinstance(error, exc.TritonVisionError):
        return error
    code = status_code(error)
    message = _message(error)
    if code is None:
        return exc.TritonVisionError(message)
    return STATUS_TO_ERROR.get(code, exc.InternalServerError)(message, status=code.name)
