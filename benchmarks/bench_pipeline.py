#!/usr/bin/env python3
"""In-process pipeline vs. the same pipeline through Triton (cpu profile), in one run.

Baseline: DALI on the CPU + the same ONNX file in ONNX Runtime, called directly with the thread budget the
server's steps get (``spec.CPU.cpu_threads`` each). Served: the SDK over gRPC to the real tritonserver
serving the cpu-profile ensemble. Both at batch 1 (sequential requests: latency) and at saturation
(in-process: batches of the preferred size; served: many requests in flight, batched by Triton).

Prints a table and writes ``results/bench_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tritonvision import Classifier, spec
from tritonvision_server.build_engines import build_cpu_repository
from tritonvision_server.launcher import TritonServer
from tritonvision_server.ort import OnnxRunner
from tritonvision_server.pipeline import CpuPreprocessor

log = logging.getLogger("bench_pipeline")
ROOT = Path(__file__).resolve().parents[1]


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


class InProcess:
    """The baseline: DALI on the CPU, then ONNX Runtime, called directly with the steps' thread budget."""

    name = "in-process (DALI CPU + ORT)"

    def __init__(self, onnx: Path, images: list[bytes]):
        threads = spec.CPU.cpu_threads
        self.pre = CpuPreprocessor(max_batch_size=spec.CPU.max_batch_size, num_threads=threads)
        # ONNX Runtime as the served step runs it. With its defaults, threads left spinning after a run here
        # would also slow the served request that follows, and the reverse.
        self.model = OnnxRunner(onnx, intra_op_threads=threads, spin_max_batch=spec.CPU.ort_spin_max_batch)
        self.arrays = [np.frombuffer(b, np.uint8) for b in images]
        self.batch = max(spec.CPU.resnet50.batching.preferred_batch_sizes)
        self._run(self.arrays[:1])  # warm-up

        #: batch-1 seconds of each step, to set against the served steps' compute times
        self.steps: dict[str, list[float]] = {spec.PREPROCESS: [], spec.RESNET50: []}

    def _run(self, batch):
        return self.model(self.pre(batch))

    def one(self, i: int) -> float:
        """Seconds for image ``i`` alone (batch 1)."""
        t = time.perf_counter()
        pixels = self.pre([self.arrays[i % len(self.arrays)]])
        t1 = time.perf_counter()
        self.model(pixels)
        t2 = time.perf_counter()
        self.steps[spec.PREPROCESS].append(t1 - t)
        self.steps[spec.RESNET50].append(t2 - t1)
        return t2 - t

    def throughput(self, n: int) -> float:
        done, start = 0, time.perf_counter()
        with tqdm(total=n, desc=f"{self.name}: batch {self.batch}", leave=False) as bar:
            while done < n:
                self._run([self.arrays[(done + j) % len(self.arrays)] for j in range(self.batch)])
                done += self.batch
                bar.update(self.batch)
        return done / (time.perf_counter() - start)


class Served:
    """The same pipeline through Triton: the SDK over gRPC, one request per image."""

    name = "Triton cpu profile via SDK"

    def __init__(self, url: str, images: list[bytes], concurrency: int):
        self.clf = Classifier(url, timeout=600, max_in_flight=concurrency)
        self.images = images
        self.clf.classify(images[0])  # warm-up

    def one(self, i: int) -> float:
        t = time.perf_counter()
        self.clf.classify(self.images[i % len(self.images)])
        return time.perf_counter() - t

    def throughput(self, n: int) -> float:
        work = [self.images[i % len(self.images)] for i in range(n)]
        start = time.perf_counter()
        self.clf.classify_batch(work)
        return n / (time.perf_counter() - start)


def measure(pipelines, rounds: int, n_latency: int, n_throughput: int) -> dict:
    """Batch 1: the pipelines take turns request by request (ABBA order), so that the shared machine's
    drift hits both alike and each served request has an in-process twin from the same moment.
    Saturation: they alternate round by round."""
    lat = {p.name: [] for p in pipelines}
    tput = {p.name: [] for p in pipelines}
    for r in range(rounds):
        log.info("round %d/%d", r + 1, rounds)
        for i in tqdm(range(n_latency), desc="batch 1, taking turns", leave=False):
            for p in pipelines if i % 2 == 0 else reversed(pipelines):
                lat[p.name].append(p.one(i))
        for p in pipelines:
            tput[p.name].append(p.throughput(n_throughput))
    figures = {
        p.name: {
            "batch1_p50_ms": percentile(lat[p.name], 50),
            "batch1_p90_ms": percentile(lat[p.name], 90),
            "throughput_img_s": float(statistics.median(tput[p.name])),
            "throughput_rounds": tput[p.name],
        }
        for p in pipelines
    }
    base, served = (lat[p.name] for p in pipelines)
    figures["paired_overhead_ms"] = float(np.median(np.subtract(served, base)) * 1000.0)
    return figures


def parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-requests", type=int, default=40)
    ap.add_argument("--throughput-images", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both pipelines")
    ap.add_argument("--weights", default="random:0", help="weights of the benchmarked model (speed does not depend on them)")
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "bench_pipeline.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    build = ROOT / "build" / "bench"
    repo = build_cpu_repository(build / "model_repository_cpu", build / "resnet50.onnx", args.weights)
    from tritonvision import sample_images

    images = [p.read_bytes() for p in sample_images()]

    baseline = InProcess(build / "resnet50.onnx", images)
    with TritonServer(repo) as server:
        served = Served(server.grpc_url, images, args.concurrency)
        with served.clf.measure() as m:
            for i in tqdm(range(args.latency_requests), desc="served batch 1, per-step breakdown", leave=False):
                served.one(i)
        figures = measure([baseline, served], args.rounds, args.latency_requests, args.throughput_images)
        since_start = served.clf.settled_statistics().breakdown()
        avg_batch = {model: round(since_start[model].avg_batch, 2) for model in (spec.PREPROCESS, spec.RESNET50)}
        served.clf.close()
    base, srv = figures[InProcess.name], figures[Served.name]
    srv["avg_batch"] = avg_batch
    srv["concurrency"] = args.concurrency
    base["throughput_batch"] = baseline.batch
    base["batch1_step_mean_ms"] = {k: float(np.mean(v) * 1e3) for k, v in baseline.steps.items()}
    srv["batch1_breakdown"] = m.breakdown.active().to_dict()

    from importlib.metadata import version

    from machine import hardware

    result = {
        "hardware": hardware(),
        "versions": {"python": platform.python_version(), "dali": version("nvidia-dali-cuda130"), "onnxruntime": version("onnxruntime"),
                     "tritonclient": version("tritonclient"), "tritonserver": "2.51.0 (nvidia-pytriton 0.7.0)"},
        "images": [p.name for p in sample_images()],
        "in_process": base,
        "served": srv,
        "ratios": {
            "throughput_served_over_in_process": srv["throughput_img_s"] / base["throughput_img_s"],
            "batch1_p50_overhead_ms": srv["batch1_p50_ms"] - base["batch1_p50_ms"],
            "batch1_paired_median_overhead_ms": figures["paired_overhead_ms"],
        },
        "targets": {"throughput_ratio_min": 0.9, "batch1_p50_overhead_ms_max": 3.0},
    }
    rows = [
        ("in-process (DALI CPU + ORT)", base["batch1_p50_ms"], base["batch1_p90_ms"], base["throughput_img_s"], f"batch {base['throughput_batch']}"),
        ("Triton cpu profile via SDK", srv["batch1_p50_ms"], srv["batch1_p90_ms"], srv["throughput_img_s"], f"{args.concurrency} in flight"),
    ]
    print(f"\n{'pipeline':<30} {'b1 p50 ms':>10} {'b1 p90 ms':>10} {'img/s':>8}  saturation")
    for name, p50, p90, tput, how in rows:
        print(f"{name:<30} {p50:>10.1f} {p90:>10.1f} {tput:>8.1f}  {how}")
    r = result["ratios"]
    print("\nwhere a served batch-1 request spends its time (Triton statistics):")
    print(m.breakdown.active().table())
    steps = base["batch1_step_mean_ms"]
    print("in-process batch-1 step means: " + ", ".join(f"{k} {v:.2f} ms" for k, v in steps.items()))
    print(f"\nthroughput served/in-process: {r['throughput_served_over_in_process']:.2f} (target >= 0.9); "
          f"batch-1 p50 overhead: {r['batch1_p50_overhead_ms']:+.1f} ms (target <= 3 ms; median of request-by-request "
          f"differences {r['batch1_paired_median_overhead_ms']:+.1f} ms); average batch {srv['avg_batch']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
