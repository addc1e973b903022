"""The SDK's errors. Every error raised by :mod:`tritonvision` is a :class:`TritonVisionError`::

    TritonVisionError
    ├── InvalidImageError        the server (or the client) refused this image; other requests are unaffected
    ├── ServerError              the server could not serve the request
    │   ├── ServerUnavailableError   not reachable (down, restarting, wrong address); retried by the client
    │   ├── ModelNotReadyError       the classifier is not loaded or not ready
    │   ├── OverloadedError          the server shed load (queue full or queue timeout); not retried
    │   └── InternalServerError      anything else the server reported
    ├── DeadlineExceededError    the call's deadline passed before a response came
    ├── SharedMemoryError        a client-side shared-memory region could not be created or written
    └── MissingExtraError        an optional feature's package is missing (also an ImportError)

Errors from the server are mapped from their gRPC status code in :func:`tritonvision._transport._errors.map_error`.
The one exception: Triton sheds load with UNAVAILABLE, the code of an unreachable server too, and says
which it is only in its message; that mapping module alone matches those fixed messages.
"""

from __future__ import annotations

from .spec import refusal_reason

__all__ = [
    "TritonVisionError",
    "InvalidImageError",
    "ServerError",
    "ServerUnavailableError",
    "ModelNotReadyError",
    "OverloadedError",
    "InternalServerError",
    "DeadlineExceededError",
    "SharedMemoryError",
    "MissingExtraError",
]


class TritonVisionError(Exception):
    """Base class of every error the SDK raises."""

    def __init__(self, message: str, *, status: str | None = None):
        super().__init__(message)
        self.message = message
        #: The gRPC status code name (``"INVALID_ARGUMENT"``...) when the error came from the server.
        self.status = status


class InvalidImageError(TritonVisionError):
    """The image was refused: not a supported format, corrupt, truncated, empty or too large."""

    def __init__(self, message: str, *, status: str | None = None, reason: str | None = None):
        super().__init__(message, status=status)
        #: Why the server refused it: ``"header"`` (format, limits, truncation; checked before decoding) or
        #: ``"decode"`` (decoding failed), read from the message's ``image refused (<reason>): `` start;
        #: None for an image refused on the client (empty, unreadable file, pixels JPEG cannot hold) or by
        #: another server.
        self.reason = reason if reason is not None else refusal_reason(message)


class ServerError(TritonVisionError):
    """The server could not serve the request."""


class ServerUnavailableError(ServerError):
    """The server is not reachable."""


class ModelNotReadyError(ServerError):
    """The model is not loaded or not ready on the server."""


class OverloadedError(ServerError):
    """The server refused the request for lack of capacity."""


class InternalServerError(ServerError):
    """The server failed in a way not covered by a more specific error."""


class DeadlineExceededError(TritonVisionError):
    """The call's deadline passed before the server answered."""


class SharedMemoryError(TritonVisionError):
    """A shared-memory region could not be created, written or registered on the client's side."""


class MissingExtraError(TritonVisionError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""
