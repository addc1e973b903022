"""A call's ``top_k`` and ``timeout`` are checked where the call starts, alike on every entry point of both
twins: a bad value is the caller's mistake (ValueError or TypeError), raised before anything is sent, never an
error blamed on the image or the server."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

import tritonvision as tv
from sdk_helpers import top
from tritonvision.spec import NUM_CLASSES
from tritonvision_server.launcher import free_port

IMAGE = b"\xff\xd8\xff"  # never sent: every call below must fail before it reaches the (absent) server


def _sync(call: str, **kwargs):
    with tv.Classifier(f"127.0.0.1:{free_port()}", retry=tv.RetryPolicy(attempts=1)) as clf:
        if call == "classify":
            clf.classify(IMAGE, **kwargs)
        elif call == "submit":
            clf.submit(IMAGE, **kwargs)
        elif call == "classify_batch":
            clf.classify_batch([IMAGE], **kwargs)
        else:  # not iterated: the stream's arguments are checked when it is asked for
            clf.classify_stream([IMAGE], **kwargs)


def _async(call: str, **kwargs):
    async def main():
        async with tv.AsyncClassifier(f"127.0.0.1:{free_port()}", retry=tv.RetryPolicy(attempts=1)) as clf:
            if call == "classify":
                await clf.classify(IMAGE, **kwargs)
            elif call == "classify_batch":
                await clf.classify_batch([IMAGE], **kwargs)
            else:
                clf.classify_stream([IMAGE], **kwargs)

    asyncio.run(main())


ENTRY_POINTS = {
    "sync classify": (_sync, "classify"),
    "sync submit": (_sync, "submit"),
    "sync classify_batch": (_sync, "classify_batch"),
    "sync classify_stream": (_sync, "classify_stream"),
    "async classify": (_async, "classify"),
    "async classify_batch": (_async, "classify_batch"),
    "async classify_stream": (_async, "classify_stream"),
}

BAD_TOP_K = {0: ValueError, -1: ValueError, NUM_CLASSES + 1: ValueError, 2**40: ValueError,
             2.5: TypeError, "3": TypeError, True: TypeError, None: TypeError}
BAD_TIMEOUT = {0: ValueError, -1: ValueError, math.nan: ValueError, math.inf: ValueError, -math.inf: ValueError,
               "5": TypeError, True: TypeError}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("top_k", list(BAD_TOP_K), ids=repr)
def test_top_k_outside_1_to_the_number_of_classes_is_refused_before_sending(entry, top_k):
    run, call = ENTRY_POINTS[entry]
    with pytest.raises(BAD_TOP_K[top_k], match=f"top_k must be an integer from 1 to {NUM_CLASSES}"):
        run(call, top_k=top_k)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("timeout", list(BAD_TIMEOUT), ids=repr)
def test_timeout_that_is_not_a_finite_positive_number_is_refused_before_sending(entry, timeout):
    run, call = ENTRY_POINTS[entry]
    with pytest.raises(BAD_TIMEOUT[timeout], match="timeout must be None or a finite number of seconds > 0"):
        run(call, timeout=timeout)


@pytest.mark.parametrize("twin", [tv.Classifier, tv.AsyncClassifier])
@pytest.mark.parametrize("timeout", list(BAD_TIMEOUT), ids=repr)
def test_classifier_timeout_is_checked_when_the_classifier_is_made(twin, timeout):
    with pytest.raises(BAD_TIMEOUT[timeout], match="timeout must be None or a finite number of seconds > 0"):
        twin(f"127.0.0.1:{free_port()}", timeout=timeout)


def test_every_class_can_be_asked_for_and_numpy_integers_are_integers(classifier, photos):
    everything = classifier.classify(photos["chelsea"], top_k=NUM_CLASSES)
    assert sorted(p.index for p in everything) == list(range(NUM_CLASSES))
    best = classifier.classify(photos["chelsea"], top_k=np.int64(1))
    assert top(best) == top(everything[:1])
    (streamed,) = classifier.classify_stream([photos["chelsea"]], top_k=np.int32(2))
    assert top(streamed.unwrap()) == top(everything[:2])


def test_a_timeout_longer_than_grpc_can_carry_means_no_practical_limit(grpc_url, classifier, photos):
    # grpcio fails at once a call whose deadline is past 2^63 ns after 1970, and Triton takes the request's
    # timeout as int64 microseconds: a longer timeout must still classify, on every path.
    long = 1e300
    assert classifier.classify(photos["chelsea"], top_k=1, timeout=long)
    assert classifier.submit(photos["chelsea"], top_k=1, timeout=long).result(60)
    (streamed,) = classifier.classify_stream([photos["chelsea"]], top_k=1, timeout=long)
    assert streamed.ok, streamed.error

    async def main():
        async with tv.AsyncClassifier(grpc_url, timeout=long) as clf:
            assert await clf.classify(photos["chelsea"], top_k=1)
            return [c async for c in clf.classify_stream([photos["chelsea"]], top_k=1)]

    (streamed,) = asyncio.run(main())
    assert streamed.ok, streamed.error


@pytest.mark.parametrize("twin", [tv.Classifier, tv.AsyncClassifier])
@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_in_flight_below_one_is_refused_when_the_classifier_is_made(twin, bad):
    # 0 made classify_batch wait forever for a slot.
    with pytest.raises(ValueError, match="max_in_flight must be an integer >= 1"):
        twin(f"127.0.0.1:{free_port()}", max_in_flight=bad)


@pytest.mark.parametrize("timeout", [math.nan, math.inf, 0, -1])
def test_wait_until_ready_refuses_a_wait_that_is_not_a_finite_positive_number(timeout):
    # A NaN deadline never passed: the wait went on forever against a server that is not there.
    with tv.Classifier(f"127.0.0.1:{free_port()}") as clf, pytest.raises(ValueError, match="finite number"):
        clf.wait_until_ready(timeout=timeout)

    async def main():
        async with tv.AsyncClassifier(f"127.0.0.1:{free_port()}") as clf:
            await clf.wait_until_ready(timeout=timeout)

    with pytest.raises(ValueError, match="finite number"):
        asyncio.run(main())
