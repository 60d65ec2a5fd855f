#!/bin/bash
# gpu-weights.sh - one device call on the decode lists weighted by SM speed: the build; the decode and runtime GPU
# suites with memcheck / racecheck on the small decode cases (beside); the SM rate probe in each form of
# PROBES (printed per-SM rates); a traced b64 x 4096 launch without weights, whose per-SM rates are compared with
# each probe's (bench/sm_rates.py) and give a weights list; then kvattn's decode benchmark alone, each row with
# the context's (probe) weights, none (u0), equal weights through the claim path, and the trace's weights; last a
# traced launch under the trace's weights. No peers: FlashInfer's numbers come from gpu-final.sh.
#   OUT=... PROBES="a:-DPROBE_STAGES=4 b:-DPROBE_GATHER=8_-DPROBE_STAGES=2_-DPROBE_VECS=16" bash scripts/gpu-weights.sh
# (a probe's defines with _ for spaces). Returns console.log, decode.json and logs.tgz under $OUT.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-weights}
L=$OUT/logs
mkdir -p "$L"
exec > >(tee -a "$OUT/console.log") 2>&1
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PYTHONUNBUFFERED=1 PATH=$PATH:/usr/local/cuda/bin
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

phase device
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
phase build
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release >"$L/build.log" 2>&1 &&
  cmake --build build-gpu -j"$(nproc)" >>"$L/build.log" 2>&1 || { tail -40 "$L/build.log"; exit 1; }
export KVATTN_LIBRARY=$PWD/build-gpu/libkvattn.so
DEC=build-gpu/test_gpu_decode RT=build-gpu/test_gpu_runtime
K=build-gpu/kvattn

phase "decode and runtime suites, sanitizers beside"
san() { # tool test
  env KVATTN_GPU_TEST_SCALE=0 timeout 150 compute-sanitizer --tool $1 --error-exitcode 9 "$DEC" "$2" >"$L/$1_$2.log" 2>&1
  local rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$L/$1_$2.log" | sed "s/^/$1 $2: /" | tail -1
  [ $rc = 0 ] || { echo "  FAILED ($1 $2)"; tail -15 "$L/$1_$2.log"; }
}
san memcheck decode_small_cases & s1=$!
san racecheck decode_small_cases & s2=$!
san memcheck weighted_lists & s3=$!
timeout 200 "$DEC" >"$L/decode_test.log" 2>&1 & d=$!
timeout 200 "$RT" >"$L/runtime_test.log" 2>&1 & r=$!
for x in "decode $d" "runtime $r"; do
  set -- $x
  wait $2 && echo "$1 suite: ok" || echo "$1 suite: FAIL ($1_test.log)"
  grep -E "passed|FAIL|CHECK|weighted|launch [12]" "$L/${1}_test.log" | tail -8
done
wait $s1 $s2 $s3

phase "SM rate probes"
probe_args=()
for p in ${PROBES:-default:}; do
  name=${p%%:*}; defs=${p#*:}; defs=${defs//_/ }
  KVATTN_SM_PROBE_DEFINES="$defs" KVATTN_DECODE_SM_RATES_PRINT=1 timeout 60 $K bench decode --backend cuda --batch 1 \
    --kv-len 64 --iters 1 >"$L/probe-$name.log" 2>&1 || echo "probe $name rc=$?"
  probe_args+=(--probe "$name=$L/probe-$name.log")
  echo "probe $name [$defs]: $(grep -c 'SM rate' "$L/probe-$name.log") SMs"
done

phase "traced b64 x 4096 without weights; the probes against it"
KVATTN_DECODE_SM_WEIGHTS=0 KVATTN_DECODE_TRACE="$L/trace-u0.txt" timeout 60 $K bench decode --backend cuda --batch 64 \
  --kv-len 4096 --iters 5 >"$L/trace-u0.log" 2>&1 || echo "trace rc=$?"
python3 bench/sm_rates.py "$L/trace-u0.txt" "${probe_args[@]}" --weights-out "$OUT/trace_weights.txt"
python3 bench/decode_trace.py "$L/trace-u0.txt" | tail -4

phase "decode benchmark: probe weights, none, equal (claimed), the trace's"
timeout ${DECODE_BENCH:-170} python3 bench/decode.py --no-flashinfer --no-triton \
  --sweep "u0,@KVATTN_DECODE_SM_WEIGHTS=1.0,@KVATTN_DECODE_SM_WEIGHTS=@$OUT/trace_weights.txt" \
  --json "$OUT/decode.json" >"$L/decode_bench.log" 2>&1 || echo "decode bench rc=$?"
grep "kvattn context" "$L/decode_bench.log"
python3 - "$OUT/decode.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
names = None
for k, e in d["workloads"].items():
    cs = [c for c in e if c.startswith("kvattn") and isinstance(e[c], dict) and "us" in e[c]]
    if names is None:
        names = cs
        print("| row | " + " | ".join(c.replace("KVATTN_DECODE_SM_WEIGHTS=", "w=")[:28] for c in cs) + " |")
    print("| %s | " % k + " | ".join("%.1f" % e[c]["us"] if c in e and "us" in e[c] else "-" for c in names) + " |")
EOF

phase "traced b64 x 4096 and b16 x 4096 under the trace's weights"
for shape in 64x4096 16x4096; do
  KVATTN_DECODE_SM_WEIGHTS=$(cat "$OUT/trace_weights.txt") KVATTN_DECODE_TRACE="$L/trace-w-$shape.txt" timeout 60 $K \
    bench decode --backend cuda --batch ${shape%x*} --kv-len ${shape#*x} --iters 5 >"$L/trace-w-$shape.log" 2>&1
  echo "--- $shape: $(grep -E 'GB/s' "$L/trace-w-$shape.log" | tail -1)"
  python3 bench/decode_trace.py "$L/trace-w-$shape.txt" | grep -E "first tile ->|exits:|streaming part|tiles per CTA"
done
phase done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
