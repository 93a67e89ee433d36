#!/usr/bin/env bash
# GPU check for koret (one H100/H200, under 5 minutes): see scripts/gpu_check.py. Usage:
#   bash scripts/gpu_check.sh            # on the GPU machine; writes $OUT/gpu_check.json (or bench/results)
#   bash scripts/gpu_check.sh --smoke    # toy sizes on CPU (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" scripts/gpu_check.py "$@"
