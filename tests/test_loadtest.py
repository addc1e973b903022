"""Locust scenarios and the sweep, run for real (headless Locust in subprocesses) against real servers."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from locust_helpers import LOCUSTFILE, locust, locust_cmd, run, stats

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "loadtest" / "shapes"
SWEEP = ROOT / "loadtest" / "sweep.py"
KIND = {"UnaryUser": "unary", "ShmUser": "shm", "StreamUser": "stream"}


def load_sweep():
    spec = importlib.util.spec_from_file_location("loadtest_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loadtest_sweep"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# -- Locust as users run it -------------------------------------------------------------------------------
@pytest.mark.parametrize("user", ["UnaryUser", "ShmUser", "StreamUser"])
def test_refused_bad_images_are_successes_under_their_own_name_and_a_clean_run_exits_0(grpc_url, tmp_path, user):
    rows, proc = locust(grpc_url, user, tmp_path, "--bad-image-every", "3")
    kind = KIND[user]
    good, bad = rows[f"{kind} classify"], rows[f"{kind} bad image refused"]
    assert int(good["Request Count"]) >= 2 and int(good["Failure Count"]) == 0
    assert int(bad["Request Count"]) >= 1 and int(bad["Failure Count"]) == 0
    assert f"{kind} bad image accepted" not in rows
    # Request names say which user class sent them: nothing else was recorded.
    assert set(rows) == {f"{kind} classify", f"{kind} bad image refused", "Aggregated"}
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_options_fall_back_to_environment_variables(grpc_url, tmp_path, photos, monkeypatch):
    (tmp_path / "only.jpg").write_bytes(photos["coffee"])
    monkeypatch.setenv("TRITONVISION_IMAGES", str(tmp_path / "only.jpg"))
    monkeypatch.setenv("TRITONVISION_BAD_IMAGE_EVERY", "2")
    rows, _ = locust(grpc_url, "UnaryUser", tmp_path)
    # Every second request is the corrupt one: as many are refused as succeed, give or take the last in flight.
    assert abs(int(rows["unary classify"]["Request Count"]) - int(rows["unary bad image refused"]["Request Count"])) <= 2


def test_project_options_are_in_the_web_ui_form_and_in_help(grpc_url):
    from tritonvision_server.launcher import free_port

    port = free_port()
    proc = subprocess.Popen(locust_cmd(grpc_url, "--web-host", "127.0.0.1", "--web-port", str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 60, ""
        while time.monotonic() < deadline and not page:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert page, "the web UI did not answer"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for option in ("images", "bad_image_every", "arrival_rate", "stream_in_flight", "request_timeout"):
        assert f'"{option}": {{"choices"' in page, f"--{option} is not in the web UI's form"
    # `locust --help` prints before it imports a locustfile; the locustfile prints Locust's help with its own.
    help_text = run([sys.executable, str(LOCUSTFILE), "--help"]).stdout
    assert "--bad-image-every" in help_text and "--headless" in help_text


def test_an_http_url_as_host_is_refused_with_the_fix(tmp_path):
    rows, proc = locust("http://127.0.0.1:8000", "UnaryUser", tmp_path)
    assert proc.returncode == 2
    assert "is a URL, but these users speak gRPC" in proc.stderr and "--host 127.0.0.1:8001" in proc.stderr
    assert int(rows["Aggregated"]["Request Count"]) == 0


@pytest.mark.parametrize("target", ["http port", "closed port"])
def test_unreachable_server_is_diagnosed_and_users_back_off(triton_server, tmp_path, target):
    from tritonvision_server.launcher import free_port

    host = triton_server.http_url.removeprefix("http://") if target == "http port" else f"127.0.0.1:{free_port()}"
    rows, proc = locust(host, "UnaryUser", tmp_path, "--unavailable-backoff", "2")
    failed = int(rows["unary classify"]["Failure Count"])
    # Backing off 0.05, 0.1, 0.2 ... 2 s, two users make at most ~20 tries in 4 s (not thousands).
    assert 2 <= failed <= 24, failed
    assert proc.returncode == 1
    expected = "that is Triton's HTTP port" if target == "http port" else "cannot connect to"
    assert proc.stderr.count(expected) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize("extra, message, shape", [
    (["--top-k", "0"], "--top-k 0", None),
    (["--request-timeout", "0"], "--request-timeout 0", None),
    (["--stream-in-flight", "0"], "--stream-in-flight 0", None),
    (["--bad-image-every", "-1"], "--bad-image-every -1", None),
    (["--arrival-rate", "-5"], "--arrival-rate -5", None),
    (["--unavailable-backoff", "-1"], "--unavailable-backoff -1", None),
    (["--images", "{tmp}/missing/photos"], "--images {tmp}/missing/photos", None),
    (["--latency-file", "{tmp}/missing/latency.json"], "--latency-file {tmp}/missing/latency.json", None),
    (["--step-users", "0"], "--step-users 0", "step_ramp.py"),
    (["--spike-seconds", "0"], "--spike-seconds 0", "spike.py"),
])
def test_options_that_cannot_run_are_refused_at_start_with_the_reason(tmp_path, extra, message, shape):
    locustfile = f"{LOCUSTFILE},{SHAPES / shape}" if shape else str(LOCUSTFILE)
    extra, message = [a.format(tmp=tmp_path) for a in extra], message.format(tmp=tmp_path)
    proc = run(locust_cmd("127.0.0.1:1", "--headless", "-u", "2", "-r", "2", "-t", "3s", *extra, "StreamUser",
                          locustfile=locustfile), timeout=60)
    # Exit 2 with what is wrong, once; not a traceback per user (or per request), nor a run that ignores it.
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count(message) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot connect" not in proc.stderr, "users started"


def test_a_stream_that_breaks_reports_each_image_it_had_in_flight_as_failed(tmp_path):
    from sdk_helpers import own_server
    from tritonvision_server.configs import write_light_repository
    from tritonvision_server.launcher import kill_group

    latency = tmp_path / "latency.json"
    with own_server(write_light_repository(tmp_path / "repo")) as server:
        proc = subprocess.Popen(locust_cmd(server.grpc_url, "--headless", "-u", "2", "-r", "2", "-t", "5s", "--csv",
                                           str(tmp_path / "s"), "--latency-file", str(latency), "--stream-in-flight",
                                           "4", "--unavailable-backoff", "1", "StreamUser"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3.5)  # Locust's start, then answers streaming
        kill_group(server.pid)
        _, err = proc.communicate(timeout=60)
    rows = stats(tmp_path / "s")
    # Two streams of 4 images each were cut: the images they carried failed, counted as requests that failed.
    failed = int(rows["stream classify"]["Failure Count"])
    assert failed >= 2, err[-2000:]
    assert int(rows["stream classify"]["Request Count"]) > 100, "the streams answered before the kill"
    records = json.loads(latency.read_text())["requests"]["stream classify"]
    assert sum(not ok for _t, _ms, ok in records) == failed
    assert proc.returncode == 1


def test_arrival_rate_paces_users_to_the_rate_asked_for(grpc_url, tmp_path):
    rows, proc = locust(grpc_url, "UnaryUser", tmp_path, "--arrival-rate", "4", seconds=5)
    sent = int(rows["unary classify"]["Request Count"])
    # Unpaced, two users keep the server busy (20+ requests/s); paced, ~4/s over 5 s.
    assert 12 <= sent <= 30, sent
    assert "achieved" not in proc.stderr


@pytest.mark.parametrize("shape, extra, expected", [
    ("step_ramp.py", ["--step-users", "1", "--step-seconds", "2", "--max-users", "3"], [1, 2, 3]),
    ("spike.py", ["-u", "1", "--spike-users", "3", "--spike-at", "2", "--spike-seconds", "2.5"], [1, 3, 1]),
])
def test_load_shapes_change_the_user_count_over_time_and_end_by_themselves(grpc_url, tmp_path, shape, extra, expected):
    prefix = tmp_path / "shape"
    started = time.monotonic()
    proc = run(locust_cmd(grpc_url, "--headless", "--csv", str(prefix), "--csv-full-history", *extra, "UnaryUser",
                          locustfile=f"{LOCUSTFILE},{SHAPES / shape}"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - started < 40
    history = prefix.with_name(prefix.name + "_stats_history.csv")
    counts = [int(r["User Count"]) for r in csv.DictReader(history.open()) if r["Name"] == "Aggregated" and int(r["User Count"])]
    phases = [c for i, c in enumerate(counts) if i == 0 or c != counts[i - 1]]
    # Locust can write one more history row while it stops the users once the shape has ended.
    if len(phases) == len(expected) + 1 and phases[-1] < phases[-2]:
        phases = phases[:-1]
    assert phases == expected, counts


def distributed(grpc_url, tmp_path, *extra) -> tuple[list[int], int]:
    """A headless master with two workers, 4 UnaryUsers for 5 s: the requests each worker recorded, and the
    count the master's statistics show."""
    from tritonvision_server.launcher import free_port

    port = free_port()
    prefix = tmp_path / "dist"
    latency = tmp_path / "latency.json"
    master = subprocess.Popen(
        locust_cmd(grpc_url, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                   "--headless", "--expect-workers", "2", "-u", "4", "-r", "4", "-t", "5s", "--csv", str(prefix),
                   *extra, "UnaryUser"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Workers take the options the user code reads from the master; the recording is set up at each
    # worker's start, so it takes its file from the environment.
    env = {**os.environ, "TRITONVISION_LATENCY_FILE": str(latency)}
    workers = [subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host",
                                 "127.0.0.1", "--master-port", str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        _, err = master.communicate(timeout=90)
        for w in workers:
            w.wait(timeout=30)
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
    assert master.returncode == 0, err[-2000:]
    files = sorted(tmp_path.glob("latency.*.json"))
    assert len(files) == 2, "each worker writes its own recording"
    per_worker = [len(json.loads(f.read_text())["requests"].get("unary classify", [])) for f in files]
    return per_worker, int(stats(prefix)["unary classify"]["Request Count"])


def test_master_with_two_workers_shares_the_load_and_sums_their_statistics(grpc_url, tmp_path):
    per_worker, summed = distributed(grpc_url, tmp_path)
    assert all(n > 0 for n in per_worker), per_worker
    # The master sums what the workers report; a request in flight when the master stops (one per user at
    # most) finishes on its worker after the last report.
    assert sum(per_worker) - 4 <= summed <= sum(per_worker)


def test_an_arrival_rate_is_the_rate_of_all_workers_together(grpc_url, tmp_path):
    per_worker, _ = distributed(grpc_url, tmp_path, "--arrival-rate", "4")
    # ~4/s over 5 s in all; each worker pacing its own users to the whole rate would send twice that.
    assert all(n > 0 for n in per_worker) and 12 <= sum(per_worker) <= 30, per_worker


# -- the sweep --------------------------------------------------------------------------------------------
def test_sweep_against_a_running_server_writes_point_by_point_table_json_csv_and_plot(grpc_url, tmp_path):
    out = tmp_path / "sweep.json"
    proc = run([sys.executable, str(SWEEP), "--url", grpc_url, "--users", "1,3", "--seconds", "2.5", "--warmup", "0.5",
                "--rounds", "2", "--no-progress", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "net batch" in proc.stdout and "server at" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["complete"] and [r["users"] for r in rows] == [1, 3] and all(r["rounds"] == 2 for r in rows)
    assert all(r["throughput"] > 0 and r["failures"] == 0 and r["p50_ms"] <= r["p99_ms"] for r in rows)
    # Unrounded latencies: the project's recording, not Locust's two significant digits.
    assert any(r["p50_ms"] != round(r["p50_ms"]) for r in rows)
    # One user never gives the batcher two requests at once. Three users that never pause must batch: ResNet-50
    # takes 40 ms or more per image on the CPU, so while one request runs the others queue and leave together.
    assert rows[0]["resnet50_avg_batch"] == pytest.approx(1.0)
    assert rows[1]["resnet50_avg_batch"] > 1.0, f"three users did not batch: {rows[1]}"
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 4
    assert out.with_suffix(".csv").read_text().count("\n") == 3
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_sweep_interleaves_rounds_reloads_the_queue_delay_in_place_and_recommends_within_budget(tmp_path):
    out = tmp_path / "sweep.json"
    proc = run([sys.executable, str(SWEEP), "--variant", "light", "--users", "1", "--queue-delay-us", "0,20000",
                "--seconds", "1.5", "--warmup", "0.5", "--budget-ms", "15", "--percentile", "p50", "--no-progress",
                "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    order = [json.loads(line)["config"] for line in out.with_suffix(".jsonl").read_text().splitlines()]
    a, b = "delay 0 us", "delay 20000 us"
    assert order == [a, b, b, a, a, b], "three rounds, each visiting every configuration, in rotated order"
    none, delayed = result["rows"]
    # One start; every other change of configuration came without a restart ("as is": a round began with the
    # configuration the previous one ended with). A lone request waits the whole delay for company.
    assert "start" in none["applied"] and "reload" in delayed["applied"]
    assert not {"start", "restart"} & set(delayed["applied"]) and "restart" not in none["applied"]
    assert none["resnet50_queue_ms"] < 5 and delayed["resnet50_queue_ms"] >= 15
    assert delayed["p50_ms"] > none["p50_ms"] + 10
    # Only the configuration without the delay can hold a 15 ms median: a lone request waits 20 ms in the other.
    assert result["recommendation"]["config"] == a and none["recommended"] and not delayed["recommended"]
    # The light variant is named wherever its figures go.
    assert "LIGHT VARIANT" in proc.stdout and result["variant"] == "light"
    assert {r["variant"] for r in csv.DictReader(out.with_suffix(".csv").open())} == {"light"}


def test_sweep_restarts_only_for_a_max_batch_size_and_reloads_instance_counts(tmp_path):
    out = tmp_path / "sweep.json"
    proc = run([sys.executable, str(SWEEP), "--variant", "light", "--users", "6", "--max-batch", "1,32",
                "--instances", "1,2", "--rounds", "1", "--seconds", "1.5", "--warmup", "0.5", "--no-progress",
                "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # The sweep checks the config each step serves after a reload (instances, delay, preferred sizes).
    applied = {(r["max_batch"], r["instances"]): r["applied"] for r in rows}
    assert applied == {(1, 1): ["start"], (1, 2): ["reload"], (32, 1): ["restart"], (32, 2): ["reload"]}
    for r in rows:
        assert r["failures"] == 0
        if r["max_batch"] == 1:
            assert r["resnet50_avg_batch"] == pytest.approx(1.0) and r["preprocess_avg_batch"] == pytest.approx(1.0)


def _servers_under(root: Path) -> list[int]:
    """Process ids of the tritonservers serving a model repository under ``root``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if argv and argv[0].endswith(b"tritonserver") and f"--model-repository={root}".encode() in b" ".join(argv):
            pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def sweep_in_flight(cmd: list[str], work: Path):
    """The sweep ``cmd``, its temporary folders under ``work``, handed over once its 2-user Locust run is under
    way (that run's statistics file appears); killed if it still runs after the block."""
    proc = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(work)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob("tritonvision-sweep-*/locust_2_stats.csv")):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"the 2-user Locust run did not start (sweep exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sweep_marks_a_point_failed_when_its_server_dies_starts_it_again_and_goes_on(tmp_path):
    out, work = tmp_path / "sweep.json", tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, str(SWEEP), "--variant", "light", "--users", "1,2", "--rounds", "2", "--seconds", "2",
           "--warmup", "0.5", "--budget-ms", "1000", "--no-progress", "--out", str(out)]
    with sweep_in_flight(cmd, work) as proc:  # at the first round's second point
        (pid,) = _servers_under(work)
        os.killpg(pid, signal.SIGKILL)  # the server and its stubs
        table, err = proc.communicate(timeout=300)
    # A point failed: the sweep says so in its exit code, but measured every point of both rounds.
    assert proc.returncode == 1, err[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and len(out.with_suffix(".jsonl").read_text().splitlines()) == 4
    one, two = result["rows"]
    assert two["failed_rounds"] == 1 and two["rounds"] == 2 and len(two["errors"]) == 1 and not two["recommended"]
    # The server was started again for round 2, whose points succeeded; the answer comes from them.
    assert "restart" in one["applied"] and one["failed_rounds"] == 0 and one["failures"] == 0
    assert result["recommendation"]["users"] == 1 and one["recommended"]
    assert "FAILED 1/2 rounds" in table, table
    assert _servers_under(work) == [], "the sweep's server outlived it"


def _children(pid: int, running: str) -> list[int]:
    """Process ids whose parent is ``pid`` and whose command line has ``running``."""
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1]) == pid
                    and running.encode() in (entry / "cmdline").read_bytes()):
                kids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return kids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_sweep_stopped_by_a_signal_stops_its_locust_and_server_and_leaves_nothing(tmp_path, sig):
    from tritonvision._transport._shm import leftover_files

    out, work = tmp_path / "sweep.json", tmp_path / "work"
    work.mkdir()
    # As from a terminal, Ctrl-C raises KeyboardInterrupt in the sweep even where this test runs with SIGINT
    # ignored (a background job of a non-interactive shell, which its children inherit and Python keeps).
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", start, str(SWEEP), "--variant", "light", "--users", "2", "--rounds", "1",
           "--seconds", "60", "--user-class", "ShmUser", "--no-progress", "--out", str(out)]
    with sweep_in_flight(cmd, work) as proc:
        (locust_pid,) = _children(proc.pid, "locust")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and "stopped" in err, err[-2000:]
    deadline = time.monotonic() + 10  # the server's process group, reaped by the sweep's stop
    while _servers_under(work) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _servers_under(work) == [] and not Path(f"/proc/{locust_pid}").exists(), "a child outlived the sweep"
    assert leftover_files(f"tritonvision_client_{locust_pid}_") == []
    assert not list(work.glob("tritonvision-*")), "temporary folders were left behind"


def test_a_failing_perf_analyzer_fails_the_cross_check_not_the_sweep(tmp_path):
    fake = tmp_path / "perf_analyzer"
    fake.write_text("#!/bin/sh\necho 'error: failed to get model metadata' >&2\nexit 3\n")
    fake.chmod(0o755)
    out = tmp_path / "sweep.json"
    proc = run([sys.executable, str(SWEEP), "--variant", "light", "--users", "1", "--rounds", "1", "--seconds", "1.5",
                "--warmup", "0.5", "--perf-analyzer", str(fake), "--no-progress", "--out", str(out)], timeout=300)
    # Locust's figures of the point are kept; the table and the exit code say the cross-check failed.
    assert proc.returncode == 1, proc.stderr[-2000:]
    (point,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert point["throughput"] > 0 and "failed to get model metadata" in point["pa_error"]
    assert "perf_analyzer failed 1/1 rounds" in proc.stdout and "Traceback" not in proc.stderr
    # One that is not there is a usage error before anything is measured.
    proc = run([sys.executable, str(SWEEP), "--variant", "light", "--perf-analyzer", str(tmp_path / "missing"),
                "--out", str(tmp_path / "never.json")], timeout=60)
    assert proc.returncode == 2 and "--perf-analyzer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never.jsonl").exists()


def test_the_perf_analyzer_cross_check_sends_the_images_the_locust_users_send(tmp_path, photos):
    # A folder of two images, one of which the server refuses: both tools must meet it, or they measured
    # different work (perf_analyzer used to send one sample photo whatever Locust sent).
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(photos["chelsea"])
    (images / "b.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    out = tmp_path / "sweep.json"
    proc = run([sys.executable, str(SWEEP), "--variant", "light", "--users", "1", "--rounds", "1", "--seconds", "1.5",
                "--warmup", "0.5", "--images", str(images), "--perf-analyzer", "--no-progress", "--out", str(out)],
               timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["images"] == [str(images / "a.jpg"), str(images / "b.jpg")]
    (point,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert point["failures"] > 0 and point["throughput"] > 0, point  # Locust: b.jpg refused, a.jpg classified
    assert "image refused" in point["pa_error"], point


def test_sweep_refuses_server_knobs_for_a_server_it_did_not_start(tmp_path):
    proc = run([sys.executable, str(SWEEP), "--url", "127.0.0.1:1", "--queue-delay-us", "100,200"], timeout=60)
    assert proc.returncode == 2 and "drop --url" in proc.stderr


def test_sweep_refuses_a_url_where_no_server_answers(tmp_path):
    from tritonvision_server.launcher import free_port

    out = tmp_path / "sweep.json"
    started = time.monotonic()
    proc = run([sys.executable, str(SWEEP), "--url", f"127.0.0.1:{free_port()}", "--users", "1,2", "--no-progress",
                "--out", str(out)], timeout=120)
    assert proc.returncode == 2 and "argument --url: no classifier ready" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - started < 40 and not out.with_suffix(".jsonl").exists()


def _sample(config, users, rnd, throughput, p99, failures=0):
    return {"config": config, "config_fields": {}, "users": users, "round": rnd, "applied": "reload",
            "throughput": throughput, "p50_ms": p99 / 2, "p95_ms": p99 * 0.9, "p99_ms": p99, "failures": failures}


def test_recommendation_takes_the_most_throughput_that_held_the_budget_in_every_round():
    sweep = load_sweep()

    class Args:
        percentile, tolerance, knee_fraction = "p99", 0.10, 0.9

    samples = [
        # A: saturates at 4 users (the knee); 8 users add latency, not throughput.
        *(_sample("A", 1, r, 20, 50) for r in (1, 2, 3)),
        *(_sample("A", 4, r, t, 150) for r, t in ((1, 60), (2, 62), (3, 61))),
        *(_sample("A", 8, r, 63, 420) for r in (1, 2, 3)),
        # B at 4 users: more throughput, a median p99 within the budget, but one round over it.
        *(_sample("B", 4, r, 90, p) for r, p in ((1, 180), (2, 190), (3, 260))),
        # B at 2 users: within the budget every round, but its rounds disagree on throughput.
        *(_sample("B", 2, r, t, 120) for r, t in ((1, 70), (2, 85), (3, 80))),
        # C: fastest, and within the budget, but requests failed.
        *(_sample("C", 4, r, 120, 100, failures=1) for r in (1, 2, 3)),
    ]
    rows = sweep.aggregate(samples, Args)
    rec = sweep.recommend(rows, 250, "p99")
    assert (rec["config"], rec["users"], rec["throughput"]) == ("B", 2, 80)
    assert rec["unstable"], "70..85 img/s over rounds is more than 10% apart"
    knee = sweep.knees(rows, 0.9)
    assert knee["A"] == 4
    assert sweep.recommend(rows, 40, "p99")["config"] is None
    assert sweep.recommend(rows, None, "p99") is None
    sweep.mark(rows, knee, rec)
    assert [(r["config"], r["users"]) for r in rows if r["recommended"]] == [("B", 2)]


def test_sweep_answers_again_from_measured_points_under_another_budget(tmp_path):
    points = tmp_path / "measured.jsonl"
    samples = [_sample(c, u, r, t, p) for c, u, t, p in (("A", 1, 20, 50), ("A", 4, 61, 150), ("B", 2, 80, 120))
               for r in (1, 2, 3)]
    points.write_text("".join(json.dumps(s) + "\n" for s in samples))
    points.with_suffix(".json").write_text(json.dumps({
        "hardware": {"cpu": "test CPU", "cores": 2, "gpu": None}, "variant": "real", "url": None, "rounds": 3}))
    answers = {}
    for budget in ("100", "250"):
        out = tmp_path / f"budget_{budget}.json"
        proc = run([sys.executable, str(SWEEP), "--from-points", str(points), "--budget-ms", budget, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(out.read_text())
        answers[budget] = (result["recommendation"]["config"], result["recommendation"]["users"])
        assert result["budget_ms"] == float(budget) and out.with_suffix(".png").exists()
    assert answers == {"100": ("A", 1), "250": ("B", 2)}


def test_percentiles_are_nearest_rank():
    sweep = load_sweep()
    ten, hundred = [float(v) for v in range(10, 0, -1)], [float(v) for v in range(1, 101)]
    # Nearest rank: the smallest value with at least q% of the values at or below it.
    assert sweep.percentile(ten, 50) == 5.0
    assert sweep.percentile(hundred, 99) == 99.0 and sweep.percentile(hundred, 50) == 50.0
    assert sweep.percentile([float(v) for v in range(1, 21)], 95) == 19.0
    assert sweep.percentile(ten, 99) == 10.0 and sweep.percentile([7.0], 50) == 7.0


def test_latency_figures_leave_out_the_warm_up_and_refuse_a_run_that_was_all_warm_up():
    sweep = load_sweep()
    # Sent at 0 s (a 1 s first answer), then one answer every 0.1 s from 1.0 to 3.0 s; one failure.
    good = [(1.0, 1000.0, True)] + [(1.0 + i / 10, 10.0 + i, True) for i in range(1, 21)]
    records = {"unary classify": good + [(2.0, 5.0, False)]}
    fig = sweep.latency_figures(records, "unary", warmup=1.5)
    # Kept: answers at 1.5 .. 3.0 s (16 answers, 15 intervals over 1.5 s); the 1 s first answer is left out.
    assert fig["throughput"] == pytest.approx(10.0) and fig["p99_ms"] == 30.0 and fig["failures"] == 1
    assert fig["requests"] == 21
    # A warm-up as long as the run leaves nothing to measure: that is an error, not the warm-up's figures.
    with pytest.raises(RuntimeError, match="warm-up"):
        sweep.latency_figures(records, "unary", warmup=5.0)


class _Args:
    percentile, tolerance, knee_fraction = "p99", 0.10, 0.9


def test_recommendation_edge_cases_ties_a_single_point_and_a_failed_round():
    sweep = load_sweep()
    # A single point within the budget is the answer; over it, there is none, with the reason.
    rows = sweep.aggregate([_sample("A", 1, 1, 20, 50)], _Args)
    assert sweep.recommend(rows, 100, "p99")["users"] == 1 and sweep.knees(rows, 0.9) == {"A": 1}
    assert sweep.recommend(rows, 10, "p99")["config"] is None
    # A tie on throughput goes to the lower latency, not to the configuration named first.
    rows = sweep.aggregate([_sample("A", 8, 1, 50, 200), _sample("B", 2, 1, 50, 90)], _Args)
    assert (sweep.recommend(rows, 250, "p99")["config"], sweep.recommend(rows, 250, "p99")["users"]) == ("B", 2)
    # A round that could not be measured (the server died) fails its point: it is never recommended, even
    # when its other rounds were the best.
    failed = {"config": "C", "config_fields": {}, "users": 4, "round": 2, "applied": "as is", "failures": 0,
              "error": "RuntimeError: no successful 'unary classify' request was recorded (12 failures)"}
    rows = sweep.aggregate([_sample("A", 1, r, 20, 50) for r in (1, 2)]
                           + [_sample("C", 4, 1, 90, 60), failed], _Args)
    c = next(r for r in rows if r["config"] == "C")
    assert c["failed_rounds"] == 1 and c["rounds"] == 2 and c["throughput"] == 90
    rec = sweep.recommend(rows, 250, "p99")
    assert (rec["config"], rec["users"]) == ("A", 1)
    sweep.mark(rows, sweep.knees(rows, 0.9), rec)
    assert "FAILED 1/2 rounds" in sweep.table({"rows": rows, "percentile": "p99", "recommendation": rec,
                                               "budget_ms": 250, "rounds": 2, "tolerance": 0.1, "knee_fraction": 0.9,
                                               "variant": "light", "hardware": {"cores": 2}, "url": None})
    # A point that failed in every round has no figures at all, and is no knee either.
    rows = sweep.aggregate([_sample("A", 1, 1, 20, 50), {**failed, "round": 1}], _Args)
    assert sweep.knees(rows, 0.9) == {"A": 1, "C": None} and sweep.recommend(rows, 250, "p99")["config"] == "A"


def test_from_points_reads_a_sweep_that_died_mid_write(tmp_path):
    points = tmp_path / "measured.jsonl"
    samples = [_sample("A", u, 1, t, p) for u, t, p in ((1, 20, 50), (4, 61, 150))]
    # The last line was cut off half-written; the .json of the dying sweep too.
    points.write_text("".join(json.dumps(s) + "\n" for s in samples) + json.dumps(_sample("A", 8, 1, 63, 90))[:40])
    points.with_suffix(".json").write_text('{"hardware": {"cpu": "t')
    out = tmp_path / "again.json"
    proc = run([sys.executable, str(SWEEP), "--from-points", str(points), "--budget-ms", "200", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "line 3 is cut off" in proc.stderr
    result = json.loads(out.read_text())
    assert [r["users"] for r in result["rows"]] == [1, 4] and result["recommendation"]["users"] == 4
    # A damaged line before the last is not a cut-off write: refused, with the line.
    points.write_text("{not json\n" + "".join(json.dumps(s) + "\n" for s in samples))
    proc = run([sys.executable, str(SWEEP), "--from-points", str(points), "--out", str(out)])
    assert proc.returncode == 2 and "line 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--users", ""], "--users"),
    (["--users", "1,0"], "--users"),
    (["--users", "-2"], "--users"),
    (["--users", "2,2"], "twice"),
    (["--users", "1,x"], "--users"),
    (["--seconds", "0"], "--seconds"),
    (["--warmup", "-1"], "--warmup"),
    (["--rounds", "0"], "--rounds"),
    (["--budget-ms", "0"], "--budget-ms"),
    (["--budget-ms", "-5"], "--budget-ms"),
    (["--tolerance", "-0.1"], "--tolerance"),
    (["--knee-fraction", "0"], "--knee-fraction"),
    (["--knee-fraction", "1.5"], "--knee-fraction"),
    (["--max-batch", "0"], "--max-batch"),
    (["--instances", "0"], "--instances"),
    (["--pre-instances", "-1"], "--pre-instances"),
    (["--queue-delay-us", "-1"], "--queue-delay-us"),
    (["--preferred", "0/8"], "--preferred"),
    (["--stream-in-flight", "0"], "--stream-in-flight"),
    (["--bad-image-every", "-1"], "--bad-image-every"),
    (["--bad-image-every", "1"], "--bad-image-every"),
    (["--variant", "heavy"], "--variant"),
    (["--images", "/nonexistent/photos"], "--images"),
])
def test_sweep_refuses_arguments_that_cannot_be_measured_with_a_usage_error(argv, message, capsys, tmp_path):
    sweep = load_sweep()
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--variant", "light", "--no-progress", "--out", str(tmp_path / "never" / "sweep.json"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err
    assert not (tmp_path / "never").exists(), "the sweep started"
