"""Every CPU benchmark runs, briefly, as users run it: its script in a subprocess, with its own arguments,
writing its results file. Benchmarks are run by hand now and then, so one that stopped running (a file that
moved, a function renamed under it) would otherwise be found only by the next person who needs its figures.
The figures of these short runs mean nothing; that they are there and sane is what is checked.
(benchmarks/gpu_torch.py has its own smoke tests; gpu_check.py needs a GPU.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _positive(rows, key):
    return bool(rows) and all(r[key] > 0 for r in rows)


# name: (arguments, the option naming the results file, what the results must show)
CASES = {
    "bad_images": (["--batch", "4", "--rounds", "1", "--bad", "1"], "--out",
                   lambda d: _positive(d["rows"], "good_img_per_s")),
    "batch_budget": (["--clients", "8", "--seconds", "3", "--variants", "shipped"], "--output",
                     lambda d: [r["variant"] for r in d["rows"]] == ["shipped"] and d["rows"][0]["requests"] > 0
                     and d["rows"][0]["errors"] == 0 and d["rows"][0]["over_budget"] == 0),
    "batch_memory": (["--rows", "1,2", "--formats", "jpeg"], "--out",
                     lambda d: [r["rows"] for r in d["results"]] == [1, 2] and not any(r["error"] for r in d["results"])),
    "bench_client": (["--concurrency", "1", "--seconds", "1", "--warmup", "0.5"], "--out",
                     lambda d: _positive(d["rows"], "throughput") and not any(r.get("errors") for r in d["rows"])),
    "bench_pipeline": (["--latency-requests", "3", "--throughput-images", "8", "--concurrency", "2", "--rounds", "1"],
                       "--output", lambda d: d["ratios"]["throughput_served_over_in_process"] > 0),
    "cancel_storm": (["--seconds", "2", "--threads", "2", "--rounds", "1"], "--output",
                     lambda d: bool(d["rows"]) and all(r["probes"] > 0 for r in d["rows"])),
    "fuzz_images": (["--cases", "60", "--server", "4", "--no-progress"], "--out",
                    lambda d: d["cases"] == sum(r["cases"] for r in d["rows"]) == 60
                    and {r["format"] for r in d["rows"]} == {"jpeg", "png", "bmp", "tiff", "webp", "gif"}
                    and sum(r["decoded"] for r in d["rows"]) >= 31 and not any(r["faults"] for r in d["rows"])
                    and d["server"]["cases"] == 4 and not d["server"]["faults"] and d["server"]["alive_after"]),
    "overload": (["--rounds", "1", "--seconds", "3", "--capacity-seconds", "2", "--capacity-concurrency", "2",
                  "--variants", "shed", "--no-progress"], "--out",
                 lambda d: bool(d["results"]) and all(r["outcomes"].get("ok", 0) > 0 for r in d["results"])),
    "precision_agreement": ([], "--output", lambda d: d["results"]["fp32"]["top1_agreement"] == 1.0
                            and {"fp16", "int8"} <= set(d["results"])),
    "queue_stall": (["--concurrency", "2", "--seconds", "2", "--rounds", "1"], "--out",
                    lambda d: _positive(d["summary"], "throughput")),
    # Not the "every" variant: Triton 2.51 crashes when it traces every request under load (README, Tracing).
    "trace_cost": (["--concurrency", "2", "--seconds", "1", "--rounds", "1", "--variants", "off,rate1000"], "--output",
                   lambda d: _positive(d["summary"], "throughput") and [s["variant"] for s in d["summary"]]
                   == ["off", "rate1000"] and d["summary"][0]["spans"] == 0),
    "validate_ceiling": (["--instances", "1", "--concurrency", "1", "--seconds", "1", "--images", "35KB"], "--output",
                         lambda d: _positive(d["rows"], "throughput")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_its_results(name, tmp_path):
    args, out_option, sane = CASES[name]
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args, out_option, str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sane(result), json.dumps(result)[:3000]


def test_fuzz_images_serves_the_gpu_torch_profile_on_the_cpu_and_repeats_its_costliest_cases(tmp_path):
    # The server pass serves the profile fuzzed in process (gpu-torch on the CPU device), not the cpu one; with
    # --rounds it then sends the costliest cases again, reading the preprocess stub's memory after each round.
    out = tmp_path / "fuzz_images_gpu_torch.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "fuzz_images.py"), "--profile", "gpu-torch", "--cases", "45",
                           "--server", "12", "--rounds", "3", "--no-progress", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    server = d["server"]
    assert d["profile"] == server["profile"] == "gpu-torch" and server["cases"] == 12, json.dumps(d)[:3000]
    assert not server["faults"] and server["alive_after"] and server["refused"] >= 1 and server["stubs"] >= 2, server
    repeated, rounds = server["repeated"], server["rounds"]
    # Each format's costliest accepted case, then the crafted PNG that fails late in its decode (in process too).
    assert {"bmp", "jpeg", "png", "tiff", "webp"} <= {c["format"] for c in repeated}, repeated
    assert repeated[-1]["size"] == [10000, 12000] and repeated[-1]["in_process"] == "refused-decode", repeated[-1]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["cases"] == len(repeated) for r in rounds), rounds
    tally = server["rounds_tally"]
    assert tally["cases"] == tally["as_expected"] == 3 * len(repeated) and tally["refused"] >= 3, tally
    # The crafted PNG decodes 120 MP before it fails: every round's peak shows it, and the stub is read idle after.
    assert all(r["peak_mib"] > r["VmRSS_mib"] + 300 and r["RssAnon_mib"] > 0 for r in rounds), rounds
    assert server["rounds_summary"]["verdict"] == "plateau", server["rounds_summary"]
    assert "rounds 2-3:" in proc.stdout and "RssAnon" in proc.stdout, proc.stdout[-3000:]


def test_every_benchmark_script_is_covered():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - {"machine", "perf_analyzer", "gpu_check", "gpu_torch"}
    assert scripts == set(CASES), "a benchmark without a smoke run here (or one listed that is gone)"
