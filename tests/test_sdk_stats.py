"""Per-stage statistics: the arithmetic between two snapshots, and a measurement on the real server."""

from __future__ import annotations

import pytest

import tritonvision as tv
from tritonvision.spec import ENSEMBLE, PREPROCESS, RESNET50


def model(name, *, inferences, executions, success, queue_ns, infer_ns, batches):
    def c(count, ns):
        return {"count": str(count), "ns": str(ns)}

    return {
        "name": name,
        "version": "1",
        "inference_count": str(inferences),
        "execution_count": str(executions),
        "inference_stats": {
            "success": c(success, success * 10_000_000),
            "fail": {},
            "queue": c(success, queue_ns),
            "compute_input": c(success, success * 1_000_000),
            "compute_infer": c(success, infer_ns),
            "compute_output": c(success, success * 500_000),
        },
        "batch_stats": [{"batch_size": str(b), "compute_infer": c(n, ns)} for b, (n, ns) in batches.items()],
    }


def test_breakdown_differences_two_snapshots():
    before = tv.Statistics.parse(
        {"model_stats": [model(RESNET50, inferences=4, executions=4, success=4, queue_ns=4_000_000, infer_ns=160_000_000,
                               batches={1: (4, 160_000_000)})]}, taken_at=100.0)
    # Then 12 more images in 2 batches of 4 and 1 batch of... 4 again: 3 executions of 4.
    after = tv.Statistics.parse(
        {"model_stats": [
            model(RESNET50, inferences=16, executions=7, success=16, queue_ns=4_000_000 + 12 * 5_000_000,
                  infer_ns=160_000_000 + 12 * 100_000_000, batches={1: (4, 160_000_000), 4: (3, 300_000_000)}),
            model(ENSEMBLE, inferences=12, executions=12, success=12, queue_ns=0, infer_ns=12 * 120_000_000, batches={}),
        ]}, taken_at=102.5)
    b = after - before
    assert [s.model for s in b.stages] == [ENSEMBLE, RESNET50]
    r = b[RESNET50]
    assert (r.requests, r.inferences, r.executions) == (12, 12, 3)
    assert r.avg_batch == pytest.approx(4.0)
    assert r.queue_ms == pytest.approx(5.0)
    assert r.infer_ms == pytest.approx(100.0)  # each request counts its batch's full compute
    assert r.infer_ms_per_image == pytest.approx(25.0)  # 300 ms over 12 images
    assert r.request_ms == pytest.approx(10.0)
    assert b.seconds == pytest.approx(2.5)
    assert b[ENSEMBLE].requests == 12  # a model absent before counts from zero
    assert "avg_batch" in r.to_dict() and RESNET50 in b.table()


def test_a_model_whose_counters_went_backwards_restarted_and_counts_from_zero():
    # 10 images before; the server restarted (or the model was reloaded) and has served 3 since.
    before = tv.Statistics.parse({"model_stats": [
        model(RESNET50, inferences=10, executions=5, success=10, queue_ns=10_000_000, infer_ns=100_000_000,
              batches={2: (5, 100_000_000)}),
        model(ENSEMBLE, inferences=10, executions=10, success=10, queue_ns=0, infer_ns=0, batches={}),
    ]}, taken_at=10.0)
    after = tv.Statistics.parse({"model_stats": [
        model(RESNET50, inferences=3, executions=3, success=3, queue_ns=3_000_000, infer_ns=30_000_000,
              batches={1: (3, 30_000_000)}),
        model(ENSEMBLE, inferences=14, executions=14, success=14, queue_ns=0, infer_ns=0, batches={}),
    ]}, taken_at=20.0)
    b = after - before
    r = b[RESNET50]
    assert r.restarted and not b[ENSEMBLE].restarted
    assert (r.requests, r.inferences, r.executions) == (3, 3, 3)
    assert r.queue_ms == pytest.approx(1.0) and r.infer_ms_per_image == pytest.approx(10.0)
    assert b.restarted == [RESNET50]
    assert b[ENSEMBLE].requests == 4
    assert b.to_dict()["stages"][1]["restarted"] is True
    assert "restarted" in b.table() and "*" in b.table()


def test_measure_reports_every_stage_of_the_pipeline(classifier, photos):
    images = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    with classifier.measure() as m:
        classifier.classify_batch(images)
    b = m.breakdown
    assert [s.model for s in b.active().stages] == [ENSEMBLE, PREPROCESS, RESNET50]
    for name in (ENSEMBLE, PREPROCESS, RESNET50):
        assert b[name].requests == 3 and b[name].failures == 0
        assert 1 <= b[name].executions <= 3 and b[name].inferences == 3
    assert b[RESNET50].infer_ms > 0 and b[RESNET50].infer_ms_per_image > 0
