"""The synchronous :class:`Classifier`."""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import math
import numbers
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Literal

from ._images import ImageInput, encoded_bytes, stream_source
from ._retry import Deadline, RetryPolicy, backoff_or_raise
from ._stats import Breakdown, Statistics
from ._transport._channel import TARGET_SCHEMES, Connection, Pem
from ._transport._grpc import MAX_TIMEOUT_S, GrpcTransport, with_access_key
from ._transport._shm import ShmPool
from ._transport._stream import InferStream
from ._types import Classification, Prediction
from .exceptions import DeadlineExceededError, OverloadedError, SharedMemoryError, TritonVisionError
from .spec import ENSEMBLE, NUM_CLASSES

log = logging.getLogger("tritonvision")

ShmMode = Literal["system", "cuda", "auto"] | None


def is_local(url: str) -> bool:
    """Whether ``host:port`` names this machine (loopback, or one of this host's own addresses). A gRPC
    target URI (``dns:///``, ``ipv4:``, ...) may name several servers and is never taken as local."""
    if url.lower().startswith(TARGET_SCHEMES):
        return False
    host = url.rsplit(":", 1)[0].strip("[]") if ":" in url else url
    if host in ("localhost", ""):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    own: set[str] = set()
    try:
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in own for a in addresses)


def resolve_shm(shm: ShmMode, url: str, allow_remote: bool = False) -> str | None:
    """The shared-memory kind to use: ``auto`` means system shared memory when the server is on this host.
    ``system``/``cuda`` for a server that is not on this host is refused unless ``allow_remote``: the
    region would name a /dev/shm key (or GPU memory) on the server's host, not ours."""
    if shm in (None, "none", "off", False):
        return None
    if shm == "auto":
        return "system" if os.path.isdir("/dev/shm") and is_local(url) else None
    if shm in ("system", "cuda"):
        if not allow_remote and not is_local(url):
            raise SharedMemoryError(
                f"shm={shm!r}: the server {url} is not on this host; shared memory only works with a local "
                "server (pass allow_remote_shm=True if that address is this host after all)"
            )
        return shm
    raise ValueError(f"shm must be None, 'system', 'cuda' or 'auto', not {shm!r}")


def checked_top_k(top_k: int) -> int:
    """``top_k`` as an int, or raise: an integer from 1 to the number of classes. Checked here because the
    server would refuse 0 or less as if the image were bad, and answer more than it has with nothing."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an integer from 1 to {NUM_CLASSES}, got {top_k!r} ({type(top_k).__name__})")
    if not 1 <= top_k <= NUM_CLASSES:
        raise ValueError(f"top_k must be an integer from 1 to {NUM_CLASSES}, got {top_k}")
    return int(top_k)


def checked_timeout(timeout: float | None) -> float | None:
    """``timeout`` in seconds as a float, or None for no deadline, or raise: a finite number > 0 (beyond
    ``MAX_TIMEOUT_S``, ~3 years, cut to it: gRPC cannot carry a longer deadline)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be None or a finite number of seconds > 0, got {timeout!r} ({type(timeout).__name__})")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be None or a finite number of seconds > 0, got {timeout!r}")
    return min(float(timeout), MAX_TIMEOUT_S)


def checked_wait(timeout: float) -> float:
    """How long ``wait_until_ready`` may wait: a finite number of seconds > 0 (a NaN one would wait forever)."""
    if timeout is None:
        raise TypeError("timeout must be a finite number of seconds > 0, got None")
    return checked_timeout(timeout)


class _ClassifierBase:
    """Settings and the decisions without I/O common to :class:`Classifier` and :class:`AsyncClassifier`
    (the twins keep only their I/O loops; the transport owns the connection and the shared memory)."""

    _transport = None

    @property
    def _pool(self) -> ShmPool | None:
        return self._transport.pool if self._transport is not None else None

    @staticmethod
    def _batch_outcome(results: list, return_exceptions: bool) -> list:
        """``classify_batch``'s answer once every image has finished: the results in input order, or, unless
        ``return_exceptions``, the first error in input order raised (the same on both twins)."""
        if not return_exceptions:
            for r in results:
                if isinstance(r, TritonVisionError):
                    raise r
        return results

    def _call_settings(self, top_k: int, timeout: float | None) -> tuple[int, float | None]:
        """A call's ``top_k`` and deadline (``timeout``, else the classifier's), checked where the call
        starts, before anything is encoded or sent (ValueError or TypeError: the caller's mistake)."""
        return checked_top_k(top_k), checked_timeout(self.timeout if timeout is None else timeout)

    # The transport class of the twin: GrpcTransport or AsyncGrpcTransport.
    _transport_class: type

    def __init__(
        self,
        url: str | None = None,
        *,
        model: str = ENSEMBLE,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        max_in_flight: int = 64,
        shm: ShmMode = None,
        cuda_device: int = 0,
        access_key: tuple[str, str] | None = None,
        allow_remote_shm: bool = False,
        ssl: bool = False,
        root_certificates: Pem = None,
        private_key: Pem = None,
        certificate_chain: Pem = None,
        headers: Mapping[str, str] | None = None,
        load_balancing: str | None = None,
        tls_server_name: str | None = None,
        trace: bool = False,
    ):
        self.connection = Connection.make(
            url, headers=with_access_key(headers, access_key), ssl=ssl, root_certificates=root_certificates,
            private_key=private_key, certificate_chain=certificate_chain, load_balancing=load_balancing,
            tls_server_name=tls_server_name, trace=trace,
        )
        self.url = self.connection.target
        self.timeout = checked_timeout(timeout)
        self.retry = retry or RetryPolicy()
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, numbers.Integral) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")  # 0: waits forever
        self.max_in_flight = int(max_in_flight)
        self.shm = resolve_shm(shm, self.url, allow_remote_shm)
        self._transport = self._transport_class(self.connection, model=model, shm=self.shm, device_id=cuda_device)

    @property
    def shm_prefix(self) -> str | None:
        """The prefix of this client's shared-memory region names (``/dev/shm`` keys and the server's
        registrations alike); None without shared memory."""
        return self._pool.prefix if self._pool is not None else None

    @property
    def shm_regions(self) -> list[str]:
        """The shared-memory regions this client holds now (each registered on the server while in use)."""
        return self._pool.region_names if self._pool is not None else []


class Classifier(_ClassifierBase):
    """Classify images with the ``classifier`` ensemble over gRPC.

    >>> with Classifier("127.0.0.1:8001") as clf:
    ...     top5 = clf.classify("cat.jpg")
    ...     print(top5[0].label, top5[0].score)

    ``timeout`` is each call's deadline in seconds, over all its retries; a call's ``top_k`` (1 to the number
    of classes) and ``timeout`` (None or a finite number > 0) are checked before anything is sent, and a bad
    one raises ValueError or TypeError. Only an unreachable server (:class:`ServerUnavailableError`) is
    retried, following ``retry``. ``shm`` sends images through shared memory: ``"system"`` (server on this
    host), ``"cuda"`` (on this host's GPU; ``tritonvision[cuda]``) or ``"auto"`` (system shared memory when
    the server is local); ``system``/``cuda`` for a server on another host raise :class:`SharedMemoryError`
    unless ``allow_remote_shm``.

    ``url`` is the server's gRPC ``host:port`` (port 8001 if none is given; default ``$TRITONVISION_URL``,
    else ``127.0.0.1:8001``) or a gRPC target such as ``dns:///tritonvision-headless.ml.svc:8001``; with
    ``load_balancing="round_robin"`` calls are spread over every address the name resolves to (every pod
    behind a Kubernetes headless Service), instead of all going over one connection. TLS: ``ssl=True`` (or
    a ``grpcs://`` URL) with the system's roots, or ``root_certificates`` (PEM bytes or a file path), and
    ``private_key`` + ``certificate_chain`` for a client certificate (mutual TLS). ``headers`` go with every
    call as gRPC metadata (an API gateway's key, for example). ``access_key=(name, value)`` opens a server's
    restricted protocols (shared-memory registration, statistics; ``tritonvision serve --access-key``,
    Triton's ``--grpc-restricted-protocol=...:<name>=<value>``): it is sent as the header
    ``triton-grpc-protocol-<name>``. ``tls_server_name``: the name the server's certificate carries, where
    ``url`` is an address or a list of them. ``trace=True`` (``tritonvision[trace]``) sends the caller's
    current OpenTelemetry trace context with each call (a stream: the context where it opens; a retry: the
    context of its first attempt), so a server exporting traces (``tritonvision serve --trace-url``) puts
    its spans for the request and each ensemble step under the caller's span.
    """

    _transport_class = GrpcTransport

    # -- one image ----------------------------------------------------------------------------------------
    def _infer(self, data: bytes, top_k: int, timeout: float | None) -> list[Prediction]:
        return self._transport.infer(data, top_k, timeout)

    def classify(self, image: ImageInput, top_k: int = 5, *, timeout: float | None = None,
                 retry: RetryPolicy | None = None) -> list[Prediction]:
        """Top-k predictions for one image, best first. ``timeout`` and ``retry`` override the classifier's
        for this call."""
        top_k, timeout = self._call_settings(top_k, timeout)
        data = encoded_bytes(image)
        deadline = Deadline(timeout)
        delays = (retry or self.retry).delays()
        while True:
            try:
                return self._infer(data, top_k, deadline.check())
            except TritonVisionError as exc:
                wait = backoff_or_raise(exc, delays, deadline)
                log.info("%s; retrying in %.2f s", exc.message, wait)
                time.sleep(wait)

    # -- many images ----------------------------------------------------------------------------------------
    def _submit(self, data: bytes, top_k: int, deadline: Deadline, callback, delays) -> None:
        """Send one image without blocking; ``callback(predictions, error)`` runs once, on another thread.
        Retries (on a timer thread) follow ``delays``."""
        context = contextvars.copy_context()

        def done(preds, error):
            if error is None:
                callback(preds, None)
                return
            try:
                wait = backoff_or_raise(error, delays, deadline)
            except TritonVisionError as final:
                callback(None, final)
                return
            # The retry runs in the first attempt's context (its trace context, with ``trace``).
            timer = threading.Timer(wait, context.run, (self._submit, data, top_k, deadline, callback, delays))
            timer.daemon = True
            timer.start()

        try:
            self._transport.async_infer(data, top_k, done, deadline.check())
        except TritonVisionError as exc:
            callback(None, exc)

    def submit(self, image: ImageInput, top_k: int = 5, *, timeout: float | None = None,
               retry: RetryPolicy | None = None) -> Future:
        """Send one image without blocking: a :class:`concurrent.futures.Future` of its top-k predictions
        (or of its :class:`TritonVisionError`), retried as :meth:`classify` is. Done-callbacks run on a
        gRPC thread: keep them short."""
        top_k, timeout = self._call_settings(top_k, timeout)
        future: Future = Future()
        future.set_running_or_notify_cancel()

        def done(preds, error):
            if error is None:
                future.set_result(preds)
            else:
                future.set_exception(error)

        try:
            data = encoded_bytes(image)
        except TritonVisionError as exc:  # unreadable file: never sent
            future.set_exception(exc)
            return future
        deadline = Deadline(timeout)
        self._submit(data, top_k, deadline, done, (retry or self.retry).delays())
        return future

    def classify_batch(
        self, images: Iterable[ImageInput], top_k: int = 5, *, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[list[Prediction] | TritonVisionError]:
        """Classify many images at once; the server's dynamic batcher groups them.

        Each image travels as its own request (at most ``max_in_flight`` at a time), so a bad image fails
        alone: with ``return_exceptions=True`` its slot holds the error; otherwise the first error (in input
        order) is raised after all finish.
        """
        self._call_settings(top_k, timeout)  # a bad argument is raised before any image is sent
        images = list(images)
        results: list = [None] * len(images)
        slots = threading.BoundedSemaphore(self.max_in_flight)
        finished = threading.Semaphore(0)

        def record(i: int, future: Future) -> None:
            error = future.exception()
            results[i] = error if error is not None else future.result()
            slots.release()
            finished.release()

        for i, image in enumerate(images):
            slots.acquire()
            self.submit(image, top_k, timeout=timeout).add_done_callback(lambda f, i=i: record(i, f))
        for _ in images:
            finished.acquire()
        return self._batch_outcome(results, return_exceptions)

    def classify_stream(
        self,
        images: Iterable[ImageInput],
        top_k: int = 5,
        *,
        max_in_flight: int = 16,
        timeout: float | None = None,
        drain_timeout: float = 10.0,
    ) -> Iterator[Classification]:
        """Classify an iterable (possibly endless) over one gRPC stream; one :class:`Classification` per
        image, in input order. At most ``max_in_flight`` images are outstanding, so ``images`` is consumed
        only as fast as results are. A bad image yields a failed ``Classification`` and the stream goes on;
        a lost server raises. ``timeout`` bounds each image's wait. Close the generator (or exhaust it) to
        end the stream: images already sent are answered first (their results dropped), for up to
        ``drain_timeout`` seconds, after which the stream is cancelled."""
        top_k, timeout = self._call_settings(top_k, timeout)
        stream = InferStream(
            self._transport,
            top_k=top_k,
            max_in_flight=max_in_flight,
            timeout=timeout,
            drain_timeout=drain_timeout,
        )
        return stream.classify(stream_source(image) for image in images)

    # -- server state ---------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        return self._transport.is_ready()

    def probe(self, image: ImageInput) -> str | None:
        """A liveness check through the whole ensemble: None when ``image`` was classified or shed (busy, not
        dead), else why it was not. Triton's health endpoints stay true while a step's stub is dead or its
        gRPC inference path is stuck; ``tritonvision probe`` and ``tritonvision serve``'s watchdog use this."""
        try:
            self.classify(image, top_k=1)
        except OverloadedError:
            return None
        except TritonVisionError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Block until the server and the classifier are ready, or raise :class:`DeadlineExceededError`."""
        deadline = time.monotonic() + checked_wait(timeout)
        while not self._transport.is_ready(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            if time.monotonic() + interval > deadline:
                raise DeadlineExceededError(f"{self.url} was not ready after {timeout:g} s")
            time.sleep(interval)

    def statistics(self) -> Statistics:
        """A snapshot of Triton's counters for every model; subtract two to get a :class:`Breakdown`. With
        ``load_balancing="round_robin"``, of every server the target resolves to, summed."""
        return Statistics.gather(self._transport.statistics_by_server(self.timeout))

    @contextmanager
    def measure(self) -> Iterator["Measurement"]:
        """``with clf.measure() as m: ...`` then ``m.breakdown``: the per-stage figures of the block."""
        m = Measurement(self.settled_statistics())
        yield m
        m.breakdown = self.settled_statistics() - m.before

    def settled_statistics(self, patience: float = 2.0, interval: float = 0.05) -> Statistics:
        """A snapshot taken once the counters stop moving: Triton updates an ensemble's counters just
        after it sends the response, so a snapshot taken right after the last answer can miss it."""
        snapshot = self.statistics()
        end = time.monotonic() + patience
        while time.monotonic() < end:
            time.sleep(interval)
            again = self.statistics()
            if again.models == snapshot.models:
                return again
            snapshot = again
        return snapshot

    def close(self) -> None:
        """Free every shared-memory region and close the connection (idempotent)."""
        self._transport.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Measurement:
    """Filled in by :meth:`Classifier.measure` when its block ends."""

    def __init__(self, before: Statistics):
        self.before = before
        self.breakdown: Breakdown | None = None
