#!/usr/bin/env bash
# GPU check of the FP4-weight kernels (docs/fp4.md), staged so that a fault of the new swap-AB kernel
# cannot hide the other results: each stage is its own process (a CUDA fault kills its context).
#   1. small swap-AB cases of both pairs (K = 32 / 96 / 160 / 4096, one and two consumer warpgroups),
#      CUDA_LAUNCH_BLOCKING=1, stop at the first failure
#      (full output: $OUT/fp4_first.log);
#   2. every test with the swap-AB kernel off in the rules (CUTE_MOE_FP4_SWAP_AB=0: the
#      widen-in-shared-memory kernel):
#      $OUT/fp4_old.log; on a second GPU in parallel when there is one;
#   3. every test with the rules' default, the swap-AB kernel: $OUT/fp4_swap.log;
#   4. the quick benchmark (rules' default): $OUT/fp4/bench_fp4.md, log $OUT/fp4_bench.log.
# Usage (repo root, package installed): bash tools/fp4_gpu_check.sh ; about 6 minutes on one H200
# (stage 2 runs beside stages 1, 3, 4 on a second GPU: at most 90 + 240 + 170 s; one GPU: + 170 s).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." && out=${OUT:-bench_results} && mkdir -p "$out" || exit 1
tests=(python3 -m pytest -q -m gpu tests/test_gpu_fp4.py -p no:cacheprovider --timeout 90)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)

old_tests() {
    CUTE_MOE_FP4_SWAP_AB=0 timeout 170 "${tests[@]}" -k "not swap" > "$out/fp4_old.log" 2>&1
    echo "stage 2 (swap-AB off) rc=$?" >> "$out/fp4_old.log"
}
if [ "$gpus" -ge 2 ]; then
    (export CUDA_VISIBLE_DEVICES=1; old_tests) &
    old_pid=$!
fi

echo "=== stage 1: first swap-AB launches (CUDA_LAUNCH_BLOCKING=1)"
CUDA_LAUNCH_BLOCKING=1 CUTE_MOE_DEBUG=1 timeout 90 "${tests[@]}" -x \
    -k "swap_ab_masked_k_block_counts or (swap_ab_masked_every_tile and 16-128)" \
    > "$out/fp4_first.log" 2>&1
echo "stage 1 rc=$?"
tail -n 30 "$out/fp4_first.log"

if [ "$gpus" -lt 2 ]; then
    old_tests
fi

echo "=== stage 3: all tests, rules on the swap-AB kernel (the default)"
timeout 240 "${tests[@]}" -k "not shared-widen and not every_tile_shape" \
    > "$out/fp4_swap.log" 2>&1
echo "stage 3 rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/fp4_swap.log" | tail -n 40

echo "=== stage 4: quick benchmark (the rules' default: the swap-AB kernel)"
CUTE_MOE_PRINT_CONFIGS=1 timeout 170 python3 -m cute_moe.tools.bench_fp4 --out "$out/fp4" \
    --quick > "$out/fp4_bench.log" 2>&1
echo "stage 4 rc=$?"
tail -n 40 "$out/fp4_bench.log"

if [ "$gpus" -ge 2 ]; then
    wait "$old_pid"
fi
echo "=== stage 2: all tests, swap-AB kernel off"
grep -E "^(FAILED|ERROR)|passed|failed|rc=" "$out/fp4_old.log" | tail -n 20
