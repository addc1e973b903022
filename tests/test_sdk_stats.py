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


def _ensemble(served):
    return {"model_stats": [model(ENSEMBLE, inferences=served, executions=served, success=served, queue_ns=0,
                                  infer_ns=0, batches={})]}


def test_several_servers_are_differenced_one_by_one_then_summed():
    # Behind a round_robin client: a and b in both snapshots, c joined in between, d answered only the first.
    before = tv.Statistics.gather({"a": _ensemble(100), "b": _ensemble(5), "d": _ensemble(7)}, taken_at=0.0)
    assert before.models[ENSEMBLE].success.count == 112 and sorted(before.servers) == ["a", "b", "d"]
    after = tv.Statistics.gather({"a": _ensemble(110), "b": _ensemble(2), "c": _ensemble(4),
                                  "d": tv.ServerUnavailableError("connection refused")}, taken_at=1.0)
    assert after.unreachable == {"d": "connection refused"}
    b = after - before
    # a: 10 more; b restarted and served 2 since; c counts from its start; summing the snapshots first would
    # give 116 - 112 = 4 and no restart.
    e = b[ENSEMBLE]
    assert e.requests == 16 and e.restarted
    assert b.servers == ("a", "b", "c") and b.lost == ("d",)
    assert "summed over 3 servers" in b.table() and "not counted (no second snapshot): d" in b.table()
    assert b.to_dict()["lost"] == ["d"] and b.active().lost == ("d",)
    # Each server's own figures too: which one is slow, which one gets no traffic.
    assert {a: own[ENSEMBLE].requests for a, own in b.by_server.items()} == {"a": 10, "b": 2, "c": 4}
    assert b.by_server["b"][ENSEMBLE].restarted and not b.by_server["a"][ENSEMBLE].restarted
    assert b.to_dict()["by_server"]["c"][0]["requests"] == 4 and set(b.active().by_server) == {"a", "b", "c"}
    # Since the servers started: everything, nothing marked.
    assert not after.breakdown().restarted and after.breakdown()[ENSEMBLE].requests == 116
    # No server answered: the error, not an empty snapshot.
    with pytest.raises(tv.ServerUnavailableError):
        tv.Statistics.gather({"a": tv.ServerUnavailableError("down"), "b": tv.ServerUnavailableError("down")})


def test_round_robin_statistics_ask_every_address_the_target_resolves_to():
    from tritonvision._transport._channel import Connection, resolve

    assert resolve("ipv4:10.0.0.1:8001,10.0.0.2:8001") == (None, ["ipv4:10.0.0.1:8001", "ipv4:10.0.0.2:8001"])
    host, addresses = resolve("dns:///localhost:9")
    assert host == "localhost" and addresses and set(addresses) <= {"ipv4:127.0.0.1:9", "ipv6:[::1]:9"}
    assert resolve("localhost:9") == (host, addresses)
    assert resolve("ipv6:[::1]:7") == (None, ["ipv6:[::1]:7"])
    assert resolve("unix:/run/triton.sock") == (None, ["unix:/run/triton.sock"])
    # Over TLS each address is checked against the name the certificate carries: the host's.
    (one,) = Connection.make("grpcs://localhost:9", load_balancing="round_robin", headers={"k": "v"}).servers()
    assert one.target.endswith(":9") and one.tls_server_name == "localhost" and one.load_balancing is None
    assert one.headers == (("k", "v"),)
    # pick_first talks to one server: its own channel answers.
    conn = Connection.make("10.0.0.1:8001")
    assert conn.servers() == [conn]


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
