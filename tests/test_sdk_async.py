"""The asyncio client under concurrency."""

from __future__ import annotations

import asyncio
import io

import pytest

import tritonvision as tv
from sdk_helpers import NOT_AN_IMAGE, assert_no_regions, registered, top
from tritonvision_server.launcher import free_port


def test_async_client_under_concurrency_matches_the_sync_client(grpc_url, photos, classifier):
    names = list(photos) * 2
    expected = [top(classifier.classify(photos[n])) for n in names]

    async def main():
        async with tv.AsyncClassifier(grpc_url, timeout=120, max_in_flight=4) as clf:
            await clf.wait_until_ready(timeout=10)
            singles = await asyncio.gather(*(clf.classify(photos[n]) for n in names))
            batch = await clf.classify_batch([photos[n] for n in names] + [NOT_AN_IMAGE], return_exceptions=True)
            return singles, batch

    singles, batch = asyncio.run(main())
    assert [top(p) for p in singles] == expected
    assert [top(p) for p in batch[:-1]] == expected
    assert isinstance(batch[-1], tv.InvalidImageError)


def test_async_errors_are_the_sdk_errors(grpc_url):
    async def main():
        async with tv.AsyncClassifier(grpc_url, timeout=120) as clf:
            with pytest.raises(tv.InvalidImageError):
                await clf.classify(NOT_AN_IMAGE)
        async with tv.AsyncClassifier(f"127.0.0.1:{free_port()}", retry=tv.RetryPolicy(attempts=2, initial=0.05)) as clf:
            with pytest.raises(tv.ServerUnavailableError):
                await clf.classify(b"\xff\xd8\xff", timeout=10)

    asyncio.run(main())


def test_async_stream_keeps_order_and_bound_and_fails_bad_images_alone(grpc_url, photos, classifier):
    names = ["chelsea", "coffee", "astronaut"] * 3
    expected = [top(classifier.classify(photos[n])) for n in names]
    images = [photos[n] for n in names]
    images.insert(4, NOT_AN_IMAGE)

    async def frames():  # an async source, consumed only as fast as results come back
        for image in images:
            await asyncio.sleep(0)
            yield image

    async def main():
        async with tv.AsyncClassifier(grpc_url, timeout=120) as clf:
            return [c async for c in clf.classify_stream(frames(), max_in_flight=3)]

    results = asyncio.run(main())
    assert [c.index for c in results] == list(range(len(images)))
    assert isinstance(results[4].error, tv.InvalidImageError)
    assert [top(c.unwrap()) for c in results[:4] + results[5:]] == expected


def test_async_stream_left_early_is_drained_and_the_client_keeps_working(grpc_url, photos):
    async def main():
        async with tv.AsyncClassifier(grpc_url, timeout=120, shm="system") as clf:
            prefix = clf.shm_prefix
            stream = clf.classify_stream([photos["chelsea"]] * 30, max_in_flight=4)
            first = await stream.__anext__()
            await stream.aclose()
            held = clf.shm_regions
            again = await clf.classify(photos["coffee"], top_k=1)
            # Drained, not cancelled: the stream's regions came back whole and serve the next call.
            assert set(clf.shm_regions) == set(held)
            return first, again, prefix

    first, again, prefix = asyncio.run(main())
    assert first.ok and again
    assert_no_regions(prefix, registered(grpc_url))


def test_async_shared_memory_equals_plain_grpc_and_leaks_nothing(grpc_url, photos, classifier):
    expected = {n: top(classifier.classify(d)) for n, d in photos.items()}

    async def main():
        async with tv.AsyncClassifier(grpc_url, timeout=120, shm="system", max_in_flight=4) as clf:
            prefix = clf.shm_prefix
            got = await clf.classify_batch(list(photos.values()) + [NOT_AN_IMAGE], return_exceptions=True)
            regions = clf.shm_regions
            assert 1 <= len(regions) <= 4 and set(regions) <= set(registered(grpc_url))
            # A task cancelled mid-request retires its region (the server may still read it).
            task = asyncio.create_task(clf.classify(photos["chelsea"]))
            await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return got, prefix

    got, prefix = asyncio.run(main())
    assert [top(p) for p in got[:-1]] == list(expected.values())
    assert isinstance(got[-1], tv.InvalidImageError)
    assert_no_regions(prefix, registered(grpc_url))


def test_async_measure_breaks_the_block_down_per_step(grpc_url, photos):
    async def main():
        async with tv.AsyncClassifier(grpc_url, timeout=120) as clf:
            async with clf.measure() as m:
                await clf.classify_batch([photos["chelsea"]] * 3 + [NOT_AN_IMAGE], return_exceptions=True)
            return m.breakdown

    b = asyncio.run(main())
    # Triton 2.51 counts a failed ensemble request twice in its failure counter.
    assert b[tv.spec.ENSEMBLE].requests == 3 and b[tv.spec.ENSEMBLE].failures >= 1
    assert b[tv.spec.RESNET50].inferences == 3 and b[tv.spec.RESNET50].infer_ms > 0


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_classify_batch_raises_the_first_error_in_input_order_once_every_image_finished(grpc_url, photos, twin, tmp_path):
    # The missing file fails at once on the client, before the server refuses the text at index 1: both twins
    # still wait for every image and raise index 1's error, the first in input order.
    images = [photos["chelsea"], NOT_AN_IMAGE, str(tmp_path / "missing.jpg"), photos["coffee"]]

    def sync():
        with tv.Classifier(grpc_url, timeout=120) as clf:
            with pytest.raises(tv.TritonVisionError) as err:
                clf.classify_batch(images)
            return err.value, clf.classify_batch(images, return_exceptions=True)

    async def asynchronous():
        async with tv.AsyncClassifier(grpc_url, timeout=120) as clf:
            with pytest.raises(tv.TritonVisionError) as err:
                await clf.classify_batch(images)
            return err.value, await clf.classify_batch(images, return_exceptions=True)

    error, results = sync() if twin == "sync" else asyncio.run(asynchronous())
    assert isinstance(error, tv.InvalidImageError) and "missing.jpg" not in str(error), error
    assert type(results[1]) is type(error) and str(results[1]) == str(error)
    assert isinstance(results[2], tv.TritonVisionError) and "missing.jpg" in str(results[2])
    assert [type(r) for r in (results[0], results[3])] == [list, list]


def test_async_calls_encode_pixels_off_the_event_loop(grpc_url, photos, classifier, monkeypatch):
    """Encoding pixels to JPEG takes milliseconds to seconds of CPU: done on the event loop's thread, it would
    stall every other task of the application (its health checks, its other requests) meanwhile."""
    import threading

    import numpy as np
    from PIL import Image

    from tritonvision import _images

    pixels = np.asarray(Image.open(io.BytesIO(photos["chelsea"])).convert("RGB"))
    expected = top(classifier.classify(pixels))
    real = _images._encode_pil

    def encode(image, what="PIL image"):
        # The event loop must run another task while this waits; on the loop's own thread it waits in vain.
        started.set()
        assert loop_ran.wait(10), "encoding pixels blocked the event loop"
        return real(image, what)

    monkeypatch.setattr(_images, "_encode_pil", encode)

    async def other_task():
        while not started.is_set():
            await asyncio.sleep(0.002)
        loop_ran.set()

    async def call(kind):
        async with tv.AsyncClassifier(grpc_url, timeout=120) as clf:
            if kind == "classify":
                return top(await clf.classify(pixels))
            return [top(c.predictions) async for c in clf.classify_stream([pixels])][0]

    async def main(kind):
        ticker = asyncio.create_task(other_task())
        result = await call(kind)
        await ticker
        return result

    for kind in ("classify", "stream"):
        started, loop_ran = threading.Event(), threading.Event()
        assert asyncio.run(main(kind)) == expected, kind


def test_an_async_classifier_made_outside_a_loop_serves_each_loop_it_is_used_in(grpc_url, photos, classifier):
    """Made at import time (a web app's module global) or in synchronous set-up code, then used under the
    application's event loop, or under one asyncio.run() after another (scripts, tests)."""
    expected = top(classifier.classify(photos["chelsea"]))
    for shm in (None, "system"):
        clf = tv.AsyncClassifier(grpc_url, timeout=120, shm=shm)

        async def one():
            preds = top(await clf.classify(photos["chelsea"]))
            streamed = [top(c.predictions) async for c in clf.classify_stream([photos["chelsea"]])]
            return preds, streamed

        for _ in range(2):
            assert asyncio.run(one()) == (expected, [expected]), shm
        prefix = clf.shm_prefix
        asyncio.run(clf.close())
        if shm:
            assert_no_regions(prefix, registered(grpc_url))
        with pytest.raises(tv.TritonVisionError, match="closed"):
            asyncio.run(clf.classify(photos["chelsea"]))


def test_an_async_classifier_shared_by_threads_keeps_one_channel_per_event_loop(grpc_url, photos, classifier, monkeypatch):
    """A thread-per-loop application (or a worker pool) sharing one client: each loop keeps its own channel
    for the client's life, instead of each call from another loop dropping the channel in use and opening a
    connection of its own."""
    import threading

    import tritonvision._transport._grpc as grpc_transport

    opened = []
    real_open = grpc_transport.open_channel
    monkeypatch.setattr(grpc_transport, "open_channel", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    expected = top(classifier.classify(photos["coffee"]))
    clf = tv.AsyncClassifier(grpc_url, timeout=120)
    results, errors = [], []
    barrier = threading.Barrier(3)
    finished = threading.Event()

    def worker():
        async def main():
            barrier.wait()  # both loops run at once
            for _ in range(10):
                results.extend(top(p) for p in await asyncio.gather(*(clf.classify(photos["coffee"]) for _ in range(3))))
            await asyncio.to_thread(finished.wait)  # the loop still runs when the client is closed

        try:
            asyncio.run(main())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    barrier.wait()
    while len(results) < 60 and not errors and any(t.is_alive() for t in threads):
        threading.Event().wait(0.05)
    assert not errors and results == [expected] * 60
    assert len(opened) == 2, f"{len(opened)} channels for 2 event loops"
    # Closed from a third loop: the channels of loops still running are closed on their own loops.
    asyncio.run(clf.close())
    finished.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    with pytest.raises(tv.TritonVisionError, match="closed"):
        asyncio.run(clf.classify(photos["coffee"]))
