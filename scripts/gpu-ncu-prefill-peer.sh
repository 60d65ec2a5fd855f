#!/bin/bash
# gpu-ncu-prefill-peer.sh - kvattn's prefill kernel and FlashInfer's (fa2) on the same problem under Nsight
# Compute, one launch each, in one device call: launch shape, registers, shared memory, instructions,
# issue and stall statistics, shared-memory wavefronts, and each kernel's per-instruction source view
# (SASS with executed counts and stall samples) exported as CSV for reading on a machine without ncu.
#   OUT=... bash scripts/gpu-ncu-prefill-peer.sh ["--batch 16 --len 1024 --format ragged --full" ...]
# Logs: $OUT/ncu-prefill-peer/<case>_{kvattn,fi}.log and <case>_{kvattn,fi}_sass.csv.gz
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-ncu-prefill-peer}
L=$OUT/ncu-prefill-peer
mkdir -p "$L"
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PYTHONUNBUFFERED=1 PATH=$PATH:/usr/local/cuda/bin
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache MAX_JOBS=16
t0=$(date +%s)
phase() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
. scripts/device-common.sh
phase build
use_kvattn_library "$L" || exit 1  # a library built earlier in the same call is used as is
use_flashinfer_wheels "$L" || exit 1
phase "FlashInfer fa2 JIT"
timeout 300 python3 bench/prefill.py --warmup-peers --fi-backends fa2 2>&1 | tail -4
CASES=("$@")
[ ${#CASES[@]} -gt 0 ] || CASES=("--batch 16 --len 1024 --format ragged --full" "--batch 4 --len 4096 --format ragged --full")
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SourceCounters"
KEY="Duration|Registers Per|Dynamic Shared|Grid Size|Block Size|Theoretical Occ|Achieved Occupancy|Executed Ipc A|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Executed Instructions  |Stall|Bank|Wavefronts Shared"
for c in "${CASES[@]}"; do
  n=$(echo "$c" | tr -d '-' | tr ' ' '_' | sed 's/__*/_/g')
  for who in kvattn fi; do
    if [ $who = kvattn ]; then k=prefill_kernel; extra=""; else k="BatchPrefill"; extra="--flashinfer fa2"; fi
    phase "$c: $who"
    python3 bench/prefill_one.py $c --reps 9 $extra | tail -1
    timeout 150 ncu --clock-control none -k "regex:$k" --launch-skip 1 --launch-count 1 --import-source no $SECTIONS \
      -f -o "$L/${n}_$who" python3 bench/prefill_one.py $c --reps 1 $extra >"$L/${n}_$who.run.log" 2>&1 ||
      tail -5 "$L/${n}_$who.run.log"
    ncu -i "$L/${n}_$who.ncu-rep" --print-details all >"$L/${n}_$who.log" 2>&1
    ncu -i "$L/${n}_$who.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip >"$L/${n}_${who}_sass.csv.gz"
    rm -f "$L/${n}_$who.ncu-rep"
    grep -E "^  [a-zA-Z_]+.*\(|$KEY" "$L/${n}_$who.log" | grep -v "^==" | head -40
  done
done
phase done
