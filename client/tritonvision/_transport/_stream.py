"""Classify an iterable of images over one bidirectional gRPC stream.

One :class:`InferStream` owns the stream: the request queue that feeds gRPC, the reader thread that
collects responses, the in-order hand-over of results, the shared-memory regions of the images in flight
(from the transport's pool), and closing. At most ``max_in_flight`` images are outstanding (sent, or
answered but not yet handed to the caller), so a slow consumer or a slow server holds the producer back
instead of filling memory. The stream takes encoded bytes; an item that is already an error (an image the
client could not read) yields its failed result in its place, never sent.

Per-image failures do not end the stream. Triton's stream responses carry an error *message* but no status
code; the message alone decides the error (:func:`._errors.stream_error`: the server's refusals start with a
fixed text), and no image is sent twice. A failure of the stream itself (the server went away) ends it with
the mapped error.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Optional, Union

import grpc

from .._types import Classification, Prediction
from ..exceptions import DeadlineExceededError, ServerUnavailableError, TritonVisionError
from ._errors import map_error, stream_error
from ._grpc import GrpcTransport, infer_request, predictions
from ._shm import Region

log = logging.getLogger(__name__)

_END = object()

# What the stream answered for one image: its predictions, or Triton's error message.
Item = tuple[Optional[list[Prediction]], Optional[str]]
# What a stream is fed: an image's encoded bytes, or the error that kept it from being sent.
Source = Union[bytes, TritonVisionError]


def stream_item(response) -> tuple[int, Item]:
    """The image index (the request id) and outcome of one ``ModelStreamInferResponse``."""
    i = int(response.infer_response.id)
    if response.error_message:
        return i, (None, response.error_message)
    try:
        return i, (predictions(response.infer_response), None)
    except Exception as exc:  # noqa: BLE001 - a malformed response fails its own image
        return i, (None, str(exc))


class StreamBase:
    """What the blocking and the asyncio streams share: settings, the regions of images in flight, and
    what becomes of those regions when the stream ends."""

    def __init__(
        self,
        transport,
        *,
        top_k: int,
        max_in_flight: int = 16,
        timeout: float | None = None,
        drain_timeout: float = 10.0,
    ):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        #: Seconds closing waits for the answers to images already sent before it cancels.
        self.drain_timeout = drain_timeout
        self._transport = transport
        self._top_k = top_k
        self._timeout = timeout
        self._pool = transport.pool
        self._regions: dict[int, Region] = {}
        self._failure: TritonVisionError | None = None
        self._closing = False
        self._call = None

    def _give_back_region(self, i: int, error: BaseException | None) -> None:
        region = self._regions.pop(i, None)
        if region is not None and self._pool is not None:
            self._pool.release(region, error)

    def _settle_regions(self) -> None:
        """After the stream ended: regions of unanswered images are retired (the server may still read
        them), unless the server is gone, which reads nothing more."""
        error = self._failure if isinstance(self._failure, ServerUnavailableError) else None
        for i in list(self._regions):
            region = self._regions.pop(i)
            if self._pool is None:
                continue
            if error is None:
                self._pool.retire(region)
            else:
                self._pool.release(region, error)

    def _deadline_error(self) -> DeadlineExceededError:
        return DeadlineExceededError(f"no response within {self._timeout:g} s", status="DEADLINE_EXCEEDED")

    @staticmethod
    def _outcome(i: int, item: Item) -> Classification:
        preds, message = item
        if message is None:
            return Classification(i, predictions=preds)
        return Classification(i, error=stream_error(message))


class InferStream(StreamBase):
    """One stream; use as a context manager, or call :meth:`close`. :meth:`classify` may run once."""

    def __init__(self, transport: GrpcTransport, **settings):
        super().__init__(transport, **settings)
        self._requests: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._responses: dict[int, Item] = {}
        self._abandoned: set[int] = set()
        self._reader: threading.Thread | None = None

    # -- the reader thread -------------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            for response in self._call:
                i, item = stream_item(response)
                self._give_back_region(i, None)
                with self._cond:
                    if i in self._abandoned:
                        self._abandoned.discard(i)
                    else:
                        self._responses[i] = item
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            if not (self._closing and exc.code() == grpc.StatusCode.CANCELLED):
                with self._cond:
                    self._failure = map_error(exc)
        finally:
            with self._cond:
                if self._failure is None and not self._closing:
                    self._failure = ServerUnavailableError("the server closed the stream")
                self._cond.notify_all()

    # -- the caller's side -------------------------------------------------------------------------------
    def _start(self) -> None:
        self._call = self._transport.open_stream(iter(self._requests.get, _END))
        self._reader = threading.Thread(target=self._read, name="tritonvision-stream", daemon=True)
        self._reader.start()

    def _send(self, i: int, data: bytes) -> None:
        payload: bytes | object = data
        if self._pool is not None:
            region, payload = self._pool.acquire(data, self._timeout)
            self._regions[i] = region
        self._requests.put(infer_request(self._transport.model, payload, self._top_k, str(i), timeout=self._timeout))

    def _wait_for(self, i: int, sent_at: float) -> object:
        """The response of image ``i``, a :class:`DeadlineExceededError`, or raise the stream's failure."""
        with self._cond:
            while i not in self._responses:
                if self._failure is not None:
                    raise self._failure
                left = None if self._timeout is None else sent_at + self._timeout - time.monotonic()
                if left is not None and left <= 0:
                    # Its response may still come; the reader drops it then (and frees its region).
                    self._abandoned.add(i)
                    return self._deadline_error()
                self._cond.wait(left)
            return self._responses.pop(i)

    def classify(self, images: Iterable[Source]) -> Iterator[Classification]:
        """Results in input order, one per image."""
        if self._call is not None:
            raise RuntimeError("an InferStream runs once")
        self._start()
        pending: deque[tuple[int, float, Classification | None]] = deque()
        source = enumerate(images)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    try:
                        i, data = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    if isinstance(data, TritonVisionError):  # refused on the client: never sent
                        pending.append((i, 0.0, Classification(i, error=data)))
                        continue
                    self._send(i, data)
                    pending.append((i, time.monotonic(), None))
                if not pending:
                    return
                i, sent_at, ready = pending.popleft()
                if ready is None:
                    item = self._wait_for(i, sent_at)
                    ready = Classification(i, error=item) if isinstance(item, TritonVisionError) else self._outcome(i, item)
                yield ready
        finally:
            self.close()

    def close(self, drain_timeout: float | None = None) -> None:
        """End the stream and free every region it holds.

        Images already sent are drained, not cancelled: the request side is half-closed, and the server
        answers them (the answers are dropped) and ends the stream. Cancelling a stream with requests in
        flight leaves Triton (2.51) holding the ensemble, and its shutdown then hangs; and a cancelled
        request's shared-memory region may still be read by the server after the client gets it back.
        Only when the drain takes longer than ``drain_timeout`` (default: the class's) is the stream
        cancelled, and the regions of what was still in flight are retired (kept until the pool closes,
        never reused).
        """
        if self._call is None or self._closing:
            return
        with self._cond:
            self._closing = True
        self._requests.put(_END)  # half-close: the server answers what it has, then ends the stream
        limit = self.drain_timeout if drain_timeout is None else drain_timeout
        if self._reader is not None:
            self._reader.join(timeout=limit)
            if self._reader.is_alive():
                log.warning("the stream's %d images in flight were not answered within %g s; cancelling it",
                            len(self._regions), limit)
                self._call.cancel()
                self._reader.join(timeout=30)
        self._settle_regions()

    def __enter__(self) -> "InferStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
