"""``tritonvision serve``: build the cpu repository if needed, start Triton, show it working, serve until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .launcher import ServerStartError, TritonServer, which_tritonserver

log = logging.getLogger("tritonvision.serve")



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


def serve(args: argparse.Namespace) -> int:
    repository = _repository(args)
    server = TritonServer(
        repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        tritonserver=which_tritonserver(args.tritonserver),
        extra_args=args.server_arg,
        startup_timeout=args.startup_timeout,
        log_verbose=1 if args.verbose else 0,
    )
    try:
        server.start()
    except ServerStartError as exc:
        log.error("%s", exc)
        return 1
    if args.demo is not None:
        _demo(server.grpc_url, args.demo)
    log.info("serving %s on gRPC %s / HTTP %s; Ctrl-C to stop", repository, server.grpc_url, server.http_url)
    return server.serve_forever()
