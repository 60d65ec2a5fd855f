#!/bin/bash
# gpu-final.sh - the decode and prefill device checks in ONE call (a session's last device time):
# decode's scripts/gpu-check.sh, then prefill's scripts/gpu-check-prefill.sh, with prefill's
# FlashInfer modules (fa2, fa3: minutes of JIT) compiling in the background from the start so that
# they are ready when the prefill benchmark begins. Needs .whl carried. Budget: ~9.5 minutes.
#   OUT=... bash scripts/gpu-final.sh
# Returns at most 8 files: decode/{console.log,decode.json,logs.tgz}, prefill/{*.json,logs.tgz}.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-final}
mkdir -p "$OUT/decode" "$OUT/prefill"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/tmp/pip-final.log 2>&1 || tail -5 /tmp/pip-final.log
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

(export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache MAX_JOBS=10 PYTHONUNBUFFERED=1
 KVATTN_LIBRARY=/nonexistent timeout 330 python3 bench/prefill.py --warmup-peers >/tmp/prefill-prewarm.log 2>&1) &
PREWARM=$!

echo "################ decode ($(( $(date +%s) - t0 )) s)"
OUT=$OUT/decode DEADLINE=${DECODE_DEADLINE:-250} bash scripts/gpu-check.sh --no-other-tests
echo "################ waiting for prefill's FlashInfer prewarm ($(( $(date +%s) - t0 )) s)"
wait $PREWARM
tail -8 /tmp/prefill-prewarm.log
echo "################ prefill ($(( $(date +%s) - t0 )) s)"
OUT=$OUT/prefill DEADLINE=${PREFILL_DEADLINE:-270} PEER_WARMUP_TIMEOUT=90 bash scripts/gpu-check-prefill.sh
cp /tmp/prefill-prewarm.log "$OUT/prefill/prewarm.log"
(cd "$OUT/prefill" && ls *.log >/dev/null 2>&1 && tar czf logs.tgz *.log && rm -f *.log)
echo "################ done ($(( $(date +%s) - t0 )) s); files:"
find "$OUT" -type f | sed "s|$OUT/||"
