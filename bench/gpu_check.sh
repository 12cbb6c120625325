#!/usr/bin/env bash
# The GPU check as one command for a lent GPU machine (no network): installs wheels carried in .whl/ if any,
# then runs bench/gpu_check.py with the machine's python. Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py "$@"
