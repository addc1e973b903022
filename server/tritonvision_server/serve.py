"""``tritonvision serve``: build the cpu (or gpu-torch) repository if needed, start Triton, show it working,
serve until Ctrl-C."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .launcher import (
    LIVENESS_MISSES,
    MAX_RESTARTS,
    PROBE_INTERVAL_S,
    RESTART_WINDOW_S,
    SHM_NAMESPACE,
    STOP_SIGNALS,
    PortInUseError,
    ServerStartError,
    ServerTLS,
    TraceExport,
    TritonServer,
    which_tritonserver,
)

log = logging.getLogger("tritonvision.serve")

# Requests traced without a client's trace context: one in this many (Triton's own default).
TRACE_RATE = 1000

# Seconds the watchdog's inference probe may take (a request queued behind a full batch on the CPU takes a
# few; one the server sheds returns at once and counts as alive).
PROBE_TIMEOUT_S = 10.0

# Lines of Triton's log that say why it did not start: glog errors ("E1127 22:57:43.058 ..."), a refused
# command-line option (printed after the whole options table), "error: creating server: ...", and the rows
# of the model table for models that failed to load.
_CAUSE = re.compile(r"^E\d{4} |Bad option|option format|error: |\| *UNAVAILABLE|Unrecognized|unknown option", re.I)


def start_failure(tail: str) -> list[str]:
    """The lines of a server log tail that name the cause of a failed start (empty when none does)."""
    return [line.rstrip() for line in tail.splitlines() if _CAUSE.search(line)]


def server_tls(cert: str | None, key: str | None, client_ca: str | None = None) -> ServerTLS | None:
    """The gRPC TLS of ``--grpc-tls-cert/--grpc-tls-key`` (and ``--grpc-tls-client-ca`` for mutual TLS);
    :meth:`ServerTLS.args` turns it into Triton 2.51's ``--grpc-use-ssl[-mutual]``, ``--grpc-server-cert/-key``
    and ``--grpc-root-cert``. Raises ValueError for an incomplete set."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise ValueError("--grpc-tls-cert and --grpc-tls-key go together (--grpc-tls-client-ca needs both)")
    return ServerTLS(Path(cert).resolve(), Path(key).resolve(), Path(client_ca).resolve() if client_ca else None)


TORCH_DEVICE_ENV = "TRITONVISION_TORCH_DEVICE"
# gpu-torch: the python backend hands GPU tensors between stub and server through Triton's CUDA memory pool
# of each GPU (64 MiB by default); one FP16 batch of 128 is 38.5 MB of pixels, and two instances of each
# step have batches in flight at once. Pinned memory, which launcher.py turns off for CPU-only hosts, speeds
# the host-side copies. Later flags override earlier ones, so --server-arg can still change these.
GPU_TORCH_CUDA_POOL_BYTES = 1 << 30
GPU_TORCH_PINNED_POOL_BYTES = 256 << 20


def gpu_torch_server_args(gpus: int | None = None) -> list[str]:
    """tritonserver's memory-pool flags for gpu-torch: a CUDA pool on every GPU (``gpus``, default all that
    PyTorch sees, which honours CUDA_VISIBLE_DEVICES as Triton does), since a KIND_GPU instance group puts
    instances on each of them; a GPU without one hands tensors over through slower paths."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    return [*(f"--cuda-memory-pool-byte-size={i}:{GPU_TORCH_CUDA_POOL_BYTES}" for i in range(gpus)),
            f"--pinned-memory-pool-byte-size={GPU_TORCH_PINNED_POOL_BYTES}"]


def gpu_torch_device(requested: str) -> str:
    """The device gpu-torch is served on; a clear error when it is ``cuda`` and PyTorch sees no GPU."""
    if requested == "cpu":
        return "cpu"
    from .torch_pipeline import device_for

    device_for("cuda")  # raises the explanation
    return "cuda"


def _repository(model_repository: str | Path | None, profile: str, weights: str, torch_device: str = "cuda") -> Path:
    from .build_engines import DEFAULT_CPU_REPOSITORY, DEFAULT_GPU_REPOSITORY, build_cpu_repository

    path = Path(model_repository) if model_repository else None
    if profile == "gpu":  # built with build_engines.py gpu, on a host with TensorRT
        return path or DEFAULT_GPU_REPOSITORY
    if path is not None:
        if path.exists():
            return path
        log.info("no model repository at %s yet: building the %s profile's there (weights: %s)", path, profile, weights)
    elif profile == "cpu" and not (DEFAULT_CPU_REPOSITORY / "resnet50" / "1" / "model.onnx").exists():
        log.info("no cpu model repository yet: building it (weights: %s)", weights)
    if profile == "gpu-torch":
        from .build_engines import build_gpu_torch_repository

        # Cheap when up to date: the state dict is kept and only the configs are rewritten.
        return build_gpu_torch_repository(path, weights=weights, device=torch_device)
    # Cheap when up to date: the ONNX export is skipped and only the configs are rewritten.
    return build_cpu_repository(path or DEFAULT_CPU_REPOSITORY, weights=weights)


def _demo(url: str, images: list[str]) -> None:
    from tritonvision import Classifier, TritonVisionError, sample_images

    paths = images or [str(p) for p in sample_images()]
    with Classifier(url) as clf:
        for path, result in zip(paths, clf.classify_batch(paths, top_k=3, return_exceptions=True)):
            if isinstance(result, TritonVisionError):
                log.warning("demo: %s: %s", path, result)
            else:
                log.info("demo: %s -> %s", Path(path).name, ", ".join(f"{p.label} ({p.score:.3f})" for p in result))


class Stopped(BaseException):
    """A stop signal arrived before the server was serving. A BaseException, like KeyboardInterrupt, so that
    nothing on the way out takes it for an error, and the server's own clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    # Once: a second signal must not interrupt the clean-up the first one started.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


@contextmanager
def _stop_signals_raise():
    """SIGTERM and SIGHUP raise :class:`Stopped` (SIGINT raises KeyboardInterrupt already): their default
    action would end the process at once, leaving the server to its parent-death signal, its stubs orphaned
    during a model load, and the regions and lock behind. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}  # _raise_stopped ignores SIGINT too
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise_stopped)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def client_shm_args(allow: bool, tritonserver: str | None) -> list[str]:
    """``--allow-client-shm=true`` when asked for; refused for the bundled Triton 2.51, which exits on a flag
    it does not know (and lets clients use shared memory without it)."""
    if not allow:
        return []
    if not tritonserver:
        raise ValueError("--allow-client-shm is for Triton 2.68+ given with --tritonserver; the bundled Triton 2.51 "
                         "does not know the flag and accepts client shared memory without it")
    return ["--allow-client-shm=true"]


def _key_value(text: str, form: str, empty_value: bool) -> tuple[str, str]:
    """An argparse value ``KEY=VALUE`` as a pair (``empty_value``: ``KEY=`` too)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not (value or empty_value):
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return key, value


def _resource(text: str) -> tuple[str, str]:
    return _key_value(text, "KEY=VALUE", empty_value=True)


def trace_export(url: str | None, rate: int, resources: list[tuple[str, str]]) -> TraceExport | None:
    """``serve``'s tracing flags as a :class:`TraceExport` (None without ``--trace-url``); ValueError for
    flags that make no sense."""
    if url is None:
        if resources or rate != TRACE_RATE:
            raise ValueError("--trace-rate and --trace-resource need --trace-url (the collector to export to)")
        return None
    return TraceExport(url, rate, tuple(resources))


def _access_key(text: str) -> tuple[str, str]:
    return _key_value(text, "NAME=VALUE", empty_value=False)


def stops_in_order(fn: Callable[..., int]) -> Callable[..., int]:
    """``fn`` (returning an exit code) with SIGTERM and SIGHUP ending it like Ctrl-C does: in order, through
    its clean-up, with exit code 128 + the signal, until the server's own handlers take over."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            with _stop_signals_raise():
                return fn(*args, **kwargs)
        except Stopped as exc:
            log.warning("stopped by %s before serving", signal.Signals(exc.signum).name)
            return 128 + exc.signum

    return wrapper


@stops_in_order
def serve(
    *,
    model_repository: str | Path | None = None,
    profile: str = "cpu",
    weights: str = "imagenet",
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    tritonserver: str | None = None,
    server_args: list[str] | tuple[str, ...] = (),
    startup_timeout: float = 180.0,
    access_key: tuple[str, str] | None = None,
    tls: ServerTLS | None = None,
    trace: TraceExport | None = None,
    demo: list[str] | None = None,
    health_interval: float = 1.0,
    max_restarts: int = MAX_RESTARTS,
    probe_interval: float = PROBE_INTERVAL_S,
    probe_timeout: float = PROBE_TIMEOUT_S,
    allow_client_shm: bool = False,
    torch_device: str = "cuda",
    shm_namespace: str = SHM_NAMESPACE,
    verbose: bool = False,
) -> int:
    """Serve ``model_repository`` (default: the cpu profile's, built if needed) until Ctrl-C; the exit code.

    ``demo``: images to classify once ready (an empty list: the bundled samples; None: no demo).
    ``allow_client_shm``: pass ``--allow-client-shm=true``, which Triton 2.68+ (NGC 26.04+) needs before it
    accepts clients' shared memory; the bundled 2.51 does not know the flag (and needs none).
    ``torch_device``: gpu-torch only, ``cpu`` runs its PyTorch steps on the CPU (the override for machines
    without a GPU); with ``cuda`` and no GPU the exit code is 1, with the reason.
    ``trace``: export OpenTelemetry traces (:class:`TraceExport`).
    """
    server_args = list(server_args) + client_shm_args(allow_client_shm, tritonserver)
    if profile == "gpu-torch":
        try:
            torch_device = gpu_torch_device(torch_device)
        except RuntimeError as exc:
            log.error("%s", exc)
            return 1
        if torch_device == "cuda":
            server_args = gpu_torch_server_args() + server_args
    if trace is not None and not tritonserver:
        # The bundled Triton 2.51 crashes when it traces many requests a second (fixed in r25.04, server PR
        # #8144); measured here: SIGSEGV within seconds with every request traced at 8-16 in flight.
        log.warning("tracing on the bundled Triton 2.51: it crashes (SIGSEGV) when it traces many requests a second "
                    "(fixed upstream in 25.04); keep --trace-rate high and trace-context clients few, and rely on "
                    "serve's restart; NGC images from 25.04 have the fix")
    repository = _repository(model_repository, profile, weights, torch_device)
    if not repository.is_dir():  # the gpu profile's is built on a GPU host, not here
        log.error("no model repository at %s: build the gpu profile's with: build_engines.py gpu", repository)
        return 1
    server = TritonServer(
        repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        tritonserver=which_tritonserver(tritonserver),
        extra_args=list(server_args),
        startup_timeout=startup_timeout,
        log_verbose=1 if verbose else 0,
        access_key=access_key,
        tls=tls,
        trace=trace,
        shm_namespace=shm_namespace,
    )
    try:
        server.start()  # stops the server on every failure, Stopped included
    except ServerStartError as exc:
        cause = start_failure(server.log_tail(60))
        first_line = str(exc).splitlines()[0].removesuffix("; last log lines:")
        if cause:
            log.error("%s; Triton said:\n  %s", first_line, "\n  ".join(cause))
        else:
            log.error("%s", exc)
        # Another server on one of the ports: found before the start, or (two started at once) by Triton.
        if isinstance(exc, PortInUseError) or any("already in use" in line for line in cause):
            log.error("stop the server on that port or choose others (--http-port, --grpc-port, --metrics-port)")
        else:
            log.error("check the repository with: python build_engines.py check --profile %s %s", profile, repository)
        return 1
    try:
        if demo is not None and tls is not None:
            log.info("demo skipped: the server requires TLS")
        elif demo is not None:
            _demo(server.grpc_url, demo)
        log.info("serving %s on gRPC %s / HTTP %s; Ctrl-C to stop", repository, server.grpc_url, server.http_url)
        with ensemble_probe(server.grpc_url, tls, probe_timeout) if probe_interval > 0 else nullcontext() as probe:
            return server.serve_forever(health_interval=health_interval, max_restarts=max_restarts, probe=probe,
                                        probe_interval=probe_interval)
    finally:
        server.stop()  # a signal before serve_forever took over; a no-op after it


@contextmanager
def ensemble_probe(url: str, tls: ServerTLS | None, timeout: float = PROBE_TIMEOUT_S):
    """The watchdog's inference probe: the warm-up photo through the ensemble over gRPC within ``timeout``
    seconds (shed counts as alive), a callable giving None or why it failed. None where it cannot run: a
    gRPC port with TLS (the watchdog holds no client certificate) or a repository without a ready classifier
    ensemble."""
    if tls is not None:
        log.info("gRPC uses TLS: the watchdog checks /v2/health/live only, not inference")
        yield None
        return
    from tritonvision import Classifier, RetryPolicy

    from .configs import WARMUP_SOURCE

    with Classifier(url, timeout=timeout, retry=RetryPolicy(attempts=1)) as clf:
        if not clf.is_ready():
            log.info("no ready classifier ensemble: the watchdog checks /v2/health/live only, not inference")
            yield None
            return
        image = WARMUP_SOURCE.read_bytes()
        yield lambda: clf.probe(image)


ACCESS_KEY_ENV = "TRITONVISION_ACCESS_KEY"


def _shm_namespace(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", text):
        raise argparse.ArgumentTypeError(f"letters, digits and '-' only, got {text!r}")
    return text


def parser(prog: str = "tritonvision serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run tritonserver with the classifier (cpu profile by default): "
                                "build the repository if needed, start Triton, serve until Ctrl-C.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Triton's verbose log")
    p.add_argument("--profile", choices=("cpu", "gpu", "gpu-torch"), default="cpu",
                   help="cpu (default), gpu (the NGC image: DALI + TensorRT), or gpu-torch (PyTorch on the GPU, this "
                        "bundled server)")
    p.add_argument("--model-repository", default=None,
                   help="default: build/model_repository_cpu (cpu), model_repository (gpu), "
                        "build/model_repository_gpu_torch[_cpu] (gpu-torch); cpu and gpu-torch build it there if "
                        "it is missing")
    p.add_argument("--torch-device", choices=("cuda", "cpu"), default=os.environ.get(TORCH_DEVICE_ENV, "cuda"),
                   help=f"gpu-torch: where its PyTorch steps run (env {TORCH_DEVICE_ENV}); cpu runs the same models "
                        "without a GPU, slowly, for tests")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", default=None, help="a tritonserver binary to run instead of the bundled one")
    p.add_argument("--weights", default="imagenet",
                   help="cpu and gpu-torch: weights to build with if the repository is missing")
    p.add_argument("--demo", nargs="*", default=None, metavar="IMAGE",
                   help="classify these images (default: the bundled samples) once ready")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra tritonserver argument (repeatable)")
    p.add_argument("--access-key", default=os.environ.get(ACCESS_KEY_ENV), metavar="NAME=VALUE", type=_access_key,
                   help="require the header NAME: VALUE for shared-memory registration, the model-repository API and "
                        f"statistics (env {ACCESS_KEY_ENV}); clients pass it as access_key=(NAME, VALUE)")
    p.add_argument("--grpc-tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate (with --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--grpc-tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--trace-url", metavar="URL",
                   help="export OpenTelemetry traces to this OTLP/HTTP endpoint (http://collector:4318/v1/traces): "
                        "a span for each request, the ensemble and each step; requests that carry a trace context "
                        "(Classifier(trace=True)) are always traced")
    p.add_argument("--trace-rate", type=int, default=TRACE_RATE, metavar="N",
                   help=f"with --trace-url, also trace one in every N requests without a trace context (default {TRACE_RATE})")
    p.add_argument("--trace-resource", type=_resource, action="append", default=[], metavar="KEY=VALUE",
                   help="a resource attribute of the exported spans (repeatable; service.name defaults to tritonvision)")
    p.add_argument("--allow-client-shm", action="store_true",
                   help="let clients send images through system/CUDA shared memory on Triton 2.68+ (NGC 26.04+; "
                        "with --tritonserver); the bundled 2.51 needs no flag")
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between checks of the server: a crashed server, one that leaves its liveness "
                        f"endpoint unanswered {LIVENESS_MISSES} times in a row or fails {LIVENESS_MISSES} inference "
                        "probes in a row (--probe-interval), or a dead python-backend stub is "
                        "restarted (0: never; a server that dies then ends serve with exit code 1)")
    p.add_argument("--probe-interval", type=float, default=PROBE_INTERVAL_S,
                   help=f"seconds between the watchdog's inference probes, the warm-up photo through the ensemble "
                        f"over gRPC (default {PROBE_INTERVAL_S:.0f}; 0: none)")
    p.add_argument("--probe-timeout", type=float, default=PROBE_TIMEOUT_S,
                   help=f"seconds an inference probe may take (default {PROBE_TIMEOUT_S:.0f}); a shed probe counts as alive")
    p.add_argument("--shm-prefix", default=SHM_NAMESPACE, type=_shm_namespace, metavar="NAME",
                   help=f"the python backend's /dev/shm regions are named NAME_<pid>_<random>_...; a start removes "
                        f"those of NAME's launchers that are gone, e.g. killed by SIGKILL or the OOM killer, never a "
                        f"live one's (default {SHM_NAMESPACE})")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help=f"restarts allowed within {RESTART_WINDOW_S / 60:.0f} minutes (default {MAX_RESTARTS}); one more "
                        "is a crash loop: serve stops with exit code 1, for systemd or Kubernetes to act on")
    return p


def main(argv: list[str] | None = None, prog: str = "tritonvision serve") -> int:
    """``tritonvision serve``: the exit code (2 for a usage error)."""
    args = parser(prog).parse_args(argv)
    # A server runs for days: its lines carry the time.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tls = server_tls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        client_shm_args(args.allow_client_shm, args.tritonserver)
        trace = trace_export(args.trace_url, args.trace_rate, args.trace_resource)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        return serve(
            model_repository=args.model_repository, profile=args.profile, weights=args.weights, host=args.host,
            http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            tritonserver=args.tritonserver, server_args=args.server_arg, startup_timeout=args.startup_timeout,
            access_key=args.access_key, tls=tls, trace=trace, demo=args.demo, health_interval=args.health_interval,
            max_restarts=args.max_restarts, probe_interval=args.probe_interval, probe_timeout=args.probe_timeout,
            allow_client_shm=args.allow_client_shm, torch_device=args.torch_device, shm_namespace=args.shm_prefix,
            verbose=args.verbose,
        )
    except KeyboardInterrupt:
        return 130
