#!/usr/bin/env bash
# End-to-end check on a GPU machine without registry access: install the staged CuTe DSL bundle
# (.gpu/, copied from shared/gpu), install this package, run the GPU tests and the benchmark.
# Usage: bash tools/gpu_check.sh [pytest -k expression] ; results land in $OUT (or ./bench_results).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bash .gpu/install-dsl.sh || exit 1
python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -m pytest -m gpu -q -x tests ${1:+-k "$1"} 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m cute_moe.tools.bench --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
