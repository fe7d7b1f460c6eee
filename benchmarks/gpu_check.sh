#!/usr/bin/env bash
# On a CUDA machine with no package index: install the wheels benchmarks/gpu_wheels.sh prepared (in .whl/)
# into a private folder ahead of the image's packages, then run benchmarks/gpu_check.py, which prints one
# table and writes it to $OUT/gpu_check.md (or ./gpu_check.md). Extra arguments go to gpu_check.py.
#   bash benchmarks/gpu_wheels.sh            # before, on a CPU machine
#   bash benchmarks/gpu_check.sh [--small]   # on the GPU machine, from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="${MCORE_GPU_SITE:-/tmp/mcore-gpu-site}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in .whl/ (bash benchmarks/gpu_wheels.sh prepares them); using what is installed" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "gpu_check: no nvidia-smi" >&2
exec python3 benchmarks/gpu_check.py --out "${OUT:-.}/gpu_check.md" "$@"
