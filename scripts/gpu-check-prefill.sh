#!/bin/bash
# gpu-check-prefill.sh - the prefill family on a GPU machine in one call: build, the GPU tests
# against the float64 reference, compute-sanitizer (memcheck, racecheck) on a subset, and the
# side-by-side benchmark (bench/prefill.py: kvattn, FlashInfer fa2/fa3, PyTorch SDPA). FlashInfer
# compiles its kernels on first use (minutes): that compile runs in the background from the start,
# overlapping the build and the tests. Logs and the results JSON go to $OUT (or
# /tmp/gpu-check-prefill); a summary is printed last.
#
#   scripts/gpu-check-prefill.sh [--no-tests] [--no-sanitizer] [--no-bench] [--quick-bench] [--no-peers] [--sweep]
# Results: $OUT/prefill-<date>.json (bench) and $OUT/logs.tgz (build, tests, sanitizer, bench logs).
# Exit status 0 only when every phase that ran passed.
# Time limits (seconds) from the environment: DEADLINE for the whole script (420: the benchmark gets
# what is left, at least 60), TEST_TIMEOUT (200), SAN_TIMEOUT (45 per run), PEER_WARMUP_TIMEOUT (300).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-prefill}
# logs go to $LOGS and end up in one $OUT/logs.tgz (the device returns at most 8 files)
LOGS=$OUT/logs
mkdir -p "$OUT" "$LOGS"
TESTS=1 SAN=1 BENCH=1 PEERS=1 BENCH_ARGS=()
for a in "$@"; do
  case "$a" in
    --no-tests) TESTS=0 ;;
    --no-sanitizer) SAN=0 ;;
    --no-bench) BENCH=0 ;;
    --quick-bench) BENCH_ARGS+=(--quick) ;;
    --no-peers) PEERS=0; BENCH_ARGS+=(--no-peers) ;;
    --sweep) BENCH_ARGS+=(--sweep) ;;
  esac
done
export PATH=$PATH:/usr/local/cuda/bin
export KVATTN_CACHE_DIR=${KVATTN_CACHE_DIR:-/tmp/kvattn-cache}
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache MAX_JOBS=$(nproc)
declare -A RESULT
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

# Peers first: install the carried wheels and start FlashInfer's JIT compile in the background.
WARM_PID=
if [ "$BENCH" = 1 ] && [ "$PEERS" = 1 ]; then
  phase "peers: wheels + FlashInfer JIT (background)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >/tmp/pip.log 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || tail -5 /tmp/pip.log
  fi
  PYTHONUNBUFFERED=1 KVATTN_LIBRARY=/nonexistent timeout "${PEER_WARMUP_TIMEOUT:-300}" python3 bench/prefill.py --warmup-peers >"$LOGS/peer_warmup.log" 2>&1 &
  WARM_PID=$!
fi

phase build
if cmake -S . -B build-gpu-prefill -DCMAKE_BUILD_TYPE=Release -DKVATTN_BUILD_TOOLS=OFF >"$LOGS/build.log" 2>&1 &&
   cmake --build build-gpu-prefill -j"$(nproc)" --target kvattn kvattn_static test_gpu_prefill test_plan_prefill >>"$LOGS/build.log" 2>&1; then
  RESULT[build]=ok
else
  RESULT[build]=FAIL; tail -30 "$LOGS/build.log"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null

if [ "$TESTS" = 1 ] && [ "${RESULT[build]}" = ok ]; then
  phase "GPU tests"
  if timeout "${TEST_TIMEOUT:-200}" ./build-gpu-prefill/test_gpu_prefill >"$LOGS/gpu_test.log" 2>&1; then RESULT[gpu_tests]=ok; else RESULT[gpu_tests]=FAIL; fi
  grep -E "rel_err|FAIL|failures|passed|gpu run|token|OK" "$LOGS/gpu_test.log" | tail -70
fi

if [ "$SAN" = 1 ] && [ "${RESULT[build]}" = ok ]; then
  phase sanitizer
  if ! command -v compute-sanitizer >/dev/null; then
    RESULT[sanitizer]="FAIL (compute-sanitizer missing)"
  else
    ok=1
    for t in ${MEMCHECK_TESTS:-ragged_and_block_sparse split_kv}; do
      timeout "${SAN_TIMEOUT:-45}" compute-sanitizer --tool memcheck --error-exitcode 9 ./build-gpu-prefill/test_gpu_prefill "$t" >/tmp/san.log 2>&1 || { ok=0; tail -20 /tmp/san.log; }
      sed "s/^/memcheck $t: /" /tmp/san.log >>"$LOGS/sanitizer.log"
      grep -E "ERROR SUMMARY|passed" /tmp/san.log | sed "s/^/memcheck $t: /"
    done
    for t in ${RACECHECK_TESTS:-tiny_grid}; do
      timeout "${SAN_TIMEOUT:-45}" compute-sanitizer --tool racecheck --error-exitcode 9 ./build-gpu-prefill/test_gpu_prefill "$t" >/tmp/san.log 2>&1 || { ok=0; tail -20 /tmp/san.log; }
      sed "s/^/racecheck $t: /" /tmp/san.log >>"$LOGS/sanitizer.log"
      grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed" /tmp/san.log | sed "s/^/racecheck $t: /"
    done
    [ $ok = 1 ] && RESULT[sanitizer]=ok || RESULT[sanitizer]=FAIL
  fi
fi

if [ "$BENCH" = 1 ] && [ "${RESULT[build]}" = ok ]; then
  if [ -n "$WARM_PID" ]; then
    phase "waiting for FlashInfer's compile"
    wait "$WARM_PID"
    cat "$LOGS/peer_warmup.log" | tail -12
  fi
  if [ -n "$WARM_PID" ]; then
    # time only the FlashInfer backends whose paged and ragged modules compiled
    fi=""
    for be in fa2 fa3; do
      [ "$(grep -c "^flashinfer $be .* ready" "$LOGS/peer_warmup.log")" -ge 4 ] && fi="$fi${fi:+,}$be"
    done
    BENCH_ARGS+=(--fi-backends "$fi")
    echo "FlashInfer backends ready: ${fi:-none}"
  fi
  left=$(( ${DEADLINE:-420} - ($(date +%s) - t0) ))
  [ $left -lt 60 ] && left=60
  phase "bench (limit $left s)"
  if PYTHONUNBUFFERED=1 KVATTN_LIBRARY=$PWD/build-gpu-prefill/libkvattn.so timeout "$left" python3 bench/prefill.py --out "$OUT" "${BENCH_ARGS[@]}" \
      2>&1 | tee "$LOGS/bench.log"; then RESULT[bench]=ok; else RESULT[bench]=FAIL; fi
fi

tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
phase summary
for k in build gpu_tests sanitizer bench; do printf "%-10s %s\n" "$k" "${RESULT[$k]:-skipped}"; done
[ "${RESULT[build]:-}" = ok ] && [ "${RESULT[gpu_tests]:-ok}" = ok ] && [ "${RESULT[sanitizer]:-ok}" = ok ] &&
  [ "${RESULT[bench]:-ok}" = ok ]
