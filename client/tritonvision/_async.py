"""The asyncio :class:`AsyncClassifier`, on a ``grpc.aio`` channel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager

from ._client import Measurement, _ClassifierBase, checked_wait
from ._images import ImageInput, encoded_bytes, stream_source
from ._retry import Deadline, RetryPolicy, backoff_or_raise
from ._stats import Statistics
from ._transport._astream import AsyncInferStream
from ._transport._grpc import AsyncGrpcTransport
from ._types import Classification, Prediction
from .exceptions import DeadlineExceededError, TritonVisionError

log = logging.getLogger("tritonvision")


async def _off_the_loop(convert, image: ImageInput):
    """``convert(image)``; reading a file or encoding pixels to JPEG blocks for milliseconds to seconds, so
    that runs in a worker thread and the event loop keeps serving the application's other tasks."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return convert(image)
    return await asyncio.to_thread(convert, image)


async def _sources(images: Iterable[ImageInput] | AsyncIterable[ImageInput]) -> AsyncIterator:
    """The stream's items: each image's bytes, or the error that refuses it on the client."""
    if isinstance(images, AsyncIterable):
        async for image in images:
            yield await _off_the_loop(stream_source, image)
    else:
        for image in images:
            yield await _off_the_loop(stream_source, image)


class AsyncClassifier(_ClassifierBase):
    """:class:`Classifier` for asyncio code: the same calls, shared memory and streaming, awaited.

    >>> async with AsyncClassifier("127.0.0.1:8001") as clf:
    ...     top5 = await clf.classify("cat.jpg")

    Connection options (address, TLS, headers, access key, load balancing, remote shared memory) are those of :class:`Classifier`.
    """

    _transport_class = AsyncGrpcTransport

    async def _infer(self, data: bytes, top_k: int, timeout: float | None) -> list[Prediction]:
        return await self._transport.infer(data, top_k, timeout)

    async def classify(self, image: ImageInput, top_k: int = 5, *, timeout: float | None = None,
                       retry: RetryPolicy | None = None) -> list[Prediction]:
        """Top-k predictions for one image, best first; retried while the server is unavailable."""
        top_k, timeout = self._call_settings(top_k, timeout)
        data = await _off_the_loop(encoded_bytes, image)
        deadline = Deadline(timeout)
        delays = (retry or self.retry).delays()
        while True:
            try:
                return await self._infer(data, top_k, deadline.check())
            except TritonVisionError as exc:
                wait = backoff_or_raise(exc, delays, deadline)
                log.info("%s; retrying in %.2f s", exc.message, wait)
                await asyncio.sleep(wait)

    async def classify_batch(
        self, images: Iterable[ImageInput], top_k: int = 5, *, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[list[Prediction] | TritonVisionError]:
        """:meth:`Classifier.classify_batch` for asyncio: at most ``max_in_flight`` requests at a time; every
        image finishes, then the results come in input order, or the first error in input order is raised."""
        self._call_settings(top_k, timeout)  # a bad argument is raised before any image is sent
        slots = asyncio.Semaphore(self.max_in_flight)

        async def one(image):
            async with slots:
                try:
                    return await self.classify(image, top_k, timeout=timeout)
                except TritonVisionError as exc:
                    return exc

        return self._batch_outcome(list(await asyncio.gather(*(one(image) for image in images))), return_exceptions)

    def classify_stream(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        top_k: int = 5,
        *,
        max_in_flight: int = 16,
        timeout: float | None = None,
        drain_timeout: float = 10.0,
    ) -> AsyncIterator[Classification]:
        """:meth:`Classifier.classify_stream` for asyncio: ``async for c in clf.classify_stream(frames)``.
        ``images`` may be an async iterable. Close the generator (``await gen.aclose()``) to end early."""
        top_k, timeout = self._call_settings(top_k, timeout)
        stream = AsyncInferStream(
            self._transport,
            top_k=top_k,
            max_in_flight=max_in_flight,
            timeout=timeout,
            drain_timeout=drain_timeout,
        )
        return stream.classify(_sources(images))

    async def is_ready(self) -> bool:
        return await self._transport.is_ready()

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + checked_wait(timeout)
        while not await self._transport.is_ready(timeout=max(0.1, min(2.0, deadline - loop.time()))):
            if loop.time() + interval > deadline:
                raise DeadlineExceededError(f"{self.url} was not ready after {timeout:g} s")
            await asyncio.sleep(interval)

    async def statistics(self) -> Statistics:
        """See :meth:`Classifier.statistics`."""
        return Statistics.gather(await self._transport.statistics_by_server(self.timeout))

    async def settled_statistics(self, patience: float = 2.0, interval: float = 0.05) -> Statistics:
        """See :meth:`Classifier.settled_statistics`."""
        snapshot = await self.statistics()
        loop = asyncio.get_running_loop()
        end = loop.time() + patience
        while loop.time() < end:
            await asyncio.sleep(interval)
            again = await self.statistics()
            if again.models == snapshot.models:
                return again
            snapshot = again
        return snapshot

    @asynccontextmanager
    async def measure(self) -> AsyncIterator[Measurement]:
        """``async with clf.measure() as m: ...`` then ``m.breakdown``: the per-stage figures of the block."""
        m = Measurement(await self.settled_statistics())
        yield m
        m.breakdown = await self.settled_statistics() - m.before

    async def close(self) -> None:
        """Free every shared-memory region and close the connection (idempotent)."""
        await self._transport.close()

    async def __aenter__(self) -> "AsyncClassifier":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
