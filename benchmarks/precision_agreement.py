"""How far the FP16 and INT8 ONNX files (what the TensorRT engines are built from) stray from FP32.

Makes the FP32 export and, from it, the FP16 file and the INT8 file (explicit Q/DQ, calibrated on images fed
through the serving preprocessing), runs all three in ONNX Runtime on the CPU over held images that the
INT8 calibration did not see, and prints, per precision: top-1 agreement with FP32, mean top-5 overlap
with FP32's top 5, and the largest and mean absolute difference of the 1000 softmax scores. Writes
``results/precision_agreement.json``.

Held images: scikit-image's photos (colour, and greyscale ones as RGB; the repository's sample photos are
among them) and rotated and cropped variants of some of them, or every image under ``--images DIR``. Calibration images: mirrored,
rescaled crops of scikit-image photos, written to a folder here (or ``--calibration-images DIR``).

With the default random weights (seed 0) the network is untrained: its top-1 falls on few classes, so the
top-1 agreement says less than the score differences; pass ``--weights imagenet`` (needs internet) or
``--weights PATH`` to a ResNet-50 state_dict for trained weights.

    .venv/bin/python benchmarks/precision_agreement.py [--weights random:0] [--images DIR] [--calibration-images DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import hardware  # noqa: E402

log = logging.getLogger("precision_agreement")

BUILD = ROOT / "build" / "precision"
COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
GREY = ("camera", "moon", "coins", "clock", "page", "brick")
VARIANTS = ("astronaut", "chelsea", "coffee", "rocket")


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array[..., :3]).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def held_images() -> dict[str, bytes]:
    """>= 20 named JPEGs: scikit-image photos, rotations and crops."""
    import skimage.data

    images = {}
    for name in COLOUR + GREY:
        images[name] = _jpeg(getattr(skimage.data, name)())
    for name in VARIANTS:
        a = getattr(skimage.data, name)()
        h, w = a.shape[:2]
        images[f"{name}_rot90"] = _jpeg(np.rot90(a).copy())
        images[f"{name}_rot180"] = _jpeg(np.rot90(a, 2).copy())
        images[f"{name}_crop"] = _jpeg(a[h // 8 : h - h // 4, w // 4 : w - w // 8].copy())
    return images


def write_calibration_images(folder: Path) -> Path:
    """Mirrored, cropped, rescaled variants of scikit-image photos: not the held images, same kind of content."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in COLOUR + GREY:
        a = getattr(skimage.data, name)()
        h, w = a.shape[:2]
        a = a[:, ::-1][h // 10 :, : w - w // 10].copy()
        data = _jpeg(a, quality=85)
        (folder / f"{name}_mirror.jpg").write_bytes(data)
        img = Image.open(io.BytesIO(data))
        img.resize((img.width * 2 // 3, img.height * 2 // 3)).save(folder / f"{name}_small.jpg", quality=85)
    return folder


def scores(session, pixels: np.ndarray, batch: int = 8) -> np.ndarray:
    name = session.get_inputs()[0].name
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    out = [session.run(None, {name: pixels[i : i + batch].astype(dtype)})[0] for i in range(0, len(pixels), batch)]
    return np.concatenate(out).astype(np.float32)


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    top5_ref = np.argsort(-reference, axis=1)[:, :5]
    top5 = np.argsort(-other, axis=1)[:, :5]
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5)]
    diff = np.abs(other - reference)
    return {
        "top1_agreement": float(np.mean(reference.argmax(1) == other.argmax(1))),
        "top5_overlap": float(np.mean(overlap)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_score_fp32": float(reference.max()),
    }


def parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="random:0", help="random[:SEED] (default random:0) | imagenet | PATH")
    ap.add_argument("--images", type=Path, help="held images (default: samples, scikit-image photos and variants)")
    ap.add_argument("--calibration-images", type=Path, help="INT8 calibration images (default: made here)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime and DALI threads")
    ap.add_argument("--force", action="store_true", help="make the ONNX files again")
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "precision_agreement.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import onnx
    import onnxruntime as ort

    from tritonvision_server import precision
    from tritonvision_server.onnx_export import export_onnx
    from tritonvision_server.pipeline import CpuPreprocessor

    tag = str(args.weights).replace(":", "").replace("/", "_")[-40:]
    fp32 = export_onnx(BUILD / tag / "resnet50.onnx", args.weights, force=args.force)
    calib_dir = args.calibration_images or write_calibration_images(BUILD / "calibration")
    calib_files = precision.calibration_images(calib_dir, limit=1024)
    timings = {}
    start = time.perf_counter()
    files = {"fp32": fp32, "fp16": precision.make_fp16(fp32, force=args.force)}
    timings["fp16"] = time.perf_counter() - start
    start = time.perf_counter()
    files["int8"] = precision.make_int8(fp32, calib_files, num_threads=args.threads, force=args.force)
    timings["int8"] = time.perf_counter() - start

    if args.images:
        held = {p.name: p.read_bytes() for p in precision.calibration_images(args.images, limit=10_000)}
    else:
        held = held_images()
    pre = CpuPreprocessor(max_batch_size=8, num_threads=args.threads, pixels_dtype="FP32")
    pixels = pre([np.frombuffer(b, np.uint8) for b in held.values()])

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    results, all_scores, run_ms = {}, {}, {}
    for name, path in files.items():
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        t = time.perf_counter()
        all_scores[name] = scores(session, pixels)
        run_ms[name] = 1000 * (time.perf_counter() - t) / len(pixels)
    for name in files:
        results[name] = {
            **agreement(all_scores["fp32"], all_scores[name]),
            "input_dtype": precision.io_types(onnx.load(str(files[name])))["PIXELS"],
            "ort_cpu_ms_per_image": round(run_ms[name], 1),
            "file_mib": round(files[name].stat().st_size / 2**20, 1),
        }
    distinct = len(set(all_scores["fp32"].argmax(1).tolist()))

    print(f"\nFP16 / INT8 ONNX against FP32, ONNX Runtime {ort.__version__} on the CPU; weights {args.weights}; "
          f"{len(held)} held images ({distinct} distinct FP32 top-1 classes); INT8 calibrated on "
          f"{len(calib_files)} other images")
    print(f"{'precision':<10}{'PIXELS':<9}{'top-1 agree':>12}{'top-5 overlap':>15}{'max |diff|':>12}"
          f"{'mean |diff|':>13}{'ms/img (ORT CPU)':>18}{'MiB':>7}")
    for name, r in results.items():
        print(f"{name:<10}{r['input_dtype']:<9}{r['top1_agreement']:>12.1%}{r['top5_overlap']:>15.1%}"
              f"{r['max_abs_diff']:>12.2e}{r['mean_abs_diff']:>13.2e}{r['ort_cpu_ms_per_image']:>18.1f}{r['file_mib']:>7.1f}")
    print(f"(largest FP32 score: {results['fp32']['max_score_fp32']:.4f}; making, or finding up to date, the FP16 "
          f"file took {timings['fp16']:.1f} s, the INT8 file {timings['int8']:.1f} s)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "weights": args.weights,
        "held_images": list(held),
        "distinct_fp32_top1": distinct,
        "calibration_images": len(calib_files),
        "results": results,
        "make_seconds": {k: round(v, 1) for k, v in timings.items()},
        "per_image": {name: {"top1": all_scores[name].argmax(1).tolist()} for name in files},
        "versions": {**precision.tool_versions(), "python": platform.python_version()},
        "hardware": hardware(),
    }, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
