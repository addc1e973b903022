"""How many requests per second the gpu profile's ``validate`` step can check, per CPU core of the server.

``validate`` is a python-backend hop in front of a GPU that decodes and classifies 20-30k images/s, so its
ceiling must sit above that. This serves the ``validate`` model alone from the generated gpu-profile config
(python backend, dynamic batching, ``--instances`` CPU instances) on the bundled Triton 2.51, drives it with
perf_analyzer 2.51 (a C++ client, so the client costs the shared cores little), and divides the requests
Triton counted by the CPU time the server and its stub processes used over the same interval: requests per
CPU-second, which holds on a shared machine where wall-clock throughput does not. In the same run, turn by
turn: ``shipped`` (the model as served: each image's pixel count, 8 bytes), ``passthrough`` (the accepted image itself as
the output, copied back out of the stub, as validate once did) and ``noop`` (the floor of any python-backend
step: the input arrives, a byte leaves, nothing is read), for a 35 KB photo and a 3 MB 12-megapixel one. Prints a table, writes ``results/validate_ceiling.json``.

    .venv/bin/python benchmarks/validate_ceiling.py [--instances 1] [--concurrency 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_analyzer  # noqa: E402
from machine import hardware  # noqa: E402

log = logging.getLogger("validate_ceiling")
BUILD = ROOT / "build" / "bench" / "validate"

# What validate did before it answered with pixel counts: the accepted image itself was the output, copied back out of the stub.
PASSTHROUGH_MODEL = '''
import triton_python_backend_utils as pb_utils

from tritonvision_server.backends._common import error_response
from tritonvision_server.imagecheck import InvalidImage, inspect_rows


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            try:
                inspect_rows(rows)
            except InvalidImage as exc:
                responses.append(error_response(str(exc)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PIXEL_COUNT", rows)]))
        return responses
'''

# The floor of any python-backend step: the input reaches the stub, an 8-byte answer leaves, nothing is read.
NOOP_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PIXEL_COUNT", np.ones((1, 1), np.int64))]) for _ in requests]
'''


def images() -> dict[str, bytes]:
    """A 35 KB photo (the shipped sample) and a ~3 MB 12-megapixel JPEG made from it (grain keeps it large)."""
    import numpy as np
    from PIL import Image

    from tritonvision import sample_images

    small = next(p for p in sample_images() if p.name == "chelsea.jpg").read_bytes()
    big = Image.open(io.BytesIO(small)).resize((4032, 3024), Image.BICUBIC)
    noise = np.random.default_rng(0).integers(-12, 13, (3024, 4032, 3))
    grainy = Image.fromarray(np.clip(np.asarray(big, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    grainy.save(buf, format="JPEG", quality=90)
    return {"35KB": small, f"{len(buf.getvalue()) / 1e6:.1f}MB": buf.getvalue()}


def repository(variant: str, instances: int) -> Path:
    from dataclasses import replace

    from google.protobuf import text_format

    from tritonvision import spec
    from tritonvision_server import configs

    profile = replace(spec.GPU, validate=replace(spec.GPU.validate, instances=instances))
    cfg = configs.validate_config(profile)
    if variant == "passthrough":
        cfg.output[0].dims[:] = [-1]
        cfg.output[0].data_type = configs.mc.TYPE_UINT8
    dest = BUILD / f"repo_{variant}"
    (dest / spec.VALIDATE / "1").mkdir(parents=True, exist_ok=True)
    (dest / spec.VALIDATE / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    if variant == "noop":
        cfg.output[0].dims[:] = [1]
    model = {"noop": NOOP_MODEL, "passthrough": PASSTHROUGH_MODEL}.get(
        variant, "from tritonvision_server.backends.validate import TritonPythonModel  # noqa: F401\n")
    (dest / spec.VALIDATE / "1" / "model.py").write_text(model)
    return dest


def _cpu_seconds(root_pid: int) -> float:
    """User + system CPU time of ``root_pid`` and every process below it (the python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    total, todo, tick = 0.0, [root_pid], os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
        todo.extend(children.get(pid, []))
    return total


def _success_count(url: str, model: str) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))


def measure(variant: str, name: str, image: bytes, *, instances: int, concurrency: int, seconds: float,
            binary: Path, env: dict) -> dict:
    from tritonvision import spec
    from tritonvision_server.launcher import TritonServer

    data = perf_analyzer.input_data(image, BUILD / f"input_{name}.json")
    csv_path = BUILD / f"pa_{variant}_{name}.csv"
    csv_path.unlink(missing_ok=True)  # perf_analyzer leaves no file when it fails: never read an old one
    with TritonServer(repository(variant, instances), log_file=BUILD / f"server_{variant}.log") as server:
        pid = server._proc.pid
        before_req, before_exec = _success_count(server.grpc_url, spec.VALIDATE)
        cpu_before, wall_before = _cpu_seconds(pid), time.perf_counter()
        result = perf_analyzer.run(binary, env, url=server.grpc_url, model=spec.VALIDATE, data=data, concurrency=concurrency,
                                   interval_ms=int(seconds * 1000), csv_path=csv_path,
                                   shm="none", timeout=600)
        cpu, wall = _cpu_seconds(pid) - cpu_before, time.perf_counter() - wall_before
        after_req, after_exec = _success_count(server.grpc_url, spec.VALIDATE)
    requests = after_req - before_req
    return {
        "variant": variant, "image": name, "image_bytes": len(image), "instances": instances, "concurrency": concurrency,
        "throughput": result["throughput"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "requests": requests, "server_cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
        "requests_per_cpu_s": round(requests / cpu, 1) if cpu > 0 else None,
        "avg_batch": round(requests / max(1, after_exec - before_exec), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1, help="validate instances (the gpu profile has 4)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0, help="perf_analyzer measurement window")
    ap.add_argument("--variants", default="shipped,passthrough,noop",
                    help="shipped (the pixel counts), passthrough (the image back out), noop (the hop's floor)")
    ap.add_argument("--images", default="", help="only these image sizes (35KB, 3.1MB); default both")
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "validate_ceiling.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    BUILD.mkdir(parents=True, exist_ok=True)
    binary, env = perf_analyzer.ensure(ROOT / "build" / "bench" / "perf_analyzer", ROOT / ".whl")
    rows = []
    for name, image in images().items():
        if args.images and name not in args.images.split(","):
            continue
        for variant in args.variants.split(","):  # the variants take turns per image size: same machine state
            log.info("measuring %s with the %s image", variant, name)
            rows.append(measure(variant, name, image, instances=args.instances, concurrency=args.concurrency,
                                seconds=args.seconds, binary=binary, env=env))
    header = f"{'variant':11} {'image':7} {'req/s':>8} {'req/CPU-s':>10} {'CPU-s':>6} {'avg batch':>9} {'p50 ms':>7} {'p99 ms':>7}"
    print(f"\nvalidate ceiling: {hardware()['cpu']} x{os.cpu_count()}, Triton 2.51 (bundled), "
          f"{args.instances} instance(s), perf_analyzer concurrency {args.concurrency}")
    print(header)
    for r in rows:
        print(f"{r['variant']:11} {r['image']:7} {r['throughput']:8.0f} {r['requests_per_cpu_s']:10.0f} {r['server_cpu_s']:6.1f} "
              f"{r['avg_batch']:9.1f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"hardware": hardware(), "python": platform.python_version(),
                                       "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
