/*
 * merge_state.cu - exact merge of N attention states per row (kvattn_merge_states on the GPU).
 *
 *   s = log(sum_k e^s_k),  v = sum_k v_k e^(s_k - s)      (natural log; s_k = -inf: empty state)
 *
 * One warp per (token, head) row, grid-stride over rows; lanes over head_dim. All offsets in int64;
 * any strides.
 *
 * Specialization (-D): V_DTYPE, O_DTYPE (1 f16, 2 bf16, 3 f32).
 */
#include "common.cuh"

#ifndef V_DTYPE
#define V_DTYPE KV_BF16
#endif
#ifndef O_DTYPE
#define O_DTYPE V_DTYPE
#endif
#define KV_F32 3

struct merge_params {
  const void *v;     /* [tokens, states, heads, dim] */
  i64 v_stride[4];
  const float *s;    /* [tokens, states, heads] */
  i64 s_stride[3];
  void *v_out;       /* [tokens, heads, dim] */
  i64 vo_stride[3];
  float *s_out;      /* [tokens, heads] or NULL */
  i64 so_stride[2];
  i64 tokens;
  int states, heads, dim;
};

static __device__ __forceinline__ float load_elem(const void *base, i64 off, int dt) {
  if (dt == KV_F32) return ((const float *)base)[off];
  u16 h = ((const u16 *)base)[off];
  return dt == KV_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}
static __device__ __forceinline__ void store_elem(void *base, i64 off, int dt, float x) {
  if (dt == KV_F32) ((float *)base)[off] = x;
  else ((u16 *)base)[off] = dt == KV_BF16 ? f32_to_bf16(x) : f32_to_f16(x);
}

/* One warp per (token, head) row: the row's lse values are read by this warp only, so s_out may
 * alias s (and v_out alias v) — every read of the row happens before the warp's first write. */
extern "C" __global__ void __launch_bounds__(256) merge_states_kernel(const struct merge_params p) {
  const int lane = threadIdx.x % 32;
  const i64 rows = p.tokens * p.heads;
  const i64 warps = (i64)gridDim.x * (blockDim.x / 32);
  for (i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
    const int h = (int)(row % p.heads);
    const i64 t = row / p.heads;
    const float *srow = p.s + t * p.s_stride[0] + h * p.s_stride[2];
    float mx = KV_NEG_INF;
    for (int k = 0; k < p.states; k++) mx = fmaxf(mx, srow[k * p.s_stride[1]]);
    float w = 0.0f;
    if (mx != KV_NEG_INF)
      for (int k = 0; k < p.states; k++) w += __expf(srow[k * p.s_stride[1]] - mx);
    /* dims in passes of 32 lanes; each pass reads before it writes, lane by lane, and the dims of
     * different passes are disjoint, so aliasing v_out with state 0's v is safe */
    for (int d0 = 0; d0 < p.dim; d0 += 32) {
      const int d = d0 + lane;
      float o = 0.0f;
      if (d < p.dim && mx != KV_NEG_INF) {
        for (int k = 0; k < p.states; k++) {
          const float e = __expf(srow[k * p.s_stride[1]] - mx);
          /* an empty state's v is never read: it may hold garbage */
          if (e > 0.0f)
            o += e * load_elem(p.v, t * p.v_stride[0] + k * p.v_stride[1] + h * p.v_stride[2] + d * p.v_stride[3], V_DTYPE);
        }
      }
      __syncwarp();
      if (d < p.dim) store_elem(p.v_out, t * p.vo_stride[0] + h * p.vo_stride[1] + d * p.vo_stride[2], O_DTYPE, w > 0.0f ? o / w : 0.0f);
    }
    __syncwarp();
    if (lane == 0 && p.s_out) p.s_out[t * p.so_stride[0] + h * p.so_stride[1]] = w > 0.0f ? mx + __logf(w) : KV_NEG_INF;
  }
}
