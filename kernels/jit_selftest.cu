/*
 * jit_selftest.cu - a tiny kernel that checks the JIT path end to end: NVRTC compiles it (with an
 * embedded "x.cuh" include, the toolkit's fp16/bf16 headers and a -D specialization), the driver
 * loads the cubin, and a launch gives results the host can check exactly. Also the GPU tests' helper
 * kernels: shared memory filled and read back (jit_fill_shared, jit_read_shared), a timed spin (jit_spin).
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

/* Fill the block's dynamic shared memory (`words` 32-bit words) with `pattern`. The GPU tests launch
 * it over every SM before a kernel under test (tests/gpu/shared_poison.h), so a kernel that reads shared
 * memory it never wrote meets NaN rather than the finite leftovers of its own earlier launches, which
 * is what it meets when it has the GPU to itself. volatile: stores that no one reads are not dropped. */
extern "C" __global__ void jit_fill_shared(unsigned pattern, int words) {
  extern __shared__ unsigned fill_smem[];
  volatile unsigned *s = fill_smem;
  for (int i = threadIdx.x; i < words; i += blockDim.x) s[i] = pattern;
}

/* out[blockIdx.x * words + i] = word i of the block's dynamic shared memory, never written here: what
 * the blocks before it on that SM left (the runtime test checks that jit_fill_shared reaches it). */
extern "C" __global__ void jit_read_shared(unsigned *out, int words) {
  extern __shared__ unsigned read_smem[];
  volatile unsigned *s = read_smem;
  for (int i = threadIdx.x; i < words; i += blockDim.x) out[(long long)blockIdx.x * words + i] = s[i];
}

/* Keep the GPU busy for `ns` nanoseconds (one thread is enough): the tests queue work behind it to
 * show what an API call does or does not wait for. */
extern "C" __global__ void jit_spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}
