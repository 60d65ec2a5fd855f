#!/bin/bash
# gpu-final.sh - the decode and prefill device checks in ONE call (a session's last device time):
# decode's scripts/gpu-check.sh (build, GPU tests, sanitizer, the side-by-side decode benchmark), then
# prefill's scripts/gpu-check-prefill.sh (its GPU tests, sanitizer, a kvattn-only quick benchmark; the
# peers' prefill figures come from its own earlier run). Needs .whl carried. About 8 minutes.
#   OUT=... bash scripts/gpu-final.sh
# Returns 5 files: decode/{console.log,decode.json,logs.tgz}, prefill/{logs.tgz,prefill-*.json}.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-final}
mkdir -p "$OUT/decode" "$OUT/prefill"
t0=$(date +%s)
echo "################ decode"
OUT=$OUT/decode DEADLINE=${DECODE_DEADLINE:-250} bash scripts/gpu-check.sh --no-other-tests; rc_decode=$?
echo "################ prefill ($(( $(date +%s) - t0 )) s)"
OUT=$OUT/prefill DEADLINE=${PREFILL_DEADLINE:-220} TEST_TIMEOUT=130 SAN_TIMEOUT=40 \
  bash scripts/gpu-check-prefill.sh --no-peers --quick-bench; rc_prefill=$?
echo "################ done ($(( $(date +%s) - t0 )) s): decode rc=$rc_decode, prefill rc=$rc_prefill; files:"
find "$OUT" -type f | sed "s|$OUT/||"
