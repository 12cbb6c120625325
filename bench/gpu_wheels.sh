#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU check needs and a bare GPU machine (python 3.12, torch,
# triton and transformers, no network) may lack, into .whl/ (git-ignored). bench/gpu_check.sh installs them there.
# numba (60 MB with llvmlite) is left out unless WITH_NUMBA=1: without it the converter uses the torch formula.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl accelerate==1.15.0 psutil click tqdm
if [ "${WITH_NUMBA:-0}" = 1 ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl numba==0.68.1 llvmlite==0.50.0
fi
ls -la .whl
