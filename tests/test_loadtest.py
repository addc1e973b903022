"""Locust scenarios and the sweep, run for real (headless Locust in a subprocess) against real servers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
SWEEP = ROOT / "loadtest" / "sweep.py"


def locust(url: str, user: str, tmp_path: Path, *extra: str) -> dict[str, dict]:
    prefix = tmp_path / user
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", "2", "-r", "2",
           "-t", "4s", "--csv", str(prefix), "--only-summary", *extra, user]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"locust did not finish: {exc.stderr[-3000:] if exc.stderr else ''}")
    stats = prefix.with_name(prefix.name + "_stats.csv")
    assert stats.exists(), proc.stderr[-2000:]
    return {row["Name"]: row for row in csv.DictReader(stats.open())}


@pytest.mark.parametrize("user", ["UnaryUser", "ShmUser", "StreamUser"])
def test_each_user_loads_the_server_and_bad_images_fail_apart(grpc_url, tmp_path, user):
    rows = locust(grpc_url, user, tmp_path, "--bad-image-every", "3")
    good, bad = rows["classify"], rows["bad image"]
    assert int(good["Request Count"]) >= 2 and int(good["Failure Count"]) == 0
    assert int(bad["Request Count"]) >= 1 and bad["Failure Count"] == bad["Request Count"]


def test_options_fall_back_to_environment_variables(grpc_url, tmp_path, photos, monkeypatch):
    (tmp_path / "only.jpg").write_bytes(photos["coffee"])
    monkeypatch.setenv("TRITONVISION_IMAGES", str(tmp_path / "only.jpg"))
    monkeypatch.setenv("TRITONVISION_BAD_IMAGE_EVERY", "2")
    rows = locust(grpc_url, "UnaryUser", tmp_path)
    # Every second request is the corrupt one: as many fail as succeed, give or take the last in flight.
    assert abs(int(rows["classify"]["Request Count"]) - int(rows["bad image"]["Request Count"])) <= 2


def test_sweep_against_a_running_server_writes_table_json_csv_and_plot(grpc_url, tmp_path):
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(SWEEP), "--url", grpc_url, "--users", "1,3", "--seconds", "3",
                           "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "net batch" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["users"] for r in rows] == [1, 3]
    assert all(r["throughput"] > 0 and r["failures"] == 0 for r in rows)
    # One user never gives the batcher two requests at once. Three users that never pause must batch: ResNet-50
    # takes 40 ms or more per image on the CPU, so while one request runs the others queue and leave together.
    assert rows[0]["resnet50_avg_batch"] == pytest.approx(1.0)
    assert rows[1]["resnet50_avg_batch"] > 1.0, f"three users did not batch: {rows[1]}"
    assert out.with_suffix(".csv").read_text().count("\n") == 3
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_sweep_servers_take_the_queue_delay_it_sets(tmp_path):
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(SWEEP), "--variant", "light", "--users", "1", "--queue-delay-us", "0,20000",
                           "--seconds", "3", "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    none, delayed = json.loads(out.read_text())["rows"]
    # A lone request waits the whole delay for company that never comes.
    assert none["resnet50_queue_ms"] < 5 and delayed["resnet50_queue_ms"] >= 15
    assert delayed["p50_ms"] > none["p50_ms"] + 10


def test_sweep_refuses_server_knobs_for_a_server_it_did_not_start(tmp_path):
    proc = subprocess.run([sys.executable, str(SWEEP), "--url", "127.0.0.1:1", "--queue-delay-us", "100"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "drop --url" in proc.stderr
