#!/bin/bash
# gpu-ab.sh - one device call for A/B work on both kernel families: FlashInfer's prefill JIT (fa2) in the
# background; the build; the decode, prefill and runtime GPU suites side by side with compute-sanitizer
# memcheck / racecheck on small cases (also under each knob in SAN_ENVS); then kvattn's decode benchmark
# alone with the configurations in DECODE_SWEEP (bench/decode.py --sweep letters), and the prefill A/B
# (bench/prefill_ab.py: the default, each of PREFILL_CONFIGS, FlashInfer fa2, alternating, 2 rounds).
# Needs .whl (FlashInfer's wheels) carried for the prefill peer column.
# CHAIN_STRESS=N: the chained-decode test N times beside the prefill suite (another process).
# DECODE_TRACES="64x4096 16x4096:KVATTN_DECODE_PDL=0": traced decode launches read by bench/decode_trace.py
# (after ":", environment settings for that launch, "+"-separated).
#   OUT=... DECODE_SWEEP="c1s4" PREFILL_CONFIGS="KVATTN_PREFILL_BALANCE=0 ..." PREFILL_AB_ARGS="--calls 8 --host" \
#     SAN_ENVS="KVATTN_PREFILL_STAGE=1" bash scripts/gpu-ab.sh
# Returns console.log, decode.json, prefill_ab.log and logs.tgz under $OUT.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-ab}
L=$OUT/logs
mkdir -p "$L"
exec > >(tee -a "$OUT/console.log") 2>&1
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PYTHONUNBUFFERED=1 PATH=$PATH:/usr/local/cuda/bin
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache MAX_JOBS=8
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
. scripts/device-common.sh

phase device
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
PW=
if [ -n "${PREFILL_CONFIGS:-}" ] && use_flashinfer_wheels "$L"; then
  (KVATTN_LIBRARY=/nonexistent timeout 300 python3 bench/prefill.py --warmup-peers --fi-backends fa2 \
     >"$L/peer_warmup_prefill.log" 2>&1) &
  PW=$!
fi

phase build
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release >"$L/build.log" 2>&1 &&
  cmake --build build-gpu -j"$(nproc)" >>"$L/build.log" 2>&1 || { tail -40 "$L/build.log"; exit 1; }
export KVATTN_LIBRARY=$PWD/build-gpu/libkvattn.so
DEC=build-gpu/test_gpu_decode PRE=build-gpu/test_gpu_prefill RT=build-gpu/test_gpu_runtime

phase "GPU suites and compute-sanitizer, side by side"
san() { # tool binary test [ENV=V]
  local tag=$1_$(basename $2)_$3${4:+_${4//[^A-Za-z0-9]/_}}
  env ${4:-KVATTN_NOTHING=1} KVATTN_GPU_TEST_SCALE=0 timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool $1 \
    --error-exitcode 9 "$2" "$3" >"$L/$tag.log" 2>&1
  local rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$L/$tag.log" | sed "s/^/$1 $3 ${4:-}: /" | tail -1
  [ $rc = 0 ] || { echo "  FAILED ($tag)"; tail -15 "$L/$tag.log"; }
  return $rc
}
pids=()
san memcheck "$DEC" decode_small_cases & pids+=($!)
san racecheck "$DEC" decode_small_cases & pids+=($!)
san memcheck "$PRE" tail_balance & pids+=($!)
san racecheck "$PRE" tail_balance & pids+=($!)
san memcheck "$PRE" ragged_and_block_sparse & pids+=($!)
for e in ${SAN_ENVS:-}; do
  case $e in
    KVATTN_DECODE*) san memcheck "$DEC" decode_small_cases "$e" & pids+=($!); san racecheck "$DEC" decode_small_cases "$e" & pids+=($!) ;;
    *) san memcheck "$PRE" ragged_and_block_sparse "$e" & pids+=($!); san racecheck "$PRE" tiny_grid "$e" & pids+=($!) ;;
  esac
done
TT=${TEST_TIMEOUT:-240}
timeout $TT "$DEC" >"$L/decode_test.log" 2>&1 & d=$!
timeout $TT "$PRE" >"$L/prefill_test.log" 2>&1 & p=$!
timeout $TT "$RT" >"$L/runtime_test.log" 2>&1 & r=$!
for x in "decode $d" "prefill $p" "runtime $r"; do
  set -- $x
  wait $2 && echo "$1 suite: ok" || echo "$1 suite: FAIL ($1_test.log)"
  grep -E "passed|FAIL|CHECK" "$L/${1}_test.log" | tail -6
done
san_ok=1; for x in "${pids[@]}"; do wait $x || san_ok=0; done
echo "compute-sanitizer: $([ $san_ok = 1 ] && echo ok || echo FAIL)"

if [ -n "${CHAIN_STRESS:-}" ]; then
  # the chained-decode test failed twice only beside other GPU processes: run it CHAIN_STRESS times while
  # the prefill suite runs in another process
  phase "chained decodes beside the prefill suite, $CHAIN_STRESS times"
  ( for i in 1 2 3; do timeout 120 "$PRE" >/dev/null 2>&1; done ) & bg=$!
  nf=0; for i in $(seq "$CHAIN_STRESS"); do "$DEC" chained >"$L/chained_$i.log" 2>&1 || nf=$((nf+1)); done
  kill $bg 2>/dev/null; wait $bg 2>/dev/null
  echo "chained decodes beside the prefill suite: $nf of $CHAIN_STRESS failed"
  [ $nf = 0 ] || grep -h "CHECK\|diagnosis\|step 0" "$L"/chained_*.log | sort | uniq -c | head
fi
if [ -n "${DECODE_SWEEP:-}" ]; then
  phase "decode benchmark (kvattn alone, sweep $DECODE_SWEEP)"
  timeout ${DECODE_BENCH:-150} python3 bench/decode.py --no-flashinfer --no-triton --sweep "$DECODE_SWEEP" \
    --json "$OUT/decode.json" >"$L/decode_bench.log" 2>&1 || echo "decode bench rc=$? (rows so far are in decode.json)"
  [ -f "$OUT/decode.json" ] && python3 bench/decode_table.py "$OUT/decode.json" | tail -22
fi
if [ -n "${DECODE_TRACES:-}" ]; then
  # DECODE_TRACES="64x4096 16x4096:KVATTN_DECODE_PDL=0": a traced launch of `kvattn bench decode` per shape, read
  # by bench/decode_trace.py (after ":", environment settings for that launch, "+"-separated)
  phase "decode traces ($DECODE_TRACES)"
  for spec in $DECODE_TRACES; do
    shape=${spec%%:*}; tag=${spec//[^A-Za-z0-9]/_}
    extra=(KVATTN_NOTHING=1); [ "$spec" != "$shape" ] && { sets=${spec#*:}; extra+=(${sets//+/ }); }
    env "${extra[@]}" KVATTN_DECODE_TRACE="$L/trace-$tag.txt" timeout 60 build-gpu/kvattn bench decode --backend cuda \
      --batch "${shape%x*}" --kv-len "${shape#*x}" --iters 5 >"$L/trace-$tag.log" 2>&1 || echo "trace $spec rc=$?"
    echo "--- trace $spec: $(grep -E 'GB/s' "$L/trace-$tag.log" | tail -1)"
    python3 bench/decode_trace.py "$L/trace-$tag.txt" 2>&1 | tail -25
  done
fi
if [ -n "${PREFILL_CONFIGS:-}" ]; then
  phase "prefill A/B (FlashInfer JIT waiting)"
  [ -n "$PW" ] && wait $PW
  timeout ${PREFILL_AB:-240} python3 bench/prefill_ab.py --configs "$PREFILL_CONFIGS" --rounds 2 ${PREFILL_AB_ARGS:-} \
    >"$OUT/prefill_ab.log" 2>&1 ||
    echo "prefill A/B rc=$?"
  grep "^host time" "$OUT/prefill_ab.log"
  sed -n '/^| /,$p' "$OUT/prefill_ab.log" | tail -20
fi
phase done
# the device tool returns a handful of files: the logs travel as one archive
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
