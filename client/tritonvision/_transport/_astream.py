"""The asyncio twin of :mod:`._stream`: classify an iterable over one ``grpc.aio`` bidirectional stream.

Same contract: results in input order, at most ``max_in_flight`` images outstanding, a failed image does
not end the stream (its message decides its error; it is never sent again), and closing drains what was
sent before it cancels. One task writes requests as the consumer pulls results; one reads responses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator

import grpc

from .._types import Classification
from ..exceptions import InternalServerError, ServerUnavailableError, TritonVisionError
from ._errors import map_error
from ._grpc import AsyncGrpcTransport, infer_request
from ._stream import Source, StreamBase, stream_item

log = logging.getLogger(__name__)


class AsyncInferStream(StreamBase):
    """One stream; :meth:`classify` may run once."""

    def __init__(self, transport: AsyncGrpcTransport, **settings):
        super().__init__(transport, **settings)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def _read(self) -> None:
        try:
            async for response in self._call:
                i, item = stream_item(response)
                self._give_back_region(i, None)
                future = self._waiting.pop(i, None)
                if future is not None and not future.done():
                    future.set_result(item)
        except grpc.aio.AioRpcError as exc:
            if not (self._closing and exc.code() == grpc.StatusCode.CANCELLED):
                self._failure = map_error(exc)
        except asyncio.CancelledError:
            pass
        finally:
            if self._failure is None and not self._closing:
                self._failure = ServerUnavailableError("the server closed the stream")
            for future in self._waiting.values():
                if not future.done():
                    if self._failure is not None:
                        future.set_exception(self._failure)
                    else:
                        future.cancel()

    async def _send(self, i: int, data: bytes) -> asyncio.Future:
        payload: object = data
        if self._pool is not None:
            # Creating or registering a region is a blocking RPC: off the event loop.
            region, payload = await asyncio.to_thread(self._pool.acquire, data, self._timeout)
            self._regions[i] = region
        future = asyncio.get_running_loop().create_future()
        self._waiting[i] = future
        try:
            await self._call.write(infer_request(self._transport.model, payload, self._top_k, str(i), timeout=self._timeout))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # The stream has ended. A failed write only says "Internal error from Core"; the reader gets the
            # call's real status (UNAVAILABLE when the server went away), so wait for it to say.
            self._waiting.pop(i, None)
            await asyncio.wait([self._reader], timeout=5)
            if self._failure is None:
                self._failure = ServerUnavailableError(f"the stream ended while sending ({exc})")
            raise await self._settled_failure() from exc
        return future

    async def _settled_failure(self) -> TritonVisionError:
        """The stream's failure. A connection lost mid-write ends a grpc.aio call with INTERNAL ("Internal
        error from Core"), not UNAVAILABLE: when the server does not answer a health check either, it is
        reported as the lost server it is."""
        if isinstance(self._failure, InternalServerError) and not await self._transport.is_ready(timeout=1.0):
            self._failure = ServerUnavailableError(f"the server went away ({self._failure.message})", status="UNAVAILABLE")
        return self._failure

    async def _result(self, i: int, future: asyncio.Future) -> Classification:
        if self._failure is not None and not future.done():
            raise await self._settled_failure()
        try:
            item = await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except asyncio.TimeoutError:
            # Its response may still come; the reader then drops it (and frees its region).
            self._waiting.pop(i, None)
            return Classification(i, error=self._deadline_error())
        return self._outcome(i, item)

    async def classify(self, images: AsyncIterable[Source]) -> AsyncIterator[Classification]:
        """Results in input order, one per image."""
        if self._call is not None:
            raise RuntimeError("an AsyncInferStream runs once")
        self._call = self._transport.open_stream()
        self._reader = asyncio.create_task(self._read())
        pending: deque[tuple[int, asyncio.Future | None, Classification | None]] = deque()
        source = images.__aiter__()
        exhausted, i = False, 0
        try:
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    try:
                        data = await source.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    if isinstance(data, TritonVisionError):  # refused on the client: never sent
                        pending.append((i, None, Classification(i, error=data)))
                    else:
                        if self._failure is not None:
                            raise await self._settled_failure()
                        pending.append((i, await self._send(i, data), None))
                    i += 1
                if not pending:
                    return
                index, future, ready = pending.popleft()
                yield ready if ready is not None else await self._result(index, future)
        finally:
            await self._close()

    async def _close(self) -> None:
        """Half-close, let the server answer what was sent (for up to ``drain_timeout`` s), then cancel;
        the same reasons as :meth:`._stream.InferStream.close`."""
        self._closing = True
        try:
            await self._call.done_writing()
        except Exception as exc:  # noqa: BLE001 - the stream already ended
            log.debug("half-closing the stream: %s", exc)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), self.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("the stream's %d images in flight were not answered within %g s; cancelling it",
                        len(self._regions), self.drain_timeout)
            self._call.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._settle_regions()
