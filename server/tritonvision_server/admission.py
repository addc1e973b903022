"""Admission ahead of preprocessing: shed a request before it is decoded, not after.

Under overload the backlog builds in front of ``resnet50`` (preprocessing is ~10x faster), so without this
its full queue refuses requests that ``preprocess`` has already decoded: 13-16% of the service's CPU time
went to images nobody got (``benchmarks/overload.py``, "late" of ``no-admission``). Triton 2.51 has no in-flight limit for an
ensemble, so ``preprocess`` does the admitting itself: before decoding a batch it reads ``resnet50``'s pending
requests (Triton's live gauge ``nv_inference_pending_request_count``, from the server's own metrics port on
loopback, ~0.2 ms) and waits while ``resnet50``'s queue could not take the batch. Room is counted in images:
a request may carry up to a full batch of them, so a batch counts its rows, and the gauge's ``n`` pending
requests count the images of the last ``n`` requests admitted (``resnet50`` takes its queue in order, so the
requests still waiting there are the latest that went on). Counting requests let clients that send 32
images a request queue 32 times the intended work there (a 20 s backlog on two cores). Meanwhile requests queue at
``preprocess``, whose bounded queue refuses the excess at once, undecoded, with Triton's own "Exceeds maximum
queue size". Images still without room after ``max_wait`` (the step's queue timeout) are refused the same
way, undecoded.

The gauge counts requests from enqueue until they start executing, time out or are cancelled, so a stalled or
dead ``resnet50`` cannot leave it stuck; ``max_wait`` bounds the wait regardless. Anything that keeps the
gauge from being read (metrics off or elsewhere, a parse failure) admits everything, with a warning:
where ``resnet50`` has a queue policy of its own (gpu-torch) its bound still holds and only the saving is
lost; the cpu profile's ``resnet50`` has none (see spec.CPU), so its queue is then bounded by nothing but
the clients' deadlines.
"""

from __future__ import annotations

import collections
import http.client
import itertools
import logging
import re
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PENDING_METRIC = "nv_inference_pending_request_count"
# The launcher passes the server's metrics URL to the steps in this variable (the port is chosen at start).
METRICS_URL_ENV = "TRITONVISION_METRICS_URL"
# Without it: Triton's own default metrics address, that of a tritonserver started by hand.
DEFAULT_METRICS_URL = "http://127.0.0.1:8002/metrics"
# The message of an admission refusal contains Triton's own queue-rejection text, which is what clients
# (the SDK's OverloadedError, a stream's error mapping) recognise as overload.
OVERLOADED_MESSAGE = "Exceeds maximum queue size: no room in {model}'s queue (admission ahead of preprocessing)"
# A request whose own timeout (the client's remaining deadline) ran out while admission held it: Triton's
# text for a request that waited out its queue timeout, which clients treat the same way.
EXPIRED_MESSAGE = "Request timeout expired while admission ahead of preprocessing held it"

# Seconds after start during which an unreadable gauge is not reported (see Admission.__init__).
STARTUP_GRACE_S = 60.0

# Requests preprocess refused undecoded for want of room in resnet50's queue, by reason (the counter the
# python-backend steps export; Triton counts these error responses as the step's successes).
ADMISSION_METRIC = "tritonvision_admission_refused_total"


def metric_total(metrics_text: str, name: str, **labels: str) -> float | None:
    """The sum of every series of ``name`` in a Prometheus text page whose labels include ``labels``
    (exact label matches), or None when there is none."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    total, seen = 0.0, False
    for found, value in re.findall(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", metrics_text, re.M):
        if wanted <= set(found.split(",")):
            total += float(value)
            seen = True
    return total if seen else None


def pending_requests(metrics_text: str, model: str) -> int | None:
    """The pending requests of every version of ``model`` in a Prometheus text page, or None if absent."""
    total = metric_total(metrics_text, PENDING_METRIC, model=model)
    return None if total is None else int(total)


class Admission:
    """Lets a batch of requests on to preprocessing when ``model``'s queue can take it (see the module).

    ``limit``: the most images ``model`` should have pending once this batch is added (its queue bound, less
    what other preprocess instances may add meanwhile). ``max_wait``: seconds to hold a batch at most.
    """

    def __init__(self, url: str, model: str, limit: int, max_wait: float, *,
                 poll: tuple[float, float] = (0.001, 0.016), timeout: float = 0.5,
                 clock=time.monotonic, sleep=time.sleep):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"metrics URL must be http://host:port/path, got {url!r}")
        if limit < 1:
            raise ValueError(f"admission limit must be >= 1, got {limit}")
        self.url, self.model, self.limit, self.max_wait = url, model, limit, max_wait
        self._host, self._port, self._path = parts.hostname, parts.port, parts.path or "/metrics"
        self._poll, self._timeout, self._clock, self._sleep = poll, timeout, clock, sleep
        self._conn: http.client.HTTPConnection | None = None
        self._failing = False
        # Triton opens its metrics port only once the models are loaded: until the first reading (model
        # warm-up runs before it), a failure is expected and not worth a warning, for a while.
        self._read_once = False
        self._created = clock()
        # The images of the requests admitted lately, newest last: what the gauge's pending requests carry.
        self._admitted: collections.deque[int] = collections.deque(maxlen=limit)
        #: Requests refused for want of room so far.
        self.refused = 0

    def pending(self) -> float | None:
        """The images ``model`` has pending now, or None when they cannot be read (admission then lets all in):
        its pending requests, counted with the images of as many requests admitted last (past what this
        remembers, at their average)."""
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._conn.request("GET", self._path)
            response = self._conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            value = pending_requests(body.decode("utf-8", "replace"), self.model)
            if value is None:
                raise OSError(f"no {PENDING_METRIC} for {self.model}")
        except (OSError, http.client.HTTPException) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            starting = not self._read_once and self._clock() - self._created < STARTUP_GRACE_S
            if not self._failing and not starting:  # once per outage, not once per batch
                log.warning("admission off until %s can be read again (%s: %s)", self.url, type(exc).__name__, exc)
                self._failing = True
            return None
        if self._failing:
            log.info("admission on again: %s answers", self.url)
            self._failing = False
        self._read_once = True
        if not self._admitted:
            return float(value)
        latest = list(itertools.islice(reversed(self._admitted), value))
        return sum(latest) + (value - len(latest)) * sum(self._admitted) / len(self._admitted)

    def admit(self, sizes: int | Sequence[int]) -> tuple[int, float]:
        """Wait until ``model`` can take a batch of requests carrying ``sizes`` images each (an int ``n``: ``n``
        requests of one image). Returns how many of the requests, in order, may go on (the rest are to be
        refused as overload) and the seconds waited: all as soon as they fit, or when the gauge cannot be
        read; those that fit after ``max_wait``, or at once when the batch would not fit even into an empty
        queue (which takes at least one request, however many images it carries)."""
        sizes = [1] * sizes if isinstance(sizes, int) else list(sizes)
        if not sizes:
            return 0, 0.0
        start = self._clock()
        delay = self._poll[0]
        admitted = len(sizes)
        while True:
            pending = self.pending()
            if pending is None:
                break
            room = self.limit - pending
            if room >= sum(sizes):
                break
            if pending <= 0 or self._clock() - start >= self.max_wait:
                admitted = sum(1 for total in itertools.accumulate(sizes) if total <= room)
                if pending <= 0:
                    admitted = max(admitted, 1)
                break
            self._sleep(delay)
            delay = min(delay * 2, self._poll[1])
        held = self._clock() - start
        self._admitted.extend(sizes[:admitted])
        self.refused += len(sizes) - admitted
        return admitted, held

    def overloaded_message(self) -> str:
        return OVERLOADED_MESSAGE.format(model=self.model)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
