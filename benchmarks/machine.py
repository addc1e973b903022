"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess


def gpu() -> str | None:
    """``name, driver`` of the first GPU from nvidia-smi, or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.splitlines()[0] if out else None


def proc_status(pid: int, *keys: str) -> dict[str, int]:
    """The memory fields ``keys`` (VmRSS, RssAnon, ...) of ``/proc/<pid>/status``, in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in keys:
                fields[key] = int(value.split()[0]) * 1024
    return fields


def hardware() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu(), "platform": platform.platform()}
