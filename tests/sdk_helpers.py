"""Helpers for the SDK tests (not fixtures shared with other suites)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from tritonvision import InvalidImageError
from tritonvision._transport._shm import leftover_files

NOT_AN_IMAGE = b"this is not an image"


def top(preds) -> tuple[int, ...]:
    return tuple(p.index for p in preds)


def assert_no_regions(prefix: str, server_regions: list[str]) -> None:
    """No /dev/shm file and no server registration carries ``prefix``."""
    assert leftover_files(prefix) == [], "shared-memory files leaked"
    assert [r for r in server_regions if r.startswith(prefix)] == [], "regions left registered on the server"


@contextlib.contextmanager
def own_server(repository: Path, **kwargs):
    """A TritonServer of our own (tests that stop or restart a server must not touch the session one)."""
    from tritonvision_server.launcher import TritonServer

    server = TritonServer(repository, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.stop()
    assert not server.leftover_shm()


def registered(grpc_url: str) -> list[str]:
    """Names of the system shared-memory regions registered on the server, by a connection of its own."""
    from tritonvision._transport._grpc import GrpcTransport

    t = GrpcTransport(grpc_url)
    try:
        return t.registered_shm("system")
    finally:
        t.close()


def serve_classify_and_interrupt(args: list[str], image: bytes, *, ready_timeout: float = 120, **popen) -> tuple[int, str, int]:
    """Run ``tritonvision serve ARGS`` on free ports, classify ``image`` through it once ready, then stop it
    with SIGINT as Ctrl-C would. Returns its exit code, its output and its pid."""
    import signal
    import subprocess
    import sys

    from tritonvision import Classifier
    from tritonvision_server.launcher import free_port

    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "tritonvision._cli", "serve", *args,
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    try:
        with Classifier(f"127.0.0.1:{ports[1]}", timeout=ready_timeout) as clf:
            clf.wait_until_ready(timeout=ready_timeout)
            assert clf.classify(image)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, proc.pid


def classify_in_threads(clf, blobs: list[bytes]) -> dict[int, object]:
    """Each upload classified at once from a thread of its own (so that they can share a dynamic batch):
    index -> predictions, or the InvalidImageError that refused it."""
    outcomes: dict[int, object] = {}

    def send(i: int, blob: bytes) -> None:
        try:
            outcomes[i] = clf.classify(blob)
        except InvalidImageError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(blobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes
