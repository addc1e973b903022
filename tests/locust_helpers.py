"""Headless Locust in a subprocess, and its statistics (for the load-test, TLS and connection tests)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"


def locust_cmd(url: str, *extra: str, locustfile: str = str(LOCUSTFILE)) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", locustfile, "--host", url, "--only-summary", *extra]


def run(cmd: list[str], timeout: float = 90, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd[:6]} did not finish: {exc.stderr[-3000:] if exc.stderr else ''}")


def stats(prefix: Path) -> dict[str, dict]:
    path = prefix.with_name(prefix.name + "_stats.csv")
    assert path.exists(), f"no {path}"
    return {row["Name"]: row for row in csv.DictReader(path.open())}


def locust(url: str, user: str, tmp_path: Path, *extra: str, seconds: int = 4) -> tuple[dict[str, dict], subprocess.CompletedProcess]:
    prefix = tmp_path / user
    proc = run(locust_cmd(url, "--headless", "-u", "2", "-r", "2", "-t", f"{seconds}s", "--csv", str(prefix), *extra, user))
    return stats(prefix), proc
