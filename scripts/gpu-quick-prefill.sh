#!/bin/bash
# gpu-quick-prefill.sh - a short prefill iteration on the device: build, the GPU prefill tests (or a
# filter), and kvattn-only timings of the headline workloads (bench/prefill_one.py). No peers.
#   OUT=... bash scripts/gpu-quick-prefill.sh [test-filter]
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-quick}
mkdir -p "$OUT"
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PYTHONUNBUFFERED=1
t0=$(date +%s)
cmake -S . -B build-q -DCMAKE_BUILD_TYPE=Release -DKVATTN_BUILD_TOOLS=OFF >"$OUT/build.log" 2>&1 &&
  cmake --build build-q -j"$(nproc)" --target kvattn test_gpu_prefill >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "built ($(( $(date +%s) - t0 )) s)"
timeout ${TEST_TIMEOUT:-150} ./build-q/test_gpu_prefill ${1:-} >"$OUT/gpu_test.log" 2>&1; rc=$?
grep -E "FAIL|passed|failed|rel_err" "$OUT/gpu_test.log" | tail -40
echo "gpu tests rc=$rc ($(( $(date +%s) - t0 )) s)"
export KVATTN_LIBRARY=$PWD/build-q/libkvattn.so
for spec in "4 4096 ragged" "4 4096 paged16" "4 4096 paged1" "16 1024 ragged" "16 1024 paged16" "1 16384 paged16"; do
  set -- $spec
  timeout 60 python3 bench/prefill_one.py --batch $1 --len $2 --format $3 --reps 9 2>&1 | tail -1
done
timeout 60 python3 bench/prefill_one.py --batch 4 --len 4096 --format paged16 --full --reps 9 2>&1 | tail -1
# knobs given as "ENV=V ..." in $KNOBS, each timed on two workloads
for e in ${KNOBS:-}; do
  for spec in "4 4096 ragged" "16 1024 ragged" "16 1024 paged16"; do set -- $spec
    echo "[$e] $(env ${e//,/ } timeout 60 python3 bench/prefill_one.py --batch $1 --len $2 --format $3 --reps 9 2>&1 | tail -1)"
  done
done
echo "done ($(( $(date +%s) - t0 )) s)"
