"""Build the gpu profile's TensorRT engine from the precision-specific ONNX file.

An engine only runs on the GPU model (compute capability) and the TensorRT version that built it (plans are
not portable across TensorRT releases unless built version-compatible, which these are not), so every
engine is built under a name that records both,
next to a JSON file with everything that went into it. ``ensure_engine`` reuses a matching engine and
rebuilds when anything differs: GPU, TensorRT, precision, ONNX file, optimisation profiles or workspace.

Every build is **strongly typed** and passes no precision flag: the types come from the ONNX file
(:mod:`tritonvision_server.precision` makes the FP16 file and the INT8 file with explicit Q/DQ nodes). That
is the only mode of TensorRT 11, which removed trtexec's ``--fp16``/``--int8``/``--calib``,
``BuilderFlag.FP16``/``INT8``, the IInt8 calibrators and the ``ITensor.dtype`` setter; TensorRT 10 builds
the same way with ``--stronglyTyped`` / ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. What remains a
builder setting is TF32, the math mode of FP32 convolutions (``--noTF32`` / ``BuilderFlag.TF32``, both
still in TensorRT 11.1): it is cleared for ``fp32`` engines and left on for ``tf32``. Checked against the
sources of NVIDIA/TensorRT v10.0.0, v10.3.0, v10.5.0 (the 24.10 image), v11.0 and v11.1:
``samples/common/sampleOptions.cpp`` and ``sampleEngines.cpp`` (trtexec's options), ``include/NvInfer.h``
and ``python/src/infer/pyCore.cpp``/``pyGraph.cpp`` (the Python API). TensorRT 10.0 or newer is required.

Two builders, whichever the machine has: ``trtexec``, which every NGC ``tritonserver`` image ships at
/usr/src/tensorrt/bin/trtexec, or the TensorRT Python API (the NGC ``tensorrt`` image). Neither can run
on a machine without an NVIDIA GPU and TensorRT; everything else here is plain Python and unit-tested.

The engine directory may be shared by several pods (a volume per GPU type): a build takes an exclusive lock
(``fcntl.flock``) on a lock file there, checks again whether another process built the engine meanwhile,
writes to a temporary file of its own and renames it into place, so nobody loads a half-written engine and
an engine is never built twice at once. The volume must support ``flock`` (local disks, NFSv4 do).
"""

from __future__ import annotations

import contextlib
import fcntl
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
from typing import Protocol

from tritonvision.spec import PIXELS, PREPROCESSING, Batching, EngineBuild

log = logging.getLogger(__name__)

TRTEXEC_NGC = Path("/usr/src/tensorrt/bin/trtexec")
MIN_TENSORRT = (10, 0)  # trtexec --stronglyTyped and NetworkDefinitionCreationFlag.STRONGLY_TYPED
HOW_TO_GET_TENSORRT = (
    "Building a TensorRT engine needs the TensorRT of the server that will load it, on a machine with an "
    "NVIDIA GPU: a plan loads only in the TensorRT version that built it, and neither trtexec nor the "
    "TensorRT Python API ('import tensorrt') was found here. Build inside the same image tag as the server, "
    "whose trtexec is at "
    f"{TRTEXEC_NGC}: docker run --gpus all -v $PWD:/workspace -w /workspace "
    "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 python3 build_engines.py engine (the same <yy.mm> as the "
    "server; nvcr.io/nvidia/tensorrt:<yy.mm>-py3 of that tag has the same TensorRT and its Python API). "
    "A TensorRT from another source (a pip wheel, another image tag) builds plans that server refuses."
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


class Builder(Protocol):
    """What builds engines: says which TensorRT it is and turns an ONNX file into a plan.

    :func:`ensure_engine` takes one (or a name for :func:`find_builder`); tests pass a stand-in.
    """

    name: str

    def tensorrt_version(self) -> str: ...

    def build(self, onnx: Path, plan: Path, spec: "EngineSpec", timing_cache: Path) -> None: ...


@dataclass(frozen=True)
class TrtexecBuilder:
    """``trtexec``, in every tritonserver image next to the TensorRT that loads the plans."""

    path: Path
    name: str = "trtexec"

    def tensorrt_version(self) -> str:
        out = subprocess.run([str(self.path), "--help"], capture_output=True, text=True)
        return parse_trtexec_version(out.stdout + out.stderr)

    def build(self, onnx: Path, plan: Path, spec: "EngineSpec", timing_cache: Path) -> None:
        _build_with_trtexec(self.path, onnx, plan, spec, timing_cache)


@dataclass(frozen=True)
class PythonApiBuilder:
    """The TensorRT Python API (the NGC ``tensorrt`` image)."""

    name: str = "python"

    def tensorrt_version(self) -> str:
        import tensorrt

        return tensorrt.__version__

    def build(self, onnx: Path, plan: Path, spec: "EngineSpec", timing_cache: Path) -> None:
        _build_with_python(onnx, plan, spec, timing_cache)


def find_builder(prefer: str = "auto") -> Builder:
    """A trtexec or TensorRT Python API builder; raise :class:`TensorRTUnavailable` with how to get one.

    ``auto`` prefers trtexec: it is in every tritonserver image, next to the TensorRT the server loads plans with.
    """
    trtexec = trtexec_path()
    if prefer in ("auto", "trtexec") and trtexec is not None:
        return TrtexecBuilder(trtexec)
    if prefer in ("auto", "python"):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            pass
        else:
            return PythonApiBuilder()
    raise TensorRTUnavailable(HOW_TO_GET_TENSORRT)


def trtexec_path() -> Path | None:
    found = shutil.which("trtexec")
    if found:
        return Path(found)
    return TRTEXEC_NGC if TRTEXEC_NGC.exists() else None


def check_tensorrt_version(version: str) -> None:
    """Refuse TensorRT releases that cannot build strongly typed networks."""
    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if parts < MIN_TENSORRT:
        raise TensorRTUnavailable(
            f"TensorRT {version} cannot build strongly typed networks; TensorRT "
            f"{'.'.join(map(str, MIN_TENSORRT))} or newer is needed (use a newer NGC tritonserver image)"
        )


def check_onnx_precision(onnx: Path, build: EngineBuild) -> None:
    """Refuse an ONNX file whose sidecar says it was made for another precision than ``build``'s.

    A strongly typed engine takes its types from the file, so an FP32 file would silently give an FP32
    engine where an FP16 one was asked for (and an FP32 input that the configs do not declare).
    """
    meta_path = onnx.with_suffix(onnx.suffix + ".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        log.warning("%s has no readable %s: cannot check that it is the %s ONNX file", onnx, meta_path.name,
                    build.onnx_precision)
        return
    made = meta.get("precision", "fp32")  # the FP32 export's record has no precision
    if made != build.onnx_precision:
        raise ValueError(
            f"{onnx} is the {made} ONNX file, but a {build.precision} engine is built from the "
            f"{build.onnx_precision} one: run `build_engines.py onnx --precision {build.precision}`"
        )


def _shapes_arg(shape: tuple[int, ...]) -> str:
    return f"{PIXELS('FP32').name}:" + "x".join(str(d) for d in shape)


def trtexec_command(trtexec: Path, onnx: Path, plan: Path, spec: EngineSpec, *, timing_cache: Path) -> list[str]:
    """The trtexec command line that builds ``spec``'s engine from the precision-specific ``onnx``.

    Strongly typed, no precision flag and no I/O formats: the input (FP16 or FP32 ``PIXELS``) and output
    (FP32 ``SCORES``) types are the ONNX file's, which the configs declare.
    """
    if len(spec.profiles) != 1:
        raise ValueError(f"the trtexec build takes one optimisation profile, got {len(spec.profiles)}")
    ((low, opt, high),) = spec.profiles
    cmd = [
        str(trtexec), f"--onnx={onnx}", f"--saveEngine={plan}", "--skipInference", "--stronglyTyped",
        f"--minShapes={_shapes_arg(_shape(low))}", f"--optShapes={_shapes_arg(_shape(opt))}",
        f"--maxShapes={_shapes_arg(_shape(high))}",
    ]
    if spec.precision == "fp32":
        cmd.append("--noTF32")  # TF32 is on by default: tf32 engines keep it, fp32 ones are true FP32
    # A bare number is MiB in every trtexec from 10.0 (10.0.x takes MiB only: there a unit suffix multiplied
    # the MiB again, "4096M" meaning 4096 TiB; 10.1 and newer take B/K/M/G and default to M).
    cmd += [f"--memPoolSize=workspace:{spec.workspace_mib}", f"--timingCacheFile={timing_cache}"]
    return cmd


def _build_with_trtexec(trtexec: Path, onnx: Path, plan: Path, spec: EngineSpec, timing_cache: Path) -> None:
    cmd = trtexec_command(trtexec, onnx, plan, spec, timing_cache=timing_cache)
    log.info("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:  # trtexec logs progress; pass it on at debug level
        log.debug("trtexec: %s", line.rstrip())
        tail = (tail + [line.rstrip()])[-30:]
    if proc.wait() != 0:
        raise RuntimeError(f"trtexec failed with exit code {proc.returncode}:\n" + "\n".join(tail))


def _network_flags(trt) -> int:
    """STRONGLY_TYPED on TensorRT 10; in 11 the flag is deprecated and ignored (always strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _build_with_python(onnx: Path, plan: Path, spec: EngineSpec, timing_cache: Path) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.INFO if log.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx}:\n{errors}")
    inp = network.get_input(0)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    if spec.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    for low, opt, high in spec.profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, _shape(low), _shape(opt), _shape(high))
        config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    plan.write_bytes(bytes(serialized))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def wanted_engine(onnx: Path, build: EngineBuild, batching: Batching, *, gpu: GpuInfo, trt_version: str) -> EngineSpec:
    return EngineSpec(
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=trt_version,
        precision=build.precision,
        input_dtype=build.input_dtype,
        onnx_sha256=sha256(onnx),
        profiles=tuple(optimization_profiles(batching)),
        workspace_mib=build.workspace_mib,
    )


@contextlib.contextmanager
def build_lock(path: Path):
    """Exclusive ``flock`` on ``path`` for the duration of the block, across processes (and threads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building in %s; waiting for it", path.parent)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_engine(
    onnx: Path,
    dest: Path,
    build: EngineBuild,
    batching: Batching,
    *,
    engine_dir: Path,
    builder: str | Builder = "auto",
    gpu: GpuInfo | None = None,
    gpu_index: int = 0,
    force: bool = False,
) -> Path:
    """Build (or reuse) the engine for this GPU and TensorRT from ``onnx``, install it as ``dest``.

    ``onnx`` is the file made for ``build.precision`` (:func:`tritonvision_server.precision.onnx_path`);
    ``dest`` is ``resnet50/1/model.plan``. ``builder``: a :class:`Builder`, or the name of one to find
    (``auto``, ``trtexec``, ``python``); ``gpu``: the GPU to build for (default: nvidia-smi's ``gpu_index``).
    """
    onnx, dest, engine_dir = Path(onnx), Path(dest), Path(engine_dir)
    if not onnx.exists():
        raise FileNotFoundError(f"{onnx} does not exist: run `build_engines.py onnx --precision {build.precision}` first")
    check_onnx_precision(onnx, build)
    which = find_builder(builder) if isinstance(builder, str) else builder
    gpu = gpu or detect_gpu(gpu_index)
    version = which.tensorrt_version()
    check_tensorrt_version(version)
    key = f"{gpu.slug}_sm{gpu.compute_capability.replace('.', '')}_trt{version}"
    timing_cache = engine_dir / f"timing_{key}.cache"
    wanted = wanted_engine(onnx, build, batching, gpu=gpu, trt_version=version)
    plan, meta = engine_paths(engine_dir, wanted)
    if not force and is_up_to_date(plan, meta, wanted):
        log.info("engine %s is up to date for %s (sm %s, TensorRT %s)", plan.name, gpu.name, gpu.compute_capability, version)
    else:
        # One build at a time per GPU and TensorRT (they share the timing cache); whoever waited checks again.
        with build_lock(engine_dir / f".build_{key}.lock"):
            if not force and is_up_to_date(plan, meta, wanted):
                log.info("engine %s was built by another process meanwhile", plan.name)
            else:
                _build(onnx, plan, meta, wanted, which, timing_cache, gpu)
    install(plan, dest)
    return dest


def _build(onnx: Path, plan: Path, meta: Path, wanted: EngineSpec, which: Builder, timing_cache: Path,
           gpu: GpuInfo) -> None:
    log.info("building the %s engine for %s (sm %s) with TensorRT %s via %s, profiles %s; this takes minutes",
             wanted.precision, gpu.name, gpu.compute_capability, wanted.tensorrt_version, which.name,
             list(wanted.profiles))
    tmp = plan.with_name(f".{plan.stem}.{os.getpid()}.tmp.plan")
    start = time.perf_counter()
    try:
        which.build(onnx, tmp, wanted, timing_cache)
        elapsed = time.perf_counter() - start
        record = {"engine": wanted.to_json(), "plan_sha256": sha256(tmp), "builder": which.name,
                  "build_seconds": round(elapsed, 1)}
        # The plan first, then its record: a reader that sees the new plan with the old record finds the
        # checksum wrong and waits on the lock, never the other way round.
        os.replace(tmp, plan)
        _write_atomically(meta, json.dumps(record, indent=2).encode())
    finally:
        tmp.unlink(missing_ok=True)
    log.info("built %s in %.0f s", plan, elapsed)


def install(plan: Path, dest: Path) -> None:
    """Copy ``plan`` to ``dest`` unless it is already there (a copy, not a link: it must survive a bind mount)."""
    if dest.exists() and dest.stat().st_size == plan.stat().st_size and sha256(dest) == sha256(plan):
        log.info("%s is already installed as %s", plan.name, dest)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(plan, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("installed %s as %s", plan.name, dest)
