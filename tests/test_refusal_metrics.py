"""Operators tell clients' bad images from server failures: refused images are counted per reason on the
metrics port, and a refused image on a stream is never sent again (its error comes from the message)."""

from __future__ import annotations

import re
from pathlib import Path
import time
import urllib.request

import pytest
import yaml

import tritonvision as tv
from image_helpers import undecodable_jpeg
from tritonvision import spec

ROOT = Path(__file__).resolve().parents[1]


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def refused(m: dict, reason: str) -> float:
    return m.get(f'tritonvision_refused_images_total{{reason="{reason}"}}', 0.0)


def ensemble_failures(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith("nv_inference_request_failure{") and f'model="{spec.ENSEMBLE}"' in k)


def settled(server) -> dict[str, float]:
    # Triton refreshes some counters on a poll interval: read until two reads agree.
    before = metrics(server)
    while True:
        time.sleep(0.3)
        now = metrics(server)
        if now == before:
            return now
        before = now


def test_a_refused_image_is_counted_once_as_the_client_s_error(triton_server, classifier, photos):
    before = settled(triton_server)
    classifier.classify(photos["chelsea"])
    for _ in range(3):
        try:
            classifier.classify(b"GIF89a definitely not a whole image")
        except tv.InvalidImageError:
            pass
    after = settled(triton_server)
    assert refused(after, "header") - refused(before, "header") == 3


def test_a_refused_image_on_a_stream_is_not_sent_through_the_ensemble_again(triton_server, classifier, photos):
    # The ensemble failure count of one unary refusal, as Triton counts it.
    before = settled(triton_server)
    try:
        classifier.classify(b"not an image")
    except tv.InvalidImageError:
        pass
    unary = settled(triton_server)
    per_refusal = ensemble_failures(unary) - ensemble_failures(before)
    assert per_refusal >= 1
    results = list(classifier.classify_stream([photos["chelsea"], b"not an image", photos["coffee"]]))
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, tv.InvalidImageError)
    after = settled(triton_server)
    # The stream's refusal fails the ensemble as often as a unary one does, no more, and counts once.
    assert ensemble_failures(after) - ensemble_failures(unary) == per_refusal
    assert refused(after, "header") - refused(unary, "header") == 1


def test_images_only_decoding_finds_broken_are_counted_once_each_among_good_ones(triton_server, classifier, photos):
    bad = undecodable_jpeg(photos["chelsea"])
    images = [photos["chelsea"], bad, photos["coffee"], bad, photos["chelsea"], photos["coffee"], bad, photos["coffee"]]
    before = settled(triton_server)
    # Sent together, so that the cpu preprocess step gets good and bad images in one dynamic batch.
    results = classifier.classify_batch(images, top_k=1, return_exceptions=True)
    after = settled(triton_server)
    for image, result in zip(images, results):
        if image is bad:
            assert isinstance(result, tv.InvalidImageError) and "could not decode" in result.message
        else:
            assert not isinstance(result, Exception), result
    assert refused(after, "decode") - refused(before, "decode") == 3
    assert refused(after, "header") == refused(before, "header")


def test_a_stream_sends_each_image_once_and_names_refusals_from_the_message(classifier, photos):
    bad = undecodable_jpeg(photos["chelsea"])
    images = [photos["chelsea"], b"GIF89a not an image", bad, photos["coffee"]]
    with classifier.measure() as m:
        results = list(classifier.classify_stream(images, max_in_flight=4))
    assert [r.ok for r in results] == [True, False, False, True]
    header, decode = results[1].error, results[2].error
    assert isinstance(header, tv.InvalidImageError) and header.reason == "header" and header.status == "INVALID_ARGUMENT"
    assert isinstance(decode, tv.InvalidImageError) and decode.reason == "decode"
    # Every step saw each image at most once: none is asked again about a failed image. (The ensemble's own
    # failure counter counts each failed request twice in Triton 2.51, so it is not compared here.)
    sent = {s.model: s.requests + s.failures for s in m.breakdown.stages}
    assert m.breakdown[spec.ENSEMBLE].requests == 2, sent
    assert sent[spec.PREPROCESS] == len(images), sent
    assert sent[spec.RESNET50] == 2, sent


def test_unary_refusals_carry_their_reason(classifier, photos):
    for data, reason in ((b"GIF89a not an image", "header"), (undecodable_jpeg(photos["coffee"]), "decode")):
        try:
            classifier.classify(data)
        except tv.InvalidImageError as exc:
            assert exc.reason == reason and exc.message.count(f"image refused ({reason}): ") == 1
        else:
            raise AssertionError(f"{reason}: not refused")
    with pytest.raises(tv.InvalidImageError) as info:
        classifier.classify(b"")
    assert info.value.reason is None or info.value.reason == "header"


def test_the_refusal_message_is_one_contract_for_server_and_client():
    message = spec.refusal_message("decode", "could not decode the JPEG image")
    assert spec.refusal_reason(f"in ensemble '{spec.ENSEMBLE}', {message}") == "decode"
    assert spec.refusal_reason("Stub process 'resnet50_0_0' is not healthy.") is None
    assert spec.refusal_reason("image refused (elsewhere): x") is None
    with pytest.raises(ValueError):
        spec.refusal_message("because", "x")


def ensemble_successes(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith("nv_inference_request_success{") and f'model="{spec.ENSEMBLE}"' in k)


def all_refused(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith("tritonvision_refused_images_total{"))


def test_the_alert_s_server_failures_are_zero_when_only_clients_sent_bad_images(triton_server, classifier, photos):
    # The chart's TritonvisionFailureRatio takes server failures as (ensemble failures / k - refused images)
    # over (ensemble successes + ensemble failures / k), k = ensembleFailuresPerRequest, 2 by default.
    k = yaml.safe_load((ROOT / "deploy/helm/tritonvision/values.yaml").read_text())["metrics"]["prometheusRule"]["ensembleFailuresPerRequest"]
    bad = undecodable_jpeg(photos["coffee"])
    images = [photos["chelsea"], b"GIF89a not an image", bad, photos["coffee"], b"\x89PNG\r\n\x1a\n broken", bad]
    before = settled(triton_server)
    results = classifier.classify_batch(images, top_k=1, return_exceptions=True)
    list(classifier.classify_stream(images, max_in_flight=3))
    after = settled(triton_server)
    assert sum(isinstance(r, Exception) for r in results) == 4
    d = {f.__name__: f(after) - f(before) for f in (ensemble_failures, ensemble_successes, all_refused)}
    assert d["ensemble_failures"] / k - d["all_refused"] == 0, d
    assert d["ensemble_successes"] + d["ensemble_failures"] / k == 2 * len(images), d
