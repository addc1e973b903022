"""``tritonvision serve``: build the cpu repository if needed, start Triton, show it working, serve until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from .launcher import ServerStartError, ServerTLS, TritonServer, which_tritonserver

log = logging.getLogger("tritonvision.serve")

# Lines of Triton's log that say why it did not start: glog errors ("E1127 22:57:43.058 ..."), a refused
# command-line option (printed after the whole options table), "error: creating server: ...", and the rows
# of the model table for models that failed to load.
_CAUSE = re.compile(r"^E\d{4} |Bad option|option format|error: |\| *UNAVAILABLE|Unrecognized|unknown option", re.I)


def start_failure(tail: str) -> list[str]:
    """The lines of a server log tail that name the cause of a failed start (empty when none does)."""
    return [line.rstrip() for line in tail.splitlines() if _CAUSE.search(line)]


def server_tls(args: argparse.Namespace) -> ServerTLS | None:
    """The gRPC TLS of ``serve``'s ``--grpc-tls-cert/--grpc-tls-key`` (and ``--grpc-tls-client-ca`` for mutual
    TLS); :meth:`ServerTLS.args` turns it into Triton 2.51's ``--grpc-use-ssl[-mutual]``,
    ``--grpc-server-cert/-key`` and ``--grpc-root-cert``. Raises ValueError for an incomplete set."""
    cert, key, root = (getattr(args, name, None) for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca"))
    if not (cert or key or root):
        return None
    if not (cert and key):
        raise ValueError("--grpc-tls-cert and --grpc-tls-key go together (--grpc-tls-client-ca needs both)")
    return ServerTLS(Path(cert).resolve(), Path(key).resolve(), Path(root).resolve() if root else None)


def _repository(args: argparse.Namespace) -> Path:
    from .build import DEFAULT_CPU_REPOSITORY, DEFAULT_GPU_REPOSITORY, build_cpu_repository

    if args.model_repository:
        return Path(args.model_repository)
    if args.profile == "gpu":
        return DEFAULT_GPU_REPOSITORY
    if not (DEFAULT_CPU_REPOSITORY / "resnet50" / "1" / "model.onnx").exists():
        log.info("no cpu model repository yet: building it (weights: %s)", args.weights)
    # Cheap when up to date: the ONNX export is skipped and only the configs are rewritten.
    return build_cpu_repository(DEFAULT_CPU_REPOSITORY, weights=args.weights)


def _demo(url: str, images: list[str]) -> None:
    from tritonvision import Classifier, TritonVisionError

    from tritonvision._images import sample_paths

    paths = images or [str(p) for p in sample_paths()]
    with Classifier(url) as clf:
        for path, result in zip(paths, clf.classify_batch(paths, top_k=3, return_exceptions=True)):
            if isinstance(result, TritonVisionError):
                log.warning("demo: %s: %s", path, result)
            else:
                log.info("demo: %s -> %s", Path(path).name, ", ".join(f"{p.label} ({p.score:.3f})" for p in result))


def _access_key(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise SystemExit("--access-key takes NAME=VALUE")
    return name, value


def serve(args: argparse.Namespace) -> int:
    try:
        tls = server_tls(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    repository = _repository(args)
    server = TritonServer(
        repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        tritonserver=which_tritonserver(args.tritonserver),
        extra_args=list(args.server_arg),
        startup_timeout=args.startup_timeout,
        log_verbose=1 if args.verbose else 0,
        access_key=_access_key(args.access_key),
        tls=tls,
    )
    try:
        server.start()
    except ServerStartError as exc:
        cause = start_failure(server.log_tail(60))
        first_line = str(exc).splitlines()[0].removesuffix("; last log lines:")
        if cause:
            log.error("%s; Triton said:\n  %s", first_line, "\n  ".join(cause))
        else:
            log.error("%s", exc)
        log.error("check the repository with: python build_engines.py check --profile %s %s", args.profile, repository)
        return 1
    if args.demo is not None and tls is not None:
        log.info("demo skipped: the server requires TLS")
    elif args.demo is not None:
        _demo(server.grpc_url, args.demo)
    log.info("serving %s on gRPC %s / HTTP %s; Ctrl-C to stop", repository, server.grpc_url, server.http_url)
    return server.serve_forever(health_interval=args.health_interval)
