"""``tritonvision``: the command line.

    tritonvision classify [--url URL] [--top-k K] [--json] [--shm auto|system|cuda|off] IMAGE|DIR|GLOB...
    tritonvision stats [--url URL] [--interval SECONDS] [--json]
    tritonvision bench [--url URL] [--concurrency 1,4,16] [--seconds 10] [--timeout S] [--shm ...] [--json] IMAGE...
    tritonvision probe [--url URL] --image IMAGE [--timeout S]
    tritonvision serve [--profile cpu|gpu] [--model-repository DIR] [--grpc-port 8001] ...

The client commands take the server's address from ``--url``, else ``$TRITONVISION_URL``, else
127.0.0.1:8001, and the connection options of :class:`tritonvision.Classifier` (TLS files, ``--header``,
``--access-key``, ``--load-balancing``).

Exit status: 0 done; 1 some images refused or timed out (bench: some requests failed or were shed; probe:
not serving); 2 a usage error or a server error; 3 the server is overloaded and shed the request (try
again later); 130 interrupted.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from . import __version__
from ._client import Classifier, checked_timeout, checked_top_k
from ._images import encoded_bytes
from .extras import require
from ._retry import RetryPolicy
from ._transport._channel import DEFAULT_PORT, DEFAULT_URL, LOAD_BALANCING, URL_ENV, Connection, normalize_url
from .exceptions import (
    DeadlineExceededError,
    InvalidImageError,
    OverloadedError,
    ServerUnavailableError,
    TritonVisionError,
)
from .spec import NUM_CLASSES, image_suffixes

log = logging.getLogger("tritonvision")
ACCESS_KEY_ENV = "TRITONVISION_ACCESS_KEY"

# Exit codes: 0 all classified, 1 some images refused or timed out (bench: some requests failed or were
# shed; probe: not serving), 2 usage or server errors, 3 the server shed the request (overloaded: try again
# later), 130 interrupted.
EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_OVERLOADED = 0, 1, 2, 3
EXIT_CODES = ("exit status: 0 done; 1 some images refused or timed out (bench: some requests failed or shed; "
              "probe: not serving); 2 usage error or server error; 3 the server is overloaded and shed the "
              "request (try again later); 130 interrupted")

IMAGE_SUFFIXES = image_suffixes()
STDIN = "-"  # an image argument that reads the image from standard input


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


def _connect(args: argparse.Namespace, **kwargs) -> Classifier:
    """A :class:`Classifier` with the command line's connection options."""
    headers = dict(h.split("=", 1) for h in args.header)
    return Classifier(args.url, ssl=args.tls, root_certificates=args.root_certificates, private_key=args.client_key,
                      certificate_chain=args.client_cert, headers=headers, load_balancing=args.load_balancing,
                      tls_server_name=args.tls_server_name, access_key=_key(args), **kwargs)


def _classify(args: argparse.Namespace) -> int:
    if args.images.count(STDIN) > 1:
        log.error("standard input (-) holds one image: name it once")
        return EXIT_ERROR
    images = expand(args.images)
    if not images:
        log.error("no images to classify")
        return EXIT_ERROR
    sources: list = images
    if STDIN in images:
        if sys.stdin.isatty():
            log.error("- reads an image from standard input: pipe one in (curl -s URL | tritonvision classify -)")
            return EXIT_ERROR
        data = sys.stdin.buffer.read()
        sources = [data if image == STDIN else image for image in images]
    failed = 0
    out = []
    bar = _progress(len(images), len(images) > 20 and sys.stderr.isatty(), "classify")
    # Lines go through the bar's write() while it is drawn, so that results and the bar do not interleave.
    write = (lambda text, file=sys.stdout: bar.write(text, file=file)) if bar is not None else \
        (lambda text, file=sys.stdout: print(text, file=file))
    with _connect(args, timeout=args.timeout, shm=args.shm) as clf:
        log.debug("shared memory: %s", clf.shm or "off")
        for image, result in zip(images, clf.classify_stream(sources, top_k=args.top_k)):
            if bar is not None:
                bar.update(1)
            if not result.ok:
                # A refused image, or one not answered within --timeout, is that image's failure; anything
                # else (the server went away) ends the run.
                if not isinstance(result.error, (InvalidImageError, DeadlineExceededError)):
                    raise result.error
                failed += 1
                out.append({"image": image, "error": result.error.message, "type": type(result.error).__name__})
                if not args.json:
                    write(f"{image}: error: {result.error.message}", file=sys.stderr)
                continue
            out.append({"image": image, "predictions": [p.to_dict() for p in result.predictions]})
            if not args.json:
                write("\n".join([image] + [f"  {p.score:7.4f}  {p.index:4d}  {p.label}" for p in result.predictions]))
    if bar is not None:
        bar.close()
    if args.json:
        # Always a list, one entry per image, whatever the number of images.
        json.dump(out, sys.stdout, indent=2)
        print()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    with _connect(args, timeout=args.timeout or 10) as clf:
        before = clf.statistics()
        if args.interval:
            log.info("measuring for %g s", args.interval)
            time.sleep(args.interval)
            breakdown = (clf.statistics() - before).active()
            if breakdown.restarted:
                log.warning("%s started again during the interval (server restart, model reload or a server that "
                            "joined): their figures count from that start", ", ".join(breakdown.restarted))
            if breakdown.lost:
                log.warning("not counted, no second snapshot from: %s", ", ".join(breakdown.lost))
        else:
            breakdown = before.breakdown()
    if args.json:
        json.dump(breakdown.to_dict(), sys.stdout, indent=2)
        print()
    else:
        span = f"last {breakdown.seconds:.1f} s" if args.interval else "since the server started"
        print(f"Triton statistics at {normalize_url(args.url)[0]} ({span}); times are per request, in ms\n")
        print(breakdown.table())
        if args.per_server:
            for address, own in breakdown.by_server.items():
                print(f"\n{address}\n{own.table()}")
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from . import _bench

    files = expand(args.images)
    if not files:
        log.error("no images to send")
        return EXIT_ERROR
    # A file that cannot be read is an InvalidImageError naming it (exit 2), before anything connects.
    images = [encoded_bytes(f) for f in files]
    levels = args.concurrency
    results = []
    with _connect(args, shm=args.shm) as clf:
        # Fail fast: a server that is down would otherwise turn every level into a column of errors.
        clf.wait_until_ready(timeout=args.ready_timeout)
        for c in levels:
            bar = _progress(None, not args.no_progress and sys.stderr.isatty(), f"concurrency {c}")
            r = _bench.run(clf, images, concurrency=c, seconds=args.seconds, warmup=args.warmup, top_k=args.top_k,
                           timeout=args.timeout, progress=bar.update if bar is not None else None)
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


def _serve(argv: list[str]) -> int:
    try:
        from tritonvision_server.serve import main as serve_main
    except ImportError as exc:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        log.error("serving needs the server extra: pip install 'tritonvision[server]' (%s)", exc)
        return EXIT_ERROR
    return serve_main(argv, prog="tritonvision serve")


def _probe(args: argparse.Namespace) -> int:
    """A liveness check that runs the whole ensemble: Triton's own health endpoints stay true while a
    step cannot serve (a dead python-backend stub). A server that sheds the probe is busy, not dead."""
    data = encoded_bytes(args.image)
    with _connect(args, timeout=args.timeout, retry=RetryPolicy(attempts=1)) as clf:
        why = clf.probe(data)
    if why is not None:
        log.error("not serving: %s", why)
        return EXIT_SOME_FAILED
    return EXIT_OK


def _key(args: argparse.Namespace) -> tuple[str, str] | None:
    name, sep, value = (getattr(args, "access_key", None) or "").partition("=")
    return (name, value) if sep else None


def _url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None,
                   help=f"Triton gRPC address host[:port] (port {DEFAULT_PORT} if none), or a gRPC target such as "
                        f"dns:///name:port (default ${URL_ENV}, else {DEFAULT_URL})")
    g = p.add_argument_group("connection")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates (also: a grpcs:// URL)")
    g.add_argument("--root-certificates", metavar="PEM", help="root certificates that signed the server's certificate (TLS)")
    g.add_argument("--client-cert", metavar="PEM", help="client certificate chain, for mutual TLS (with --client-key)")
    g.add_argument("--client-key", metavar="PEM", help="client private key, for mutual TLS")
    g.add_argument("--tls-server-name", metavar="NAME", help="name the server's certificate carries, if not the URL's host")
    g.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", type=_header,
                   help="gRPC metadata sent with every call (repeatable)")
    g.add_argument("--access-key", default=os.environ.get(ACCESS_KEY_ENV), metavar="NAME=VALUE", type=_access_key,
                   help="the server's access key (serve --access-key), for shared memory and statistics "
                        f"(env {ACCESS_KEY_ENV})")
    g.add_argument("--load-balancing", choices=LOAD_BALANCING, default=None,
                   help="round_robin: spread calls over every address the URL resolves to (a headless Service)")


def _header(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _access_key(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return text


def _top_k(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    try:
        return checked_top_k(k)  # the SDK's rule, so that the two cannot drift apart
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timeout(text: str) -> float:
    try:
        return checked_timeout(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}") from None


def _warmup(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return seconds


def _levels(text: str) -> list[int]:
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return levels


def _shm(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--shm", choices=("auto", "system", "cuda", "off"), default=default,
                   help=f"send images through shared memory (default {default}; auto = system when the server is local)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tritonvision", description="ResNet-50 image classification on Triton.",
                                 epilog=EXIT_CODES)
    ap.add_argument("--version", action="version", version=f"tritonvision {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify image files, folders or globs")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="files, folders (searched recursively), globs, or - for one image from standard input")
    _url(p)
    p.add_argument("--top-k", type=_top_k, default=5, help=f"classes per image, 1 to {NUM_CLASSES} (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one entry per image")
    p.add_argument("--timeout", type=_timeout, default=None,
                   help="seconds per image; an image not answered in time counts as failed and the run goes on")
    _shm(p, "off")
    p.set_defaults(func=_classify)

    p = sub.add_parser("stats", help="per-stage time breakdown from Triton's statistics")
    _url(p)
    p.add_argument("--interval", type=_timeout, default=None,
                   help="measure over this many seconds from now (default: everything since start-up)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--per-server", action="store_true",
                   help="with --load-balancing round_robin: each server's table too (the JSON always has them)")
    p.add_argument("--timeout", type=_timeout, default=None)
    p.set_defaults(func=_stats)

    p = sub.add_parser("bench", help="throughput and latency percentiles at given concurrencies")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images sent round-robin (files, folders, globs)")
    _url(p)
    p.add_argument("--concurrency", type=_levels, default="1,4,16",
                   help="comma-separated requests in flight, each >= 1 (default 1,4,16)")
    p.add_argument("--seconds", type=_timeout, default=10.0, help="measured seconds per concurrency (default 10)")
    p.add_argument("--warmup", type=_warmup, default=1.0, help="unmeasured seconds first, 0 for none (default 1)")
    p.add_argument("--top-k", type=_top_k, default=5)
    p.add_argument("--timeout", type=_timeout, default=60.0, help="seconds before a request counts as failed (default 60)")
    p.add_argument("--ready-timeout", type=_timeout, default=10.0,
                   help="seconds to wait for the server to be ready before giving up (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn unless stderr is a terminal)")
    _shm(p, "off")
    p.set_defaults(func=_bench)

    p = sub.add_parser("probe", help="liveness check: classify one image end to end (exit 0 if served or shed, 1 if not)")
    _url(p)
    p.add_argument("--image", required=True, help="a valid image to send (e.g. the repository's warm-up photo)")
    p.add_argument("--timeout", type=_timeout, default=10.0, help="seconds before the probe fails")
    p.set_defaults(func=_probe)

    # The server's own command (tritonvision_server.serve): its options and code live in the server package,
    # which is imported only when `serve` runs (main() hands it the rest of the command line).
    p = sub.add_parser("serve", help="run tritonserver with the classifier (cpu profile by default; "
                                     "`tritonvision serve --help` for its options; needs the server extra)",
                       add_help=False)
    p.add_argument("server_argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "serve" in argv:  # `tritonvision [-v] serve ...`: the server package parses the rest
        k = argv.index("serve")
        if all(a in ("-v", "--verbose") for a in argv[:k]):
            return _serve(argv[k + 1 :] + (["--verbose"] if argv[:k] else []))
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "header"):
        try:  # a bad address or option is a usage error (exit 2) before anything connects
            Connection.make(args.url, root_certificates=args.root_certificates, private_key=args.client_key,
                            certificate_chain=args.client_cert, headers=dict(h.split("=", 1) for h in args.header))
        except ValueError as exc:
            ap.error(str(exc))
    if getattr(args, "shm", None) == "off":
        args.shm = None
    try:
        return args.func(args)
    except OverloadedError as exc:
        log.error("the server is overloaded and shed the request; try again later (%s)", exc)
        return EXIT_OVERLOADED
    except TritonVisionError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        target = normalize_url(args.url)[0] if hasattr(args, "url") else ""
        if isinstance(exc, (ServerUnavailableError, DeadlineExceededError)) and target.endswith(":8000"):
            log.error("port 8000 is Triton's HTTP port by default; tritonvision needs the gRPC port (%d)", DEFAULT_PORT)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
