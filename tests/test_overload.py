"""Overload: every step's queue is bounded with a queue timeout, the SDK sends its remaining deadline as the
server-side timeout, and a full queue reaches the caller as OverloadedError, fast and without retries.

The server's memory stays put under load: the python backend's regions are sized for a full batch from the
start (Triton 2.51 maps a region again on every growth and keeps the old mappings, each counted in the
server's RSS), and glibc malloc in the server and its stubs hands large blocks back.

The full 60 s run at three times capacity is ``benchmarks/overload.py``; this is its short version."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

import tritonvision as tv
from tritonvision import spec
from tritonvision._transport._errors import map_error
from tritonvision._transport._grpc import infer_request
from tritonvision_server import configs
from tritonvision_server.admission import ADMISSION_METRIC, metric_total, pending_requests
from tritonvision_server.launcher import SHM_DIR

ROOT = Path(__file__).resolve().parents[1]


def _steps(profile):
    steps = {spec.PREPROCESS: profile.preprocess, spec.RESNET50: profile.resnet50}
    if profile.validate is not None:
        steps[spec.VALIDATE] = profile.validate
    return steps


@pytest.mark.parametrize("profile", list(spec.PROFILES.values()), ids=list(spec.PROFILES))
def test_every_step_has_a_bounded_queue_that_rejects_after_a_timeout(profile):
    generated = configs.configs(profile)
    for name, serving in _steps(profile).items():
        if name == spec.RESNET50 and not serving.batching.has_queue_policy:
            # Bounded by admission ahead of preprocessing instead (test_admission.py): preprocess holds a
            # batch until resnet50 has room for it under admission_pending requests.
            params = generated[spec.PREPROCESS].parameters
            assert int(params["admission_limit"].string_value) == profile.admission_limit > 0
            assert profile.admission_limit <= serving.batching.max_batch_size * 2, "a bound, not a formality"
            continue
        policy = generated[name].dynamic_batching.default_queue_policy
        assert policy.max_queue_size == serving.batching.max_queue_size > 0, name
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT, name
        assert policy.default_timeout_microseconds == serving.batching.queue_timeout_us > 0, name
        # Only with the override does a request's own (shorter) deadline replace the default timeout.
        assert policy.allow_timeout_override, name


def test_request_carries_its_remaining_deadline_as_the_server_timeout():
    request = infer_request(spec.ENSEMBLE, b"\xff\xd8\xff", 5, timeout=2.5)
    assert request.parameters["timeout"].int64_param == 2_500_000
    assert "timeout" not in infer_request(spec.ENSEMBLE, b"\xff\xd8\xff", 5).parameters


@pytest.mark.parametrize(
    "message",
    [
        "[request id: <id_unknown>] Exceeds maximum queue size",  # scheduler_utils.cc, queue full on enqueue
        "Request timeout expired",  # dynamic_batch_scheduler.cc, rejected by the queue policy
    ],
)
def test_tritons_queue_rejections_map_to_overloaded(message):
    error = map_error(InferenceServerException(message, status="StatusCode.UNAVAILABLE"))
    assert type(error) is tv.OverloadedError and error.status == "UNAVAILABLE"
    assert not tv.RetryPolicy.retryable(error)


@pytest.fixture(scope="module")
def small_queue_server(onnx_path, tmp_path_factory):
    """The cpu profile with short queues, so that a burst of a few dozen requests overloads it."""
    from tritonvision_server.configs import write_repository
    from tritonvision_server.launcher import TritonServer

    # preprocess's queue and admission's bound on resnet50's.
    preprocess = dataclasses.replace(spec.CPU.preprocess,
                                     batching=dataclasses.replace(spec.CPU.preprocess.batching, max_queue_size=4))
    profile = dataclasses.replace(spec.CPU, preprocess=preprocess, admission_pending=4)
    repository = write_repository(profile, tmp_path_factory.mktemp("small_queue"), onnx_path=onnx_path)
    with TritonServer(repository) as server:
        yield server


def test_full_queue_is_refused_as_overload_without_retries(small_queue_server, photos):
    burst = 48
    with tv.Classifier(small_queue_server.grpc_url, timeout=60, max_in_flight=burst) as clf:
        sent = []
        send = clf._transport.async_infer
        clf._transport.async_infer = lambda *args, **kw: (sent.append(1), send(*args, **kw))[1]
        started = time.monotonic()
        results = clf.classify_batch([photos["chelsea"]] * burst, return_exceptions=True)
        elapsed = time.monotonic() - started
        overloaded = [r for r in results if isinstance(r, tv.OverloadedError)]
        others = [r for r in results if isinstance(r, tv.TritonVisionError) and not isinstance(r, tv.OverloadedError)]
        ok = [r for r in results if not isinstance(r, tv.TritonVisionError)]
        assert not others, others[:3]
        assert overloaded, f"{burst} concurrent requests, none refused in {elapsed:.1f} s: the queue is unbounded"
        assert ok, "every request was refused"
        # Overload is not retried: one request sent per image.
        assert len(sent) == burst
        # And the server still serves once the burst is over.
        assert clf.classify(photos["chelsea"])[0].label


def _admission_refused(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return metric_total(text, ADMISSION_METRIC) or 0.0


def test_overload_is_refused_before_preprocessing(small_queue_server, photos):
    """resnet50's queue is where the backlog builds; without admission ahead of preprocessing it refused
    requests that preprocess had decoded already (4 of the 9 it decoded here). Now preprocess decodes only what resnet50
    can queue: every refusal happens undecoded, at preprocess's queue or by its admission."""
    burst = 48
    with tv.Classifier(small_queue_server.grpc_url, timeout=60, max_in_flight=burst) as clf:
        before, refused_before = clf.settled_statistics(), _admission_refused(small_queue_server)
        results = clf.classify_batch([photos["chelsea"]] * burst, return_exceptions=True)
        delta = clf.settled_statistics() - before
    ok = [r for r in results if not isinstance(r, tv.TritonVisionError)]
    overloaded = [r for r in results if isinstance(r, tv.OverloadedError)]
    assert len(ok) + len(overloaded) == burst, [r for r in results if r not in ok and r not in overloaded][:3]
    assert overloaded and ok
    # Triton counts a python-backend step's error responses as its successes: take admission's out.
    decoded = delta[spec.PREPROCESS].requests - (_admission_refused(small_queue_server) - refused_before)
    assert decoded == delta[spec.RESNET50].requests == len(ok), "preprocessed, then refused by resnet50's queue"


def test_admission_bounds_the_images_at_resnet50_when_each_request_carries_many(triton_server, photos):
    """Admission counts images, not requests: raw clients sending 16 images a request may not queue 16 times
    the intended work at resnet50 (counted in requests, 10 such clients stacked 6-9 requests there, minutes of
    work on a slow host, long enough for the watchdog's probe to take a healthy server for a hung one)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    rows, clients = 16, 10
    image = np.frombuffer(photos["chelsea"], np.uint8)
    batch = np.tile(image, (rows, 1))
    most, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            text = urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
            most[0] = max(most[0], pending_requests(text, spec.RESNET50) or 0)
            time.sleep(0.01)

    def send(_):
        with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
            tensor = grpcclient.InferInput(spec.IMAGE.name, list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            try:
                client.infer(spec.ENSEMBLE, [tensor], client_timeout=120)
                return "ok"
            except InferenceServerException as exc:
                return "overloaded" if isinstance(map_error(exc), tv.OverloadedError) else exc.message()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(send, range(clients)))
    finally:
        stop.set()
        watcher.join()
    assert set(outcomes) <= {"ok", "overloaded"} and "ok" in outcomes, outcomes
    limit = spec.CPU.admission_limit
    # One request more than the limit allows may slip in while the gauge has yet to count the one before.
    assert most[0] * rows <= limit + rows, f"resnet50 had {most[0]} requests of {rows} images pending"


def test_bench_reports_shed_requests_apart_from_errors(small_queue_server, photos, tmp_path, capsys):
    from tritonvision._cli import EXIT_SOME_FAILED, main

    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    code = main(["bench", "--url", small_queue_server.grpc_url, "--concurrency", "48", "--seconds", "2",
                 "--warmup", "0.5", "--no-progress", "--json", str(tmp_path / "cat.jpg")])
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert code == EXIT_SOME_FAILED
    assert r["overloaded"] > 0 and r["errors"] == 0 and r["requests"] > 0


@pytest.mark.slow
def test_locust_reports_overload_under_its_own_name(small_queue_server, tmp_path):
    prefix = tmp_path / "overload"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "--host", small_queue_server.grpc_url, "-u", "40", "-r", "40", "-t", "4s", "--csv", str(prefix),
           "--only-summary", "UnaryUser"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    stats = prefix.with_name(prefix.name + "_stats.csv")
    assert stats.exists(), proc.stderr[-2000:]
    rows = {row["Name"]: row for row in csv.DictReader(stats.open())}
    assert int(rows["unary classify"]["Request Count"]) > 0 and int(rows["unary classify"]["Failure Count"]) == 0
    shed = rows["unary overloaded"]
    assert int(shed["Request Count"]) > 0 and shed["Failure Count"] == shed["Request Count"]


def test_stream_reports_shed_images_as_overload_without_sending_them_again(small_queue_server, photos):
    with tv.Classifier(small_queue_server.grpc_url, timeout=60) as clf:
        resent = []
        infer = clf._transport.infer
        clf._transport.infer = lambda *args, **kw: (resent.append(1), infer(*args, **kw))[1]
        results = list(clf.classify_stream([photos["coffee"]] * 64, max_in_flight=48))
    errors = [r.error for r in results if not r.ok]
    assert errors and all(isinstance(e, tv.OverloadedError) for e in errors), errors[:3]
    assert any(r.ok for r in results)
    assert not resent


def _image_bytes(profile) -> int:
    return 3 * spec.PREPROCESSING.crop ** 2 * (2 if profile.pixels_dtype == "FP16" else 4)


def test_server_starts_with_python_regions_for_a_full_batch_and_malloc_tuning(tmp_path, monkeypatch):
    from tritonvision_server import launcher

    for key in launcher.MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    server = launcher.TritonServer(tmp_path)
    cmd = server.command(tmp_path)
    assert f"--backend-config=python,shm-default-byte-size={launcher.PYTHON_SHM_REGION_BYTES}" in cmd
    assert f"--backend-config=python,shm-growth-byte-size={launcher.PYTHON_SHM_GROWTH_BYTES}" in cmd
    # A full cpu-profile batch (resnet50's pixels in, scores out) fits without the region growing.
    assert launcher.PYTHON_SHM_REGION_BYTES > spec.CPU.max_batch_size * (_image_bytes(spec.CPU) + 4 * spec.NUM_CLASSES)
    env = server._env()
    assert {k: env[k] for k in launcher.MALLOC_ENV} == launcher.MALLOC_ENV
    # The caller's own settings win, and so do its own backend-config values.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert server._env()["MALLOC_ARENA_MAX"] == "4"
    mine = "--backend-config=python,shm-default-byte-size=1048576"
    cmd = launcher.TritonServer(tmp_path, extra_args=[mine]).command(tmp_path)
    assert [a for a in cmd if "shm-default-byte-size" in a] == [mine]
    # No pooled gRPC request objects (each would keep its largest request's memory), unless asked for.
    assert "--grpc-infer-allocation-pool-size=0" in server.command(tmp_path)
    pooled = launcher.TritonServer(tmp_path, extra_args=["--grpc-infer-allocation-pool-size=8"]).command(tmp_path)
    assert [a for a in pooled if "allocation-pool" in a] == ["--grpc-infer-allocation-pool-size=8"]
    # The steps' admission reads this server's metrics, on loopback even when it listens on every address,
    # and never a URL inherited from a parent's environment.
    monkeypatch.setenv("TRITONVISION_METRICS_URL", "http://10.0.0.1:1/metrics")
    everywhere = launcher.TritonServer(tmp_path, host="0.0.0.0", metrics_port=18002)
    assert everywhere._env()["TRITONVISION_METRICS_URL"] == "http://127.0.0.1:18002/metrics"


def _resident_bytes_of(pid: int, prefix: str) -> int:
    """Resident bytes of ``pid``'s mappings of files whose path starts with ``prefix``, summed over mappings."""
    total, mapped = 0, False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: address range, perms, ..., path
                mapped = len(fields) > 5 and fields[5].startswith(prefix)
            elif fields[0] == "Rss:" and mapped:
                total += int(fields[1]) * 1024
    return total


def test_full_batches_leave_each_python_region_mapped_once_in_the_server(triton_server, photos):
    """Triton 2.51 grows a region by mapping it again and keeps the old mapping: the server's RSS then counts
    the region's pages once per mapping. A region that never grows is counted once."""
    with tv.Classifier(triton_server.grpc_url, timeout=120, max_in_flight=64) as clf:
        results = clf.classify_batch([photos["chelsea"]] * 64, return_exceptions=True)
    assert any(not isinstance(r, tv.TritonVisionError) for r in results)
    regions = sum(p.stat().st_size for p in triton_server.leftover_shm())
    assert 0 < _resident_bytes_of(triton_server.pid, str(SHM_DIR / triton_server.shm_prefix)) <= regions
