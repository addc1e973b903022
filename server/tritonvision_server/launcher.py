"""Run a real ``tritonserver``: the one bundled in the nvidia-pytriton wheel, or one given by path.

:class:`TritonServer` is a context manager: it prepares the python backend directory, gives the server a
unique shared-memory prefix, starts it on loopback, waits for readiness and, on exit, stops it and removes
whatever the python backend left in ``/dev/shm``.

Nothing outlives it: the server runs in its own process group, which is killed whenever the server ends
(however it ends: python-backend stubs otherwise outlive a killed server, deadlocked), and it receives
SIGTERM when the process that started it dies (Linux's parent-death signal). Ports already in use are
refused before start, so a leftover server answering the readiness probe is never taken for ours.
While it runs it holds an exclusive ``flock`` on ``/dev/shm/<prefix>.lock``; a starting server removes the
regions (and kills the orphaned python-backend stubs) of every owner whose lock it can take, i.e. of launchers
that are gone however they ended (SIGKILL, the OOM killer), and never those of a live one, even one in
another pid namespace sharing ``/dev/shm`` (the lock lives in the kernel, on the file): :func:`sweep_dead_owners`.
:meth:`TritonServer.heal` restarts a server whose python-backend stub died (Triton 2.51 does not restart
stubs: every request then fails while Triton still reports itself and the model ready), and
:meth:`TritonServer.serve_forever` also restarts one that crashed or stopped answering, up to a crash loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from tritonvision.extras import require

from .admission import METRICS_URL_ENV

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# The python backend's regions are /dev/shm/<namespace>_<launcher pid>_<8 hex>_<uuid>, and the launcher's lock
# /dev/shm/<namespace>_<launcher pid>_<8 hex>.lock. (The Helm chart runs tritonserver without the launcher,
# one per pod's own /dev/shm, with the fixed prefix ``tritonvision_server_`` and no lock: never swept here.)
SHM_NAMESPACE = "tritonvision"


# `serve_forever`'s watchdog. A live check that takes longer than this counts as unanswered; this many in a
# row (one per health interval), or this many failed inference probes in a row (one per PROBE_INTERVAL_S),
# and the server is restarted. More restarts than MAX_RESTARTS within
# RESTART_WINDOW_S seconds: a crash loop, left to the supervisor above.
LIVENESS_TIMEOUT_S = 2.0
LIVENESS_MISSES = 3
PROBE_INTERVAL_S = 10.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
# After a restart that does not come up, the next waits this long, doubled at each failure in a row, up to the max.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the tail of its log."""


class PortInUseError(ServerStartError):
    """One of the server's ports was taken before it started (nothing was started)."""


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# What stops a server in order: Ctrl-C, a supervisor (systemd, the kubelet), a terminal that hangs up.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What an access key guards (Triton 2.51 names): registering shared memory (any /dev/shm key the server's
# user can open), loading and unloading models, statistics, and the trace and log settings (open, they let
# any client trace every request or turn on verbose logging: load and disk for everyone).
RESTRICTED = ("shared-memory", "model-repository", "statistics", "trace", "logging")
STUB_COMM = "triton_python_"  # /proc/<pid>/comm of triton_python_backend_stub (truncated to 15 chars)

# The python backend's shared-memory region, one per model instance, carries each dynamic batch's inputs and
# outputs between tritonserver and the stub. Triton 2.51 starts it at 1 MiB and grows it by mapping it again,
# keeping every earlier mapping: each growth adds the region's used pages to the server's RSS once more
# (measured: 59-107 MiB of RssShmem for 20-28 MiB of regions after full batches and an overload). Sized for
# the cpu profile's largest batch from the start, it is never remapped: 32 images of 224x224 FP32 pixels
# (19.3 MB) plus their uploads, up to ~170 KB each, in 24 MiB. The backend allocates the whole region when it
# creates it (every block of the /dev/shm file is in use at once), so that memory is held from the start, not
# from the first full batch; bigger uploads still grow the region, in 16 MiB steps.
PYTHON_SHM_REGION_BYTES = 24 << 20
PYTHON_SHM_GROWTH_BYTES = 16 << 20
# glibc malloc in tritonserver and its stubs (they inherit the environment): at most two arenas per process
# instead of eight per core, and blocks of 128 KiB or more (a 602 KB pixel tensor, a JPEG upload) mapped on
# their own and unmapped when freed, so the memory a burst of queued requests took goes back to the system
# instead of staying in an arena. Variables the caller's environment already sets win.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _parent_death_signal():
    """A ``preexec_fn`` that makes the kernel send SIGTERM to the server when the thread that started it
    ends (start it from a thread that lives as long as the server: the main thread, in ``tritonvision
    serve``). libc is loaded here, in the parent: the child between fork and exec must not import or
    allocate (other threads may hold the locks), only call prctl."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError("prctl(PR_SET_PDEATHSIG) failed")
        # Files the server creates stay private to its user. (Not the python backend's /dev/shm regions:
        # boost.interprocess sets their 0644 explicitly; _spawn narrows those once they exist.)
        os.umask(0o077)

    return preexec


def process_group(pgid: int) -> dict[int, str]:
    """``{pid: comm}`` of the live (not zombie) processes of process group ``pgid``, from ``/proc``."""
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members[int(entry)] = stat[stat.index("(") + 1 : stat.rindex(")")]
    return members


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in group ``pgid`` (a server's stubs after the server ended)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` (SO_REUSEADDR: a port in TIME_WAIT is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def listening_ports(pid: int) -> set[int] | None:
    """TCP ports on which process ``pid`` holds a listening socket (from ``/proc``; IPv4 and IPv6), or None
    where ``/proc`` does not tell (no procfs, another user's process)."""
    try:
        sockets = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                sockets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except OSError:
        return None
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in sockets:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


_PORTS = ("http_port", "grpc_port", "metrics_port")
# A launcher's folder of links to the bundled python backend, named after its shared-memory prefix so that
# the sweep of a launcher that is gone removes it too.
BACKENDS_DIR_PREFIX = "tritonvision-backends-"


def free_ports(host: str = "127.0.0.1", count: int = 1, exclude: Collection[int] = ()) -> list[int]:
    """``count`` different free ports, none of ``exclude``. The sockets stay bound until all are chosen: the
    kernel may hand out a port it just gave back (three single picks in a row repeated one in ~5000 here,
    more often under load), and Triton refuses to start with two of its ports the same."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            sockets.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in exclude and port not in ports:
                ports.append(port)
        return ports
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host, 1)[0]


@dataclass(frozen=True)
class SweptOwner:
    """What :func:`sweep_dead_owners` removed for one launcher that is gone."""

    prefix: str
    files: tuple[Path, ...]
    bytes: int  # memory the files held (their allocated blocks), freed once no process maps them
    stubs: tuple[int, ...]  # its orphaned python-backend stubs, killed (those visible in our pid namespace)


def _lock_pattern(namespace: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(namespace)}_\d+_[0-9a-f]{{8}}\.lock")


def owner_lock_path(prefix: str, shm_dir: Path = SHM_DIR) -> Path:
    """The lock file of the launcher whose regions are named ``prefix*`` (outside that glob)."""
    return shm_dir / f"{prefix.rstrip('_')}.lock"


def hold_owner_lock(prefix: str, shm_dir: Path = SHM_DIR) -> int | None:
    """Create and lock (exclusive ``flock``, for as long as the returned descriptor is open) the lock file of
    ``prefix``; None, with a warning, where /dev/shm cannot hold it. The file is locked under a name no sweep
    looks at and then renamed, so a sweep never finds it unlocked. The descriptor is not inherited: the
    lock is the launcher's, so a sweep can also end the stubs that outlive it."""
    final = owner_lock_path(prefix, shm_dir)
    pending = shm_dir / f".{final.name}.{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.warning("cannot create %s (%s): a launcher that is killed will leave its shared memory behind", final, exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(pending, final)
    except BaseException:
        os.close(fd)
        pending.unlink(missing_ok=True)
        raise
    return fd


def release_owner_lock(fd: int | None, prefix: str, shm_dir: Path = SHM_DIR) -> None:
    """Remove the lock file (while still holding it) and close it."""
    if fd is None:
        return
    owner_lock_path(prefix, shm_dir).unlink(missing_ok=True)
    os.close(fd)


def _stubs_of(prefix: str) -> list[int]:
    """Python-backend stubs (visible in our pid namespace) whose command line names a region ``prefix*``."""
    stubs = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if not Path(f"/proc/{entry}/comm").read_text().startswith(STUB_COMM):
                continue
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix.encode()) for a in args):
            stubs.append(int(entry))
    return stubs


def sweep_dead_owners(namespace: str = SHM_NAMESPACE, shm_dir: Path = SHM_DIR,
                      temp_dir: Path | None = None) -> list[SweptOwner]:
    """Remove the /dev/shm regions of launchers of ``namespace`` that are gone, after killing their orphaned
    stubs, and their folders of python-backend links in ``temp_dir`` (default: the temporary directory);
    return what was removed. An owner is gone when its lock file can be locked: a live launcher holds
    its lock whatever its pid namespace, and the kernel drops it when the launcher dies, however it dies.
    Regions without a lock file (the Helm chart's, an older launcher's) are never touched."""
    temp_dir = Path(tempfile.gettempdir()) if temp_dir is None else temp_dir
    pattern = _lock_pattern(namespace)
    swept = []
    for lock in sorted(shm_dir.glob(f"{namespace}_*.lock")):
        if not pattern.fullmatch(lock.name):
            continue
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # another sweep removed it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # its owner is alive
                raise
            prefix = lock.name.removesuffix(".lock") + "_"
            # Killed first: a region's memory is freed once its file is gone and nothing maps it any more.
            stubs = []
            for pid in _stubs_of(prefix):
                try:
                    os.kill(pid, signal.SIGKILL)
                    stubs.append(pid)
                except (ProcessLookupError, PermissionError):
                    pass
            files, held = [], 0
            for path in sorted(shm_dir.glob(prefix + "*")):
                try:
                    blocks = path.stat().st_blocks
                    path.unlink()
                except FileNotFoundError:
                    continue
                except PermissionError as exc:
                    log.warning("cannot remove %s of a launcher that is gone: %s", path, exc)
                    continue
                files.append(path)
                held += blocks * 512
            for folder in temp_dir.glob(f"{BACKENDS_DIR_PREFIX}{prefix}*"):
                shutil.rmtree(folder, ignore_errors=True)  # links only: removed, never followed
            lock.unlink(missing_ok=True)
            swept.append(SweptOwner(prefix, tuple(files), held, tuple(stubs)))
        finally:
            os.close(fd)
    return swept


def bundled_server_root() -> Path:
    """``pytriton/tritonserver`` inside the installed nvidia-pytriton wheel."""
    pytriton = require("pytriton", extra="server", what="the bundled Triton server")
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise FileNotFoundError(f"no tritonserver binary under {root}; reinstall nvidia-pytriton")
    return root


def _python_backend_dir(root: Path, dest: Path) -> Path:
    """A backend directory of symlinks into the wheel, with the stub for the running Python.

    The python backend looks for its stub only next to ``libtriton_python.so``; symlinks (unlike copies)
    keep the wheel's RPATH working without LD_LIBRARY_PATH.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"nvidia-pytriton has no python-backend stub for Python {version} ({stub})")
    python = dest / "python"
    python.mkdir(parents=True)
    for src in (root / "backends" / "python").iterdir():
        if src.is_file():
            (python / src.name).symlink_to(src)
    (python / "triton_python_backend_stub").symlink_to(stub)
    return dest


@dataclass(frozen=True)
class ServerTLS:
    """TLS on the gRPC port (Triton 2.51 ``--grpc-use-ssl``): the server's certificate and key (PEM files),
    and with ``client_ca`` mutual TLS (``--grpc-use-ssl-mutual``: clients need a certificate it signed).
    Triton's HTTP port has no TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def args(self) -> list[str]:
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.client_ca}"]
        return args


@dataclass(frozen=True)
class TraceExport:
    """OpenTelemetry traces of requests, exported by Triton over OTLP/HTTP (JSON) to ``url`` (a collector's
    ``http(s)://host:4318/v1/traces``): Triton's ``--trace-config mode=opentelemetry``, timestamps only (never
    tensors: they would carry the images). A request is traced when its client sent a trace context
    (``traceparent``, e.g. ``Classifier(trace=True)``), else one in every ``rate``. Each traced request
    gives a span for the gRPC request, the ensemble, each step and each step's compute. ``resources``: the
    spans' resource attributes (``service.name`` is ``tritonvision`` unless given)."""

    url: str
    rate: int = 1000
    resources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.url.lower().startswith(("http://", "https://")):
            raise ValueError(f"the trace URL must be an OTLP/HTTP endpoint, http(s)://host:port/v1/traces, not {self.url!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 1:
            raise ValueError(f"the trace rate must be an integer >= 1 (one request in every rate), not {self.rate!r}")
        for key, value in self.resources:
            if not key or "=" in key or "," in key + value:
                raise ValueError(f"a trace resource attribute is KEY=VALUE without commas, not {key}={value}")

    def args(self) -> list[str]:
        resources = dict(self.resources)
        resources.setdefault("service.name", "tritonvision")
        return (["--trace-config=mode=opentelemetry", "--trace-config=level=TIMESTAMPS",
                 f"--trace-config=rate={self.rate}", f"--trace-config=opentelemetry,url={self.url}"]
                + [f"--trace-config=opentelemetry,resource={k}={v}" for k, v in resources.items()])


@dataclass
class TritonServer:
    """A ``tritonserver`` process serving ``model_repository``.

    Ports default to free loopback ports (another free one if one is taken before Triton binds it); pass
    8000/8001/8002 for the usual ones.
    """

    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    tritonserver: Path | None = None  # a real installation; default: the bundled one
    extra_args: list[str] = field(default_factory=list)
    startup_timeout: float = 120.0
    log_verbose: int = 0
    log_file: Path | None = None
    # Seconds Triton may spend draining in-flight requests on a stop (its --exit-timeout-secs, unless
    # extra_args set it); the stop kills the process group 5 s after that.
    exit_timeout: float = 10.0
    # (name, value): shared-memory registration, the model-repository API and statistics then need this
    # header (gRPC metadata ``triton-grpc-protocol-<name>``, HTTP header ``<name>``); inference and health
    # stay open. Triton 2.51's --grpc-restricted-protocol / --http-restricted-api.
    access_key: tuple[str, str] | None = None
    tls: ServerTLS | None = None
    trace: TraceExport | None = None
    # Bytes of each python-backend instance's shared-memory region at start, and of each growth step (None:
    # Triton's defaults, 1 MiB each; ignored when extra_args set them). See PYTHON_SHM_REGION_BYTES.
    python_shm_bytes: int | None = PYTHON_SHM_REGION_BYTES
    python_shm_growth_bytes: int | None = PYTHON_SHM_GROWTH_BYTES
    # Environment for glibc malloc in the server and its stubs ({}: glibc's defaults). See MALLOC_ENV.
    malloc_env: dict[str, str] = field(default_factory=lambda: dict(MALLOC_ENV))
    # Triton's --grpc-infer-allocation-pool-size (None: its default, 8; ignored when extra_args set it). Each
    # pooled request object keeps the capacity of the largest request it held, so with the default a few
    # oversized uploads (refused, but only after the copy) stay in the server's memory: 3 of 65 MiB held
    # 244 MiB, and more with each. With 0 the memory of every request is freed after it (the same 3: 65 MiB,
    # not growing); no throughput difference was measurable (light variant, 1 and 16 in flight).
    grpc_request_pool: int | None = 0
    # The first part of the python backend's region names; a start removes the regions of this namespace's
    # launchers that are gone (sweep_dead_owners; False: never).
    shm_namespace: str = SHM_NAMESPACE
    sweep_shm: bool = True

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        # Ports left to the launcher: another free one replaces one that is taken before the server binds it.
        self._chosen_ports = {name for name in _PORTS if not getattr(self, name)}
        self._choose_ports(sorted(self._chosen_ports))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", self.shm_namespace):
            raise ValueError(f"shared-memory namespace {self.shm_namespace!r}: letters, digits and '-' only")
        self.shm_prefix = f"{self.shm_namespace}_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._lock_fd: int | None = None
        #: What this start removed of launchers that were gone (:func:`sweep_dead_owners`).
        self.swept: list[SweptOwner] = []
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log_tail: deque[str] = deque(maxlen=60)
        self._reader: threading.Thread | None = None
        self._log_fh = None
        self._stubs: dict[int, str] = {}
        self.restarts = 0
        #: The shared-memory files the server left behind and :meth:`stop` removed (a server that shuts
        #: down cleanly removes its own: this stays empty).
        self.cleaned_shm: list[Path] = []

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path | None) -> list[str]:
        binary = str(self.tritonserver) if self.tritonserver else str(bundled_server_root() / "bin" / "tritonserver")
        cmd = [
            binary,
            f"--model-repository={self.model_repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
        ]
        for key, value in (("shm-default-byte-size", self.python_shm_bytes),
                           ("shm-growth-byte-size", self.python_shm_growth_bytes)):
            if value is not None and not any(f",{key}=" in a for a in self.extra_args):
                cmd.append(f"--backend-config=python,{key}={value}")
        if self.access_key is not None:
            name, value = self.access_key
            name = name.lower()  # gRPC lowercases metadata keys; Triton compares them as given
            restricted = f"{','.join(RESTRICTED)}:{name}={value}"
            cmd += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        if self.tls is not None:
            cmd += self.tls.args()
        if self.trace is not None:
            cmd += self.trace.args()
        if self.grpc_request_pool is not None and not any(
                a.startswith("--grpc-infer-allocation-pool-size") for a in self.extra_args):
            cmd.append(f"--grpc-infer-allocation-pool-size={self.grpc_request_pool}")
        if not any(a.startswith("--exit-timeout-secs") for a in self.extra_args):
            cmd.append(f"--exit-timeout-secs={int(self.exit_timeout)}")
        if backend_dir is not None:
            # CPU-only hosts: no pinned host memory to ask the (absent) CUDA driver for.
            cmd += [f"--backend-directory={backend_dir}", "--pinned-memory-pool-byte-size=0"]
        return cmd + list(self.extra_args)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The python-backend stub finds its packages through the first python3 on PATH: this environment's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        for key, value in self.malloc_env.items():
            env.setdefault(key, value)
        # The preprocess step's admission reads resnet50's queue from this server's metrics (admission.py);
        # always this server's, never one inherited from a parent's environment.
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        env[METRICS_URL_ENV] = f"http://{host}:{self.metrics_port}/metrics"
        return env

    def start(self) -> "TritonServer":
        if self._proc is not None:
            raise RuntimeError("server already started")
        busy = self._busy_ports()
        if busy and self._choose_other_ports(busy):
            busy = []
        if busy:
            raise PortInUseError(f"port(s) {', '.join(map(str, busy))} on {self.host} already in use "
                                   "(another server, or one left behind?); not starting")
        backend_dir = None
        if self.tritonserver is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{BACKENDS_DIR_PREFIX}{self.shm_prefix}")
            backend_dir = _python_backend_dir(bundled_server_root(), Path(self._tmp.name))
        self._cmd = self.command(backend_dir)
        log.info("starting %s", " ".join(self._cmd))
        self._log_fh = open(self.log_file, "w") if self.log_file else None  # noqa: SIM115 - closed in stop()
        try:
            self._claim_shm()
            crashes = clashes = 0
            while True:
                try:
                    self._spawn()
                    break
                except ServerStartError:
                    if self._crashed_during_start() and crashes < 1:
                        # Seen once in hundreds of starts on a loaded machine: Triton 2.51 aborting in its gRPC
                        # event engine ("epoll_wait ... Bad file descriptor") before it was ready. A refused
                        # option or a model that fails to load exits with a code, not a signal: not retried.
                        crashes += 1
                        log.warning("tritonserver died from signal %d during start-up; starting it once more. Last "
                                    "log lines:\n%s", -self._proc.returncode, self.log_tail(10))
                    elif clashes < 3 and self._port_taken_during_start():
                        clashes += 1
                        log.warning("a port chosen for tritonserver was taken while its models loaded; starting it "
                                    "on gRPC %d, HTTP %d, metrics %d", self.grpc_port, self.http_port,
                                    self.metrics_port)
                    else:
                        raise
                    self._kill()
                    self.cleanup_shm()
                    self._cmd = self.command(backend_dir)
        except BaseException:
            self.stop()
            raise
        log.info("Triton is ready: gRPC %s, HTTP %s, metrics %s", self.grpc_url, self.http_url, self.metrics_url)
        return self

    def _claim_shm(self) -> None:
        """Hold this launcher's lock, then remove what launchers that are gone left in /dev/shm."""
        if not SHM_DIR.is_dir():
            return
        self._lock_fd = hold_owner_lock(self.shm_prefix)
        if not self.sweep_shm:
            return
        self.swept = sweep_dead_owners(self.shm_namespace)
        for owner in self.swept:
            if not (owner.files or owner.stubs):
                continue  # it died before its server made a region
            log.warning("removed %d shared-memory file(s), %d bytes (%.1f MiB), of a launcher that is gone (%s*)%s",
                        len(owner.files), owner.bytes, owner.bytes / (1 << 20), SHM_DIR / owner.prefix,
                        f"; killed its orphaned python-backend stub(s) {', '.join(map(str, owner.stubs))}"
                        if owner.stubs else "")

    def _spawn(self) -> None:
        """Start the server process and wait until it is ready."""
        # Until this start is ready its stubs are unknown: a start that fails must not be judged by the stubs
        # of the server before it (all dead by now), which would read as "stub died".
        self._stubs = {}
        proc = subprocess.Popen(
            self._cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._env(), text=True, errors="replace",
            start_new_session=True,  # its own process group (killed as a whole), and Ctrl-C reaches only us
            preexec_fn=_parent_death_signal(),
        )
        self._proc = proc
        self._reader = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._reader.start()
        # The stubs inherit the server's stdout, so the reader sees no end of file while one lives on:
        # a watcher kills the group as soon as the server process ends, however it ends.
        threading.Thread(target=self._reap, args=(proc,), daemon=True).start()
        self.wait_ready(self.startup_timeout)
        self._stubs = self.stub_processes()
        # The python backend's regions carry every request's bytes between server and stubs and are
        # created 0644 (readable by every user of the host); they are created at model load, before any
        # request, so narrowing them once the server is ready closes that window. Same user: the server
        # and its stubs keep their access.
        for path in self.leftover_shm():
            path.chmod(0o600)

    def _busy_ports(self) -> list[int]:
        """This server's ports on which something already listens."""
        return [p for p in (self.http_port, self.grpc_port, self.metrics_port) if port_in_use(self.host, p)]

    def _choose_other_ports(self, busy: list[int]) -> bool:
        """Replace the chosen ports among ``busy`` by free ones; False (nothing changed) if one of them was given."""
        names = [name for name in _PORTS if getattr(self, name) in busy]
        if not set(names) <= self._chosen_ports:
            return False
        self._choose_ports(names)
        return True

    def _choose_ports(self, names: Collection[str]) -> None:
        """Free ports for the port attributes ``names``, different from each other and from every port the
        server has now (the ones replaced included)."""
        now = {getattr(self, name) for name in _PORTS} - {0}
        for name, port in zip(names, free_ports(self.host, len(names), exclude=now)):
            setattr(self, name, port)

    def _port_taken_during_start(self) -> bool:
        """Whether the server failed to bind a port that was ours to choose (now exchanged for a free one)."""
        if not any("already in use" in line for line in list(self._log_tail)[-5:]):  # its last words
            return False
        busy = self._busy_ports()
        return bool(busy) and self._choose_other_ports(busy)

    def _crashed_during_start(self) -> bool:
        """Whether the server process ended from a signal (SIGABRT, SIGSEGV) rather than exiting."""
        return self._proc is not None and self._proc.returncode is not None and self._proc.returncode < 0

    def _reap(self, proc: subprocess.Popen) -> None:
        proc.wait()
        kill_group(proc.pid)

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._log_tail.append(line.rstrip("\n"))
            if self._log_fh:
                self._log_fh.write(line)
                self._log_fh.flush()
            log.debug("tritonserver: %s", line.rstrip())

    def stub_processes(self) -> dict[int, str]:
        """``{pid: command line}`` of the server's python-backend stubs (one per model instance)."""
        if self._proc is None:
            return {}
        stubs = {}
        for pid, comm in process_group(self._proc.pid).items():
            if comm.startswith(STUB_COMM):
                try:
                    stubs[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
        return stubs

    def unhealthy(self) -> str | None:
        """Why the server cannot serve (it exited, or a stub it started died), or None."""
        if not self.running:
            return "tritonserver is not running"
        alive = self.stub_processes()
        dead = [pid for pid in self._stubs if pid not in alive]
        if dead:
            return f"python-backend stub process(es) {', '.join(map(str, dead))} died"
        return None

    def heal(self) -> bool:
        """Restart the server (same ports) if a stub of it died; True if it did. Call from the thread that
        started the server (the parent-death signal follows that thread)."""
        reason = self.unhealthy()
        if reason is None or not self.running:
            return False
        log.error("%s; restarting tritonserver", reason)
        self.restart()
        return True

    def restart(self) -> None:
        """Kill the server's process group (if anything of it is left), remove its regions and start it
        again on the same ports; returns once it is ready."""
        self._kill()
        self.cleanup_shm()
        self._spawn()
        self.restarts += 1
        log.info("tritonserver restarted and ready")

    def _kill(self) -> None:
        """SIGKILL the server's whole process group and wait for the server."""
        if self._proc is None:
            return
        kill_group(self._proc.pid)
        self._proc.wait()
        if self._reader:
            self._reader.join(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._log_tail)[-lines:])

    def _health(self, endpoint: str, timeout: float) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/{endpoint}", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self) -> bool:
        return self._health("ready", 2.0)

    def is_live(self, timeout: float = LIVENESS_TIMEOUT_S) -> bool:
        """Whether the server answers ``/v2/health/live`` within ``timeout``. A process can be running and
        answer nothing: Triton 2.51, after corrupting its heap, can hang inside its own crash handler."""
        return self._health("live", timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                self._reader and self._reader.join(timeout=2)
                raise ServerStartError(
                    f"tritonserver exited with code {self._proc.returncode} during start-up; last log lines:\n"
                    f"{self.log_tail()}"
                )
            # Ready, and on our server's own ports: another server may have taken one since start() found them
            # free (Triton binds them only after its models load); its readiness is not our server's.
            if self.is_ready() and self._owns_ports():
                return
            time.sleep(0.2)
        raise ServerStartError(f"tritonserver was not ready after {timeout:.0f} s; last log lines:\n{self.log_tail()}")

    def _owns_ports(self) -> bool:
        """Whether our server process listens on its HTTP, gRPC and metrics ports (True where ``/proc`` does not
        tell)."""
        held = listening_ports(self._proc.pid) if self._proc is not None else None
        if held is None:
            return True
        # Not those a --allow-grpc/--allow-metrics=false among the extra arguments turned off.
        off = {port for port, flag in ((self.grpc_port, "grpc"), (self.metrics_port, "metrics"))
               if any(a.lower() in (f"--allow-{flag}=false", f"--allow-{flag}=0") for a in self.extra_args)}
        return {self.http_port, self.grpc_port, self.metrics_port} - off <= held

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group's (the python-backend stubs are in it)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests for up to ``exit_timeout``), then SIGKILL of the whole
        process group after ``timeout`` (default ``exit_timeout`` + 5 s), or at once when a stub has died
        (Triton's shutdown would wait out its exit timeout on it); then remove what the server left in
        /dev/shm (listed in :attr:`cleaned_shm`). Returns the server's exit code (-9: killed)."""
        code = None
        if self._proc is not None:
            limit = self.exit_timeout + 5.0 if timeout is None else timeout
            if self._proc.poll() is None and self.unhealthy() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(limit)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", limit)
            self._kill()
            code = self._proc.returncode
            self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self.cleaned_shm += self.cleanup_shm()
        release_owner_lock(self._lock_fd, self.shm_prefix)
        self._lock_fd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def leftover_shm(self) -> list[Path]:
        return sorted(SHM_DIR.glob(self.shm_prefix + "*")) if SHM_DIR.is_dir() else []

    def cleanup_shm(self) -> list[Path]:
        """Remove the files under this server's prefix; return them. A server that was killed (or died)
        leaves its python-backend regions behind; the prefix is ours alone."""
        removed = self.leftover_shm()
        for path in removed:
            log.warning("removing leftover shared memory %s", path)
            path.unlink(missing_ok=True)
        return removed

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self, health_interval: float = 1.0, *, max_restarts: int = MAX_RESTARTS,
                      restart_window: float = RESTART_WINDOW_S, unanswered: int = LIVENESS_MISSES,
                      probe: Callable[[], str | None] | None = None, probe_interval: float = PROBE_INTERVAL_S) -> int:
        """Block until SIGINT, SIGTERM or SIGHUP, then stop the server; returns an exit code.

        Every ``health_interval`` seconds (0: never, and a server that dies ends this with 1) the server is
        restarted on the same ports when its process died (Triton 2.51 crashes in its gRPC handler when
        clients cancel calls as they complete, a race fixed upstream in later releases), when it left
        ``/v2/health/live`` unanswered ``unanswered`` times in a row (wedged), or when a python-backend stub
        died (Triton 2.51 never restarts one). ``probe`` (None when the path it checks serves, else why not)
        runs every ``probe_interval`` seconds and counts the same way: after such a race, Triton 2.51's gRPC
        inference can stop answering while its HTTP health endpoints still do. More than ``max_restarts``
        within ``restart_window`` seconds is a crash loop: the server is stopped and the exit code is 1, for
        the supervisor above to act on. A restart that does not come up counts too and is tried again, after a
        wait that doubles with each such failure in a row (RESTART_BACKOFF_S up to RESTART_BACKOFF_MAX_S); a stop
        signal ends the wait."""
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in STOP_SIGNALS}
        watchdog = _Watchdog(self, unanswered, probe, probe_interval)
        restarts: deque[float] = deque()
        failed = 0  # restarts in a row that did not come up
        try:
            while not stop.wait(health_interval or 0.5):
                if not health_interval:
                    if not self.running:
                        log.error("tritonserver %s; last log lines:\n%s", self.exit_reason(), self.log_tail())
                        return 1
                    continue
                reason = watchdog.fault()
                if reason is None:
                    continue
                now = time.monotonic()
                while restarts and now - restarts[0] > restart_window:
                    restarts.popleft()
                if len(restarts) >= max_restarts:
                    log.error("%s, after %d restart(s) in the last %.0f s: giving up. Last log lines:\n%s", reason,
                              len(restarts), restart_window, self.log_tail(20))
                    return 1
                log.error("%s; restarting it. Last log lines:\n%s", reason, self.log_tail(20))
                restarts.append(now)
                try:
                    self.restart()
                    failed = 0
                except ServerStartError as exc:
                    # Dead or not answering after the start-up timeout: the next check finds that and it
                    # counts as another restart, so a server that cannot come back ends in the crash-loop exit,
                    # after waits that double (1, 2, 4 ... s) rather than in a tight loop of model loads.
                    failed += 1
                    delay = min(RESTART_BACKOFF_S * 2 ** (failed - 1), RESTART_BACKOFF_MAX_S)
                    log.error("%s", exc)
                    if len(restarts) < max_restarts:
                        log.warning("next restart in %.0f s", delay)
                        if stop.wait(delay):
                            break
                watchdog.reset()
            log.info("shutting down")
            return 0
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def exit_reason(self) -> str:
        """How the server process ended: ``died from signal 6 (SIGABRT)`` or ``exited with code 1``."""
        code = self._proc.returncode if self._proc is not None else None
        if code is None:
            return "is running"
        if code < 0:
            try:
                return f"died from signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                return f"died from signal {-code}"
        return f"exited with code {code}"


class _Watchdog:
    """What :meth:`TritonServer.serve_forever` checks at each health interval: a fault's description, or None.
    Failed live checks and inference probes count in a row; a restart starts the counts again."""

    def __init__(self, server: TritonServer, unanswered: int, probe: Callable[[], str | None] | None,
                 probe_interval: float):
        self.server, self.unanswered, self.probe, self.probe_interval = server, unanswered, probe, probe_interval
        self.reset()

    def reset(self) -> None:
        self.misses = self.probe_misses = 0
        self.next_probe = time.monotonic() + self.probe_interval

    def fault(self) -> str | None:
        if not self.server.running:
            return f"tritonserver {self.server.exit_reason()}"
        reason = self.server.unhealthy()
        if reason is not None:
            return reason
        self.misses = 0 if self.server.is_live() else self.misses + 1
        if self.misses >= self.unanswered:
            return f"tritonserver left /v2/health/live unanswered {self.misses} times in a row"
        if self.probe is None or time.monotonic() < self.next_probe:
            return None
        why = self.probe()
        # A failure is checked again at the next health check, not a probe interval later.
        self.next_probe = time.monotonic() + (self.probe_interval if why is None else 0.0)
        if why is None:
            self.probe_misses = 0
            return None
        self.probe_misses += 1
        log.warning("inference probe failed (%d of %d): %s", self.probe_misses, self.unanswered, why)
        if self.probe_misses >= self.unanswered:
            return f"the inference probe failed {self.probe_misses} times in a row ({why})"
        return None


def which_tritonserver(path: str | None) -> Path | None:
    """Resolve ``--tritonserver``: ``None`` means the bundled one; a bare name is looked up on PATH."""
    if not path:
        return None
    found = shutil.which(path) or (path if Path(path).exists() else None)
    if not found:
        raise FileNotFoundError(f"tritonserver not found: {path}")
    return Path(found)
