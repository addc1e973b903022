"""What a batch of large images leaves the cpu profile's ``preprocess`` stub holding, on the real server.

The limits hold per image (``spec.ImageLimits``: 120 MP), so one small request can carry 32 images just under
them, and DALI keeps its decode buffers at the size of the largest run it has decoded, for good. The step
therefore decodes a batch in runs of at most ``spec.ImageLimits.max_run_pixels`` (``pipeline.decoder_runs``).
Each case here starts a fresh server, sends one request of ``rows`` copies of a near-limit image (a solid
10954x10954 JPEG, 1.9 MB, or a 16383x7300 lossless WebP, 4.6 KB), samples the stub's resident memory every
50 ms, then sends an ordinary photo and reads what the stub still holds 2 s later. The baseline is the
one-row case of the same format in the same run: with the budget, ``rows`` images should cost what one does
(ratio ~1; decoded as one run, 8 rows held ~5x and 16 rows ~10x one row's memory).

    .venv/bin/python benchmarks/batch_memory.py [--rows 1,8,16] [--formats jpeg,webp]

Prints a table and writes ``results/batch_memory.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "batch_memory"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import hardware, proc_status  # noqa: E402

log = logging.getLogger("batch_memory")

SIZES = {"jpeg": (10954, 10954), "webp": (16383, 7300)}


def near_limit_image(fmt: str) -> bytes:
    from PIL import Image

    image = Image.new("RGB", SIZES[fmt], (120, 80, 200))
    buf = io.BytesIO()
    image.save(buf, fmt.upper(), **({"quality": 10} if fmt == "jpeg" else {"lossless": True}))
    return buf.getvalue()


def repository() -> Path:
    from tritonvision import spec
    from tritonvision_server.configs import write_repository
    from tritonvision_server.onnx_export import export_onnx

    onnx = export_onnx(BUILD / "resnet50.onnx", "random:0")
    return write_repository(spec.CPU, BUILD / "model_repository_cpu", onnx_path=onnx)


def rss_mib(pid: int) -> float:
    return proc_status(pid, "VmRSS")["VmRSS"] / 2**20


def run_case(repo: Path, fmt: str, data: bytes, rows: int, photo: bytes) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tritonvision import spec
    from tritonvision_server.launcher import TritonServer

    with TritonServer(repo, log_file=BUILD / "tritonserver.log") as server:
        stub = next(pid for pid, cmd in server.stub_processes().items() if f"{spec.PREPROCESS}/1/model.py" in cmd)
        idle = rss_mib(stub)
        peak, stop = [idle], threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(stub))
                time.sleep(0.05)

        def infer(client, array):
            tensor = grpcclient.InferInput(spec.IMAGE.name, list(array.shape), "UINT8")
            tensor.set_data_from_numpy(array)
            client.infer(spec.ENSEMBLE, [tensor], client_timeout=600)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            started = time.monotonic()
            error = None
            try:
                infer(client, np.tile(np.frombuffer(data, np.uint8), (rows, 1)))
            except InferenceServerException as exc:
                error = exc.message()
            seconds = time.monotonic() - started
            infer(client, np.frombuffer(photo, np.uint8).reshape(1, -1))  # the server still serves
            time.sleep(2.0)
        stop.set()
        watcher.join()
        held = rss_mib(stub)
    return {"format": fmt, "rows": rows, "bytes": len(data) * rows, "seconds": round(seconds, 2),
            "error": error, "idle_mib": round(idle), "peak_mib": round(peak[0]), "held_mib": round(held)}


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def table(results: list[dict]) -> str:
    base = {r["format"]: r for r in results if r["rows"] == 1}
    lines = ["| image | rows | request | time | stub idle | peak | held after | held over idle, x one row |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        over = r["held_mib"] - r["idle_mib"]
        one = base.get(r["format"])
        ratio = f"{over / max(one['held_mib'] - one['idle_mib'], 1):.2f}" if one else "-"
        w, h = SIZES[r["format"]]
        lines.append(f"| {r['format'].upper()} {w}x{h} | {r['rows']} | {size(r['bytes'])} | {r['seconds']:.1f} s"
                     f"{' (' + r['error'][:40] + ')' if r['error'] else ''} | {r['idle_mib']} MiB | {r['peak_mib']} MiB"
                     f" | {r['held_mib']} MiB | {over} MiB, {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tritonvision import sample_images, spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,16", help="comma-separated rows per request (1 is the baseline)")
    ap.add_argument("--formats", default="jpeg,webp", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "batch_memory.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = sorted({int(r) for r in args.rows.split(",")} | {1})
    formats = args.formats.split(",")
    if set(formats) - set(SIZES):
        ap.error(f"formats are {', '.join(SIZES)}")
    BUILD.mkdir(parents=True, exist_ok=True)
    repo = repository()
    photo = next(p for p in sample_images() if p.name == "chelsea.jpg").read_bytes()
    results = []
    for fmt in formats:
        data = near_limit_image(fmt)
        for n in rows:
            log.info("%s x %d", fmt, n)
            results.append(run_case(repo, fmt, data, n, photo))
    machine = hardware()
    print(f"\n{machine['cpu']}, {machine['cores']} cores, Triton 2.51 (nvidia-pytriton), Python "
          f"{platform.python_version()}; decoder runs of at most {spec.IMAGE_LIMITS.max_run_pixels / 1e6:g} MP\n")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": machine, "max_run_pixels": spec.IMAGE_LIMITS.max_run_pixels,
                                    "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
