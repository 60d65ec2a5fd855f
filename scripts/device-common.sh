# device-common.sh - sourced by the device-call scripts (gpu-profile.sh, gpu-ncu-peer.sh,
# gpu-ncu-prefill-peer.sh): the steps they share.
#
# use_kvattn_library LOGDIR: export KVATTN_LIBRARY, building build-gpu/ first unless a library built
#   earlier in the same call is preset (so scripts chained in one call build once).
# use_flashinfer_wheels LOGDIR: install the carried FlashInfer wheels (.whl/) into /tmp/site and put it
#   on PYTHONPATH. Both return non-zero, with the log's tail printed, on failure.
use_kvattn_library() {
  [ -f "${KVATTN_LIBRARY:-}" ] && return 0
  cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release >"$1/build.log" 2>&1 &&
    cmake --build build-gpu -j"$(nproc)" --target kvattn >>"$1/build.log" 2>&1 || { tail -30 "$1/build.log"; return 1; }
  export KVATTN_LIBRARY=$PWD/build-gpu/libkvattn.so
}
use_flashinfer_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$1/pip.log" 2>&1 || { echo "FlashInfer wheels not installable"; tail -5 "$1/pip.log"; return 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
