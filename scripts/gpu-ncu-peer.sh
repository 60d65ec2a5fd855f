#!/bin/bash
# gpu-ncu-peer.sh - kvattn's decode kernel and FlashInfer's beside it under Nsight Compute, on the same
# workloads, with a short metric list (time, DRAM bytes and throughput, L2 hit rate, occupancy,
# instructions): where the uniform rows' gap to FlashInfer comes from. Needs .whl carried.
#   OUT=... [SOURCE=1] bash scripts/gpu-ncu-peer.sh [workload ...]     (default: b64_L4096 b16_L4096)
# Logs: $OUT/ncu-peer/*.log, each kernel's metrics printed as they come. SOURCE=1 also exports the
# per-instruction source view of kvattn's kernel (L2 sectors per copy instruction, actual vs ideal:
# how the 16-byte-padded ring's 24-for-16 was found) to $OUT/ncu-peer/<workload>_kvattn_sass.csv.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-ncu-peer}
L=$OUT/ncu-peer
mkdir -p "$L"
export KVATTN_CACHE_DIR=/tmp/kvattn-cache PYTHONUNBUFFERED=1 PATH=$PATH:/usr/local/cuda/bin
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache MAX_JOBS=8
WORK=${*:-b64_L4096 b16_L4096}
. scripts/device-common.sh
use_kvattn_library "$L" || exit 1  # a library built earlier in the same call is used as is
use_flashinfer_wheels "$L" || exit 1
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
M=$M,lts__t_sector_hit_rate.pct,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size
M=$M,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__occupancy_limit_registers
M=$M,smsp__inst_executed.sum,sm__cycles_active.avg,lts__t_sectors_srcunit_tex_op_read.sum
# the first JIT of FlashInfer's decode modules happens outside ncu
timeout 200 python3 bench/decode.py --warmup-peers >"$L/warmup.log" 2>&1 || tail -5 "$L/warmup.log"
for w in $WORK; do
  # kvattn: its one kernel; FlashInfer: the tensor-core path (its prefill kernel) and any merge after it
  for who in "kvattn:decode_paged" "fi:BatchPrefillWithPagedKVCache" "fimerge:[Mm]erge"; do
    n=${who%%:*} k=${who#*:}
    timeout 150 ncu --clock-control none --target-processes all -k "regex:$k" --launch-skip 3 --launch-count 1 \
      --metrics "$M" python3 bench/decode.py --only "$w" --pages 16 --no-triton >"$L/${w}_$n.log" 2>&1
    echo "--- $w $n"
    grep -E "^\s+(gpu__|dram__|lts__|sm__|launch__|smsp__)" "$L/${w}_$n.log" | awk '{$1=$1};1' | head -20
  done
  if [ "${SOURCE:-0}" = 1 ]; then
    timeout 150 ncu --clock-control none -k regex:decode_paged --launch-skip 3 --launch-count 1 --import-source no \
      --section SourceCounters -f -o "$L/${w}_src" python3 bench/decode.py --only "$w" --pages 16 --no-flashinfer \
      --no-triton >"$L/${w}_src.log" 2>&1 &&
      ncu -i "$L/${w}_src.ncu-rep" --page source --csv --print-source sass >"$L/${w}_kvattn_sass.csv" 2>&1
    rm -f "$L/${w}_src.ncu-rep"
    echo "--- $w kvattn source view: $(wc -l <"$L/${w}_kvattn_sass.csv" 2>/dev/null || echo 0) lines"
  fi
done
