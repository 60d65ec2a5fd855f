set -u
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PATH=$PATH:/usr/local/cuda/bin
t0=$(date +%s)
cmake -S . -B build-d -DCMAKE_BUILD_TYPE=Release -DKVATTN_BUILD_TOOLS=OFF >/tmp/b.log 2>&1 && cmake --build build-d -j16 --target test_gpu_decode test_gpu_prefill >>/tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
echo "built $(( $(date +%s) - t0 )) s"
KVATTN_GPU_TEST_SCALE=0 timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 build-d/test_gpu_prefill tiny_grid 2>&1 | grep -E "RACECHECK SUMMARY|passed" &
for cfg in "X=1" "KVATTN_DECODE_EARLY_REFILL=0" "KVATTN_DECODE_PIPE=0"; do
  for i in 1 2 3 4 5; do
    echo "[$cfg #$i] $(env $cfg timeout 40 build-d/test_gpu_decode one_captured 2>&1 | grep -E "graph replay:|step" | tr '\n' ' ') ($(( $(date +%s) - t0 )) s)"
    [ $(( $(date +%s) - t0 )) -gt 200 ] && break 2
  done
done
wait
echo "done $(( $(date +%s) - t0 )) s"
