#!/bin/bash
# gpu-check.sh - the GPU half of kvattn on a GPU machine, in one call: build, the GPU tests (ctest -L
# gpu) against the float64 reference, compute-sanitizer memcheck and racecheck on the decode tests'
# small cases (the script FAILS when compute-sanitizer is missing), the decode benchmark
# (bench/decode.py: kvattn vs FlashInfer vs Triton vs the copy bandwidth), and a summary table last.
# The JSON goes to $OUT (or /tmp/gpu-check), the logs to $OUT/logs.tgz.
#
#   scripts/gpu-check.sh [--no-tests] [--no-other-tests] [--no-sanitizer] [--no-bench] [--quick-bench]
#                        [--bench-args "..."] [--profile]
# DEADLINE=<seconds> (env): the benchmark gets what is left of it (at least 60 s) and stops there.
# --profile: Nsight Compute reports of one decode launch (b1 and b64 x 4096, page 16) after the bench.
# FlashInfer travels as wheels in .whl/ (see the device README); without them the bench runs without it.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
L="$OUT/logs"  # packed into $OUT/logs.tgz at the end (the device tool returns at most 8 files)
mkdir -p "$L"
exec > >(tee -a "$OUT/console.log") 2>&1  # what is printed survives a run cut short
BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
TESTS=1 OTHER_TESTS=1 SAN=1 BENCH=1 PROFILE=0 BENCH_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) TESTS=0 ;;
    --no-other-tests) OTHER_TESTS=0 ;;
    --no-sanitizer) SAN=0 ;;
    --no-bench) BENCH=0 ;;
    --profile) PROFILE=1 ;;
    --quick-bench) BENCH_ARGS="$BENCH_ARGS --quick" ;;
    --bench-args) shift; BENCH_ARGS="$BENCH_ARGS $1" ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
export KVATTN_CACHE_DIR=${KVATTN_CACHE_DIR:-/tmp/kvattn-cache}
export PYTHONUNBUFFERED=1
declare -A R
ORDER=()
result() { R[$1]=$2; ORDER+=("$1"); }
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

phase "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>&1 | tee "$L/gpu.txt"

# FlashInfer's wheels, and its decode modules compiled in the background while we build and test
WARM_PID=""
if [ "$BENCH" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$L/pip.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || tail -5 "$L/pip.log"
  export FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws
  (timeout 180 python3 bench/decode.py --warmup-peers >"$L/peer_warmup.log" 2>&1) &
  WARM_PID=$!
fi

phase "build"
if cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release >"$L/build.log" 2>&1 &&
   cmake --build build-gpu -j"$(nproc)" >>"$L/build.log" 2>&1; then
  result build ok
else
  result build FAIL; tail -40 "$L/build.log"
fi
DEC=build-gpu/test_gpu_decode
[ -x "$DEC" ] || DEC=build-gpu/gpu_test_gpu_decode

if [ "$TESTS" = 1 ] && [ "${R[build]}" = ok ]; then
  phase "decode GPU tests"
  "$DEC" >"$L/decode_test.log" 2>&1 && result decode_tests ok || result decode_tests "FAIL (see decode_test.log)"
  grep -E "prewarm|^  (random|small|options|batch|all_|short|exact|last|group|mha|page|odd|heavy)|passed|FAIL|CHECK|returned|graph replay|kvattn_plan|verify|error" "$L/decode_test.log" | tail -150
  ./build-gpu/test_plan_decode 2>&1 | grep -E "plan_decode|heavy|passed" | tee -a "$L/decode_test.log"
fi
if [ "$TESTS" = 1 ] && [ "$OTHER_TESTS" = 1 ] && [ "${R[build]}" = ok ]; then
  phase "the other GPU tests (ctest -L gpu)"
  (cd build-gpu && ctest -L gpu -E 'test_gpu_decode$' --output-on-failure --timeout 300) >"$L/gpu_tests.log" 2>&1
  rc=$?
  grep -E "tests passed|Test +#|FAIL|failed" "$L/gpu_tests.log" | tail -20
  [ $rc = 0 ] && result other_gpu_tests ok || result other_gpu_tests "FAIL (see gpu_tests.log)"
fi

if [ "$SAN" = 1 ] && [ "${R[build]}" = ok ]; then
  phase "compute-sanitizer"
  if ! command -v compute-sanitizer >/dev/null; then
    result memcheck "FAIL (compute-sanitizer missing)"
    result racecheck "FAIL (compute-sanitizer missing)"
  else
    ok=1
    for t in decode_small_cases merge_states append_paged_kv; do
      KVATTN_GPU_TEST_SCALE=0 compute-sanitizer --tool memcheck --error-exitcode 9 "$DEC" "$t" >"$L/memcheck_$t.log" 2>&1 || { ok=0; tail -25 "$L/memcheck_$t.log"; }
      grep -E "ERROR SUMMARY|passed" "$L/memcheck_$t.log" | sed "s/^/memcheck $t: /"
    done
    [ $ok = 1 ] && result memcheck ok || result memcheck FAIL
    ok=1
    for t in decode_small_cases merge_states; do
      KVATTN_GPU_TEST_SCALE=0 compute-sanitizer --tool racecheck --error-exitcode 9 "$DEC" "$t" >"$L/racecheck_$t.log" 2>&1 || { ok=0; tail -25 "$L/racecheck_$t.log"; }
      grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed" "$L/racecheck_$t.log" | sed "s/^/racecheck $t: /"
    done
    [ $ok = 1 ] && result racecheck ok || result racecheck FAIL
  fi
fi

if [ "$BENCH" = 1 ] && [ "${R[build]}" = ok ]; then
  phase "benchmark"
  export KVATTN_LIBRARY=$PWD/build-gpu/libkvattn.so
  if [ -n "${DEADLINE:-}" ]; then
    left=$(( DEADLINE - ($(date +%s) - t0) - 10 ))
    [ $left -lt 60 ] && left=60
    BENCH_TIMEOUT=$left
  fi
  [ -n "$WARM_PID" ] && { wait "$WARM_PID" 2>/dev/null; tail -3 "$L/peer_warmup.log"; }
  if timeout "$BENCH_TIMEOUT" python3 bench/decode.py --json "$OUT/decode.json" $BENCH_ARGS 2>&1 | tee "$L/bench.log"; then
    result bench ok
  else
    result bench "FAIL or cut at ${BENCH_TIMEOUT}s (rows so far are in decode.json)"
  fi
fi

if [ "$PROFILE" = 1 ] && [ "${R[build]}" = ok ]; then
  phase "profile (ncu, one decode launch)"
  export KVATTN_LIBRARY=$PWD/build-gpu/libkvattn.so
  if command -v ncu >/dev/null; then
    ok=1
    for w in b1_L4096 b64_L4096; do
      ncu --target-processes all -k regex:decode_paged --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section LaunchStats python3 bench/decode.py --only $w --quick --no-flashinfer \
        --no-triton >"$L/ncu_$w.log" 2>&1 || ok=0
      echo "--- ncu $w"
      grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Stall|Warp Cycles Per Issued|Issued Ipc|Block Limit|L2 Hit|Mem Busy|Max Bandwidth|Eligible|No Eligible|One or More|Dynamic Shared|Grid Size|Waves" "$L/ncu_$w.log" | head -40
    done
    [ $ok = 1 ] && result profile ok || result profile FAIL
  else
    result profile "FAIL (ncu missing)"
  fi
fi

tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
phase "summary"
echo "| step | result |"
echo "|---|---|"
for k in "${ORDER[@]}"; do echo "| $k | ${R[$k]} |"; done
bad=0
for k in "${ORDER[@]}"; do case "${R[$k]}" in ok) ;; *) bad=1 ;; esac; done
exit $bad
