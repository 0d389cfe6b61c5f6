#!/usr/bin/env bash
# The whole GPU check in one call (issue 10): each Triton kernel against its PyTorch twin on the GPU with fresh
# random inputs, the fast path against the reference path (eager and CUDA graphs), then the benchmarks.
#   bash bench/gpu_check.sh [OUT_DIR]       (the device image has torch/triton/transformers/peft; .whl carries pydantic)
# Environment: CHECKS (test files, or "none"), BENCHES (default "inference"; "finetune", or "inference finetune"),
# BENCH_ARGS (extra flags for every benchmark), BENCH_TIMEOUT (seconds per benchmark, default 420).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/coserve-gpu}}"
mkdir -p "$out"
source bench/device_env.sh
tests="${CHECKS:-tests/test_kernel_attention.py tests/test_kernel_lora.py tests/test_kernel_fused_ops.py \
    tests/test_kernel_sampling.py tests/test_kernel_gemv.py tests/test_fast_path.py tests/test_unit_graphs.py tests/test_finetune_ops.py \
    tests/test_engine_overlap.py tests/test_kernel_cross_entropy.py}"
if [ "$tests" != none ]; then
    python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tee "$out/kernels.log" | tail -15
fi
for bench in ${BENCHES:-inference}; do
    log="$out/bench.log"
    [ "$bench" = inference ] || log="$out/$bench.log"
    timeout "${BENCH_TIMEOUT:-420}" python3 "bench/${bench}_bench.py" --out "$out/$bench.json" ${BENCH_ARGS:-} \
        2> "$log"
    tail -5 "$log"
done
