"""Streaming over one bidirectional gRPC stream: order, backpressure, per-image errors, closing."""

from __future__ import annotations

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
