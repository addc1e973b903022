"""``build_engines.py``: build the model artifacts of every profile (the repository's script and the
installed command of the same name run this).

Subcommands, each idempotent:

- ``onnx``     export ResNet-50 (+ softmax) to ONNX with a dynamic batch axis (both profiles), and the
               FP16 / INT8 (Q/DQ) files the engines of those precisions are built from
- ``configs``  render the gpu profile's committed ``model_repository/`` configs and labels
- ``cpu``      ``onnx`` + the cpu profile's repository (python-backend steps) under ``build/``
- ``gpu-torch`` the gpu-torch profile's repository (PyTorch python-backend steps, the ResNet-50 state dict)
               under ``build/``; ``--device cpu`` builds the CPU override that runs without a GPU
- ``dali``     write the GPU-decoder pipeline as ``preprocess/1/dali.py`` and check that this machine's DALI
               autoserialises it the way the Triton DALI backend will
- ``batcher``  compile the pixel budget of preprocess's batches (a Triton batching strategy, C) as
               ``preprocess/batchstrategy.so`` with this machine's C compiler
- ``engine``   build the TensorRT engine for this GPU and TensorRT version as ``resnet50/1/model.plan``,
               strongly typed from the ONNX file of its precision (``trtexec``, in every tritonserver image)
- ``gpu``      (alias ``all``) ``onnx`` + ``dali`` + ``batcher`` + ``engine`` + ``configs``: the whole gpu profile
- ``check``    validate a model repository the way Triton would at load time (and more)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tritonvision import spec

from . import configs

if TYPE_CHECKING:
    from .engines import Builder, GpuInfo

log = logging.getLogger("tritonvision.build")

DEFAULT_BUILD = Path("build")
DEFAULT_ONNX = DEFAULT_BUILD / "resnet50.onnx"
DEFAULT_CPU_REPOSITORY = DEFAULT_BUILD / "model_repository_cpu"
DEFAULT_GPU_REPOSITORY = Path("model_repository")
DEFAULT_ENGINES = DEFAULT_BUILD / "engines"
DEFAULT_TORCH_WEIGHTS = DEFAULT_BUILD / "resnet50_state_dict.pt"


def default_gpu_torch_repository(device: str = "cuda") -> Path:
    """Where ``gpu-torch`` is built: one folder per device, since the configs differ (instance kind, device)."""
    return DEFAULT_BUILD / ("model_repository_gpu_torch" if device == "cuda" else f"model_repository_gpu_torch_{device}")


def build_cpu_repository(dest: Path = DEFAULT_CPU_REPOSITORY, onnx: Path = DEFAULT_ONNX, weights: str = "random",
                         force: bool = False) -> Path:
    """Export the ONNX file if needed and write the cpu-profile repository that serves it."""
    from .onnx_export import export_onnx

    export_onnx(onnx, weights, force=force)
    return configs.write_repository(spec.CPU, dest, onnx_path=onnx)


def gpu_torch_profile(device: str = "cuda", precision: str | None = None) -> spec.Profile:
    """The gpu-torch profile on ``device`` (``cpu``: the override), with another model precision when asked."""
    from dataclasses import replace

    profile = spec.GPU_TORCH if device == "cuda" else spec.GPU_TORCH.on_cpu()
    return replace(profile, torch_precision=precision) if precision else profile


def build_gpu_torch_repository(dest: Path | None = None, weights: str = "random", *, device: str = "cuda",
                               precision: str | None = None, state_dict: Path = DEFAULT_TORCH_WEIGHTS,
                               force: bool = False) -> Path:
    """Write the ResNet-50 state dict if needed (the same weights as the ONNX export) and the gpu-torch
    repository that serves it on ``device``."""
    from .onnx_export import export_state_dict

    export_state_dict(state_dict, weights, force=force)
    dest = Path(dest) if dest is not None else default_gpu_torch_repository(device)
    return configs.write_repository(gpu_torch_profile(device, precision), dest, torch_weights=state_dict)


def gpu_profile(precision: str | None = None) -> spec.Profile:
    """The gpu profile, with another engine precision (and the PIXELS dtype it takes) when asked."""
    if precision is None or precision == spec.GPU.engine.precision:
        return spec.GPU
    profile = spec.GPU.with_engine_precision(precision)
    if profile.pixels_dtype != spec.GPU.pixels_dtype:
        log.warning("a %s engine takes %s pixels: the configs written differ from the committed ones",
                    precision, profile.pixels_dtype)
    return profile


def build_dali(repository: Path, profile: spec.Profile) -> Path:
    """Write ``preprocess/1/dali.py`` and autoserialise it with this machine's DALI, as the backend will."""
    import tempfile

    from . import pipeline

    path = Path(repository) / spec.PREPROCESS / "1" / configs.DALI_FILE
    text = pipeline.dali_model_source(profile)
    if path.exists() and path.read_text() == text:
        log.info("%s is up to date", path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log.info("wrote the DALI pipeline (mixed decoder, hw_decoder_load %.2f, %s output) to %s",
                 profile.hw_decoder_load, profile.pixels_dtype, path)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.dali"
        pipeline.autoserialize_model(path, target)
        log.info("DALI %s autoserialises it (%d bytes); the server's DALI does the same when it loads the model",
                 pipeline.dali_version(), target.stat().st_size)
    return path


def build_batcher(repository: Path, compiler: str | None = None) -> Path:
    """Compile the pixel-budget batching strategy into ``repository/preprocess/batchstrategy.so``."""
    from . import batchstrategy

    return batchstrategy.build(batchstrategy.library_path(repository), compiler=compiler)


def build_onnx(output: Path, weights: str, precisions: list[str], *, calibration_images: Path | None = None,
               force: bool = False, require_weights: bool = False) -> list[Path]:
    """Export the FP32 ONNX file (the source of the others) and make the file of each engine precision."""
    from . import precision
    from .onnx_export import export_onnx

    export_onnx(output, weights, force=force, allow_random_fallback=not require_weights)
    made = []
    for p in dict.fromkeys(precisions):  # in order, once each
        made.append(precision.ensure_onnx(output, p, calibration_images_dir=calibration_images, force=force))
    return made


def build_engine(
    repository: Path,
    profile: spec.Profile,
    *,
    onnx: Path = DEFAULT_ONNX,
    engine_dir: Path = DEFAULT_ENGINES,
    workspace_mib: int = 0,
    builder: str | Builder = "auto",
    gpu: GpuInfo | None = None,
    gpu_index: int = 0,
    force: bool = False,
) -> Path:
    """Build (or reuse) ``profile``'s engine from the ONNX file of its precision next to ``onnx`` (the FP32
    export) and install it as ``repository/resnet50/1/model.plan``; ``workspace_mib`` 0 keeps the spec's;
    ``builder`` and ``gpu`` as in :func:`.engines.ensure_engine`."""
    from dataclasses import replace

    from . import engines, precision

    build = profile.engine
    if workspace_mib:
        build = replace(build, workspace_mib=workspace_mib)
    return engines.ensure_engine(
        precision.onnx_path(onnx, build.precision), Path(repository) / spec.RESNET50 / "1" / configs.PLAN_FILE, build,
        profile.resnet50.batching, engine_dir=engine_dir, builder=builder, gpu=gpu, gpu_index=gpu_index, force=force,
    )


def _engine_options(args: argparse.Namespace) -> dict:
    return dict(onnx=args.onnx, engine_dir=args.engine_dir, workspace_mib=args.workspace_mib, builder=args.builder,
                gpu_index=args.gpu, force=args.force)


def check(repository: Path, profile: spec.Profile, require_artifacts: bool) -> int:
    from . import repocheck

    problems = repocheck.check_repository(repository, profile=profile, require_artifacts=require_artifacts)
    for problem in problems:
        log.error("%s", problem)
    if not problems:
        log.info("%s: no problems found", repository)
    return 1 if problems else 0


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=sorted(spec.ENGINE_PRECISIONS), default=None,
                   help=f"engine precision (default from the spec: {spec.GPU.engine.precision}); the engine is built "
                        "from the ONNX file of that precision next to --onnx (resnet50_fp16.onnx, "
                        "resnet50_int8.onnx); fp32 and tf32 also switch PIXELS to FP32 and rewrite the configs")
    p.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="the FP32 export (default: build/resnet50.onnx)")
    p.add_argument("--engine-dir", type=Path, default=DEFAULT_ENGINES,
                   help="where engines, their metadata and timing caches are kept (default: build/engines); "
                        "may be shared by several processes (builds lock it)")
    p.add_argument("--workspace-mib", type=int, default=0, help="TensorRT workspace limit (default from the spec)")
    p.add_argument("--builder", choices=("auto", "python", "trtexec"), default="auto",
                   help="auto: trtexec if present (every tritonserver image has it), else the TensorRT Python API")
    p.add_argument("--gpu", type=int, default=0, help="index of the GPU to build for")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")


def _add_onnx_precision_args(p: argparse.ArgumentParser, *, with_precision: bool = True) -> None:
    if with_precision:
        p.add_argument("--precision", nargs="+", choices=sorted(spec.ENGINE_PRECISIONS),
                       default=[spec.GPU.engine.precision], metavar="PRECISION",
                       help=f"engine precision(s) to make the ONNX file for, of {sorted(spec.ENGINE_PRECISIONS)} "
                            f"(default: {spec.GPU.engine.precision}); the FP32 file is always written, fp16 adds "
                            "resnet50_fp16.onnx, int8 resnet50_int8.onnx (needs --calibration-images)")
    p.add_argument("--calibration-images", type=Path,
                   help="INT8: a folder of representative images (a few hundred; at most "
                        f"{spec.GPU.engine.calibration_max_images} are used), fed through the serving preprocessing")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_dali_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hw-decoder-load", type=float, default=None, metavar="SHARE",
                   help=f"share (0..1) of each batch for the hardware JPEG decoder of A100/H100/H200, the rest "
                        f"to the CUDA decoder (default {spec.GPU.hw_decoder_load}; 0 on GPUs without one)")


def _with_hw_decoder_load(profile: spec.Profile, share: float | None) -> spec.Profile:
    from dataclasses import replace

    return profile if share is None else replace(profile, hw_decoder_load=share)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="build_engines.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(ap)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("onnx", help="export ResNet-50 to ONNX (FP32) and make the FP16 / INT8 files")
    p.add_argument("--weights", default="imagenet", help="imagenet | random[:SEED] | PATH to a state_dict (default: imagenet)")
    p.add_argument("--output", type=Path, default=DEFAULT_ONNX,
                   help="the FP32 file (default: build/resnet50.onnx); the others go next to it")
    _add_onnx_precision_args(p)
    p.add_argument("--force", action="store_true", help="export even if an up-to-date file exists")
    p.add_argument("--require-weights", action="store_true",
                   help="fail (exit 2) instead of falling back to random weights when the ImageNet download fails "
                        "(image builds)")

    p = sub.add_parser("configs", help="render the gpu profile's config.pbtxt files and labels")
    p.add_argument("--output", type=Path, default=DEFAULT_GPU_REPOSITORY)

    p = sub.add_parser("cpu", help="ONNX export + the cpu profile's model repository")
    p.add_argument("--weights", default="imagenet", help="imagenet | random[:SEED] | PATH (default: imagenet)")
    p.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    p.add_argument("--output", type=Path, default=DEFAULT_CPU_REPOSITORY)
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("gpu-torch", help="the gpu-torch profile's repository (PyTorch steps on the bundled server)")
    p.add_argument("--weights", default="imagenet", help="imagenet | random[:SEED] | PATH (default: imagenet)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default), or cpu: the same code on CPU instances, for machines without a GPU")
    p.add_argument("--precision", choices=spec.TORCH_PRECISIONS, default=None,
                   help=f"the model step's precision on CUDA (default from the spec: {spec.GPU_TORCH.torch_precision})")
    p.add_argument("--state-dict", type=Path, default=DEFAULT_TORCH_WEIGHTS)
    p.add_argument("--output", type=Path, default=None, help="default: build/model_repository_gpu_torch[_cpu]")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("dali", help="write preprocess/1/dali.py (GPU decoder) and check that DALI autoserialises it")
    p.add_argument("--precision", choices=sorted(spec.ENGINE_PRECISIONS), default=None,
                   help="engine precision the pixels must match (default from the spec)")
    _add_dali_args(p)
    p.add_argument("--output", type=Path, default=DEFAULT_GPU_REPOSITORY)

    p = sub.add_parser("batcher", help="compile preprocess/batchstrategy.so, the pixel budget of DALI batches (needs a C compiler)")
    p.add_argument("--cc", default=None, help="the C compiler (default: $CC, else cc, gcc or clang from PATH)")
    p.add_argument("--output", type=Path, default=DEFAULT_GPU_REPOSITORY)

    p = sub.add_parser("engine", help="build the TensorRT engine for this GPU (needs TensorRT)")
    _add_engine_args(p)
    p.add_argument("--output", type=Path, default=DEFAULT_GPU_REPOSITORY)

    for name in ("gpu", "all"):
        p = sub.add_parser(name, help="onnx + dali + batcher + engine + configs: the whole gpu profile")
        _add_engine_args(p)
        _add_onnx_precision_args(p, with_precision=False)
        _add_dali_args(p)
        p.add_argument("--weights", default="imagenet", help="imagenet | random[:SEED] | PATH (default: imagenet)")
        p.add_argument("--cc", default=None, help="the C compiler for the batching strategy (default: $CC, else cc, "
                                                  "gcc or clang from PATH)")
        p.add_argument("--output", type=Path, default=DEFAULT_GPU_REPOSITORY)

    p = sub.add_parser("check", help="validate a model repository (exit code 1 when it finds problems)")
    p.add_argument("repository", type=Path, nargs="?", default=DEFAULT_GPU_REPOSITORY)
    p.add_argument("--profile", choices=sorted(spec.PROFILES), default="gpu")
    p.add_argument("--require-artifacts", action="store_true",
                   help="also require model.plan / dali.py / model.onnx (on the serving host)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "onnx":
            build_onnx(args.output, args.weights, args.precision, calibration_images=args.calibration_images,
                       force=args.force, require_weights=args.require_weights)
        elif args.command == "configs":
            configs.write_repository(spec.GPU, args.output)
        elif args.command == "cpu":
            build_cpu_repository(args.output, args.onnx, args.weights, args.force)
        elif args.command == "gpu-torch":
            build_gpu_torch_repository(args.output, args.weights, device=args.device, precision=args.precision,
                                       state_dict=args.state_dict, force=args.force)
        elif args.command == "dali":
            build_dali(args.output, _with_hw_decoder_load(gpu_profile(args.precision), args.hw_decoder_load))
        elif args.command == "batcher":
            build_batcher(args.output, args.cc)
        elif args.command == "engine":
            build_engine(args.output, gpu_profile(args.precision), **_engine_options(args))
        elif args.command in ("gpu", "all"):
            profile = gpu_profile(args.precision)
            build_onnx(args.onnx, args.weights, [profile.engine.precision], calibration_images=args.calibration_images)
            build_dali(args.output, _with_hw_decoder_load(profile, args.hw_decoder_load))
            if profile.max_batch_pixels:
                build_batcher(args.output, args.cc)
            build_engine(args.output, profile, **_engine_options(args))
            configs.write_repository(profile, args.output)
            return check(args.output, profile, require_artifacts=True)
        elif args.command == "check":
            return check(args.repository, spec.PROFILES[args.profile], args.require_artifacts)
    except (ImportError, ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
