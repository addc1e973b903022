"""Run a real ``tritonserver``: the one bundled in the nvidia-pytriton wheel, or one given by path.

:class:`TritonServer` is a context manager: it prepares the python backend directory, gives the server a
unique shared-memory prefix, starts it on loopback, waits for readiness and, on exit, stops it and removes
whatever the python backend left in ``/dev/shm``.
"""

from __future__ import annotations

import logging
import os
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
from dataclasses import dataclass, field
from pathlib import Path

from tritonvision._extras import require

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


@dataclass
class TritonServer:
    """A ``tritonserver`` process serving ``model_repository``.

    Ports default to free loopback ports; pass 8000/8001/8002 for the usual ones.
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

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self.shm_prefix = f"tritonvision_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log_tail: deque[str] = deque(maxlen=60)
        self._reader: threading.Thread | None = None
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
        if backend_dir is not None:
            # CPU-only hosts: no pinned host memory to ask the (absent) CUDA driver for.
            cmd += [f"--backend-directory={backend_dir}", "--pinned-memory-pool-byte-size=0"]
        return cmd + list(self.extra_args)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The python-backend stub finds its packages through the first python3 on PATH: this environment's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> "TritonServer":
        if self._proc is not None:
            raise RuntimeError("server already started")
        backend_dir = None
        if self.tritonserver is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tritonvision-backends-")
            backend_dir = _python_backend_dir(bundled_server_root(), Path(self._tmp.name))
        cmd = self.command(backend_dir)
        log.info("starting %s", " ".join(cmd))
        log_fh = open(self.log_file, "w") if self.log_file else None  # noqa: SIM115 - closed by the reader
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._env(), text=True, errors="replace",
            start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
        )
        self._reader = threading.Thread(target=self._pump, args=(log_fh,), daemon=True)
        self._reader.start()
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Triton is ready: gRPC %s, HTTP %s, metrics %s", self.grpc_url, self.http_url, self.metrics_url)
        return self

    def _pump(self, log_fh) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._log_tail.append(line.rstrip("\n"))
            if log_fh:
                log_fh.write(line)
                log_fh.flush()
            log.debug("tritonserver: %s", line.rstrip())
        if log_fh:
            log_fh.close()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._log_tail)[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                self._reader and self._reader.join(timeout=2)
                raise ServerStartError(
                    f"tritonserver exited with code {self._proc.returncode} during start-up; last log lines:\n"
                    f"{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerStartError(f"tritonserver was not ready after {timeout:.0f} s; last log lines:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group's (the python-backend stubs are in it)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests), SIGKILL after ``timeout``; then remove what the server
        left in /dev/shm (listed in :attr:`cleaned_shm`). Returns the server's exit code (-9: killed)."""
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                    os.killpg(self._proc.pid, signal.SIGKILL)
                    self._proc.wait()
            code = self._proc.returncode
            if self._reader:
                self._reader.join(timeout=5)
            self._proc = None
        self.cleaned_shm += self.cleanup_shm()
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

    def serve_forever(self) -> int:
        """Block until SIGINT/SIGTERM or until the server dies; then stop it. Returns an exit code."""
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                if not self.running:
                    log.error("tritonserver exited unexpectedly; last log lines:\n%s", self.log_tail())
                    return 1
            log.info("shutting down")
            return 0
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)


def which_tritonserver(path: str | None) -> Path | None:
    """Resolve ``--tritonserver``: ``None`` means the bundled one; a bare name is looked up on PATH."""
    if not path:
        return None
    found = shutil.which(path) or (path if Path(path).exists() else None)
    if not found:
        raise FileNotFoundError(f"tritonserver not found: {path}")
    return Path(found)
