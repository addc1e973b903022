"""A server of our own that goes away and comes back: retries, re-registration, cleanup."""

from __future__ import annotations

import threading
import time

import pytest

import tritonvision as tv
from sdk_helpers import assert_no_regions, own_server, registered, top
from tritonvision._transport._shm import leftover_files
from tritonvision.spec import ENSEMBLE, PREPROCESS, RESNET50

pytestmark = pytest.mark.slow

PATIENT = tv.RetryPolicy(attempts=60, initial=0.1, maximum=0.5)


@pytest.fixture(scope="module")
def server(cpu_repository, tmp_path_factory):
    with own_server(cpu_repository, log_file=tmp_path_factory.mktemp("own") / "tritonserver.log") as s:
        yield s


def test_classify_retries_until_a_restarted_server_answers(server, photos):
    with tv.Classifier(server.grpc_url, timeout=120, retry=PATIENT) as clf, \
            tv.Classifier(server.grpc_url, timeout=120, retry=PATIENT, shm="system") as shm:
        before = top(clf.classify(photos["chelsea"]))
        assert top(shm.classify(photos["chelsea"])) == before
        server.stop()
        results = {}
        threads = [
            threading.Thread(target=lambda: results.update(plain=top(clf.classify(photos["chelsea"])))),
            threading.Thread(target=lambda: results.update(shm=top(shm.classify(photos["chelsea"])))),
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)  # both calls now fail with UNAVAILABLE and back off
        server.start()
        for t in threads:
            t.join(timeout=120)
        # The shm client registered its region again on the new server.
        assert results == {"plain": before, "shm": before}


def test_region_registered_before_a_silent_restart_is_registered_again(server, photos):
    with tv.Classifier(server.grpc_url, timeout=120, shm="system") as clf:
        before = top(clf.classify(photos["coffee"]))
        server.stop()
        server.start()
        # No call saw UNAVAILABLE, so the client still believes its region is registered.
        assert top(clf.classify(photos["coffee"])) == before


def test_regions_are_cleaned_up_after_the_server_goes_away(server, photos):
    clf = tv.Classifier(server.grpc_url, timeout=30, shm="system", retry=tv.RetryPolicy(attempts=2, initial=0.05))
    clf.classify(photos["chelsea"], top_k=1)
    prefix = clf.shm_prefix
    assert leftover_files(prefix)
    server.stop()
    with pytest.raises(tv.ServerUnavailableError):
        clf.classify(photos["chelsea"], top_k=1)
    with pytest.raises(tv.ServerUnavailableError):
        list(clf.classify_stream([photos["chelsea"]]))
    clf.close()
    assert leftover_files(prefix) == []
    server.start()
    assert_no_regions(prefix, registered(server.grpc_url))


def test_async_stream_and_calls_fail_cleanly_when_the_server_goes_away(server, photos):
    import asyncio

    def frames():
        while True:
            yield photos["chelsea"]

    async def main():
        clf = tv.AsyncClassifier(server.grpc_url, timeout=30, shm="system", retry=tv.RetryPolicy(attempts=2, initial=0.05))
        prefix = clf.shm_prefix
        stream = clf.classify_stream(frames(), max_in_flight=2)
        assert (await stream.__anext__()).ok
        # Triton waits out its exit timeout while a client holds a stream open: do not wait that long.
        server.stop(timeout=5)
        with pytest.raises(tv.ServerUnavailableError):
            async for _ in stream:
                pass
        with pytest.raises(tv.ServerUnavailableError):
            await clf.classify(photos["chelsea"])
        await clf.close()
        return prefix

    prefix = asyncio.run(main())
    assert leftover_files(prefix) == []
    server.start()


def test_statistics_across_a_restart_count_from_the_restart_instead_of_going_negative(server, photos):
    with tv.Classifier(server.grpc_url, timeout=120, retry=PATIENT) as clf:
        clf.classify_batch([photos["chelsea"]] * 3, top_k=1)
        before = clf.settled_statistics()
        assert before.models[ENSEMBLE].success.count >= 3
        server.stop()
        server.start()
        clf.classify(photos["coffee"], top_k=1)
        b = clf.settled_statistics() - before
    assert set(b.restarted) >= {ENSEMBLE, PREPROCESS, RESNET50}
    for stage in b.stages:
        assert min(stage.requests, stage.failures, stage.executions, stage.inferences) >= 0, stage
        assert min(stage.queue_ms, stage.infer_ms, stage.infer_ms_per_image) >= 0, stage
    # The steps' counts since the restart include the server's own warm-up; the ensemble's are ours alone.
    assert b[ENSEMBLE].requests == 1 and b[RESNET50].inferences >= 1
