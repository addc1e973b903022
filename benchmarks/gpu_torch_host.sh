#!/usr/bin/env bash
# On a GPU host (Python 3.12 + PyTorch + CUDA, no Triton, no internet): install what benchmarks/gpu_carry.sh
# prepared (carried as build/gpu_carry) into a private environment, then run benchmarks/gpu_torch.py.
#
# The environment sees the host's packages (torch, torchvision, cuda-bindings) after its own numpy 1.26: the
# Triton 2.51 python-backend stub hands models garbage under numpy 2. Its bin/ goes first on PATH, which is
# how the stub finds its Python. This checkout's client/ and server/ are on its path through a .pth file.
# Usage (repository root): benchmarks/gpu_torch_host.sh [gpu_torch.py arguments]; results go to $OUT.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARRY=${CARRY:-$ROOT/build/gpu_carry}
ENV=${TV_ENV:-/tmp/tritonvision_env}
OUT=${OUT:-$ROOT/results}
PY=${HOST_PYTHON:-python3}

if [ ! -x "$ENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$ENV"
  "$ENV/bin/python" -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl
fi
SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -x "$SITE/pytriton/tritonserver/bin/tritonserver" ]; then
  tar -C "$SITE" -xJf "$CARRY/tritonserver.tar.xz"
  : > "$SITE/pytriton/__init__.py"  # launcher.bundled_server_root() needs only the package's folder
fi
printf '%s\n%s\n' "$ROOT/client" "$ROOT/server" > "$SITE/tritonvision_checkout.pth"
mkdir -p "$ENV/perf_analyzer"
[ -x "$ENV/perf_analyzer/perf_analyzer" ] || { xz -dc "$CARRY/perf_analyzer.xz" > "$ENV/perf_analyzer/perf_analyzer"; chmod +x "$ENV/perf_analyzer/perf_analyzer"; }

export PATH="$ENV/bin:$PATH" OUT
if [ -n "${TV_SETUP_ONLY:-}" ]; then  # only install (checked on a machine without a GPU)
  python -c "import numpy, pytriton, tritonclient.grpc, tritonvision_server.launcher as l; print('numpy', numpy.__version__, l.bundled_server_root())"
  exit 0
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import numpy, torch, torchvision; print('numpy', numpy.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
exec python "$ROOT/benchmarks/gpu_torch.py" --perf-analyzer-dir "$ENV/perf_analyzer" --output "$OUT/gpu_torch.json" "$@"
