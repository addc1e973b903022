"""``build_engines.py`` / ``tritonvision-build``: build the model artifacts of either profile.

Subcommands, each idempotent:

- ``onnx``     export ResNet-50 (+ softmax) to ONNX with a dynamic batch axis (both profiles)
- ``configs``  render the gpu profile's committed ``model_repository/`` configs and labels
- ``cpu``      ``onnx`` + the cpu profile's repository (python-backend steps) under ``build/``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tritonvision import spec

from . import configs

log = logging.getLogger("tritonvision.build")

ROOT = Path.cwd()
DEFAULT_BUILD = Path("build")
DEFAULT_ONNX = DEFAULT_BUILD / "resnet50.onnx"
DEFAULT_CPU_REPOSITORY = DEFAULT_BUILD / "model_repository_cpu"
DEFAULT_GPU_REPOSITORY = Path("model_repository")


def build_cpu_repository(dest: Path = DEFAULT_CPU_REPOSITORY, onnx: Path = DEFAULT_ONNX, weights: str = "random",
                         force: bool = False) -> Path:
    """Export the ONNX file if needed and write the cpu-profile repository that serves it."""
    from .onnx_export import export_onnx

    export_onnx(onnx, weights, force=force)
    return configs.write_repository(spec.CPU, dest, onnx_path=onnx)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="build_engines.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(ap)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("onnx", help="export ResNet-50 to ONNX")
    p.add_argument("--weights", default="imagenet", help="imagenet | random[:SEED] | PATH to a state_dict (default: imagenet)")
    p.add_argument("--output", type=Path, default=DEFAULT_ONNX)
    p.add_argument("--force", action="store_true", help="export even if an up-to-date file exists")

    p = sub.add_parser("configs", help="render the gpu profile's config.pbtxt files and labels")
    p.add_argument("--output", type=Path, default=DEFAULT_GPU_REPOSITORY)

    p = sub.add_parser("cpu", help="ONNX export + the cpu profile's model repository")
    p.add_argument("--weights", default="imagenet", help="imagenet | random[:SEED] | PATH (default: imagenet)")
    p.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    p.add_argument("--output", type=Path, default=DEFAULT_CPU_REPOSITORY)
    p.add_argument("--force", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "onnx":
            from .onnx_export import export_onnx

            export_onnx(args.output, args.weights, force=args.force)
        elif args.command == "configs":
            configs.write_repository(spec.GPU, args.output)
        elif args.command == "cpu":
            build_cpu_repository(args.output, args.onnx, args.weights, args.force)
    except (ImportError, ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
