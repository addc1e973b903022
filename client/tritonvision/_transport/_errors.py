"""The one place where gRPC status codes become :mod:`tritonvision.exceptions` types."""

from __future__ import annotations

import grpc

from .. import exceptions as exc
from ..spec import refusal_reason

# Decided by status code (see QUEUE_REJECTIONS below for the one exception). Triton reports a model that is not loaded as UNAVAILABLE on infer and
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


# Triton answers a request its queue policy refuses with UNAVAILABLE, the code it also uses for a model that
# is not loaded, and that grpc uses for a server it cannot reach. The status code alone cannot tell load
# shedding (do not retry: it adds to the load) from an outage (retry), and Triton sets no other field
# (no error details, no trailing metadata) on these errors, so the scheduler's two fixed messages are the
# only discriminator. They are matched here and nowhere else, as substrings of an UNAVAILABLE status only.
# Checked against triton-inference-server/core r24.10 (Triton 2.51): src/scheduler_utils.cc (queue full,
# "<request id> Exceeds maximum queue size") and src/dynamic_batch_scheduler.cc ("Request timeout expired").
QUEUE_REJECTIONS = ("Exceeds maximum queue size", "Request timeout expired")


def is_queue_rejection(message: str) -> bool:
    """Whether an UNAVAILABLE error's message is Triton's queue policy shedding the request."""
    return any(text in message for text in QUEUE_REJECTIONS)


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
    if code is grpc.StatusCode.UNAVAILABLE and is_queue_rejection(message):
        return exc.OverloadedError(message, status=code.name)
    return STATUS_TO_ERROR.get(code, exc.InternalServerError)(message, status=code.name)


def stream_error(message: str) -> exc.TritonVisionError:
    """The error of a failed response on a stream, where Triton sends only a message, no status code: an
    image the server refused (its message starts ``image refused (<reason>): ``, :func:`..spec.refusal_message`)
    is :class:`InvalidImageError`, a queue rejection :class:`OverloadedError`, anything else
    :class:`InternalServerError`. Never sent again to learn more: that would run a refused image through the
    ensemble twice, or send a shed one back to a server that has no room for it."""
    if refusal_reason(message) is not None:
        # The status the server gave it (a refusal is always INVALID_ARGUMENT), which the stream drops.
        return exc.InvalidImageError(message, status=grpc.StatusCode.INVALID_ARGUMENT.name)
    if is_queue_rejection(message):
        return exc.OverloadedError(message, status=grpc.StatusCode.UNAVAILABLE.name)
    return exc.InternalServerError(message)
