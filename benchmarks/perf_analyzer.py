"""perf_analyzer 2.51, taken from the tritonclient 2.51.0 wheel (newer PyPI perf-analyzer wheels need glibc 2.38).

The binary needs ``libb64.so.0d`` and ``libcudart.so.12``; the hashed copies that nvidia-pytriton bundles
serve, through symlinks in a private lib directory and LD_LIBRARY_PATH.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL = "tritonclient==2.51.0"
MEMBER = "tritonclient-2.51.0.data/data/bin/perf_analyzer"


def ensure(root: Path, wheel_dir: Path) -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary under ``root`` and the environment to run it with (downloading the wheel once)."""
    binary = root / "perf_analyzer"
    if not binary.exists():
        wheels = sorted(wheel_dir.glob("tritonclient-2.51.0-*.whl"))
        if not wheels:
            log.info("downloading %s (for its perf_analyzer)", WHEEL)
            subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(wheel_dir)], check=True)
            wheels = sorted(wheel_dir.glob("tritonclient-2.51.0-*.whl"))
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf, open(binary, "wb") as out:
            out.write(zf.read(MEMBER))
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary, environment(root)


def environment(root: Path) -> dict[str, str]:
    """The environment perf_analyzer 2.51 runs in: its libraries linked under ``root/lib``."""
    import pytriton

    libs = root / "lib"

    bundled = Path(pytriton.__file__).resolve().parents[1] / "nvidia_pytriton.libs"
    libs.mkdir(parents=True, exist_ok=True)
    for want, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        link = libs / want
        if not link.exists():
            link.symlink_to(next(bundled.glob(pattern)))
    path = [str(libs), str(bundled), os.environ.get("LD_LIBRARY_PATH", "")]
    return dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(path))


def input_data(images: bytes | list[bytes], dest: Path) -> Path:
    """``--input-data`` JSON with encoded images as the UINT8 [-1] input: one, or several that perf_analyzer
    sends in turn (one per request, in order)."""
    images = [images] if isinstance(images, bytes) else images
    dest.write_text(json.dumps({"data": [{"IMAGE": {"content": list(i), "shape": [len(i)]}} for i in images]}))
    return dest


# A stability percentage no two windows can exceed: windows of a shared machine differed by more than 1000%
# (a 0.5 ms request beside one stalled for 500 ms), which failed the run that was to measure without the check.
NO_STABILITY_CHECK = 10**9


def run(binary: Path, env: dict, *, url: str, model: str, data: Path, concurrency: int, interval_ms: int,
        csv_path: Path, shm: str = "none", timeout: float = 300, stability: int = 20) -> dict:
    """One concurrency level; returns throughput (img/s) and latency percentiles (ms).

    On two shared cores the real model's windows can differ by more than ``stability`` percent; perf_analyzer
    then writes nothing, so the level is measured again with stability checking effectively off (and
    ``stable`` is reported False)."""
    cmd = [
        str(binary), "-m", model, "-u", url, "-i", "grpc", "-b", "1", "--input-data", str(data),
        "--concurrency-range", str(concurrency), "--measurement-mode", "time_windows",
        "--measurement-interval", str(interval_ms), "--stability-percentage", str(stability), "--max-trials", "5",
        "--shared-memory", shm, "--output-shared-memory-size", "8192", "-f", str(csv_path),
    ]
    log.debug("%s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and not csv_path.exists() and stability < NO_STABILITY_CHECK:
        log.warning("perf_analyzer found no stable window at concurrency %d; measuring once more without the check",
                    concurrency)
        return {**run(binary, env, url=url, model=model, data=data, concurrency=concurrency, interval_ms=interval_ms,
                      csv_path=csv_path, shm=shm, timeout=timeout, stability=NO_STABILITY_CHECK), "stable": False}
    if proc.returncode != 0 and not csv_path.exists():
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(csv_path) as fh:
        row = next(csv.DictReader(fh), None)
    if row is None:
        raise RuntimeError(f"perf_analyzer ({proc.returncode}) wrote no measurement:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}")
    return {
        "concurrency": concurrency,
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p90_ms": float(row["p90 latency"]) / 1e3,
        "p95_ms": float(row["p95 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
        "stable": proc.returncode == 0,
    }
