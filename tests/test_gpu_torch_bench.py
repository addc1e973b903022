"""benchmarks/gpu_torch.py, the measurement owed on a GPU host: its smoke mode runs every part on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")


def test_gpu_torch_benchmark_smoke_runs_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_torch.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_torch.py"), "--smoke", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and not result["errors"]
    assert result["complete"] and result["skipped"] == []
    assert {r["batch"] for r in result["model"]} == {1, 2} and all(r["img_s"] > 0 for r in result["model"])
    assert {r["batch"] for r in result["preprocess"]} == {1, 2}
    sdk = result["triton"]["sdk"]
    assert {(r["transport"], r["concurrency"]) for r in sdk} == {("grpc", 1), ("grpc", 2), ("system", 1), ("system", 2)}
    assert all(r["throughput"] > 0 and r["errors"] == 0 for r in sdk), sdk
    assert result["triton"]["agreement"]["ok"] and all(result["triton"]["agreement"]["top1_equal"])
    stages = {s["model"]: s for s in result["triton"]["breakdown"]["stages"]}
    assert stages["resnet50"]["inferences"] > 0 and stages["preprocess"]["inferences"] > 0
    targets = result["targets"]
    assert targets["triton_batch1_p50_ms"] > 0 and "throughput_ratio" in targets
    assert "targets:" in proc.stdout and "model only" in proc.stdout


def test_gpu_torch_benchmark_skips_points_past_its_budget_and_still_writes_its_json(tmp_path):
    """A device call has a hard time limit: with no time left every point is skipped and listed, nothing fails."""
    out = tmp_path / "gpu_torch.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_torch.py"), "--smoke", "--skip-triton",
                           "--budget", "0", "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and not result["errors"] and result["model"] == [] and result["preprocess"] == []
    assert result["skipped"] == ["model fp32 graphs=False batch 1", "model fp32 graphs=False batch 2",
                                 "preprocess batch 1", "preprocess batch 2"]
    assert "skipped (out of time)" in proc.stdout


def test_gpu_utilisation_without_nvml_streams_from_one_nvidia_smi_process(tmp_path, monkeypatch):
    """Without pynvml the utilisation comes from one ``nvidia-smi --loop-ms`` process per block, ended with it."""
    started = tmp_path / "started"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho $$ >> {started}\nwhile true; do echo 40; sleep 0.02; echo 60; sleep 0.02; done\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: the fallback
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_torch

    with gpu_torch.Utilisation() as util:
        time.sleep(0.4)
    assert len(started.read_text().split()) == 1, "one nvidia-smi process per block"
    assert len(util.samples) >= 4 and 40 <= util.mean <= 60
    pid = int(started.read_text())
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
