"""The precision-specific ONNX files the TensorRT engines are built from: FP32, FP16 and INT8 (explicit Q/DQ).

TensorRT 11 builds only strongly typed networks: every tensor's type comes from the network itself, and the
builder's precision flags and INT8 calibrators are gone. The precision therefore lives in the ONNX file,
made here once from the FP32 export and checked on the CPU with ONNX Runtime:

- ``fp32`` is the export itself (``resnet50.onnx``); fp32 and tf32 engines are built from it.
- ``fp16`` (``resnet50_fp16.onnx``): FP16 weights and activations, FP16 input ``PIXELS`` (what DALI writes),
  softmax and output ``SCORES`` in FP32. Converted with nvidia-modelopt's ``convert_to_f16``.
- ``int8`` (``resnet50_int8.onnx``): post-training quantisation with nvidia-modelopt's ONNX quantiser
  (entropy calibration in ONNX Runtime on the CPU) on images fed through the serving preprocessing;
  Quantize/DequantizeLinear pairs on the convolutions and the classifier, FP16 in between, FP16 ``PIXELS``
  in, softmax and ``SCORES`` in FP32.

Both conversions insert a Cast from the FP32 input to FP16 and leave the output in FP32; the Cast is then
removed and the input declared FP16, so the file takes DALI's FP16 pixels as they are.

Each file has a JSON sidecar with what it was made from (the FP32 file's hash and weights, the calibration
images' hash, the tool versions); a file whose sidecar matches is not made again. Checked against
nvidia-modelopt 0.47.0, onnx 1.23 and ONNX Runtime 1.32. Both files are opset 19, inside the opsets 9-20
that TensorRT 10.0's ONNX parser takes, whose QuantizeLinear accepts FP16 input with a zero point of 0 (what
modelopt writes) according to onnx-tensorrt's docs/operators.md; no TensorRT build of them has been run here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib import metadata
from pathlib import Path

from tritonvision.spec import PIXELS, SCORES, EngineBuild, image_suffixes

from tritonvision.extras import require

from .engines import sha256 as sha256_file

log = logging.getLogger(__name__)

ONNX_PRECISIONS = ("fp32", "fp16", "int8")
# Bump when the conversion changes, so older files are remade.
FORMAT_VERSION = 1
CALIBRATION_METHOD = "entropy"
# Kept in FP32 in the FP16 and INT8 files: the softmax over 1000 classes, whose output SCORES is FP32.
FP32_OPS = ("Softmax",)
IMAGE_SUFFIXES = image_suffixes()


def onnx_path(fp32_onnx: Path, precision: str) -> Path:
    """Where the ONNX file for an engine ``precision`` lives, next to the FP32 export ``fp32_onnx``.

    ``fp32`` and ``tf32`` engines share the FP32 file (TF32 is a builder setting, not a type).
    """
    kind = EngineBuild(precision=precision).onnx_precision
    fp32_onnx = Path(fp32_onnx)
    return fp32_onnx if kind == "fp32" else fp32_onnx.with_name(f"{fp32_onnx.stem}_{kind}{fp32_onnx.suffix}")


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(Path(path).suffix + ".json")


def read_sidecar(path: Path) -> dict | None:
    """The JSON record next to an ONNX file, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(sidecar(path).read_text())
    except (OSError, ValueError):
        return None


# --- calibration images ---------------------------------------------------------------------------------


def calibration_images(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files under ``folder``, in a stable order."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no calibration images (jpg, png, ...) under {folder}")
    return files[:limit]


def calibration_set_sha256(files: list[Path]) -> str:
    """One hash over the images' contents, in the order used (names do not matter)."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()


def calibration_pixels(files: list[Path], num_threads: int = 2):
    """All ``files`` through the serving preprocessing, as one FP32 ``[n, 3, crop, crop]`` array."""
    import numpy as np

    from .pipeline import CpuPreprocessor

    pre = CpuPreprocessor(max_batch_size=min(32, len(files)), num_threads=num_threads, pixels_dtype="FP32")
    return np.ascontiguousarray(pre([np.fromfile(f, dtype=np.uint8) for f in files]), dtype=np.float32)


# --- graph surgery --------------------------------------------------------------------------------------


def take_fp16_input(model, name: str = PIXELS("FP16").name):
    """Declare input ``name`` FP16 and drop the Cast(FP32 -> FP16) nodes that read it.

    Raises ValueError when something else reads the input: the file would then not be FP16 inside.
    """
    from onnx import TensorProto

    inp = next((i for i in model.graph.input if i.name == name), None)
    if inp is None:
        raise ValueError(f"the model has no input {name!r}")
    readers = [n for n in model.graph.node if name in n.input]
    for node in readers:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to != TensorProto.FLOAT16:
            raise ValueError(f"input {name} is read by {node.op_type} {node.name!r}, not only by a Cast to FP16")
    for node in readers:
        for other in model.graph.node:
            for k, x in enumerate(other.input):
                if x == node.output[0]:
                    other.input[k] = name
        for vi in list(model.graph.value_info):
            if vi.name == node.output[0]:
                model.graph.value_info.remove(vi)
        model.graph.node.remove(node)
    inp.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def inline_constant_identities(model):
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer under the node's output name.

    The exporter shares identical constants (the zero biases of a network with zero-initialised residual
    branches, for one) through Identity nodes; the quantiser expects a convolution's bias to be an
    initializer itself.
    """
    inits = {i.name: i for i in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy = type(inits[node.input[0]])()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
        model.graph.node.remove(node)
    return model


def io_types(model) -> dict[str, str]:
    """``{tensor name: ONNX type name}`` of the model's inputs and outputs."""
    from onnx import TensorProto

    return {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)}


def _check_io(model, path: Path) -> None:
    types = io_types(model)
    want = {PIXELS("FP16").name: "FLOAT16", SCORES.name: "FLOAT"}
    if types != want:
        raise RuntimeError(f"{path}: inputs/outputs are {types}, expected {want}")


# --- making the files -----------------------------------------------------------------------------------


def tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("nvidia-modelopt", "onnx", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


def _require_modelopt(what: str):
    require("onnx", extra="build", what=what)
    require("onnxruntime", extra="build", what=what)
    return require("modelopt.onnx.quantization", extra="build", what=what)


def _record(source: Path, precision: str, calibration: dict | None) -> dict:
    source_meta = read_sidecar(source) or {}
    return {
        "precision": precision,
        "input_dtype": "FP16",
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "source_sha256": sha256_file(source),
        "weights": source_meta.get("weights", "unknown"),
        "calibration": calibration,
        "tools": tool_versions(),
    }


def _up_to_date(dest: Path, wanted: dict) -> bool:
    recorded = read_sidecar(dest)
    if not dest.exists() or recorded is None:
        return False
    made = {k: v for k, v in recorded.items() if k != "seconds"}
    if made != wanted:
        diff = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
        log.info("%s was made from something else %s; making it again", dest.name, diff)
        return False
    return True


def _save(model, dest: Path, record: dict, start: float) -> Path:
    import onnx

    _check_io(model, dest)
    onnx.checker.check_model(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar(dest).write_text(json.dumps({**record, "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return dest


def make_fp16(source: Path, dest: Path | None = None, *, force: bool = False) -> Path:
    """The FP16 file (FP16 ``PIXELS``, FP32 softmax and ``SCORES``) from the FP32 export ``source``."""
    source = Path(source)
    dest = Path(dest) if dest is not None else onnx_path(source, "fp16")
    _require_modelopt("the FP16 ONNX conversion")
    wanted = _record(source, "fp16", None)
    if not force and _up_to_date(dest, wanted):
        log.info("%s is up to date; skipping", dest)
        return dest
    import onnx
    from modelopt.onnx.autocast.convert import convert_to_f16

    start = time.perf_counter()
    model = convert_to_f16(onnx.load(str(source)), keep_io_types=True, op_block_list=list(FP32_OPS))
    take_fp16_input(model)
    _save(model, dest, wanted, start)
    log.info("wrote the FP16 ONNX %s in %.1f s", dest, time.perf_counter() - start)
    return dest


def make_int8(
    source: Path,
    calibration_files: list[Path],
    dest: Path | None = None,
    *,
    batch_size: int = 32,
    num_threads: int = 2,
    force: bool = False,
) -> Path:
    """The INT8 file (explicit Q/DQ, FP16 ``PIXELS``, FP32 ``SCORES``) from ``source``, calibrated on ``calibration_files``.

    The images go through the serving preprocessing (DALI on the CPU), then modelopt's quantiser runs
    entropy calibration in ONNX Runtime on the CPU, ``batch_size`` images per step.
    """
    source = Path(source)
    dest = Path(dest) if dest is not None else onnx_path(source, "int8")
    if not calibration_files:
        raise ValueError("INT8 quantisation needs calibration images")
    quantization = _require_modelopt("INT8 quantisation")
    calibration = {
        "images": len(calibration_files),
        "sha256": calibration_set_sha256(calibration_files),
        "method": CALIBRATION_METHOD,
    }
    wanted = _record(source, "int8", calibration)
    if not force and _up_to_date(dest, wanted):
        log.info("%s is up to date; skipping", dest)
        return dest
    import onnx

    start = time.perf_counter()
    pixels = calibration_pixels(calibration_files, num_threads=num_threads)
    bs = max(1, min(batch_size, len(pixels)))
    log.info("calibrating INT8 on %d images (%d per step) with ONNX Runtime on the CPU", len(pixels), bs)
    crop = pixels.shape[-1]
    raw = dest.with_name(f".{dest.name}.{os.getpid()}.quant.tmp.onnx")
    prepared = dest.with_name(f".{dest.name}.{os.getpid()}.src.tmp.onnx")
    try:
        onnx.save(inline_constant_identities(onnx.load(str(source))), str(prepared))
        quantization.quantize(
            str(prepared),
            quantize_mode="int8",
            calibration_data={PIXELS("FP32").name: pixels},
            calibration_method=CALIBRATION_METHOD,
            calibration_shapes=f"{PIXELS('FP32').name}:{bs}x3x{crop}x{crop}",
            calibration_eps=["cpu"],
            # Everything not quantised runs in FP16 (modelopt's default, said here because it matters),
            # except the softmax; the file keeps the FP32 input and output types, the input is changed below.
            high_precision_dtype="fp16",
            op_types_to_exclude_fp16=list(FP32_OPS),
            direct_io_types=False,
            output_path=str(raw),
            log_level="DEBUG" if log.isEnabledFor(logging.DEBUG) else "WARNING",
        )
        model = onnx.load(str(raw))
    finally:
        raw.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    take_fp16_input(model)
    _save(model, dest, wanted, start)
    log.info("wrote the INT8 ONNX %s in %.1f s", dest, time.perf_counter() - start)
    return dest


def ensure_onnx(
    fp32_onnx: Path,
    precision: str,
    *,
    calibration_images_dir: Path | None = None,
    build: EngineBuild | None = None,
    force: bool = False,
) -> Path:
    """The ONNX file an engine of ``precision`` is built from, made from ``fp32_onnx`` when needed."""
    build = build or EngineBuild(precision=precision)
    kind = EngineBuild(precision=precision).onnx_precision
    fp32_onnx = Path(fp32_onnx)
    if not fp32_onnx.exists():
        raise FileNotFoundError(f"{fp32_onnx} does not exist: export it first (build_engines.py onnx)")
    if kind == "fp32":
        return fp32_onnx
    if kind == "fp16":
        return make_fp16(fp32_onnx, force=force)
    if calibration_images_dir is None:
        raise ValueError("an INT8 ONNX needs --calibration-images DIR (a few hundred representative images)")
    files = calibration_images(calibration_images_dir, build.calibration_max_images)
    return make_int8(fp32_onnx, files, batch_size=build.calibration_batch_size, force=force)
