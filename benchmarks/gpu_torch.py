#!/usr/bin/env python3
"""The gpu-torch profile measured on one GPU, in one run (< 8 minutes on an H100/H200):

1. model only: ResNet-50 throughput and latency by batch size, FP32 / TF32 / FP16, eager and CUDA graphs,
   with GPU utilisation sampled from NVML (the batching table);
2. preprocessing only: nvJPEG batch decode + resize + crop + normalise on the GPU, by batch size;
3. the whole ensemble through the bundled Triton 2.51 (gpu-torch repository, random:0 weights): perf_analyzer
   and the SDK at concurrency 1..256 over plain gRPC, system shared memory and CUDA shared memory;
4. the per-step breakdown from Triton's statistics at the highest concurrency.

Before measuring the ensemble, its answers for the sample photos are checked against the same weights run in
FP32 on the CPU in this process (top-1 equal, scores within 5e-3): a broken GPU hand-over fails the run.

Then the targets: ensemble >= 0.8 x min(model-only FP16+graphs, preprocessing-only) at batch 128, and batch-1
p50 through Triton within 2 ms of model-only batch-1 latency. Prints a compact table; writes JSON.

The JSON is rewritten after every point (``complete`` turns true at the end), and ``--budget`` bounds the run:
a point that would leave the later parts short of their expected time is skipped and listed, so a device call's
time limit returns figures for every part rather than none. The server's log is copied next to the JSON.

``--smoke`` runs every part on the CPU at tiny sizes (the CPU override; no perf_analyzer, no CUDA shm), so CI
checks the script itself. Exit code 1 when a part fails (targets missed are reported, not failures).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

log = logging.getLogger("gpu_torch")


class Utilisation:
    """Mean GPU utilisation (%) over a block, sampled every 50 ms from NVML (pynvml); without pynvml, from one
    ``nvidia-smi --loop-ms`` process for the whole block (not one process per sample, whose start-up would
    take CPU from the measurement)."""

    def __init__(self, index: int = 0):
        self.index, self.samples, self._stop = index, [], threading.Event()
        self._smi = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # noqa: BLE001 - no NVML bindings: the CLI reads the same counter
            self._read = None

    def _loop(self):
        while not self._stop.wait(0.05):
            try:
                self.samples.append(float(self._read()))
            except Exception:  # noqa: BLE001 - no GPU (smoke mode): no figure
                return

    def _pump(self):
        for line in self._smi.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue

    def __enter__(self):
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
        else:
            try:
                self._smi = subprocess.Popen(
                    ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     "--loop-ms=50"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:  # no nvidia-smi (smoke mode): no figure
                self._thread = None
                return self
            self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


class Budget:
    """The run's time limit. A point is measured only while the time left exceeds what the later parts are
    expected to need (``reserve``); a skipped point is recorded, so a slow part leaves the targets' points of
    the next ones their time instead of the device call's limit cutting the run off."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def allows(self, point: str, reserve: float = 0.0) -> bool:
        if time.monotonic() + reserve < self.end:
            return True
        self.skipped.append(point)
        log.warning("out of time: %s skipped", point)
        return False


# What the later parts need on an H100/H200, with margin: Triton's start-up (two stubs importing torch and
# capturing graphs), the perf_analyzer points, the SDK points, the breakdown.
RESERVE_TRITON_S = 240.0
RESERVE_SDK_S = 60.0


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, seconds: float, min_iters: int = 3) -> tuple[float, int]:
    """Mean seconds per call of ``fn`` over at least ``seconds`` (after one warm-up call)."""
    fn()
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < seconds:
        fn()
        n += 1
    _sync(device)
    return (time.perf_counter() - start) / n, n


def model_only(device, batch_sizes, precisions, graphs, seconds, state_dict, rows: list, budget: Budget,
               reserve: float, save) -> None:
    """Appends a row per point to ``rows`` (saved as it goes). The points the targets read (FP16 with graphs)
    come first when the precisions are listed in that order."""
    import torch

    from tritonvision_server import torch_pipeline as tp

    for precision in precisions:
        model, dtype = tp.load_resnet50(state_dict, device, precision)
        runner = None
        for use_graphs in graphs:
            for bs in batch_sizes:
                if not budget.allows(f"model {precision} graphs={use_graphs} batch {bs}", reserve):
                    continue
                x = torch.randn(bs, 3, 224, 224, device=device).to(dtype)
                runner = tp.GraphRunner(model, (bs,) if use_graphs else (), device=device, input_dtype=dtype,
                                        capture=use_graphs)
                with Utilisation() as util:
                    per_call, n = _timed(lambda r=runner, x=x: r(x), device, seconds)
                rows.append({"precision": precision, "cuda_graphs": use_graphs, "batch": bs, "ms": per_call * 1e3,
                             "img_s": bs / per_call, "gpu_util": util.mean, "iters": n})
                save()
                log.info("model %s graphs=%s batch %d: %.2f ms, %.0f img/s", precision, use_graphs, bs, per_call * 1e3,
                         bs / per_call)
        del model, runner  # this precision's weights and graphs, before the next one's are made
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tp.set_tf32(False)


def preprocess_only(device, images: list[bytes], batch_sizes, seconds, rows: list, budget: Budget, reserve: float,
                    save) -> None:
    import numpy as np
    import torch

    from tritonvision_server import torch_pipeline as tp

    normalise = tp.Normaliser(device, torch.float16 if device.type == "cuda" else torch.float32)
    for bs in batch_sizes:
        if not budget.allows(f"preprocess batch {bs}", reserve):
            continue
        batch = [np.frombuffer(images[i % len(images)], np.uint8) for i in range(bs)]

        def step():
            decoded = tp.decode(batch, device)
            with torch.inference_mode():
                return normalise(tp.resize_crop(decoded))

        with Utilisation() as util:
            per_call, n = _timed(step, device, seconds)
        rows.append({"batch": bs, "ms": per_call * 1e3, "img_s": bs / per_call, "gpu_util": util.mean, "iters": n})
        save()
        log.info("preprocess batch %d: %.2f ms, %.0f img/s", bs, per_call * 1e3, bs / per_call)


def reference_scores(images: list[bytes], state_dict: Path):
    """FP32 scores of ``images`` computed in this process on the CPU: what the served ensemble must agree with."""
    import numpy as np
    import torch

    from tritonvision_server import torch_pipeline as tp

    model, _ = tp.load_resnet50(state_dict, "cpu", "fp32")
    pixels = tp.preprocess(tp.decode([np.frombuffer(b, np.uint8) for b in images], "cpu"), "cpu")
    with torch.inference_mode():
        return model(pixels).numpy()


def agreement(url: str, images: list[bytes], state_dict: Path) -> dict:
    """The served answers against :func:`reference_scores`: a broken hand-over between the steps (garbage pixels
    through DLPack) would still produce throughput figures, so they are checked first."""
    import tritonvision as tv

    ref = reference_scores(images, state_dict)
    with tv.Classifier(url, timeout=300) as clf:
        served = [clf.classify(image, top_k=5) for image in images]
    top1 = [preds[0].index == int(ref[i].argmax()) for i, preds in enumerate(served)]
    diff = max(abs(p.score - float(ref[i][p.index])) for i, preds in enumerate(served) for p in preds)
    # FP16 pixels and model against FP32, nvJPEG against libjpeg: scores of ~0.01-0.06 move by ~1e-3 at most.
    return {"top1_equal": top1, "max_score_diff": diff, "ok": all(top1) and diff <= 5e-3}


def through_triton(repo: Path, images: list[bytes], *, concurrencies, sdk_concurrencies, transports, seconds,
                   perf_analyzer: Path | None, server_args, work: Path, state_dict: Path, out: dict, budget: Budget,
                   save) -> None:
    """Fills ``out`` (saved after each point): a run cut short still returns what it measured."""
    import tritonvision as tv
    from tritonvision import _bench

    from tritonvision_server.launcher import TritonServer

    out.update({"perf_analyzer": [], "sdk": [], "breakdown": None, "errors": []})
    with TritonServer(repo, extra_args=list(server_args), startup_timeout=300, log_file=work / "tritonserver.log") as server:
        url = server.grpc_url
        with tv.Classifier(url, timeout=300) as clf:  # first requests: nvJPEG and cuDNN set-up, not measured
            for image in images * 2:
                clf.classify(image)
        out["agreement"] = agreement(url, images, state_dict)
        save()
        log.info("served vs in-process FP32 on the CPU: %s", out["agreement"])
        if not out["agreement"]["ok"]:
            out["errors"].append(f"the served scores disagree with the in-process reference: {out['agreement']}")
        if perf_analyzer is not None:
            try:
                import perf_analyzer as pa

                # A folder that already holds the binary (carried to a GPU host without internet) is used as is.
                binary, env = pa.ensure(perf_analyzer, ROOT / ".whl")
                data = pa.input_data(images[0], work / "input.json")
                for shm in transports:
                    for c in concurrencies:
                        if not budget.allows(f"perf_analyzer {shm} c={c}", RESERVE_SDK_S):
                            continue
                        r = pa.run(binary, env, url=url, model="classifier", data=data, concurrency=c,
                                   interval_ms=int(seconds * 1000), csv_path=work / f"pa_{shm}_{c}.csv",
                                   shm={"grpc": "none"}.get(shm, shm))
                        out["perf_analyzer"].append({"transport": shm, **r})
                        save()
                        log.info("perf_analyzer %s c=%d: %.0f img/s p50 %.2f ms", shm, c, r["throughput"], r["p50_ms"])
            except Exception as exc:  # noqa: BLE001 - report it, keep the SDK figures
                log.exception("perf_analyzer")
                out["errors"].append(f"perf_analyzer: {type(exc).__name__}: {exc}")
        for shm in transports:
            for c in sdk_concurrencies:
                if not budget.allows(f"SDK {shm} c={c}", 2 * seconds + 5):
                    continue
                try:
                    with tv.Classifier(url, timeout=60, shm=None if shm == "grpc" else shm) as clf:
                        r = _bench.run(clf, images, concurrency=c, seconds=seconds, warmup=min(1.0, seconds))
                    out["sdk"].append({"transport": shm, **r.to_dict()})
                    save()
                    log.info("SDK %s c=%d: %.0f img/s p50 %.2f ms", shm, c, r.throughput, r.p50_ms)
                except Exception as exc:  # noqa: BLE001
                    out["errors"].append(f"SDK {shm} c={c}: {type(exc).__name__}: {exc}")
        # The per-step breakdown at the highest concurrency, plain gRPC (what a run cut short lacks first).
        if budget.allows("breakdown"):
            with tv.Classifier(url, timeout=60) as clf:
                before = clf.settled_statistics()
                _bench.run(clf, images, concurrency=max(sdk_concurrencies), seconds=seconds, warmup=0.0)
                out["breakdown"] = (clf.settled_statistics() - before).to_dict()


def _best(rows, **match):
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(rows, key=lambda r: r["img_s"]) if rows else None


def targets(result: dict) -> dict:
    model = _best(result["model"], precision="fp16", cuda_graphs=True, batch=128) or _best(result["model"])
    pre = _best(result["preprocess"], batch=128) or _best(result["preprocess"])
    batch1 = _best(result["model"], precision="fp16", cuda_graphs=True, batch=1) or _best(result["model"], batch=1)
    served = result.get("triton", {})
    rows = served.get("perf_analyzer") or served.get("sdk") or []
    best = max(rows, key=lambda r: r["throughput"], default=None)
    c1 = [r for r in rows if r["concurrency"] == 1 and r["transport"] == "grpc" and r["p50_ms"] > 0]
    out = {"model_only_img_s": model and model["img_s"], "preprocess_only_img_s": pre and pre["img_s"],
           "ensemble_best_img_s": best and best["throughput"], "ensemble_best_at": best and
           {"transport": best["transport"], "concurrency": best["concurrency"]},
           "model_batch1_ms": batch1 and batch1["ms"], "triton_batch1_p50_ms": c1[0]["p50_ms"] if c1 else None}
    if model and pre and best:
        ceiling = min(model["img_s"], pre["img_s"])
        out["throughput_ratio"] = best["throughput"] / ceiling
        out["throughput_target_met"] = out["throughput_ratio"] >= 0.8
    if batch1 and c1:
        out["batch1_overhead_ms"] = c1[0]["p50_ms"] - batch1["ms"]
        out["latency_target_met"] = out["batch1_overhead_ms"] <= 2.0
    return out


def versions() -> dict:
    import numpy
    import torch
    import torchvision

    import machine

    v = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "numpy": numpy.__version__,
         "triton": "2.51.0 (nvidia-pytriton 0.7.0, bundled)", "hardware": machine.hardware()}
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


def print_table(result: dict) -> None:
    print(f"\n{result['versions'].get('gpu', 'CPU (smoke)')} | torch {result['versions']['torch']} | {result['date']}")
    print("model only (img/s; ms per batch)")
    for r in result["model"]:
        print(f"  {r['precision']:<5} graphs={'y' if r['cuda_graphs'] else 'n'} b={r['batch']:<4} {r['img_s']:>9.0f} "
              f"{r['ms']:>8.2f} util={r['gpu_util']}")
    print("preprocess only: " + "  ".join(f"b={r['batch']}: {r['img_s']:.0f} img/s" for r in result["preprocess"]))
    served = result.get("triton") or {}
    for tool in ("perf_analyzer", "sdk"):
        for r in served.get(tool, []):
            print(f"  {tool:<13} {r['transport']:<6} c={r['concurrency']:<4} {r['throughput']:>9.0f} img/s "
                  f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms")
    for stage in (served.get("breakdown") or {}).get("stages", []):
        print(f"  step {stage['model']:<11} batch {stage['avg_batch']:.1f} queue {stage['queue_ms']:.2f} "
              f"in {stage['input_ms']:.2f} infer {stage['infer_ms']:.2f} out {stage['output_ms']:.2f} ms")
    print(f"served vs in-process reference: {served.get('agreement')}")
    print(f"targets: {json.dumps(result['targets'])}")
    if result.get("skipped"):
        print(f"skipped (out of time): {', '.join(result['skipped'])}")
    for e in result.get("errors", []):
        print(f"ERROR {e}")


def parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--seconds", type=float, default=None, help="measured window per point (default 1.0; smoke 0.2)")
    ap.add_argument("--skip-triton", action="store_true", help="parts 1-2 only")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds for the whole run (default 480): points that would leave the later parts short of "
                         "time are skipped and listed under 'skipped'")
    ap.add_argument("--perf-analyzer-dir", type=Path, default=None,
                    help="folder holding perf_analyzer 2.51 (default: extracted from the tritonclient 2.51.0 wheel)")
    ap.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", ROOT / "results")) / "gpu_torch.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from tritonvision import sample_images, spec
    from tritonvision_server.build_engines import build_gpu_torch_repository
    from tritonvision_server.serve import gpu_torch_server_args

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        log.error("no CUDA GPU visible to PyTorch; use --smoke to check the script on the CPU")
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    seconds = args.seconds or (0.2 if smoke else 1.0)
    budget = Budget(args.budget)
    images = [p.read_bytes() for p in sample_images()]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": smoke, "versions": versions(), "errors": [],
              "model": [], "preprocess": [], "triton": {}, "skipped": budget.skipped, "complete": False,
              "profile": {"max_batch_size": spec.GPU_TORCH.max_batch_size, "graphs": spec.GPU_TORCH.cuda_graph_batch_sizes,
                          "instances": [spec.GPU_TORCH.preprocess.instances, spec.GPU_TORCH.resnet50.instances]}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_torch_"))

    def save():
        """The JSON as it stands: the device call's limit may end the run at any point."""
        partial = {**result, "errors": result["errors"] + result["triton"].get("errors", [])}
        partial["targets"] = targets(partial)
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(partial, indent=2, default=str))
        tmp.replace(args.output)
        return partial

    state_dict = work / "resnet50.pt"
    repo = build_gpu_torch_repository(work / "repo", "random:0", device=device.type, state_dict=state_dict)
    # FP16 with graphs first: the targets read it, and a budget running out drops the other precisions.
    parts = [
        ("model", lambda: model_only(device, (1, 2) if smoke else (1, 8, 32, 64, 128, 256),
                                     ("fp32",) if smoke else ("fp16", "tf32", "fp32"),
                                     (False,) if smoke else (True, False), seconds, state_dict, result["model"],
                                     budget, 0 if args.skip_triton else RESERVE_TRITON_S + 20, save)),
        ("preprocess", lambda: preprocess_only(device, images, (1, 2) if smoke else (1, 32, 128, 256), seconds,
                                               result["preprocess"], budget,
                                               0 if args.skip_triton else RESERVE_TRITON_S, save)),
    ]
    if not args.skip_triton:
        parts.append(("triton", lambda: through_triton(
            repo, images, concurrencies=(1, 8, 32, 128, 256), sdk_concurrencies=(1, 2) if smoke else (1, 16, 64, 256),
            transports=("grpc", "system") if smoke else ("grpc", "system", "cuda"),
            # On the CPU a request takes 0.1-0.5 s: a window must hold several.
            seconds=max(seconds, 2.0) if smoke else seconds,
            perf_analyzer=None if smoke else (args.perf_analyzer_dir or work / "perf_analyzer"),
            server_args=() if smoke else gpu_torch_server_args(), work=work, state_dict=state_dict,
            out=result["triton"], budget=budget, save=save)))
    for name, run in parts:
        start = time.perf_counter()
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - keep what the other parts measured
            log.exception("%s failed", name)
            result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
        log.info("%s took %.0f s", name, time.perf_counter() - start)
        save()
    if (work / "tritonserver.log").exists():  # what the server said, next to the figures
        shutil.copyfile(work / "tritonserver.log", args.output.with_name("gpu_torch_tritonserver.log"))
    result["complete"] = True
    final = save()
    print_table(final)
    return 1 if final["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
