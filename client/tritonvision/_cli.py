"""``tritonvision``: the command line.

    tritonvision classify [--url URL] [--top-k K] [--json] IMAGE...
    tritonvision serve [--profile cpu|gpu] [--model-repository DIR] [--grpc-port 8001] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from ._client import DEFAULT_URL, Classifier
from .exceptions import InvalidImageError, TritonVisionError

log = logging.getLogger("tritonvision")

# Exit codes: 0 all classified, 1 some images refused, 2 usage/server errors.
EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


def _classify(args: argparse.Namespace) -> int:
    failed = 0
    with Classifier(args.url, timeout=args.timeout) as clf:
        results = clf.classify_batch(args.images, top_k=args.top_k, return_exceptions=True)
    out = []
    for image, result in zip(args.images, results):
        if isinstance(result, TritonVisionError):
            if not isinstance(result, InvalidImageError):
                raise result
            failed += 1
            out.append({"image": image, "error": result.message})
            if not args.json:
                print(f"{image}: error: {result.message}", file=sys.stderr)
            continue
        out.append({"image": image, "predictions": [p.to_dict() for p in result]})
        if not args.json:
            print(image)
            for p in result:
                print(f"  {p.score:7.4f}  {p.index:4d}  {p.label}")
    if args.json:
        json.dump(out if len(out) > 1 else out[0], sys.stdout, indent=2)
        print()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    try:
        from tritonvision_server.serve import serve
    except ImportError as exc:
        log.error("serving needs the server extra: pip install 'tritonvision[server]' (%s)", exc)
        return EXIT_ERROR
    return serve(args)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tritonvision", description="ResNet-50 image classification on Triton.")
    ap.add_argument("--version", action="version", version=f"tritonvision {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=None, help="seconds per request")
    p.set_defaults(func=_classify)

    p = sub.add_parser("serve", help="run tritonserver with the classifier (cpu profile by default)")
    p.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model-repository", default=None, help="default: build/model_repository_cpu (cpu), model_repository (gpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", default=None, help="a tritonserver binary to run instead of the bundled one")
    p.add_argument("--weights", default="imagenet", help="cpu profile: weights to build with if the repository is missing")
    p.add_argument("--demo", nargs="*", default=None, metavar="IMAGE",
                   help="classify these images (default: the bundled samples) once ready")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra tritonserver argument (repeatable)")
    p.set_defaults(func=_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TritonVisionError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
