#!/usr/bin/env bash
# GPU check of the FP4-weight kernels (docs/fp4.md), in one command: the GPU tests (stopping at the first
# failure, so that a fault cannot hide behind later results) and the benchmark on the three FP4 presets
# of issue 10. Each stage is its own process (a CUDA fault kills its process's context):
#   1. the swap-AB kernel's new tiles first (three and four consumer warpgroups, the gpt-oss-120b shape
#      with the rules' 16 x 256 tile), CUDA_LAUNCH_BLOCKING=1 CUTE_MOE_DEBUG=1, -x: $OUT/fp4_first.log;
#   2. every other FP4 GPU test, -x: $OUT/fp4_tests.log;
#   3. the benchmark (rules' configs): gpt-oss-120b, DeepSeek-V4-Flash, Qwen3-235B-A22B gate_up at EP 8,
#      masked decode at expected_m 8 / 16 / 64 and contiguous prefill, plus every swap-AB weight-row
#      tile of gpt-oss-120b's decode (expected_m <= 16) and prefill problems (--tile-sweep):
#      $OUT/fp4/bench_fp4.md, log $OUT/fp4_bench.log.
# With two GPUs the benchmark runs on the second beside the tests (about 6-7 minutes in all, most of
# it compiling); with one, after them (about 11 minutes).
# Usage (repo root, package installed): OUT=/some/dir bash tools/fp4_gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." && out=${OUT:-bench_results} && mkdir -p "$out" || exit 1
tests=(python3 -m pytest -q -m gpu tests/test_gpu_fp4.py -p no:cacheprovider --timeout 120 -x)
first="(swap_ab_masked_every_tile and (192 or 256)) or bf16_wide_tiles or gpt_oss_shape"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)

bench() {
    CUTE_MOE_PRINT_CONFIGS=1 timeout 480 python3 -m cute_moe.tools.bench_fp4 --out "$out/fp4" --quick \
        --models gpt-oss-120b,DeepSeek-V4-Flash,Qwen3-235B-A22B --tile-sweep gpt-oss-120b > "$out/fp4_bench.log" 2>&1
    echo "stage 3 (benchmark) rc=$?" >> "$out/fp4_bench.log"
}
if [ "$gpus" -ge 2 ]; then
    (export CUDA_VISIBLE_DEVICES=1; bench) &
    bench_pid=$!
fi

echo "=== stage 1: the new swap-AB tiles (CUDA_LAUNCH_BLOCKING=1, stop at the first failure)"
CUDA_LAUNCH_BLOCKING=1 CUTE_MOE_DEBUG=1 timeout 240 "${tests[@]}" -k "$first" > "$out/fp4_first.log" 2>&1
echo "stage 1 rc=$?"
tail -n 15 "$out/fp4_first.log"

echo "=== stage 2: every other FP4 GPU test (stop at the first failure)"
timeout 330 "${tests[@]}" -k "not ($first)" > "$out/fp4_tests.log" 2>&1
echo "stage 2 rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/fp4_tests.log" | tail -n 20

if [ "$gpus" -ge 2 ]; then
    wait "$bench_pid"
else
    bench
fi
echo "=== stage 3: benchmark ($out/fp4/bench_fp4.md)"
tail -n 60 "$out/fp4_bench.log"
