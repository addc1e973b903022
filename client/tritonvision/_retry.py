"""Deadlines and retry policy. Only :class:`ServerUnavailableError` is retried: every other error is an
answer from the server (or a spent deadline) that a second try would repeat."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .exceptions import DeadlineExceededError, ServerUnavailableError, TritonVisionError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: try ``attempts`` times in all, waiting ``initial * multiplier**n``
    seconds (capped at ``maximum``) before retry ``n``, each wait shortened by a random ``jitter`` fraction so
    that clients cut off together by a restart do not come back together."""

    attempts: int = 4
    initial: float = 0.2
    maximum: float = 3.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits before retries 1 .. attempts-1."""
        rand = (rng or random).random
        for n in range(self.attempts - 1):
            base = min(self.maximum, self.initial * self.multiplier**n)
            yield base * (1.0 - self.jitter * rand())

    @staticmethod
    def retryable(error: BaseException) -> bool:
        return isinstance(error, ServerUnavailableError)


NO_RETRY = RetryPolicy(attempts=1)


class Deadline:
    """A call's deadline over all its attempts; ``None`` seconds means none."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        return self._end - time.monotonic()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def left(self, at_most: float | None = None) -> float | None:
        """The timeout to give the call's next RPC: what is left, at most ``at_most``. An exhausted deadline
        gives a moment, not zero or less, so that the RPC fails as DEADLINE_EXCEEDED rather than not at all."""
        left = self.remaining()
        if left is None:
            return at_most
        left = max(left, 0.001)
        return left if at_most is None else min(left, at_most)

    def check(self, cause: BaseException | None = None) -> float | None:
        """The seconds left, or raise :class:`DeadlineExceededError` if none are."""
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlineExceededError(f"deadline of {self.seconds:g} s exceeded") from cause
        return left


def backoff_or_raise(error: TritonVisionError, delays: Iterator[float], deadline: Deadline) -> float:
    """The wait before the next attempt after ``error``, or re-raise it (not retryable, tries or time spent)."""
    if not RetryPolicy.retryable(error):
        raise error
    delay = next(delays, None)
    if delay is None:
        raise error
    left = deadline.remaining()
    if left is not None and left <= delay:
        raise DeadlineExceededError(
            f"deadline of {deadline.seconds:g} s exceeded while retrying: {error.message}", status=error.status
        ) from error
    return delay
