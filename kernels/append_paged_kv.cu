/*
 * append_paged_kv.cu - write new K/V tokens into a paged cache (kvattn_append_paged_kv).
 *
 * Token t of request b = batch_indices[t] at position pos = positions[t] lands in page
 * indices[kv_indptr[b] + pos / page_size], slot pos % page_size. A token whose page lies outside
 * its request's pages (or a request index out of range) is skipped: a kernel can not fail.
 * One thread per 16 bytes when every row is 16-byte aligned (VEC_BYTES=16), else per element.
 *
 * Specialization (-D): ELEM_BYTES (1, 2, 4), VEC_BYTES (16 or ELEM_BYTES).
 */
#include "common.cuh"

#ifndef ELEM_BYTES
#define ELEM_BYTES 2
#endif
#ifndef VEC_BYTES
#define VEC_BYTES ELEM_BYTES
#endif
#define VEC_ELEMS (VEC_BYTES / ELEM_BYTES)

struct append_params {
  const char *k_new, *v_new;   /* [tokens, kv_heads, head_dim] */
  i64 kn_stride[2], vn_stride[2]; /* token, head (elements) */
  const int *batch_indices;    /* [tokens] */
  const int *positions;        /* [tokens] */
  char *k, *v;                 /* [pages, page_size, kv_heads, head_dim] as strides */
  i64 k_stride[3], v_stride[3];/* page, token in page, head (elements) */
  const int *indices;          /* [kv_entries] */
  const int *kv_indptr;        /* [batch + 1] */
  i64 tokens;
  int batch, kv_heads, head_dim, page_size;
};

#if VEC_BYTES == 16
typedef uint4 vec_t;
#elif VEC_BYTES == 4
typedef unsigned int vec_t;
#elif VEC_BYTES == 2
typedef unsigned short vec_t;
#else
typedef unsigned char vec_t;
#endif

extern "C" __global__ void __launch_bounds__(256) append_paged_kv_kernel(const struct append_params p) {
  const int vecs = p.head_dim / VEC_ELEMS;
  const i64 total = p.tokens * p.kv_heads * vecs;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(i % vecs);
    const int h = (int)((i / vecs) % p.kv_heads);
    const i64 t = i / ((i64)vecs * p.kv_heads);
    const int b = p.batch_indices[t];
    const int pos = p.positions[t];
    if (b < 0 || b >= p.batch || pos < 0) continue;
    const i64 entry = (i64)p.kv_indptr[b] + pos / p.page_size;
    if (entry >= p.kv_indptr[b + 1]) continue;
    const i64 page = p.indices[entry];
    const int slot = pos % p.page_size;
    const i64 d = (i64)c * VEC_ELEMS;
    const i64 kdst = page * p.k_stride[0] + slot * p.k_stride[1] + h * p.k_stride[2] + d;
    const i64 vdst = page * p.v_stride[0] + slot * p.v_stride[1] + h * p.v_stride[2] + d;
    const i64 ksrc = t * p.kn_stride[0] + h * p.kn_stride[1] + d;
    const i64 vsrc = t * p.vn_stride[0] + h * p.vn_stride[1] + d;
    *(vec_t *)(p.k + kdst * ELEM_BYTES) = *(const vec_t *)(p.k_new + ksrc * ELEM_BYTES);
    *(vec_t *)(p.v + vdst * ELEM_BYTES) = *(const vec_t *)(p.v_new + vsrc * ELEM_BYTES);
  }
}
