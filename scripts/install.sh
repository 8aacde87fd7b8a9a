#!/usr/bin/env bash
# Installs fastkd (editable) with what it needs: `bash scripts/install.sh [test]`.
#
# A torch that is already installed is kept. Without one, a machine with an NVIDIA GPU gets the
# default (CUDA) build, and a machine without one gets the CPU build, never the multi-GB CUDA one.
# A machine with an NVIDIA GPU also gets the `gpu` extra (Triton); a CPU-only one does not (the
# `test` extra brings Triton for the interpreter test lane).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
pip=("$python" -m pip install --disable-pip-version-check)

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  if [ "$gpu" = 1 ]; then
    "${pip[@]}" torch
  else
    "${pip[@]}" "torch==2.13.0+cpu" \
      || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" "setuptools>=70" wheel
extras=()
if [ "$gpu" = 1 ]; then
  extras+=(gpu)
fi
if [ "${1:-}" = "test" ]; then
  extras+=(test)
fi
target="."
if [ "${#extras[@]}" -gt 0 ]; then
  target=".[$(IFS=,; echo "${extras[*]}")]"
fi
"${pip[@]}" --no-build-isolation -e "$target"
# pyenv puts console scripts behind shims that exist only after a rehash.
if command -v pyenv >/dev/null 2>&1; then
  pyenv rehash || true
fi
"$python" -c "import fastkd, torch; print(f'fastkd {fastkd.__version__} installed (torch {torch.__version__})')"
