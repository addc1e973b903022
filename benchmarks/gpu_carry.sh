#!/usr/bin/env bash
# Prepare build/gpu_carry/ on this machine for a GPU host that has Python 3.12, PyTorch and CUDA but no Triton,
# no internet and numpy 2 (the lent H100/H200 machines): what benchmarks/gpu_torch_host.sh installs there.
#
#   tritonserver.tar.xz  the server bundled in nvidia-pytriton 0.7.0 (Triton 2.51): bin, python backend,
#                        caches, the Python 3.12 stub and its libraries (not the bundled libpython: the host's)
#   wheels/              numpy 1.26.4 (the 2.51 stub needs numpy < 2), tritonclient, python-rapidjson (cp312);
#                        with FULL=1 also grpcio, protobuf < 7, ml_dtypes and the small packages they import,
#                        for a host without them (the lent hosts have them; FULL=1 makes ~62 MiB in all)
#   perf_analyzer.xz     perf_analyzer 2.51.0 from the tritonclient 2.51.0 wheel
#
# About 49 MB, under the 64 MiB that one device call may carry. Usage: [FULL=1] benchmarks/gpu_carry.sh [DEST]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/build/gpu_carry}
PY=${PYTHON:-$ROOT/.venv/bin/python}
SITE=$("$PY" -c "import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).resolve().parents[1])")
TRITONCLIENT=$("$PY" -c "import importlib.metadata as m; print(m.version('tritonclient'))")
rm -rf "$DEST" && mkdir -p "$DEST/wheels"

stubs=()
for d in "$SITE"/pytriton/tritonserver/python_backend_stubs/*; do
  [ "$(basename "$d")" = 3.12 ] || stubs+=("--exclude=pytriton/tritonserver/python_backend_stubs/$(basename "$d")")
done
tar -C "$SITE" -cJf "$DEST/tritonserver.tar.xz" "${stubs[@]}" --exclude='__pycache__' \
  --exclude='nvidia_pytriton.libs/libpython3*' pytriton/tritonserver nvidia_pytriton.libs

"$PY" -m pip download -q --dest "$DEST/wheels" --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
  --python-version 3.12 --implementation cp --abi cp312 \
  numpy==1.26.4 python-rapidjson "tritonclient==$TRITONCLIENT" \
  ${FULL:+grpcio "protobuf<7" packaging typing_extensions ml_dtypes==0.5.4 urllib3}

PA_WHEEL=$(ls "$ROOT"/.whl/tritonclient-2.51.0-*.whl 2>/dev/null | head -1 || true)
if [ -z "$PA_WHEEL" ]; then
  mkdir -p "$ROOT/.whl"
  "$PY" -m pip download -q --no-deps --dest "$ROOT/.whl" tritonclient==2.51.0
  PA_WHEEL=$(ls "$ROOT"/.whl/tritonclient-2.51.0-*.whl | head -1)
fi
"$PY" - "$PA_WHEEL" "$DEST/perf_analyzer.xz" <<'PYEOF'
import lzma, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as zf, lzma.open(sys.argv[2], "wb") as out:
    out.write(zf.read("tritonclient-2.51.0.data/data/bin/perf_analyzer"))
PYEOF
du -sh "$DEST"/* "$DEST"
