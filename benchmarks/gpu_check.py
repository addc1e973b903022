#!/usr/bin/env python3
"""Checks for a GPU host that has no DALI and no TensorRT: what of the product can run there, does.

1. CUDA shared memory through the SDK (``shm="cuda"``) against the real tritonserver bundled in
   nvidia-pytriton, serving the light variant of the ensemble (same interface, trivial compute): results
   equal plain gRPC and system shared memory, a refused image inside a CUDA-shm session fails alone, and no
   region stays registered on the server or in ``/dev/shm`` afterwards.
2. SDK throughput and latency per transport (plain gRPC, system shm, CUDA shm) at concurrency 1 and 16 on
   that server, plain gRPC being the baseline of the same run.
3. The engine builder's GPU detection and engine naming on a real ``nvidia-smi``, and its refusal without
   TensorRT.

Prints a table and writes JSON (``--output``); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

log = logging.getLogger("gpu_check")


def shm_checks(url: str, images: list[bytes], failures: list[str]) -> dict:
    import tritonvision as tv
    from tritonvision._transport._grpc import GrpcTransport

    out = {}
    with tv.Classifier(url, timeout=60) as plain:
        expected = [[(p.index, round(p.score, 5)) for p in plain.classify(img)] for img in images]
    for kind in ("system", "cuda"):
        try:
            out[kind] = _shm_check(tv, GrpcTransport, url, kind, images, expected)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other checks
            out[kind] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if not out[kind]["ok"]:
            failures.append(f"{kind} shared memory: {out[kind]}")
    return out


def _shm_check(tv, GrpcTransport, url, kind, images, expected) -> dict:  # noqa: N803
    with tv.Classifier(url, timeout=60, shm=kind) as clf:
        got = [[(p.index, round(p.score, 5)) for p in clf.classify(img)] for img in images]
        try:
            clf.classify(b"not an image")
            refused = False
        except tv.InvalidImageError:
            refused = True
        after_error = [[(p.index, round(p.score, 5)) for p in clf.classify(img)] for img in images[:1]]
        # A stream left early over this kind of memory: drained, its regions reused, nothing left behind.
        stream = clf.classify_stream(images * 8, max_in_flight=8)
        streamed_ok = next(stream).ok
        stream.close()
        stream_regions = len(clf.shm_regions)
        prefix = clf.shm_prefix
    transport = GrpcTransport(url)
    leaked = [r for r in transport.registered_shm(kind) if r.startswith(prefix)]
    transport.close()
    leaked_files = [p.name for p in Path("/dev/shm").glob(prefix + "*")]
    ok = got == expected and refused and after_error == expected[:1] and streamed_ok and not leaked and not leaked_files
    return {"equal_to_plain": got == expected, "bad_image_refused": refused, "serves_after_error": after_error == expected[:1],
            "stream_left_early_ok": streamed_ok, "regions_after_stream": stream_regions,
            "leaked_regions": leaked, "leaked_files": leaked_files, "ok": ok}


def throughput(url: str, images: list[bytes], seconds: float) -> list[dict]:
    import tritonvision as tv
    from tritonvision import _bench

    rows = []
    for shm in (None, "system", "cuda"):
        for concurrency in (1, 16):
            try:
                with tv.Classifier(url, timeout=60, shm=shm) as clf:
                    r = _bench.run(clf, images, concurrency=concurrency, seconds=seconds, warmup=1.0)
            except Exception as exc:  # noqa: BLE001 - the shm check above already reports it
                log.warning("throughput with %s: %s", shm, exc)
                continue
            rows.append({"transport": shm or "grpc", **r.to_dict()})
    return rows


def engine_naming(failures: list[str]) -> dict:
    from tritonvision import spec
    from tritonvision_server import engines

    gpu = engines.detect_gpu(0)
    s = engines.EngineSpec(gpu.name, gpu.compute_capability, "10.x", "fp16", "FP16", "0" * 64,
                           tuple(engines.optimization_profiles(spec.GPU.resnet50.batching)), 4096)
    try:
        engines.find_builder()
        missing = "a TensorRT builder was found"
    except engines.TensorRTUnavailable as exc:
        missing = f"refused: {str(exc)[:160]}"
    return {"gpu": str(gpu), "engine_file": s.file_stem, "without_tensorrt": missing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="measured window per throughput point")
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "gpu_check.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import machine
    from tritonvision_server.configs import write_light_repository
    from tritonvision_server.launcher import TritonServer

    from tritonvision import sample_images

    images = [p.read_bytes() for p in sample_images()]
    failures: list[str] = []
    result = {"device": machine.gpu() or "none", "hardware": machine.hardware(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_light_repository(Path(tmp) / "light")
        with TritonServer(repo) as server:
            result["shm"] = shm_checks(server.grpc_url, images, failures)
            result["throughput"] = throughput(server.grpc_url, images, args.seconds)
    try:
        result["engines"] = engine_naming(failures)
    except Exception as exc:  # noqa: BLE001 - report, do not hide the other results
        failures.append(f"engine naming: {type(exc).__name__}: {exc}")
    result["failures"] = failures

    print(f"\ndevice: {result['device']}")
    for kind, r in result["shm"].items():
        print(f"{kind:>6} shm: {'OK' if r['ok'] else 'FAILED'} {r}")
    print(f"\n{'transport':<8} {'conc':>4} {'img/s':>9} {'vs grpc':>8} {'p50 ms':>8} {'p99 ms':>8}")
    base = {r["concurrency"]: r["throughput"] for r in result["throughput"] if r["transport"] == "grpc"}
    for r in result["throughput"]:
        print(f"{r['transport']:<8} {r['concurrency']:>4} {r['throughput']:>9.1f} {r['throughput'] / base[r['concurrency']]:>8.2f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    print(f"\nengines: {result.get('engines')}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for f in failures:
        log.error("%s", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
