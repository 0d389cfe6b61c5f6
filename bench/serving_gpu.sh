#!/usr/bin/env bash
# The serving benchmark (issue 12) on a GPU machine in one call: the carried wheels (.whl: pydantic, fastapi,
# starlette, uvicorn, openai and what they need) go to /tmp/site as in gpu_check.sh, then bench/serving_bench.py
# runs the default sweep (about 9 minutes on one H100; --time-budget 570 s skips what would not fit).
#   bash bench/serving_gpu.sh [OUT_DIR] [serving_bench.py arguments...]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/coserve-serving}}"
shift || true
mkdir -p "$out"
source bench/device_env.sh
python3 bench/serving_bench.py --out "$out/serving_bench.json" "$@" 2> "$out/serving_bench.log"
status=$?
tail -25 "$out/serving_bench.log"
exit $status
