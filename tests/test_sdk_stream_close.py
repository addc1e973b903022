"""Leaving a stream early, on a server of our own: what was sent is answered, nothing is held, nothing leaks."""

from __future__ import annotations

import pytest

import tritonvision as tv
from sdk_helpers import assert_no_regions, own_server, top
from test_sdk_shm import registered
from tritonvision.spec import ENSEMBLE

pytestmark = pytest.mark.slow


@pytest.fixture()
def server(cpu_repository, tmp_path):
    with own_server(cpu_repository, log_file=tmp_path / "tritonserver.log") as s:
        yield s


def test_a_stream_left_early_is_drained_and_does_not_hold_up_shutdown(server, photos):
    with tv.Classifier(server.grpc_url, timeout=120, shm="system") as clf, clf.measure() as m:
        prefix = clf.shm_prefix
        stream = clf.classify_stream([photos["chelsea"]] * 40, max_in_flight=8)
        assert next(stream).ok
        stream.close()
        in_flight_regions = clf.shm_regions
        # Drained, not cancelled: every region came back whole and is reused by the next calls.
        assert len(in_flight_regions) >= 2
        assert top(clf.classify(photos["coffee"], top_k=1))
        assert set(clf.shm_regions) == set(in_flight_regions)
    answered = m.breakdown[ENSEMBLE]
    assert answered.failures == 0 and 1 + len(in_flight_regions) <= answered.requests < 40
    assert_no_regions(prefix, registered(server.grpc_url))
    # Cancelling a stream with requests in flight leaves Triton 2.51 holding the ensemble: it then waits
    # out its whole exit timeout and is killed (-9). A drained stream lets it exit by itself.
    assert server.stop(timeout=20) == 0


def test_a_stream_that_cannot_drain_is_cancelled_and_its_regions_retired(server, photos):
    with tv.Classifier(server.grpc_url, timeout=120, shm="system") as clf:
        prefix = clf.shm_prefix
        stream = clf.classify_stream([photos["chelsea"]] * 40, max_in_flight=8, drain_timeout=0)
        assert next(stream).ok
        sent = set(clf.shm_regions)
        assert len(sent) >= 4
        stream.close()
        # The unanswered images' regions may still be read by the server: kept (registered) but never
        # reused, so eight concurrent calls need regions beyond those the stream had.
        assert set(clf.shm_regions) == sent
        results = clf.classify_batch([photos["coffee"]] * 8, top_k=1)
        assert all(results)
        assert len(clf.shm_regions) > len(sent)
    # At close every region, retired ones included, is unregistered and destroyed.
    assert_no_regions(prefix, registered(server.grpc_url))
    # This path does trip Triton's shutdown wait (see above); stop kills the server after 3 s and removes
    # its shared memory, which own_server checks.
    server.stop(timeout=3)
