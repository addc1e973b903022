"""The asyncio :class:`AsyncClassifier`, on tritonclient's gRPC aio client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from ._client import DEFAULT_URL
from ._images import ImageInput, encoded_bytes
from ._retry import Deadline, RetryPolicy, backoff_or_raise
from ._stats import Statistics
from ._transport._grpc import AsyncGrpcTransport
from ._types import Prediction
from .exceptions import DeadlineExceededError, TritonVisionError
from .spec import ENSEMBLE

log = logging.getLogger("tritonvision")


class AsyncClassifier:
    """:class:`Classifier` for asyncio code (no shared memory or streaming yet).

    >>> async with AsyncClassifier("127.0.0.1:8001") as clf:
    ...     top5 = await clf.classify("cat.jpg")
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model: str = ENSEMBLE,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        max_in_flight: int = 64,
    ):
        self.url = url
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_in_flight = max_in_flight
        self._transport = AsyncGrpcTransport(url, model=model)

    async def classify(self, image: ImageInput, top_k: int = 5, *, timeout: float | None = None) -> list[Prediction]:
        """Top-k predictions for one image, best first; retried while the server is unavailable."""
        data = encoded_bytes(image)
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        delays = self.retry.delays()
        while True:
            try:
                return await self._transport.infer(data, top_k, deadline.check())
            except TritonVisionError as exc:
                wait = backoff_or_raise(exc, delays, deadline)
                log.info("%s; retrying in %.2f s", exc.message, wait)
                await asyncio.sleep(wait)

    async def classify_batch(
        self, images: Iterable[ImageInput], top_k: int = 5, *, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[list[Prediction] | TritonVisionError]:
        """Classify many images concurrently (at most ``max_in_flight`` requests at a time), in input order."""
        slots = asyncio.Semaphore(self.max_in_flight)

        async def one(image):
            async with slots:
                try:
                    return await self.classify(image, top_k, timeout=timeout)
                except TritonVisionError as exc:
                    if return_exceptions:
                        return exc
                    raise

        return list(await asyncio.gather(*(one(image) for image in images)))

    async def is_ready(self) -> bool:
        return await self._transport.is_ready()

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self._transport.is_ready(timeout=max(0.1, min(2.0, deadline - loop.time()))):
            if loop.time() + interval > deadline:
                raise DeadlineExceededError(f"{self.url} was not ready after {timeout:g} s")
            await asyncio.sleep(interval)

    async def statistics(self) -> Statistics:
        return Statistics.parse(await self._transport.statistics(self.timeout))

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> "AsyncClassifier":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
