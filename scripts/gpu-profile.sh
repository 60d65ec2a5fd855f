#!/bin/bash
# gpu-profile.sh - Nsight Compute on one launch of each kernel that misses its bar, plus the SASS of
# the prefill and decode cubins the runs compiled, in one device call. Logs to $OUT/profile.tgz.
#   OUT=... bash scripts/gpu-profile.sh [prefill] [prefill-src] [decode]
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-profile}
L=$OUT/prof
mkdir -p "$L"
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PYTHONUNBUFFERED=1 PATH=$PATH:/usr/local/cuda/bin
WHAT=${*:-prefill decode}
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
phase build
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
. scripts/device-common.sh
use_kvattn_library "$L" || exit 1  # a library built earlier in the same call is used as is
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats --section InstructionStats --section SourceCounters"
KEY="Duration|Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Warp Cycles Per Issued|Issued Ipc|Issue Slots Busy|No Eligible|Eligible Warps|Block Limit|L2 Hit|Bank|Stall|Grid Size|Executed Ipc|Pipe|Dynamic Shared"
prof() {  # name regex command...
  local n=$1 k=$2; shift 2
  timeout 120 ncu --clock-control none --target-processes all -k "regex:$k" --launch-skip 1 --launch-count 1 $SECTIONS \
    --print-details all "$@" >"$L/ncu_$n.log" 2>&1
  echo "--- $n"; grep -E "$KEY" "$L/ncu_$n.log" | grep -v "^==" | head -45
}
case " $WHAT " in *" prefill "*)
  phase "prefill timings"
  for f in ragged paged16 paged1; do python3 bench/prefill_one.py --batch 4 --len 4096 --format $f --reps 9; done
  python3 bench/prefill_one.py --batch 16 --len 1024 --format ragged --reps 9
  # kernel-shape knobs, one at a time (KV tile, warps of the 128-row tile, scale folded into exp2)
  for e in KVATTN_PREFILL_KV_TILE=32 KVATTN_PREFILL_FOLD=1 KVATTN_PREFILL_WARPS128=8 "KVATTN_PREFILL_WARPS128=8 KVATTN_PREFILL_KV_TILE=128"; do
    echo "[$e] $(env $e python3 bench/prefill_one.py --batch 4 --len 4096 --format ragged --reps 9 | tail -1)"
    echo "[$e] $(env $e python3 bench/prefill_one.py --batch 16 --len 1024 --format ragged --reps 9 | tail -1)"
  done
  phase "prefill ncu"
  prof prefill_ragged prefill_kernel python3 bench/prefill_one.py --batch 4 --len 4096 --format ragged --reps 1
  prof prefill_paged1 prefill_kernel python3 bench/prefill_one.py --batch 4 --len 4096 --format paged1 --reps 1
  ;; esac
case " $WHAT " in *" prefill-src "*)
  # where a short-row item's time goes: per-instruction stall samples of the ragged 16x1024 kernel,
  # exported as CSV (read with the SASS here: no ncu needed on the reading machine)
  phase "prefill ncu, source counters (ragged 16x1024)"
  timeout 150 ncu --clock-control none -k regex:prefill_kernel --launch-skip 1 --launch-count 1 --import-source no \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section Occupancy -f -o "$L/pf16" \
    python3 bench/prefill_one.py --batch 16 --len 1024 --format ragged --reps 1 >"$L/pf16.log" 2>&1 || tail -5 "$L/pf16.log"
  ncu -i "$L/pf16.ncu-rep" --page source --csv --print-source sass >"$L/pf16_sass.csv" 2>&1
  ncu -i "$L/pf16.ncu-rep" --print-details all >"$L/pf16_details.txt" 2>&1
  grep -E "$KEY" "$L/pf16_details.txt" | head -40; wc -l "$L/pf16_sass.csv"
  ;; esac
case " $WHAT " in *" decode "*)
  phase "decode ncu"
  prof decode_b1 decode_paged python3 bench/decode.py --only b1_L4096 --quick --no-flashinfer --no-triton
  prof decode_b64p1 decode_paged python3 bench/decode.py --only b64_L4096 --pages 1 --no-flashinfer --no-triton
  ;; esac
phase "sass"
for c in $(find /tmp/kvattn-cache -type f -size +10k | head -20); do
  tail -c +65 "$c" >/tmp/one.cubin  # past the cache entry's 64-byte header
  echo "## $c" >>"$L/sass.txt"; cuobjdump -res-usage -sass /tmp/one.cubin >>"$L/sass.txt" 2>&1 || echo "cuobjdump failed on $c"
done
grep -c . "$L/sass.txt"
tar czf "$OUT/profile.tgz" -C "$OUT" prof && rm -rf "$L"
phase done
