#!/usr/bin/env bash
# Prepare, on a CPU machine with the package index, the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that reaches no index: megatron-core, transformers and peft at the lock's versions, for the GPU
# image's CPython 3.12 on x86-64 (its torch, CUDA, accelerate, safetensors and tokenizers are used as they are).
#   bash benchmarks/gpu_wheels.sh [DEST]     # DEST defaults to .whl/ (git-ignored); at most 64 MiB in all
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
LIMIT_MIB=64
PACKAGES=(megatron-core transformers peft)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${name}==" requirements/lock.txt) || { echo "gpu_wheels: $name is not in requirements/lock.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "${pins[@]}"
size=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -1 "$DEST"/*.whl
echo "gpu_wheels: ${#pins[@]} wheels, $((size / 1048576)) MiB in $DEST"
if [ "$size" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: more than ${LIMIT_MIB} MiB: the GPU machine takes at most that much in one call" >&2
  exit 1
fi
