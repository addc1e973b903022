"""Build the gpu profile's TensorRT engine from the exported ONNX file.

An engine only runs on the GPU model (compute capability) and TensorRT version it was built with, so every
engine is built under a name that records both, next to a JSON file with everything that went into it.
``ensure_engine`` reuses a matching engine and rebuilds when anything differs: GPU, TensorRT, precision,
ONNX file, optimisation profiles or workspace.

Two builders, whichever the machine has (both ship in the NGC ``tensorrt`` and ``tritonserver`` images):
the TensorRT Python API (needed for INT8 calibration from images) or ``trtexec``. Neither can run on a
machine without an NVIDIA GPU and TensorRT; everything else here is plain Python and unit-tested.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tritonvision.spec import PIXELS, PREPROCESSING, Batching, EngineBuild

log = logging.getLogger(__name__)

TRTEXEC_NGC = Path("/usr/src/tensorrt/bin/trtexec")
HOW_TO_GET_TENSORRT = (
    "Building a TensorRT engine needs TensorRT on a machine with an NVIDIA GPU, and neither the TensorRT "
    "Python API ('import tensorrt') nor trtexec was found. Either run the build inside an NGC image that "
    "has both (nvcr.io/nvidia/tritonserver:<yy.mm>-py3 or nvcr.io/nvidia/tensorrt:<yy.mm>-py3, trtexec at "
    f"{TRTEXEC_NGC}; use the same <yy.mm> as the server so the TensorRT versions match), or on a GPU host "
    "with internet access: pip install tensorrt."
)


class TensorRTUnavailable(RuntimeError):
    """Neither the TensorRT Python API nor trtexec is available here."""


# --- optimisation profiles ------------------------------------------------------------------------------


def optimization_profiles(batching: Batching) -> list[tuple[int, int, int]]:
    """(min, opt, max) batch sizes of the engine's optimisation profile(s), from the dynamic batcher's settings.

    One profile covers 1..max_batch_size, tuned at the largest preferred batch size: the batch the
    scheduler forms under load, where throughput is decided (CUDA graphs keep small batches cheap).
    Several profiles would need ``instance_group.profile`` in the config (Triton uses only profile 0
    otherwise), multiply the execution contexts and CUDA graphs per instance, and trtexec builds them
    differently across versions; ResNet-50's kernels change little between opt points.
    """
    opt = max(batching.preferred_batch_sizes, default=batching.max_batch_size)
    return [(1, opt, batching.max_batch_size)]


def profile_for(batch_size: int, profiles: list[tuple[int, int, int]]) -> int | None:
    """Index of the profile whose range holds ``batch_size``, or None."""
    for i, (low, _, high) in enumerate(profiles):
        if low <= batch_size <= high:
            return i
    return None


def _shape(batch: int) -> tuple[int, ...]:
    return (batch, 3, PREPROCESSING.crop, PREPROCESSING.crop)


# --- what an engine is built for ------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"

    @property
    def slug(self) -> str:
        name = re.sub(r"^nvidia\s+", "", self.name.strip(), flags=re.I)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader``."""
    gpus = []
    for line in text.strip().splitlines():
        name, _, cc = line.rpartition(",")
        if not name or not re.fullmatch(r"\d+\.\d+", cc.strip()):
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        gpus.append(GpuInfo(name.strip(), cc.strip()))
    return gpus


def detect_gpu(index: int = 0) -> GpuInfo:
    """The GPU the engine is built on, from nvidia-smi (present wherever the NVIDIA driver is)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise TensorRTUnavailable("no nvidia-smi on PATH: TensorRT engines can only be built on a machine with an NVIDIA GPU")
    out = subprocess.run(
        [smi, f"--id={index}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
        check=True, capture_output=True, text=True,
    ).stdout
    return parse_nvidia_smi(out)[0]


def parse_trtexec_version(text: str) -> str:
    """TensorRT version from trtexec's banner, e.g. ``[TensorRT v100300]`` -> ``10.3.0``."""
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if not m:
        raise ValueError("no '[TensorRT vNNNN]' banner in the trtexec output")
    n = int(m.group(1))
    # NV_TENSORRT_VERSION is major*1000+minor*100+patch up to 8.x and major*10000+minor*100+patch from 10.
    major, rest = (n // 10000, n % 10000) if n >= 100000 else (n // 1000, n % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineSpec:
    """Everything that makes two engines interchangeable; an engine is reused only when all of it matches."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    input_dtype: str
    onnx_sha256: str
    profiles: tuple[tuple[int, int, int], ...]
    workspace_mib: int
    calibration_cache_sha256: str = ""  # INT8 only

    @property
    def file_stem(self) -> str:
        gpu = GpuInfo(self.gpu_name, self.compute_capability)
        cc = self.compute_capability.replace(".", "")
        return f"resnet50_{self.precision}_{gpu.slug}_sm{cc}_trt{self.tensorrt_version}_b{self.profiles[-1][2]}"

    def to_json(self) -> dict:
        data = asdict(self)
        data["profiles"] = [list(p) for p in self.profiles]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "EngineSpec":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["profiles"] = tuple(tuple(p) for p in fields["profiles"])
        return cls(**fields)


def engine_paths(engine_dir: Path, spec: EngineSpec) -> tuple[Path, Path]:
    plan = Path(engine_dir) / f"{spec.file_stem}.plan"
    return plan, plan.with_suffix(".json")


def is_up_to_date(plan: Path, meta: Path, wanted: EngineSpec) -> bool:
    """True when ``plan`` exists, is intact, and was built for exactly ``wanted``."""
    if not plan.exists() or not meta.exists():
        return False
    try:
        recorded = json.loads(meta.read_text())
        built = EngineSpec.from_json(recorded["engine"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable engine metadata %s (%s); rebuilding", meta, exc)
        return False
    if built != wanted:
        diff = {k: (v, getattr(wanted, k)) for k, v in asdict(built).items() if v != getattr(wanted, k)}
        log.info("engine %s was built for something else %s; rebuilding", plan.name, diff)
        return False
    if recorded.get("plan_sha256") != sha256(plan):
        log.warning("engine %s does not match its recorded checksum; rebuilding", plan)
        return False
    return True


# --- builders -------------------------------------------------------------------------------------------


def find_builder(prefer: str = "auto") -> str:
    """``python`` (TensorRT Python API) or ``trtexec``; raise :class:`TensorRTUnavailable` with how to get one."""
    if prefer in ("auto", "python"):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            if prefer == "python":
                raise TensorRTUnavailable(HOW_TO_GET_TENSORRT) from None
        else:
            return "python"
    if trtexec_path() is not None:
        return "trtexec"
    raise TensorRTUnavailable(HOW_TO_GET_TENSORRT)


def trtexec_path() -> Path | None:
    found = shutil.which("trtexec")
    if found:
        return Path(found)
    return TRTEXEC_NGC if TRTEXEC_NGC.exists() else None


def tensorrt_version(builder: str) -> str:
    if builder == "python":
        import tensorrt

        return tensorrt.__version__
    out = subprocess.run([str(trtexec_path()), "--help"], capture_output=True, text=True)
    return parse_trtexec_version(out.stdout + out.stderr)


def _shapes_arg(shape: tuple[int, ...]) -> str:
    return f"{PIXELS('FP32').name}:" + "x".join(str(d) for d in shape)


def trtexec_command(
    trtexec: Path, onnx: Path, plan: Path, spec: EngineSpec, *, timing_cache: Path, calibration_cache: Path | None = None
) -> list[str]:
    """The trtexec command line that builds ``spec``'s engine."""
    if len(spec.profiles) != 1:
        raise ValueError(f"the trtexec build takes one optimisation profile, got {len(spec.profiles)}")
    ((low, opt, high),) = spec.profiles
    cmd = [
        str(trtexec), f"--onnx={onnx}", f"--saveEngine={plan}", "--skipInference",
        f"--minShapes={_shapes_arg(_shape(low))}", f"--optShapes={_shapes_arg(_shape(opt))}",
        f"--maxShapes={_shapes_arg(_shape(high))}",
        # The engine's own input and output types, so Triton's config (FP16 PIXELS, FP32 SCORES) matches.
        f"--inputIOFormats={'fp16' if spec.input_dtype == 'FP16' else 'fp32'}:chw", "--outputIOFormats=fp32:chw",
    ]
    if spec.precision == "fp16":
        cmd.append("--fp16")
    elif spec.precision == "int8":
        if calibration_cache is None:
            raise TensorRTUnavailable(
                "trtexec cannot calibrate from images: build the INT8 calibration cache once with the TensorRT "
                "Python API (pip install tensorrt, or the NGC tensorrt image), then pass it with --calibration-cache"
            )
        cmd += ["--int8", "--fp16", f"--calib={calibration_cache}"]  # FP16 for the layers INT8 does not cover
    elif spec.precision == "fp32":
        cmd.append("--noTF32")
    cmd += [f"--memPoolSize=workspace:{spec.workspace_mib}M", f"--timingCacheFile={timing_cache}"]
    return cmd


def _build_with_trtexec(onnx: Path, plan: Path, spec: EngineSpec, timing_cache: Path, calibration_cache: Path | None) -> None:
    cmd = trtexec_command(trtexec_path(), onnx, plan, spec, timing_cache=timing_cache, calibration_cache=calibration_cache)
    log.info("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:  # trtexec logs progress; pass it on at debug level
        log.debug("trtexec: %s", line.rstrip())
        tail = (tail + [line.rstrip()])[-30:]
    if proc.wait() != 0:
        raise RuntimeError(f"trtexec failed with exit code {proc.returncode}:\n" + "\n".join(tail))


def calibration_images(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files under ``folder``, in a stable order."""
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no calibration images (jpg, png, ...) under {folder}")
    return files[:limit]


def calibration_batches(files: list[Path], batch_size: int, num_threads: int = 4):
    """FP32 ``[batch, 3, crop, crop]`` arrays through the serving pipeline (DALI on the CPU); drops the tail."""
    import numpy as np

    from .pipeline import CpuPreprocessor

    pre = CpuPreprocessor(max_batch_size=batch_size, num_threads=num_threads, pixels_dtype="FP32")
    for start in range(0, len(files) - batch_size + 1, batch_size):
        chunk = [np.fromfile(f, dtype=np.uint8) for f in files[start : start + batch_size]]
        yield np.ascontiguousarray(pre(chunk), dtype=np.float32)


def _calibrator(batches, batch_size: int, cache: Path):
    """An IInt8EntropyCalibrator2 fed from ``batches``; reads/writes ``cache``. Needs tensorrt and torch+CUDA."""
    import tensorrt as trt

    from tritonvision._extras import require

    torch = require("torch", extra="build", what="INT8 calibration (device buffers)")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self._batches = iter(batches)
            self._device = None
            self._seen = 0

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            try:
                batch = next(self._batches)
            except StopIteration:
                return None
            self._device = torch.from_numpy(batch).cuda()
            self._seen += len(batch)
            log.info("calibration: %d images", self._seen)
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(bytes(data))
            log.info("wrote the INT8 calibration cache %s", cache)

    return EntropyCalibrator()


def _build_with_python(
    onnx: Path, plan: Path, spec: EngineSpec, timing_cache: Path, calibrator=None, *, fp32_input: bool = False
) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.INFO if log.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx}:\n{errors}")
    inp = network.get_input(0)
    if spec.input_dtype == "FP16" and not fp32_input:
        # DALI hands over FP16 pixels: no cast kernel, half the bytes between the steps.
        inp.dtype = trt.float16
    network.get_output(0).dtype = trt.float32

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    if spec.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if spec.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    for low, opt, high in spec.profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, _shape(low), _shape(opt), _shape(high))
        config.add_optimization_profile(profile)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        # Calibration runs at one fixed shape, the calibration batch.
        calib = builder.create_optimization_profile()
        b = calibrator.get_batch_size()
        calib.set_shape(inp.name, _shape(b), _shape(b), _shape(b))
        config.set_calibration_profile(calib)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp = plan.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan)


def wanted_engine(
    onnx: Path, build: EngineBuild, batching: Batching, *, gpu: GpuInfo, trt_version: str, calibration_cache: Path | None = None
) -> EngineSpec:
    return EngineSpec(
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=trt_version,
        precision=build.precision,
        input_dtype=build.input_dtype,
        onnx_sha256=sha256(onnx),
        profiles=tuple(optimization_profiles(batching)),
        workspace_mib=build.workspace_mib,
        calibration_cache_sha256=sha256(calibration_cache) if calibration_cache and calibration_cache.exists() else "",
    )


def ensure_engine(
    onnx: Path,
    dest: Path,
    build: EngineBuild,
    batching: Batching,
    *,
    engine_dir: Path,
    calibration_images_dir: Path | None = None,
    calibration_cache: Path | None = None,
    builder: str = "auto",
    gpu_index: int = 0,
    force: bool = False,
) -> Path:
    """Build (or reuse) the engine for this GPU and TensorRT, and install it as ``dest`` (``resnet50/1/model.plan``)."""
    onnx, dest, engine_dir = Path(onnx), Path(dest), Path(engine_dir)
    if not onnx.exists():
        raise FileNotFoundError(f"{onnx} does not exist: run `build_engines.py onnx` first")
    which = find_builder(builder)
    gpu = detect_gpu(gpu_index)
    version = tensorrt_version(which)
    timing_cache = engine_dir / f"timing_{GpuInfo(gpu.name, gpu.compute_capability).slug}_trt{version}.cache"
    if build.precision == "int8":
        calibration_cache = calibration_cache or engine_dir / f"calibration_{sha256(onnx)[:12]}.cache"
        if not calibration_cache.exists():
            if calibration_images_dir is None:
                raise ValueError("an INT8 engine needs --calibration-images DIR (or an existing --calibration-cache)")
            if which != "python":
                find_builder("python")  # raises with how to get the Python API
            _calibrate(onnx, build, batching, calibration_images_dir, calibration_cache, engine_dir, gpu, version, timing_cache)
    wanted = wanted_engine(onnx, build, batching, gpu=gpu, trt_version=version, calibration_cache=calibration_cache)
    plan, meta = engine_paths(engine_dir, wanted)
    if not force and is_up_to_date(plan, meta, wanted):
        log.info("engine %s is up to date for %s (sm %s, TensorRT %s)", plan.name, gpu.name, gpu.compute_capability, version)
    else:
        engine_dir.mkdir(parents=True, exist_ok=True)
        log.info("building the %s engine for %s (sm %s) with TensorRT %s via %s, profiles %s; this takes minutes",
                 build.precision, gpu.name, gpu.compute_capability, version, which, list(wanted.profiles))
        start = time.perf_counter()
        if which == "python":
            calibrator = None
            if build.precision == "int8":
                calibrator = _calibrator(iter(()), build.calibration_batch_size, calibration_cache)  # reads the cache
            _build_with_python(onnx, plan, wanted, timing_cache, calibrator)
        else:
            _build_with_trtexec(onnx, plan, wanted, timing_cache, calibration_cache)
        elapsed = time.perf_counter() - start
        meta.write_text(json.dumps(
            {"engine": wanted.to_json(), "plan_sha256": sha256(plan), "builder": which, "build_seconds": round(elapsed, 1)},
            indent=2,
        ))
        log.info("built %s in %.0f s", plan, elapsed)
    install(plan, dest)
    return dest


def _calibrate(onnx, build, batching, images_dir, cache, engine_dir, gpu, version, timing_cache) -> None:
    """Write the INT8 calibration cache with an FP32-input calibration build.

    TensorRT calibrates in FP32, so the calibrator feeds FP32 batches to an FP32 input; the cache holds
    per-tensor scales by name and serves the real build, whose input is FP16.
    """
    files = calibration_images(images_dir, build.calibration_max_images)
    bs = min(build.calibration_batch_size, len(files))
    log.info("calibrating INT8 on %d images from %s (batches of %d)", len(files) // bs * bs, images_dir, bs)
    calib_spec = EngineSpec(gpu.name, gpu.compute_capability, version, "int8", "FP32", sha256(onnx),
                            ((1, bs, max(bs, batching.max_batch_size)),), build.workspace_mib)
    scratch = engine_dir / "calibration_scratch.plan"
    engine_dir.mkdir(parents=True, exist_ok=True)
    try:
        _build_with_python(onnx, scratch, calib_spec, timing_cache, _calibrator(calibration_batches(files, bs), bs, cache),
                           fp32_input=True)
    finally:
        scratch.unlink(missing_ok=True)
    if not cache.exists():
        raise RuntimeError("TensorRT finished calibrating without writing a calibration cache")


def install(plan: Path, dest: Path) -> None:
    """Copy ``plan`` to ``dest`` unless it is already there (a copy, not a link: it must survive a bind mount)."""
    if dest.exists() and dest.stat().st_size == plan.stat().st_size and sha256(dest) == sha256(plan):
        log.info("%s is already installed as %s", plan.name, dest)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(plan, tmp)
    os.replace(tmp, dest)
    log.info("installed %s as %s", plan.name, dest)
