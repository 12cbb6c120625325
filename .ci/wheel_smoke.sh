#!/usr/bin/env bash
# The package as users install it: build the wheel into dist/, install it into a fresh venv outside the checkout
# and, from a folder outside the checkout, convert and verify the demo checkpoint, lay out the builtin kernel and
# load presets by name. A module or preset the wheel lacks, or requirements pip cannot resolve beside the pinned
# torch, fail here.
#
#   bash .ci/wheel_smoke.sh [WORK_DIR] [TORCH_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$(pwd)
work=${1:-/tmp/convert-fp8-wheel-smoke}
torch_version=${2:-2.13.0}
python=${PYTHON:-python3}
started=$(date +%s)

case "$(realpath -m "$work")/" in "$checkout"/*) echo "wheel smoke: $work is inside the checkout" >&2; exit 2;; esac
rm -rf "$work" build dist
mkdir -p "$work/run"
"$python" -m venv "$work/venv"
bin=$work/venv/bin
# pip builds the wheel as for `pip install .` (isolated build environment, setuptools from pyproject.toml)
"$bin/python" -m pip wheel -q --no-deps -w dist .
rm -rf build
wheel=$(ls dist/convert_fp8-*.whl)
# torch first, pinned: a bare requirement would fetch a multi-GB CUDA build
echo "torch==$torch_version" > "$work/constraints.txt"
"$bin/python" -m pip install -q "torch==$torch_version"
"$bin/python" -m pip install -q -c "$work/constraints.txt" "$wheel"
installed=$(date +%s)

cd "$work/run"
where=$("$bin/python" -c "import converter; print(converter.__file__)")
case "$where" in "$work/venv/"*) ;; *) echo "wheel smoke: converter imported from $where, not the venv" >&2; exit 1;; esac
"$bin/python" -m converter.demo demo
"$bin/convert-fp8" --src demo --dst demo-FP8 -q
"$bin/convert-fp8" verify --src demo --dst demo-FP8 -q
"$bin/python" -m converter.kernels.layout kernel
test -s kernel/build/torch-cuda/metadata.json
"$bin/convert-fp8" --src demo --dst demo-31b --config gemma-4-31b-it --dry-run > /dev/null
expected=$(cd "$checkout/configs" && ls *.json | sed 's/\.json$//' | tr '\n' ' ')
found=$("$bin/python" -c "from converter.presets import available_presets; print(' '.join(available_presets()))")
if [ "$found " != "$expected" ]; then
    echo "wheel smoke: presets in the wheel: '$found', in configs/: '$expected'" >&2
    exit 1
fi
echo "wheel smoke: passed ($((installed - started)) s to build and install, $(($(date +%s) - installed)) s to run)"
