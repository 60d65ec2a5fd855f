#!/bin/bash
# gpu-check-prefill.sh - the prefill family on a GPU machine in one go: build, the GPU tests
# against the float64 reference, compute-sanitizer (memcheck, racecheck) on a subset, the resource
# report of the loaded kernels, and the side-by-side benchmark (bench/prefill.py). Logs go to
# $OUT (or /tmp/gpu-check-prefill); a summary table is printed last.
#
#   scripts/gpu-check-prefill.sh [--no-tests] [--no-sanitizer] [--no-bench] [--quick-bench] [--no-peers]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-prefill}
mkdir -p "$OUT"
TESTS=1 SAN=1 BENCH=1 BENCH_ARGS=()
for a in "$@"; do
  case "$a" in
    --no-tests) TESTS=0 ;;
    --no-sanitizer) SAN=0 ;;
    --no-bench) BENCH=0 ;;
    --quick-bench) BENCH_ARGS+=(--quick) ;;
    --no-peers) BENCH_ARGS+=(--no-peers) ;;
    --sweep) BENCH_ARGS+=(--sweep) ;;
  esac
done
export PATH=$PATH:/usr/local/cuda/bin
export KVATTN_CACHE_DIR=${KVATTN_CACHE_DIR:-/tmp/kvattn-cache}
declare -A RESULT
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

phase build
if cmake -S . -B build-gpu-prefill -DCMAKE_BUILD_TYPE=Release -DKVATTN_BUILD_TOOLS=OFF >"$OUT/build.log" 2>&1 &&
   cmake --build build-gpu-prefill -j"$(nproc)" --target kvattn kvattn_static test_gpu_prefill test_plan_prefill >>"$OUT/build.log" 2>&1; then
  RESULT[build]=ok
else
  RESULT[build]=FAIL; tail -30 "$OUT/build.log"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

if [ "$TESTS" = 1 ] && [ "${RESULT[build]}" = ok ]; then
  phase "GPU tests"
  if timeout "${TEST_TIMEOUT:-240}" ./build-gpu-prefill/test_gpu_prefill >"$OUT/gpu_test.log" 2>&1; then RESULT[gpu_tests]=ok; else RESULT[gpu_tests]=FAIL; fi
  grep -E "rel_err|FAIL|failures|passed|skipped|gpu run" "$OUT/gpu_test.log" | tail -60
fi

if [ "$SAN" = 1 ] && [ "${RESULT[build]}" = ok ]; then
  phase sanitizer
  if ! command -v compute-sanitizer >/dev/null; then
    RESULT[sanitizer]="FAIL (compute-sanitizer missing)"
  else
    ok=1
    for t in ${MEMCHECK_TESTS:-ragged_and_block_sparse split_kv}; do
      timeout ${SAN_TIMEOUT:-75} compute-sanitizer --tool memcheck --error-exitcode 9 ./build-gpu-prefill/test_gpu_prefill "$t" >"$OUT/memcheck_$t.log" 2>&1 || { ok=0; tail -20 "$OUT/memcheck_$t.log"; }
      grep -E "ERROR SUMMARY|passed" "$OUT/memcheck_$t.log" | sed "s/^/memcheck $t: /"
    done
    for t in ${RACECHECK_TESTS:-tiny_grid}; do
      timeout ${SAN_TIMEOUT:-75} compute-sanitizer --tool racecheck --error-exitcode 9 ./build-gpu-prefill/test_gpu_prefill "$t" >"$OUT/racecheck_$t.log" 2>&1 || { ok=0; tail -20 "$OUT/racecheck_$t.log"; }
      grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed" "$OUT/racecheck_$t.log" | sed "s/^/racecheck $t: /"
    done
    [ $ok = 1 ] && RESULT[sanitizer]=ok || RESULT[sanitizer]=FAIL
  fi
fi

if [ "$BENCH" = 1 ] && [ "${RESULT[build]}" = ok ]; then
  phase bench
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/pip.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache MAX_JOBS=$(nproc)
  if PYTHONUNBUFFERED=1 KVATTN_LIBRARY=$PWD/build-gpu-prefill/libkvattn.so timeout "${BENCH_TIMEOUT:-400}" python3 bench/prefill.py --out "$OUT" "${BENCH_ARGS[@]}" \
      2>&1 | tee "$OUT/bench.log"; then RESULT[bench]=ok; else RESULT[bench]=FAIL; fi
  cp "$OUT"/prefill-*.json bench/results/ 2>/dev/null
fi

phase summary
for k in build gpu_tests sanitizer bench; do printf "%-10s %s\n" "$k" "${RESULT[$k]:-skipped}"; done
