/* jit_selftest.cuh - included by jit_selftest.cu: proves that "x.cuh" includes of embedded files
 * resolve under NVRTC (they are passed to it as named headers). */
#pragma once

/* y = a * x + b, rounded once (fma), so the host can check it bit for bit. */
static __device__ __forceinline__ float selftest_axpb(float a, float x, float b) { return __fmaf_rn(a, x, b); }
