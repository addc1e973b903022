"""The synchronous :class:`Classifier`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence

from ._images import ImageInput, as_tensor, encoded_bytes
from ._transport._grpc import GrpcTransport
from ._types import Prediction
from .exceptions import DeadlineExceededError, ServerUnavailableError, TritonVisionError
from .spec import ENSEMBLE

DEFAULT_URL = "127.0.0.1:8001"


class Classifier:
    """Classify images with the ``classifier`` ensemble over gRPC.

    >>> with Classifier("127.0.0.1:8001") as clf:
    ...     top5 = clf.classify("cat.jpg")
    ...     print(top5[0].label, top5[0].score)
    """

    def __init__(self, url: str = DEFAULT_URL, *, model: str = ENSEMBLE, timeout: float | None = None, max_in_flight: int = 64):
        self.url = url
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._transport = GrpcTransport(url, model=model)

    def classify(self, image: ImageInput, top_k: int = 5, *, timeout: float | None = None) -> list[Prediction]:
        """Top-k predictions for one image (bytes, path or binary file object), best first."""
        (result,) = self._transport.infer(as_tensor(encoded_bytes(image)), top_k, timeout or self.timeout)
        return result

    def classify_batch(
        self, images: Iterable[ImageInput], top_k: int = 5, *, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[list[Prediction] | TritonVisionError]:
        """Classify many images at once; the server's dynamic batcher groups them.

        Each image travels as its own request, so a bad image fails alone: with ``return_exceptions=True``
        its slot holds the error; otherwise the first error (in input order) is raised after all finish.
        """
        images = list(images)
        results: list = [None] * len(images)
        slots = threading.BoundedSemaphore(self.max_in_flight)
        pending = threading.Semaphore(0)

        def on_done(i):
            def done(preds, error):
                results[i] = error if error is not None else preds[0]
                slots.release()
                pending.release()

            return done

        for i, image in enumerate(images):
            slots.acquire()
            try:
                self._transport.async_infer(as_tensor(encoded_bytes(image)), top_k, on_done(i), timeout or self.timeout)
            except TritonVisionError as exc:  # unreadable file, or the request could not be sent
                results[i] = exc
                slots.release()
                pending.release()
        for _ in images:
            pending.acquire()
        if not return_exceptions:
            for r in results:
                if isinstance(r, TritonVisionError):
                    raise r
        return results

    def is_ready(self) -> bool:
        return self._transport.is_ready()

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Block until the server and the classifier are ready, or raise :class:`DeadlineExceededError`."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise DeadlineExceededError(f"{self.url} was not ready after {timeout:.0f} s")
            time.sleep(interval)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

