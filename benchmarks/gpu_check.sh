#!/usr/bin/env bash
# The GPU check (`make gpu-check`; docs/benchmarks.md, "The GPU check") on a CUDA machine with no
# network: install the wheels carried in .whl/ (what the GPU image lacks; `make gpu-wheels` fetches
# them) into a folder of their own, then run `python -m benchmarks.gpu_check` from this working
# tree (no install of tike-trl). Arguments go to it, e.g. `--run-name h200`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/tike-gpu-site}
start=$(date +%s.%N)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl ||
        { echo "gpu-check: installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu-check: no wheels in .whl/ (make gpu-wheels fetches them): using the installed packages" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GPU_CHECK_INSTALL_S=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
export GPU_CHECK_INSTALL_S PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
