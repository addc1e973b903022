"""How the SDK's layers meet: one connection per client for every call, the transport owns shared memory,
and the public non-blocking call (``Classifier.submit``) the load tools drive."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import grpc
import pytest
import tritonvision as tv
from sdk_helpers import registered
from tritonvision._retry import NO_RETRY, RetryPolicy
from tritonvision_server.launcher import free_port


@pytest.fixture()
def channels(monkeypatch):
    """Counts the gRPC channels opened, by kind."""
    opened = {"sync": 0, "aio": 0}
    for module, kind in ((grpc, "sync"), (grpc.aio, "aio")):
        original = module.insecure_channel

        def counting(*args, _original=original, _kind=kind, **kwargs):
            opened[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "insecure_channel", counting)
    return opened


@pytest.mark.parametrize("shm", [None, "system"])
def test_a_classifier_makes_every_call_over_one_channel(grpc_url, photos, channels, shm):
    with tv.Classifier(grpc_url, timeout=60, shm=shm) as clf:
        assert clf.is_ready()
        clf.classify(photos["chelsea"], top_k=1)
        assert clf.statistics().models
        list(clf.classify_stream([photos["coffee"]]))
    assert channels == {"sync": 1, "aio": 0}


def test_an_async_classifier_uses_one_aio_channel_and_one_more_only_to_register_shared_memory(grpc_url, photos, channels):
    async def main(shm):
        async with tv.AsyncClassifier(grpc_url, timeout=60, shm=shm) as clf:
            assert await clf.is_ready()
            await clf.classify(photos["chelsea"], top_k=1)
            assert (await clf.statistics()).models

    asyncio.run(main(None))
    assert channels == {"sync": 0, "aio": 1}
    asyncio.run(main("system"))
    assert channels == {"sync": 1, "aio": 2}


def test_control_calls_fail_with_the_sdk_errors(photos):
    with tv.Classifier(f"127.0.0.1:{free_port()}", timeout=2, retry=NO_RETRY) as clf:
        assert clf.is_ready() is False
        with pytest.raises(tv.ServerUnavailableError):
            clf.statistics()


def test_submit_returns_a_future_of_the_same_answer_as_classify(classifier, photos, tmp_path):
    expected = [p.index for p in classifier.classify(photos["astronaut"])]
    future = classifier.submit(photos["astronaut"])
    assert isinstance(future, Future)
    assert [p.index for p in future.result(timeout=60)] == expected
    refused = classifier.submit(b"GIF89a not an image")
    assert isinstance(refused.exception(timeout=60), tv.InvalidImageError)
    unreadable = classifier.submit(tmp_path / "missing.jpg")
    assert unreadable.done() and isinstance(unreadable.exception(), tv.InvalidImageError)


def test_submit_and_classify_take_a_retry_policy_for_one_call(photos):
    attempts = []
    with tv.Classifier(f"127.0.0.1:{free_port()}", timeout=5, retry=RetryPolicy(attempts=4, initial=0.01, maximum=0.01)) as clf:
        send = clf._transport.async_infer
        clf._transport.async_infer = lambda *a, **kw: (attempts.append(1), send(*a, **kw))[1]
        assert isinstance(clf.submit(photos["chelsea"], retry=NO_RETRY).exception(timeout=10), tv.ServerUnavailableError)
        assert len(attempts) == 1
        assert isinstance(clf.submit(photos["chelsea"]).exception(timeout=10), tv.ServerUnavailableError)
        assert len(attempts) == 1 + 4


def test_closing_a_shared_memory_client_unregisters_and_removes_its_regions(grpc_url, photos):
    from tritonvision._transport._shm import leftover_files

    clf = tv.Classifier(grpc_url, timeout=60, shm="system")
    clf.classify(photos["chelsea"], top_k=1)
    prefix = clf.shm_prefix
    assert [r for r in registered(grpc_url) if r.startswith(prefix)] and leftover_files(prefix)
    clf.close()
    clf.close()  # idempotent
    assert [r for r in registered(grpc_url) if r.startswith(prefix)] == [] and leftover_files(prefix) == []
