"""Streaming over one bidirectional gRPC stream: order, backpressure, per-image errors, closing."""

from __future__ import annotations

import asyncio

import pytest

import tritonvision as tv
from sdk_helpers import NOT_AN_IMAGE, top


@pytest.fixture(scope="module")
def reference(grpc_url, photos):
    with tv.Classifier(grpc_url, timeout=120) as clf:
        return {name: top(clf.classify(data)) for name, data in photos.items()}


def test_stream_yields_results_in_input_order(classifier, photos, reference):
    names = ["chelsea", "coffee", "astronaut", "rocket", "coffee", "chelsea"]
    results = list(classifier.classify_stream((photos[n] for n in names), max_in_flight=4))
    assert [r.index for r in results] == list(range(len(names)))
    assert [top(r.unwrap()) for r in results] == [reference[n] for n in names]


def test_stream_never_has_more_than_max_in_flight_images_outstanding(classifier, photos):
    pulled = 0

    def source():
        nonlocal pulled
        for _ in range(8):
            pulled += 1
            yield photos["chelsea"]

    consumed = 0
    for _ in classifier.classify_stream(source(), max_in_flight=3):
        consumed += 1
        # The producer is held back: it runs at most max_in_flight ahead of the consumer.
        assert pulled - consumed <= 3 - 1 or pulled == 8
        assert pulled <= consumed + 3
    assert consumed == 8


def test_bad_image_inside_a_stream_fails_alone(classifier, photos, reference):
    images = [photos["chelsea"], NOT_AN_IMAGE, photos["coffee"], b"", photos["rocket"]]
    results = list(classifier.classify_stream(images, max_in_flight=4))
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert isinstance(results[1].error, tv.InvalidImageError) and results[1].error.status == "INVALID_ARGUMENT"
    assert isinstance(results[3].error, tv.InvalidImageError)
    assert top(results[4].predictions) == reference["rocket"]
    with pytest.raises(tv.InvalidImageError):
        results[1].unwrap()


def test_unreadable_path_in_a_stream_fails_on_the_client_and_the_stream_goes_on(classifier, photos, tmp_path):
    results = list(classifier.classify_stream([tmp_path / "missing.jpg", photos["chelsea"]]))
    assert isinstance(results[0].error, tv.InvalidImageError) and results[0].error.status is None
    assert results[1].ok


def test_leaving_a_stream_early_closes_it_and_the_client_keeps_working(classifier, photos):
    stream = classifier.classify_stream([photos["chelsea"]] * 50, max_in_flight=2)
    first = next(stream)
    assert first.ok
    stream.close()  # the images in flight are answered, then the stream ends
    assert classifier.classify(photos["coffee"], top_k=1)


def _stream(twin: str, url: str, images: list, max_in_flight: int) -> list:
    """Run ``classify_stream`` of the blocking or the asyncio client over ``images``."""
    if twin == "sync":
        with tv.Classifier(url, timeout=120) as clf:
            return list(clf.classify_stream(images, max_in_flight=max_in_flight))

    async def main():
        async with tv.AsyncClassifier(url, timeout=120) as clf:
            return [c async for c in clf.classify_stream(images, max_in_flight=max_in_flight)]

    return asyncio.run(main())


# Images and client-side refusals (never sent: empty bytes, a file that does not exist) in one stream.
REFUSAL_LAYOUTS = {
    "refusals behind images in flight": ["chelsea", "coffee", "missing", "empty", "rocket"],
    "refusal first": ["empty", "chelsea", "missing", "coffee"],
    "refusals last": ["chelsea", "coffee", "empty", "missing"],
    "only refusals": ["missing", "empty"],
}


@pytest.mark.parametrize("twin", ["sync", "async"])
@pytest.mark.parametrize("layout", sorted(REFUSAL_LAYOUTS))
def test_client_side_refusals_keep_their_place_in_the_stream(grpc_url, photos, reference, tmp_path, twin, layout):
    names = REFUSAL_LAYOUTS[layout]
    special = {"missing": tmp_path / "missing.jpg", "empty": b""}
    images = [special.get(n, photos.get(n)) for n in names]
    results = _stream(twin, grpc_url, images, max_in_flight=4)
    assert [r.index for r in results] == list(range(len(names))), (
        f"{twin} stream: results out of input order ({[r.index for r in results]}): a refusal overtook images in flight")
    for name, r in zip(names, results):
        if name in special:
            assert isinstance(r.error, tv.InvalidImageError) and r.error.status is None, (name, r)
            assert ("empty image" if name == "empty" else "cannot read") in r.error.message
        else:
            assert top(r.unwrap()) == reference[name], name


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_inputs_the_client_cannot_read_or_encode_fail_alone_in_a_stream(grpc_url, photos, reference, tmp_path, twin):
    import numpy as np
    from PIL import Image

    closed = open(tmp_path / "closed.jpg", "wb")
    closed.close()
    unsendable = {
        "nul": str(tmp_path / "a\0b.jpg"),
        "closed": closed,
        "empty pixels": Image.new("RGB", (0, 0)),
        "too wide": np.broadcast_to(np.zeros(1, np.uint8), (8, 66000)),
    }
    names = ["chelsea", "nul", "coffee", "closed", "empty pixels", "rocket", "too wide"]
    results = _stream(twin, grpc_url, [unsendable.get(n, photos.get(n)) for n in names], max_in_flight=3)
    assert [r.index for r in results] == list(range(len(names)))
    for name, r in zip(names, results):
        if name in unsendable:
            assert isinstance(r.error, tv.InvalidImageError) and r.error.status is None, (name, r)
        else:
            assert top(r.unwrap()) == reference[name], name
