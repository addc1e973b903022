"""Closed-loop load through the SDK: keep ``concurrency`` requests in flight, like perf_analyzer does."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ._client import Classifier
from ._retry import NO_RETRY
from .exceptions import OverloadedError, TritonVisionError


@dataclass(frozen=True)
class BenchResult:
    concurrency: int
    requests: int
    errors: int  # failed requests other than those the server shed
    seconds: float
    throughput: float  # successful images per second
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    overloaded: int = 0  # requests the server refused for lack of capacity (OverloadedError)

    def to_dict(self) -> dict:
        return asdict(self)


def run(
    clf: Classifier,
    images: Sequence[bytes],
    *,
    concurrency: int,
    seconds: float = 10.0,
    warmup: float = 1.0,
    top_k: int = 5,
    timeout: float | None = 60.0,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Send ``images`` round-robin with ``concurrency`` requests outstanding for ``warmup + seconds``.
    Like perf_analyzer, every request that completes inside the measured window counts (also one sent
    before it: excluding those would undercount by about one latency's worth of the window at high
    concurrency). No retries: a failure is a failure."""
    # Checked here too, for callers other than the CLI: no request in flight would wait forever for the last.
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if not (math.isfinite(seconds) and seconds > 0 and math.isfinite(warmup) and warmup >= 0):
        raise ValueError(f"seconds must be finite and > 0 and warmup finite and >= 0, got {seconds!r}, {warmup!r}")
    if concurrency == 1:
        return _sequential(clf, images, seconds=seconds, warmup=warmup, top_k=top_k, timeout=timeout, progress=progress)
    latencies: list[float] = []
    errors = 0
    shed = 0
    lock = threading.Lock()
    done_all = threading.Event()
    state = {"next": 0, "active": concurrency}
    submitting = threading.local()
    start = time.perf_counter()
    window_start = start + warmup
    window_end = window_start + seconds

    def send() -> None:
        with lock:
            i = state["next"]
            state["next"] = i + 1
        sent = time.perf_counter()

        def done(future):
            nonlocal errors, shed
            now = time.perf_counter()
            error = future.exception()
            # A request that failed before it left (no server, a missing extra) would fail again at once:
            # end this slot rather than spin.
            failed_to_send = error is not None and getattr(submitting, "active", False)
            with lock:
                if window_start <= now <= window_end:
                    if error is None:
                        latencies.append(now - sent)
                    elif isinstance(error, OverloadedError):
                        shed += 1
                    else:
                        errors += 1
                    if progress is not None:
                        progress(1)
                again = now < window_end and not failed_to_send
                if not again:
                    state["active"] -= 1
                    if state["active"] == 0:
                        done_all.set()
            if again:  # outside the lock: the callback of a fast reply may run on this very thread
                send()

        submitting.active = True
        try:
            clf.submit(images[i % len(images)], top_k, timeout=timeout, retry=NO_RETRY).add_done_callback(done)
        finally:
            submitting.active = False

    for _ in range(concurrency):
        send()
    done_all.wait()
    return _result(concurrency, latencies, errors, seconds, shed)


def _sequential(clf: Classifier, images, *, seconds, warmup, top_k, timeout, progress) -> BenchResult:
    """Concurrency 1 as a user's loop of ``classify`` calls makes it: blocking calls on this thread. The
    callback path would add a hand-off to gRPC's thread to every request, which nothing overlaps here."""
    latencies: list[float] = []
    errors = shed = 0
    now = start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + seconds
    i = 0
    while now < window_end:
        sent = now
        failure: TritonVisionError | None = None
        try:
            clf.classify(images[i % len(images)], top_k, timeout=timeout, retry=NO_RETRY)
        except TritonVisionError as exc:
            failure = exc
        now = time.perf_counter()
        i += 1
        if window_start <= now <= window_end:
            if failure is None:
                latencies.append(now - sent)
            elif isinstance(failure, OverloadedError):
                shed += 1
            else:
                errors += 1
            if progress is not None:
                progress(1)
    return _result(1, latencies, errors, seconds, shed)


def _result(concurrency: int, latencies: list[float], errors: int, seconds: float, shed: int = 0) -> BenchResult:
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    pct = np.percentile(lat, [50, 90, 95, 99])
    return BenchResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=seconds,
        throughput=len(latencies) / seconds,
        p50_ms=float(pct[0]),
        p90_ms=float(pct[1]),
        p95_ms=float(pct[2]),
        p99_ms=float(pct[3]),
        mean_ms=float(lat.mean()),
        overloaded=shed,
    )
