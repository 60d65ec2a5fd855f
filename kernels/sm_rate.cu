/*
 * sm_rate.cu - how fast each SM streams from DRAM while every SM streams: the probe behind the decode
 * planner's lists weighted by SM speed (src/gpu_sm_rate.c).
 *
 * Why: on our H200, 24 of the 132 SMs read 22-28% faster than the others in every long decode launch
 * (a trace from inside the kernel, docs/perf.md), so a persistent grid that gives every CTA the same
 * bytes waits for the slow SMs. Which SMs are fast depends on the chip (it is not in any device
 * attribute), so it is measured once per context.
 *
 * Each CTA streams its own slice of a buffer larger than L2, over and over, for `duration_ns` of
 * %globaltimer, with ~24-32 KiB of copies in flight per CTA (what the decode kernel's ring keeps), then
 * writes (SM, bytes, nanoseconds). All CTAs run at once (the
 * grid is the decode grid: CTAs per SM x SMs), so each one's rate is its rate under full contention.
 */
#include "common.cuh"

#define PROBE_THREADS 128
#ifndef PROBE_VECS
#define PROBE_VECS 4   /* 16-byte copies per thread and stage: 8 KiB per CTA and stage (at most 16) */
#endif
#ifndef PROBE_STAGES
#define PROBE_STAGES 4 /* stages in flight while one lands */
#endif
/* PROBE_GATHER = H > 0: read as the decode kernel reads one KV head of an NHD cache of H heads of 256 bytes
 * (rows of 256 B at a stride of H x 256 B; CTA b reads head b % H of the rows of its group of H CTAs' slice);
 * 0: each CTA its own contiguous slice */
#ifndef PROBE_GATHER
#define PROBE_GATHER 0
#endif

static __device__ __forceinline__ u64 globaltimer() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/* slice_vecs: 16-byte vectors per CTA's slice, a multiple of PROBE_THREADS * PROBE_VECS (and of 16 * PROBE_GATHER).
 * out: [gridDim.x][4] = smid, bytes, ns, 0. The copies land in shared memory that nobody reads (cp.async needs
 * no registers, so every copy of a stage is in flight at once; loads to registers were issued five at a time by
 * ptxas). */
extern "C" __global__ void __launch_bounds__(PROBE_THREADS)
sm_rate_probe(const uint4 *buf, i64 slice_vecs, u64 duration_ns, u64 *out) {
  /* one stage's room, that every stage lands in: nobody reads it, and a thread's copies only overwrite its own
   * (so the static 48 KiB limit bounds a stage, not the stages in flight) */
  __shared__ __align__(16) uint4 sink[PROBE_VECS * PROBE_THREADS];
#if PROBE_GATHER
  /* the group's slice holds PROBE_GATHER x slice_vecs vectors: rows of 16 vectors, head-major within a token */
  const uint4 *slice = buf + (i64)(blockIdx.x / PROBE_GATHER) * PROBE_GATHER * slice_vecs + (blockIdx.x % PROBE_GATHER) * 16;
#else
  const uint4 *slice = buf + (i64)blockIdx.x * slice_vecs;
#endif
  const i64 step = PROBE_THREADS * PROBE_VECS;
  i64 pos = 0, loaded = 0;
  const u64 t0 = globaltimer();
  u64 t;
  do {
#pragma unroll
    for (int u = 0; u < PROBE_VECS; u++) {
      const i64 v = pos + u * PROBE_THREADS + threadIdx.x; /* this CTA's v-th vector */
#if PROBE_GATHER
      const uint4 *src = slice + (v / 16) * (16 * PROBE_GATHER) + v % 16;
#else
      const uint4 *src = slice + v;
#endif
      cp_async16(&sink[u * PROBE_THREADS + threadIdx.x], src, 16);
    }
    cp_async_commit();
    cp_async_wait<PROBE_STAGES - 1>();
    loaded += step;
    pos = pos + step == slice_vecs ? 0 : pos + step;
    t = globaltimer();
  } while (t - t0 < duration_ns);
  cp_async_wait<0>();
  __syncthreads(); /* the CTA is done when its last thread's copies are */
  if (threadIdx.x == 0) {
    const u64 t1 = globaltimer();
    u32 s;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
    out[blockIdx.x * 4 + 0] = s;
    out[blockIdx.x * 4 + 1] = (u64)loaded * 16;
    out[blockIdx.x * 4 + 2] = t1 - t0;
    out[blockIdx.x * 4 + 3] = 0;
  }
}
