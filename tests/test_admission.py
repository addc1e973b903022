"""Admission ahead of preprocessing (tritonvision_server.admission) against a real HTTP metrics endpoint on
loopback whose page the test sets; the whole path through Triton is in test_overload.py."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tritonvision_server.admission import Admission, metric_total, pending_requests

PAGE = """# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{{model="classifier",version="1"}} 0
nv_inference_pending_request_count{{model="preprocess",version="1"}} 7
nv_inference_pending_request_count{{model="resnet50",version="1"}} {resnet50}
nv_inference_pending_request_count{{model="resnet50_large",version="1"}} 99
"""


class Metrics:
    """A metrics endpoint whose resnet50 gauge the test moves; counts the scrapes."""

    def __init__(self):
        self.pending = 0
        self.counters = None  # resnet50's (nv_inference_count, nv_inference_request_success), if shown
        self.status = 200
        self.scrapes = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Triton's endpoint

            def do_GET(self):
                outer.scrapes += 1
                page = PAGE.format(resnet50=outer.pending)
                if outer.counters is not None:
                    page += ('nv_inference_count{{model="resnet50",version="1"}} {}\n'
                             'nv_inference_request_success{{model="resnet50",version="1"}} {}\n'
                             'nv_inference_count{{model="preprocess",version="1"}} 999999\n').format(*outer.counters)
                body = page.encode()
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metrics():
    m = Metrics()
    yield m
    m.close()


def test_pending_requests_reads_one_model_across_versions():
    page = PAGE.format(resnet50=5) + 'nv_inference_pending_request_count{model="resnet50",version="2"} 3\n'
    assert pending_requests(page, "resnet50") == 8
    assert pending_requests(page, "preprocess") == 7
    assert pending_requests(page, "resnet") is None  # a prefix of another model's name is not that model


def test_metric_total_sums_the_series_whose_labels_match():
    page = ('tritonvision_admission_refused_total{reason="overloaded"} 3\n'
            'tritonvision_admission_refused_total{reason="expired"} 2\n'
            'nv_gpu_utilization 0.5\n')
    assert metric_total(page, "tritonvision_admission_refused_total") == 5
    assert metric_total(page, "tritonvision_admission_refused_total", reason="expired") == 2
    assert metric_total(page, "nv_gpu_utilization") == 0.5
    assert metric_total(page, "tritonvision_admission_refused") is None


def test_a_batch_that_fits_goes_on_at_once(metrics):
    metrics.pending = 10
    gate = Admission(metrics.url, "resnet50", limit=32, max_wait=5)
    assert gate.admit(22) == (22, pytest.approx(0, abs=0.05))
    assert metrics.scrapes == 1 and gate.refused == 0


def test_a_batch_waits_until_resnet50_takes_its_queue(metrics):
    metrics.pending = 32
    gate = Admission(metrics.url, "resnet50", limit=32, max_wait=5)
    threading.Timer(0.2, lambda: setattr(metrics, "pending", 0)).start()
    admitted, held = gate.admit(32)
    assert admitted == 32 and 0.2 <= held < 1.0
    assert metrics.scrapes > 2  # it polled rather than slept the whole wait


def test_what_does_not_fit_by_the_deadline_is_refused(metrics):
    metrics.pending = 28
    gate = Admission(metrics.url, "resnet50", limit=32, max_wait=0.3)
    started = time.monotonic()
    admitted, held = gate.admit(10)
    assert admitted == 4 and 0.3 <= held < 1.0 and time.monotonic() - started < 1.0
    assert gate.refused == 6


def test_more_than_an_empty_queue_takes_is_cut_at_once(metrics):
    gate = Admission(metrics.url, "resnet50", limit=4, max_wait=5)
    assert gate.admit(10)[0] == 4 and gate.refused == 6


@pytest.mark.parametrize("fault", ["refused", "http error", "no such model"])
def test_an_unreadable_gauge_admits_everything(metrics, fault, caplog):
    metrics.pending = 1000
    url, model = metrics.url, "resnet50"
    if fault == "refused":
        metrics.close()
    elif fault == "http error":
        metrics.status = 503
    else:
        model = "absent"
    now = [0.0]
    gate = Admission(url, model, limit=32, max_wait=5, clock=lambda: now[0])
    assert gate.admit(32) == (32, 0.0)
    # While the server is starting (model warm-up runs before its metrics port opens) it is not worth a word.
    assert not [r for r in caplog.records if "admission off" in r.message]
    now[0] = 61.0
    assert gate.admit(32)[0] == 32
    assert gate.admit(32)[0] == 32
    # Said once per outage, not once per batch.
    assert sum("admission off" in r.message for r in caplog.records) == 1


def test_it_recovers_when_the_gauge_comes_back(metrics):
    metrics.status, metrics.pending = 503, 32
    gate = Admission(metrics.url, "resnet50", limit=32, max_wait=0.2)
    assert gate.admit(8)[0] == 8
    metrics.status = 200
    assert gate.admit(8)[0] == 0  # resnet50 full again: held, then refused


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="metrics URL"):
        Admission("127.0.0.1:8002", "resnet50", 32, 1)
    with pytest.raises(ValueError, match="limit"):
        Admission("http://127.0.0.1:8002/metrics", "resnet50", 0, 1)



def test_a_batch_counts_its_images_not_its_requests(metrics):
    gate = Admission(metrics.url, "resnet50", limit=32, max_wait=0.2)
    assert gate.admit([16, 16, 16])[0] == 2 and gate.refused == 1
    metrics.pending = 1  # one request of one image (nothing has run yet)
    admitted, held = gate.admit([8, 32])
    assert admitted == 1 and held >= 0.2


def test_an_empty_queue_takes_one_request_however_many_images_it_carries(metrics):
    gate = Admission(metrics.url, "resnet50", limit=4, max_wait=5)
    assert gate.admit([10, 1])[0] == 1 and gate.refused == 1


def test_pending_requests_count_the_images_of_the_requests_admitted_last(metrics):
    gate = Admission(metrics.url, "resnet50", limit=32, max_wait=0.2)
    metrics.pending = 2
    assert gate.pending() == 2  # nothing admitted yet: one image a request
    metrics.pending = 0
    assert gate.admit([16, 1, 8])[0] == 3
    metrics.pending = 1  # resnet50 has taken all but the last one admitted
    assert gate.pending() == 8
    metrics.pending = 2
    assert gate.pending() == 9
    admitted, held = gate.admit([32])  # 23 images of room: held, then refused
    assert admitted == 0 and held >= 0.2
    metrics.pending = 5  # more than were admitted (admission was off, or another client): at their average
    assert gate.pending() == 25 + 2 * 25 / 3
