"""Locust scenarios and the sweep, run for real (headless Locust in subprocesses) against real servers."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
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


def test_sweep_keeps_what_it_measured_when_a_later_point_fails(grpc_url, tmp_path):
    out = tmp_path / "sweep.json"
    # Zero users send nothing: the second point fails after the first was measured.
    proc = run([sys.executable, str(SWEEP), "--url", grpc_url, "--users", "1,0", "--rounds", "1", "--seconds", "1.5",
                "--warmup", "0.5", "--no-progress", "--out", str(out)], timeout=300)
    assert proc.returncode != 0
    result = json.loads(out.read_text())
    assert not result["complete"] and [r["users"] for r in result["rows"]] == [1]
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 1


def test_sweep_refuses_server_knobs_for_a_server_it_did_not_start(tmp_path):
    proc = run([sys.executable, str(SWEEP), "--url", "127.0.0.1:1", "--queue-delay-us", "100,200"], timeout=60)
    assert proc.returncode == 2 and "drop --url" in proc.stderr


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
