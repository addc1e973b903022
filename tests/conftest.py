"""Shared fixtures: the real Triton server with the cpu profile, started once per session, and test photos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from image_helpers import encode, jpeg, orientation_exif

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "test"
# Random weights with a fixed seed: no downloads at test time.
TEST_WEIGHTS = "random:0"


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidia0")


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos shipped with scikit-image, encoded to JPEG here."""
    import skimage.data

    return {name: encode(getattr(skimage.data, name)(), quality=92) for name in ("chelsea", "astronaut", "coffee", "rocket")}


@pytest.fixture(scope="session")
def odd_photos(photos) -> dict[str, bytes]:
    """Real photos at odd sizes and aspect ratios, EXIF-rotated, CMYK and greyscale."""
    import skimage.data

    chelsea, coffee, astronaut = skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()
    return {
        **photos,
        "odd_333x257": jpeg(coffee[:257, :333]),
        "tall_97x301": jpeg(astronaut[:301, 200:297]),
        "wide_511x129": jpeg(chelsea[100:229, :511 if chelsea.shape[1] >= 511 else None]),
        "tiny_57x43": jpeg(coffee[100:143, 100:157]),
        # orientation 6: rotate 90 degrees clockwise to display
        "exif_rotated": jpeg(coffee[:300, :451], exif=orientation_exif(6)),
        "cmyk": jpeg(chelsea, mode="CMYK"),
        "greyscale": jpeg(astronaut, mode="L"),
    }


@pytest.fixture(scope="session")
def onnx_path() -> Path:
    from tritonvision_server.onnx_export import export_onnx

    return export_onnx(BUILD / "resnet50.onnx", TEST_WEIGHTS)


@pytest.fixture(scope="session")
def batch_strategy() -> Path:
    """The gpu profile's pixel-budget batching strategy, compiled here (a C compiler is part of the test
    environment: without one this fails with what to install, it is not skipped)."""
    from tritonvision_server import batchstrategy

    try:
        return batchstrategy.build(BUILD / batchstrategy.BATCH_STRATEGY_FILE)
    except batchstrategy.CompilerNotFound as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def cpu_repository(onnx_path) -> Path:
    from tritonvision import spec
    from tritonvision_server.configs import write_repository

    return write_repository(spec.CPU, BUILD / "model_repository_cpu", onnx_path=onnx_path)


@pytest.fixture(scope="session")
def triton_server(cpu_repository):
    """The real tritonserver (bundled in nvidia-pytriton) serving the cpu profile on free loopback ports."""
    from tritonvision_server.launcher import TritonServer

    server = TritonServer(cpu_repository, log_file=BUILD / "tritonserver.log")
    with server:
        yield server
    assert not server.leftover_shm(), "the server left shared-memory files behind"


@pytest.fixture(autouse=True)
def _session_server_alive(request):
    """A test during which the session's server died or wedged fails with the server's last log lines, and
    the server is started again, so that one crash fails one test, not every test after it."""
    if "triton_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("triton_server")
    if not server.running:
        # It died after the previous test had finished: that test passed; start the server again.
        print(f"tritonserver (pid {server.pid}) was found dead; last log lines:\n{server.log_tail(30)}")
        server.restart()
    yield
    # Wedged: Triton 2.51 can hang in its own crash handler, running and answering nothing.
    wedged = server.running and not (server.is_live(5.0) or server.is_live(5.0))
    if wedged or not server.running:
        tail = server.log_tail(30)
        reason = "stopped answering /v2/health/live" if wedged else server.exit_reason()
        server.restart()
        pytest.fail(f"tritonserver {reason} during this test; last log lines:\n{tail}")


@pytest.fixture(scope="session")
def grpc_url(triton_server) -> str:
    return triton_server.grpc_url


@pytest.fixture()
def classifier(grpc_url):
    from tritonvision import Classifier

    with Classifier(grpc_url, timeout=120) as clf:
        yield clf
