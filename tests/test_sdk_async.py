"""The asyncio client under concurrency."""

from __future__ import annotations

import asyncio

import pytest

import tritonvision as tv
from sdk_helpers import NOT_AN_IMAGE, top
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
