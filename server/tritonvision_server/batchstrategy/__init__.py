"""The pixel budget of the gpu profile's DALI batches: a Triton custom batching strategy, built from C.

Triton's DALI backend decodes each dynamic batch as one run; :file:`pixel_budget.c` makes Triton's batcher
close a batch of ``preprocess`` before the request whose images would take it past
``spec.Profile.max_batch_pixels`` decoded pixels (the sum of ``spec.PIXEL_COUNT``, which ``validate`` sends).
:func:`build` compiles it with the C compiler found here (no Triton headers or libraries needed: the library
declares the few functions it calls, and Triton resolves them when it loads it) into
``<repository>/preprocess/batchstrategy.so``, where Triton looks for it (``build_engines.py batcher``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from tritonvision import spec

log = logging.getLogger(__name__)

SOURCE = "pixel_budget.c"
# Triton looks for a library of this name in the model's version folder, then the model folder, then the
# backend folder (core r24.10 to r26.06, TritonModel::Create). The model config parameter
# TRITON_BATCH_STRATEGY_PATH is not used: from 26.06 Triton refuses one outside the model repository, and
# the default search needs no path.
BATCH_STRATEGY_FILE = "batchstrategy.so"
# preprocess's config parameter that the library reads: the budget in decoded pixels.
BATCH_PIXELS_PARAMETER = "max_batch_pixels"
# validate's: it refuses a request whose images together hold more (the batcher never splits a request).
REQUEST_PIXELS_PARAMETER = "max_request_pixels"
# The compilers tried, in order, when none is named (CC, then these). The NGC tritonserver images 26.02 to
# 26.06 install clang (server build.py, dockerfile_prepare_container_linux).
COMPILERS = ("cc", "gcc", "clang")
CFLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-std=c11", "-Wall", "-Wextra")


class CompilerNotFound(RuntimeError):
    """No C compiler to build the batching strategy with."""


def library_path(repository: Path) -> Path:
    """Where Triton finds the library of ``repository``'s preprocess model."""
    return Path(repository) / spec.PREPROCESS / BATCH_STRATEGY_FILE


def find_compiler(compiler: str | None = None) -> str:
    """The C compiler to use: ``compiler`` if given, else ``$CC``, else the first of :data:`COMPILERS` on PATH."""
    candidates = [compiler] if compiler else ([os.environ["CC"]] if os.environ.get("CC") else list(COMPILERS))
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise CompilerNotFound(
        f"no C compiler found (tried {', '.join(candidates)}): the pixel budget of the gpu profile's DALI batches "
        "is a small C library built here. Install one (Debian/Ubuntu: apt-get install gcc libc6-dev; RHEL: dnf "
        "install gcc), or name one with --cc / CC")


def source() -> str:
    """The C source shipped in the package."""
    return resources.files(__package__).joinpath(SOURCE).read_text(encoding="utf-8")


def build(dest: Path, *, compiler: str | None = None) -> Path:
    """Compile the batching strategy into ``dest`` (a file; written whole, then renamed into place)."""
    cc = find_compiler(compiler)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    defines = [f'-DPIXEL_COUNT_INPUT="{spec.PIXEL_COUNT.name}"', f'-DBUDGET_PARAMETER="{BATCH_PIXELS_PARAMETER}"']
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / SOURCE
        src.write_text(source(), encoding="utf-8")
        out = Path(tmp) / BATCH_STRATEGY_FILE
        cmd = [cc, *CFLAGS, *defines, "-o", str(out), str(src)]
        log.debug("%s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build the batching strategy (exit {proc.returncode}):\n"
                               f"{proc.stderr.strip()}")
        if proc.stderr.strip():
            log.warning("%s: %s", cc, proc.stderr.strip())
        staged = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.copyfile(out, staged)
        os.replace(staged, dest)
    log.info("built the pixel-budget batching strategy with %s into %s", cc, dest)
    return dest
