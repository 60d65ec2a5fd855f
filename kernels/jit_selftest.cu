/*
 * jit_selftest.cu - a tiny kernel that checks the JIT path end to end: NVRTC compiles it (with an
 * embedded "x.cuh" include, the toolkit's fp16/bf16 headers and a -D specialization), the driver
 * loads the cubin, and a launch gives results the host can check exactly.
 *
 * Definitions: SELFTEST_BIAS (float, default 0) is added to every output; SELFTEST_SYNTAX_ERROR
 * makes the file fail to compile, to test how compile errors are reported.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "jit_selftest.cuh"

#ifndef SELFTEST_BIAS
#define SELFTEST_BIAS 0.0f
#endif

#ifdef SELFTEST_SYNTAX_ERROR
int selftest_broken = ; /* deliberately not C++ */
#endif

/* y: [n] float32 = a * x + SELFTEST_BIAS; h: [n] float32 = x rounded to fp16 and back;
 * b: [n] float32 = x rounded to bf16 and back (round to nearest even, as the host's converters). */
extern "C" __global__ void jit_selftest(const float *x, float *y, float *h, float *b, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i];
  y[i] = selftest_axpb(a, v, SELFTEST_BIAS);
  h[i] = __half2float(__float2half_rn(v));
  b[i] = __bfloat162float(__float2bfloat16_rn(v));
}
