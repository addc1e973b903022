"""``tritonvision``: the command line.

    tritonvision classify [--url URL] [--top-k K] [--json] [--shm auto|system|cuda|off] IMAGE|DIR|GLOB...
    tritonvision stats [--url URL] [--interval SECONDS] [--json]
    tritonvision bench [--url URL] [--concurrency 1,4,16] [--seconds 10] [--shm ...] [--json] IMAGE...
    tritonvision serve [--profile cpu|gpu] [--model-repository DIR] [--grpc-port 8001] ...
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from ._client import DEFAULT_URL, Classifier
from ._extras import require
from ._retry import RetryPolicy
from ._types import TLS
from .exceptions import InvalidImageError, OverloadedError, TritonVisionError

log = logging.getLogger("tritonvision")

# Exit codes: 0 all classified, 1 some images refused (bench: some requests failed or were shed),
# 2 usage/server errors, 3 the server shed the request (overloaded: try again later), 130 interrupted.
EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_OVERLOADED = 0, 1, 2, 3

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def expand(args: list[str]) -> list[str]:
    """Files as given; folders become their image files (recursively, sorted); globs are expanded; no repeats."""
    out: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in arg for ch in "*?[") and not path.exists():
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                log.warning("no file matches %s", arg)
            out += matches
        else:
            out.append(arg)
    return list(dict.fromkeys(out))  # a file named twice (folder and glob) is classified once


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    tqdm = require("tqdm", extra="cli", what="progress bars").tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)


def _classify(args: argparse.Namespace) -> int:
    images = expand(args.images)
    if not images:
        log.error("no images to classify")
        return EXIT_ERROR
    failed = 0
    out = []
    bar = _progress(len(images), len(images) > 20 and sys.stderr.isatty(), "classify")
    with Classifier(args.url, timeout=args.timeout, shm=args.shm, access_key=_key(args), tls=_tls(args)) as clf:
        log.debug("shared memory: %s", clf.shm or "off")
        for image, result in zip(images, clf.classify_stream(images, top_k=args.top_k)):
            if bar is not None:
                bar.update(1)
            if not result.ok:
                if not isinstance(result.error, InvalidImageError):
                    raise result.error
                failed += 1
                out.append({"image": image, "error": result.error.message})
                if not args.json:
                    print(f"{image}: error: {result.error.message}", file=sys.stderr)
                continue
            out.append({"image": image, "predictions": [p.to_dict() for p in result.predictions]})
            if not args.json:
                print(image)
                for p in result.predictions:
                    print(f"  {p.score:7.4f}  {p.index:4d}  {p.label}")
    if bar is not None:
        bar.close()
    if args.json:
        json.dump(out if len(out) > 1 else out[0], sys.stdout, indent=2)
        print()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    with Classifier(args.url, timeout=args.timeout or 10, access_key=_key(args), tls=_tls(args)) as clf:
        before = clf.statistics()
        if args.interval:
            log.info("measuring for %g s", args.interval)
            time.sleep(args.interval)
            breakdown = (clf.statistics() - before).active()
        else:
            breakdown = before.breakdown()
    if args.json:
        json.dump(breakdown.to_dict(), sys.stdout, indent=2)
        print()
    else:
        span = f"last {breakdown.seconds:.1f} s" if args.interval else "since the server started"
        print(f"Triton statistics at {args.url} ({span}); times are per request, in ms\n")
        print(breakdown.table())
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from . import _bench

    files = expand(args.images)
    if not files:
        log.error("no images to send")
        return EXIT_ERROR
    images = [Path(f).read_bytes() for f in files]
    levels = [int(c) for c in str(args.concurrency).split(",")]
    results = []
    with Classifier(args.url, shm=args.shm, access_key=_key(args), tls=_tls(args)) as clf:
        clf.wait_until_ready(timeout=30)
        for c in levels:
            bar = _progress(None, not args.no_progress, f"concurrency {c}")
            r = _bench.run(clf, images, concurrency=c, seconds=args.seconds, warmup=args.warmup, top_k=args.top_k,
                           progress=bar.update if bar is not None else None)
            if bar is not None:
                bar.close()
            results.append(r)
            log.info("concurrency %d: %.1f img/s, p50 %.2f ms, p99 %.2f ms", c, r.throughput, r.p50_ms, r.p99_ms)
    if args.json:
        json.dump({"url": args.url, "shm": clf.shm, "results": [r.to_dict() for r in results]}, sys.stdout, indent=2)
        print()
    else:
        print(f"{'concurrency':>11}  {'img/s':>9}  {'p50 ms':>8}  {'p90 ms':>8}  {'p95 ms':>8}  {'p99 ms':>8}  {'errors':>6}"
              f"  {'shed':>6}")
        for r in results:
            print(f"{r.concurrency:>11}  {r.throughput:>9.1f}  {r.p50_ms:>8.2f}  {r.p90_ms:>8.2f}  {r.p95_ms:>8.2f}"
                  f"  {r.p99_ms:>8.2f}  {r.errors:>6}  {r.overloaded:>6}")
    if any(r.overloaded for r in results):
        log.warning("the server shed %d requests (overloaded): the concurrency is past its capacity",
                    sum(r.overloaded for r in results))
    return EXIT_SOME_FAILED if any(r.errors or r.overloaded for r in results) else EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    try:
        from tritonvision_server.serve import serve
    except ImportError as exc:
        log.error("serving needs the server extra: pip install 'tritonvision[server]' (%s)", exc)
        return EXIT_ERROR
    return serve(args)


def _probe(args: argparse.Namespace) -> int:
    """A liveness check that runs the whole ensemble: Triton's own health endpoints stay true while a
    step cannot serve (a dead python-backend stub). A server that sheds the probe is busy, not dead."""
    data = Path(args.image).read_bytes()
    with Classifier(args.url, timeout=args.timeout, retry=RetryPolicy(attempts=1), tls=_tls(args)) as clf:
        try:
            clf.classify(data, top_k=1)
        except OverloadedError:
            log.info("alive (overloaded)")
            return EXIT_OK
        except TritonVisionError as exc:
            log.error("not serving: %s: %s", type(exc).__name__, exc)
            return EXIT_SOME_FAILED
    return EXIT_OK


def _tls(args: argparse.Namespace) -> TLS | None:
    if not (args.tls or args.tls_root_cert or args.tls_cert):
        return None
    return TLS(root_cert=args.tls_root_cert, cert=args.tls_cert, key=args.tls_key)


def _key(args: argparse.Namespace) -> tuple[str, str] | None:
    name, sep, value = (getattr(args, "access_key", None) or "").partition("=")
    return (name, value) if sep else None


def _url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    p.add_argument("--access-key", default=os.environ.get("TRITONVISION_ACCESS_KEY"), metavar="NAME=VALUE",
                   help="the server's access key, for shared memory and statistics (env TRITONVISION_ACCESS_KEY)")
    p.add_argument("--tls", action="store_true", help="gRPC over TLS (with the system's roots unless --tls-root-cert)")
    p.add_argument("--tls-root-cert", default=os.environ.get("TRITONVISION_TLS_ROOT_CERT"),
                   help="PEM file of the CA that signed the server's certificate (implies --tls)")
    p.add_argument("--tls-cert", default=os.environ.get("TRITONVISION_TLS_CERT"),
                   help="client certificate (PEM) for a server that requires mutual TLS; with --tls-key")
    p.add_argument("--tls-key", default=os.environ.get("TRITONVISION_TLS_KEY"), help="the client certificate's key (PEM)")


def _shm(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--shm", choices=("auto", "system", "cuda", "off"), default=default,
                   help=f"send images through shared memory (default {default}; auto = system when the server is local)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tritonvision", description="ResNet-50 image classification on Triton.")
    ap.add_argument("--version", action="version", version=f"tritonvision {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify image files, folders or globs")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="files, folders (searched recursively) or globs")
    _url(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=None, help="seconds per image")
    _shm(p, "off")
    p.set_defaults(func=_classify)

    p = sub.add_parser("stats", help="per-stage time breakdown from Triton's statistics")
    _url(p)
    p.add_argument("--interval", type=float, default=0.0,
                   help="measure over this many seconds from now (default: everything since start-up)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=None)
    p.set_defaults(func=_stats)

    p = sub.add_parser("bench", help="throughput and latency percentiles at given concurrencies")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images sent round-robin (files, folders, globs)")
    _url(p)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated requests in flight (default 1,4,16)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per concurrency")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _shm(p, "off")
    p.set_defaults(func=_bench)

    p = sub.add_parser("probe", help="liveness check: classify one image end to end (exit 0 if served or shed, 1 if not)")
    _url(p)
    p.add_argument("--image", required=True, help="a valid image to send (e.g. the repository's warm-up photo)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before the probe fails")
    p.set_defaults(func=_probe)

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
    p.add_argument("--access-key", default=os.environ.get("TRITONVISION_ACCESS_KEY"), metavar="NAME=VALUE",
                   help="require the header NAME: VALUE for shared-memory registration, the model-repository API and "
                        "statistics (env TRITONVISION_ACCESS_KEY); clients pass it as access_key=(NAME, VALUE)")
    p.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM); with --tls-key")
    p.add_argument("--tls-key", default=None, help="the server certificate's key (PEM)")
    p.add_argument("--tls-client-ca", default=None,
                   help="mutual TLS: accept only clients with a certificate signed by this CA (PEM)")
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between checks of the server's python-backend stubs; a dead one restarts the "
                        "server (0: never)")
    p.set_defaults(func=_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "shm", None) == "off":
        args.shm = None
    try:
        return args.func(args)
    except OverloadedError as exc:
        log.error("the server is overloaded and shed the request; try again later (%s)", exc)
        return EXIT_OVERLOADED
    except TritonVisionError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
