#!/bin/bash
# gpu-diag-graph.sh - the decode graph-replay test repeated (default loader, and with the other GPU
# suites running beside it as in gpu-final.sh), plus racecheck on the prefill tiny grid. ~2 minutes.
set -u
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PATH=$PATH:/usr/local/cuda/bin
t0=$(date +%s)
cmake -S . -B build-d -DCMAKE_BUILD_TYPE=Release -DKVATTN_BUILD_TOOLS=OFF >/tmp/b.log 2>&1 &&
  cmake --build build-d -j16 --target test_gpu_decode test_gpu_prefill >>/tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
echo "built $(( $(date +%s) - t0 )) s"
KVATTN_GPU_TEST_SCALE=0 timeout 70 compute-sanitizer --tool racecheck --error-exitcode 9 build-d/test_gpu_prefill tiny_grid >/tmp/rc.log 2>&1
echo "racecheck prefill tiny_grid rc=$? $(grep -E 'RACECHECK SUMMARY' /tmp/rc.log) ($(( $(date +%s) - t0 )) s)"
timeout 100 build-d/test_gpu_prefill >/tmp/pf.log 2>&1 &
for i in 1 2 3 4; do
  echo "[graph #$i] $(timeout 40 build-d/test_gpu_decode one_captured 2>&1 | grep -E "graph replay:|step|passed" | tr '\n' ' ') ($(( $(date +%s) - t0 )) s)"
  [ $(( $(date +%s) - t0 )) -gt 170 ] && break
done
wait; echo "prefill suite beside: $(grep -E 'passed' /tmp/pf.log | tail -1)"
echo "done $(( $(date +%s) - t0 )) s"
