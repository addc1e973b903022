"""Helpers for the SDK tests (not fixtures shared with other suites)."""

from __future__ import annotations

import contextlib
from pathlib import Path

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
