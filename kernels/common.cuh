/*
 * common.cuh - device helpers shared by kvattn's kernels.
 *
 * Compiled by NVRTC: no host header and no CUDA header is included, so 16-bit floats are raw
 * uint16 bit patterns and every conversion, async copy and matrix instruction is inline PTX.
 * Needs sm_80 or newer (cp.async, bf16 conversions, mma.sync m16n8k16).
 */
#ifndef KVATTN_COMMON_CUH
#define KVATTN_COMMON_CUH

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define KV_LOG2E 1.4426950408889634f
#define KV_LN2 0.6931471805599453f
#define KV_NEG_INF (-__int_as_float(0x7f800000))

/* dtype codes used by the -D definitions (Q_DTYPE, KV_DTYPE, O_DTYPE) */
#define KV_F16 1
#define KV_BF16 2

/* ------------------------------------------------------------------ 16-bit float conversions */

static __device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
  return f;
}
static __device__ __forceinline__ u16 f32_to_f16(float f) {
  u16 h;
  asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
  return h;
}
/* bf16 is the top half of an fp32: widening is a shift. */
static __device__ __forceinline__ float bf16_to_f32(u16 h) { return __int_as_float(((u32)h) << 16); }
static __device__ __forceinline__ u16 f32_to_bf16(float f) {
  u16 h;
  asm("{ .reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
  return h;
}

/* Two packed 16-bit values (low half first) -> two floats. */
static __device__ __forceinline__ void bf16x2_to_f32x2(u32 v, float *lo, float *hi) {
  *lo = __int_as_float(v << 16);
  *hi = __int_as_float(v & 0xffff0000u);
}
static __device__ __forceinline__ void f16x2_to_f32x2(u32 v, float *lo, float *hi) {
  *lo = f16_to_f32((u16)(v & 0xffffu));
  *hi = f16_to_f32((u16)(v >> 16));
}
static __device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
static __device__ __forceinline__ u32 f32x2_to_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

/* Eight 16-bit values of dtype DT (in a uint4) -> eight floats. */
#define KV_UNPACK8(DT, u4v, f)                                                   \
  do {                                                                            \
    if ((DT) == KV_BF16) {                                                        \
      bf16x2_to_f32x2((u4v).x, &(f)[0], &(f)[1]);                                 \
      bf16x2_to_f32x2((u4v).y, &(f)[2], &(f)[3]);                                 \
      bf16x2_to_f32x2((u4v).z, &(f)[4], &(f)[5]);                                 \
      bf16x2_to_f32x2((u4v).w, &(f)[6], &(f)[7]);                                 \
    } else {                                                                      \
      f16x2_to_f32x2((u4v).x, &(f)[0], &(f)[1]);                                  \
      f16x2_to_f32x2((u4v).y, &(f)[2], &(f)[3]);                                  \
      f16x2_to_f32x2((u4v).z, &(f)[4], &(f)[5]);                                  \
      f16x2_to_f32x2((u4v).w, &(f)[6], &(f)[7]);                                  \
    }                                                                             \
  } while (0)

static __device__ __forceinline__ u32 pack2(int dt, float lo, float hi) {
  return dt == KV_BF16 ? f32x2_to_bf16x2(lo, hi) : f32x2_to_f16x2(lo, hi);
}

/* ------------------------------------------------------------------ memory */

static __device__ __forceinline__ u32 smem_addr(const void *p) {
  return (u32)__cvta_generic_to_shared(p);
}

/* 16-byte global -> shared copy that bypasses L1. src_bytes 0 writes 16 zero bytes and reads
 * nothing: out-of-range rows become zeros, so 0 * garbage never reaches an accumulator. */
static __device__ __forceinline__ void cp_async16_s(u32 smem_dst, const void *gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
/* The same copy with the zero fill chosen by a predicate (PTX ignore-src): the predicate goes to
 * LDGSTS as is, where the src-size form costs three integer instructions per copy on sm_90. */
static __device__ __forceinline__ void cp_async16_if(u32 smem_dst, const void *gmem_src, bool valid) {
  asm volatile("{\n .reg .pred ig;\n setp.eq.u32 ig, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, ig;\n}\n" ::"r"(smem_dst),
               "l"(gmem_src), "r"((u32)valid)
               : "memory");
}
static __device__ __forceinline__ void cp_async16(void *smem_dst, const void *gmem_src, int src_bytes) {
  cp_async16_s(smem_addr(smem_dst), gmem_src, src_bytes);
}
/* 4-byte global -> shared copy (through L1: 4 bytes is below .cg's 16). For gathers of int32 page
 * ids whose alignment is only 4 bytes. */
static __device__ __forceinline__ void cp_async4(void *smem_dst, const void *gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

static __device__ __forceinline__ uint4 lds128(const void *p) { return *(const uint4 *)p; }

/* Bring a global line into L2 ahead of its use (no register, no wait). */
static __device__ __forceinline__ void prefetch_l2(const void *p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

/* Loads that skip L1: data another CTA wrote during this launch (or, ld_cg_s32 in decode's early prefetch,
 * data the kernel before may still be writing: no L1 line is left for a later load to hit). */
static __device__ __forceinline__ int ld_cg_s32(const int *p) {
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
static __device__ __forceinline__ float ld_cg_f32(const float *p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
static __device__ __forceinline__ float4 ld_cg_f32x4(const float *p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "l"(p));
  return v;
}
static __device__ __forceinline__ void st_cg_f32x4(float *p, float4 v) {
  asm volatile("st.global.cg.v4.f32 [%0], {%1,%2,%3,%4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z),
               "f"(v.w)
               : "memory");
}

/* ------------------------------------------------------------------ warp reductions */

static __device__ __forceinline__ float warp_sum(float v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
static __device__ __forceinline__ float warp_max(float v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

static __device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/* ------------------------------------------------------------------ tensor cores */

/* ldmatrix: four 8x8 16-bit tiles from shared memory; lane l gives the address of row l%8 of
 * tile l/8. */
static __device__ __forceinline__ void ldsm_x4(u32 *r, u32 smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}
static __device__ __forceinline__ void ldsm_x4_t(u32 *r, u32 smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}
/* The same through generic pointers. The 32-bit forms above let a kernel keep a per-thread base and
 * add compile-time offsets, which the compiler folds into the instruction. */
static __device__ __forceinline__ void ldmatrix_x4(u32 *r, const void *smem_row) { ldsm_x4(r, smem_addr(smem_row)); }
static __device__ __forceinline__ void ldmatrix_x4_trans(u32 *r, const void *smem_row) {
  ldsm_x4_t(r, smem_addr(smem_row));
}
static __device__ __forceinline__ void ldmatrix_x2(u32 *r, const void *smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}
static __device__ __forceinline__ void ldmatrix_x2_trans(u32 *r, const void *smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}

/* D = A * B + D, m16n8k16, fp32 accumulators. a: 4 regs (row-major 16x16), b: 2 regs (col-major
 * 16x8), d: 4 floats (rows lane/4 and lane/4+8, columns 2*(lane%4) and +1). Not volatile: a pure
 * function of its registers, free to be scheduled among the shared-memory loads around it. */
static __device__ __forceinline__ void mma_bf16_16816(float *d, const u32 *a, const u32 *b) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
static __device__ __forceinline__ void mma_f16_16816(float *d, const u32 *a, const u32 *b) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* Programmatic dependent launch (sm_90+; both are no-ops when the launch did not ask for it, and
 * compiled out below sm_90). A kernel launched with programmatic stream serialization may start while
 * the kernel before it in the stream still runs; pdl_wait() returns once that grid has completed and
 * its writes are visible, so before it a kernel may read only what no kernel writes (its work lists,
 * written by plan's host-to-device copy) and must write nothing. pdl_launch_dependents() lets the next
 * kernel's CTAs be scheduled as this grid's CTAs retire; it promises nothing about this kernel's writes
 * (the next kernel's own wait covers those). */
static __device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
static __device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#endif /* KVATTN_COMMON_CUH */
