#!/bin/bash
# gpu-quick-decode.sh - one short device call for decode work: build, the decode GPU tests and the decode
# planner test, compute-sanitizer memcheck + racecheck on the small decode cases (--sanitizer), then
# bench/decode.py for kvattn alone (no FlashInfer, no Triton) with A/B configurations in the same run
# (--sweep, the letters of bench/decode.py's with_env), and the tables last (bench/decode_table.py).
# Everything lands in $OUT (or /tmp/gpu-quick-decode): console.log, decode_test.log, decode.json.
#
#   scripts/gpu-quick-decode.sh [--no-tests] [--sanitizer] [--sweep g0w0,g0,w0] [--bench-args "..."]
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-quick-decode}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/console.log") 2>&1
TESTS=1 SAN=0 SWEEP="" BENCH_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) TESTS=0 ;;
    --sanitizer) SAN=1 ;;
    --sweep) shift; SWEEP=$1 ;;
    --bench-args) shift; BENCH_ARGS="$BENCH_ARGS $1" ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
export KVATTN_CACHE_DIR=${KVATTN_CACHE_DIR:-/tmp/kvattn-cache}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
declare -A R
ORDER=()
result() { R[$1]=$2; ORDER+=("$1"); }

phase "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
phase "build"
if cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
   cmake --build build-gpu -j"$(nproc)" --target kvattn test_gpu_decode test_plan_decode >>"$OUT/build.log" 2>&1; then
  result build ok
else
  result build FAIL; tail -30 "$OUT/build.log"
fi

if [ "$TESTS" = 1 ] && [ "${R[build]}" = ok ]; then
  phase "decode GPU tests"
  build-gpu/test_gpu_decode >"$OUT/decode_test.log" 2>&1 && result decode_tests ok || result decode_tests FAIL
  grep -E "graph replay|chained|passed|FAIL|CHECK|error" "$OUT/decode_test.log" | tail -30
  build-gpu/test_plan_decode 2>&1 | grep -E "plan_decode|passed" | tail -3
fi

if [ "$SAN" = 1 ] && [ "${R[build]}" = ok ]; then
  phase "compute-sanitizer (decode small cases)"
  ok=1
  for tool in memcheck racecheck; do
    KVATTN_GPU_TEST_SCALE=0 compute-sanitizer --tool $tool --error-exitcode 9 build-gpu/test_gpu_decode \
      decode_small_cases >"$OUT/san_$tool.log" 2>&1 || { ok=0; tail -20 "$OUT/san_$tool.log"; }
    grep -E "SUMMARY|passed" "$OUT/san_$tool.log" | sed "s/^/$tool: /"
  done
  [ $ok = 1 ] && result sanitizer ok || result sanitizer FAIL
fi

if [ "${R[build]}" = ok ]; then
  phase "benchmark (kvattn alone)"
  export KVATTN_LIBRARY=$PWD/build-gpu/libkvattn.so
  if timeout "${BENCH_TIMEOUT:-150}" python3 bench/decode.py --json "$OUT/decode.json" --no-flashinfer --no-triton \
      ${SWEEP:+--sweep $SWEEP} $BENCH_ARGS; then
    result bench ok
  else
    result bench "FAIL or cut short (rows so far are in decode.json)"
  fi
  [ -f "$OUT/decode.json" ] && python3 bench/decode_table.py "$OUT/decode.json"
fi
phase "summary"
for k in "${ORDER[@]}"; do echo "$k: ${R[$k]}"; done
