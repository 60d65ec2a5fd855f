/*
 * util.h - shared helpers for the C tests. Self-contained: needs only kvattn.h and libc.
 *
 *   test_rng        splitmix64 RNG with fixed seeds (rng_seed, rng_u64, rng_uniform, rng_int, rng_normal)
 *   host_tensor     an owned host buffer described as a DLTensor: compact, padded (non-contiguous,
 *                   gaps filled with NaN) or given strides; element get/set as double in any float dtype
 *   test_batch      a random batch in one of the three formats, with its tensors (q, K/V or combined
 *                   KV, indices, custom mask) and outputs, built from a test_spec
 *   tb_run          attention_create + workspace + plan + run on a context, as a user calls it
 *   tb_compare      tb_run on a reference and a subject context, then the two errors below
 *   tb_tolerance    the rel_error bound for a spec's dtypes (fp32 1e-5, fp16/bf16 1e-2)
 *   tb_poison_unused  NaN into the page slots no request owns (page tails, unreferenced pages)
 *   tb_paged_elem   where (page, slot, kv_head, dim) of K or V lives, whatever the layout/storage
 *   test_context    a context of a given backend and thread count
 *   rel_error       ||out - ref|| / ||ref|| over two tensors of the same shape (NaN in out -> inf)
 *   lse_error       max |lse - ref| with equal infinities counted as 0
 *   ht_bitwise_equal  the logical elements of two tensors compare equal byte for byte
 *
 * Typical use (the fast path against the reference):
 *   test_spec sp = test_spec_default();  sp.format = KVATTN_FORMAT_PAGED;  ...
 *   test_batch tb;  test_rng r = rng_seed(42);
 *   CHECK(tb_build(&tb, &sp, &r));
 *   kvattn_attention_desc d = tb_desc(&sp);  d.causal = 1;
 *   CHECK_OK(tb_run(ctx_ref, &d, &tb, &tb.ref, &tb.ref_lse));
 *   CHECK_OK(tb_run(ctx_cpu, &d, &tb, &tb.out, &tb.out_lse));
 *   CHECK(rel_error(&tb.out, &tb.ref) < 1e-5);
 *   tb_free(&tb);
 * Outputs (out, ref, and their lse) are poisoned with NaN by tb_build and again by tb_run before
 * each run, so a kernel that leaves an element unwritten fails the comparison.
 */
#ifndef KVATTN_TEST_UTIL_H
#define KVATTN_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvattn.h"

/* ======================================================================== RNG */

typedef struct test_rng {
  uint64_t state;
} test_rng;

static inline test_rng rng_seed(uint64_t seed) {
  test_rng r = {seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull};
  return r;
}
static inline uint64_t rng_u64(test_rng *r) { /* splitmix64 */
  uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/* uniform in [0, 1) */
static inline double rng_uniform(test_rng *r) { return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }
/* uniform integer in [lo, hi] (inclusive) */
static inline int64_t rng_int(test_rng *r, int64_t lo, int64_t hi) {
  if (hi <= lo) return lo;
  return lo + (int64_t)(rng_u64(r) % (uint64_t)(hi - lo + 1));
}
/* standard normal (Box-Muller) */
static inline double rng_normal(test_rng *r) {
  double u1 = rng_uniform(r), u2 = rng_uniform(r);
  if (u1 < 1e-300) u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ======================================================================== dtypes */

static const DLDataType TDT_F16 = {kDLFloat, 16, 1}, TDT_BF16 = {kDLBfloat, 16, 1}, TDT_F32 = {kDLFloat, 32, 1},
                        TDT_F64 = {kDLFloat, 64, 1}, TDT_I32 = {kDLInt, 32, 1}, TDT_U8 = {kDLUInt, 8, 1};

static inline int tdt_eq(DLDataType a, DLDataType b) { return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes; }
static inline size_t tdt_size(DLDataType a) { return (size_t)a.bits / 8; }
static inline const char *tdt_name(DLDataType a) {
  if (tdt_eq(a, TDT_F16)) return "f16";
  if (tdt_eq(a, TDT_BF16)) return "bf16";
  if (tdt_eq(a, TDT_F32)) return "f32";
  if (tdt_eq(a, TDT_F64)) return "f64";
  if (tdt_eq(a, TDT_I32)) return "i32";
  if (tdt_eq(a, TDT_U8)) return "u8";
  return "?";
}

static inline float t_bits_to_f32(uint32_t b) {
  float f;
  memcpy(&f, &b, 4);
  return f;
}
static inline uint32_t t_f32_to_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
}
/* IEEE half <-> float, written out plainly (round to nearest even). */
static inline float t_half_to_float(uint16_t h) {
  int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
  float v;
  if (exp == 31) v = man ? NAN : INFINITY;
  else if (exp == 0) v = ldexpf((float)man, -24);
  else v = ldexpf((float)(man + 1024), exp - 25);
  return sign ? -v : v;
}
static inline uint16_t t_float_to_half(float f) {
  uint16_t sign = signbit(f) ? 0x8000 : 0;
  float a = fabsf(f);
  if (isnan(f)) return 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;
  if (a < ldexpf(1.0f, -14)) { /* subnormal: units of 2^-24 */
    float m = nearbyintf(ldexpf(a, 24));
    return sign | (uint16_t)m;
  }
  int e;
  frexpf(a, &e);                                   /* a = f * 2^e, f in [0.5, 1) */
  float m = nearbyintf(ldexpf(a, 11 - e));        /* 11 significant bits */
  if (m >= 2048.0f) m = 1024.0f, e++;
  if (e + 14 >= 31) return sign | 0x7c00;
  return sign | (uint16_t)((e + 14) << 10) | (uint16_t)((int)m - 1024);
}
static inline float t_bf16_to_float(uint16_t h) { return t_bits_to_f32((uint32_t)h << 16); }
static inline uint16_t t_float_to_bf16(float f) {
  if (isnan(f)) return 0x7fc0;
  uint32_t x = t_f32_to_bits(f);
  x += 0x7fff + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

/* ======================================================================== host tensors */

typedef struct host_tensor {
  DLTensor t;       /* points into `alloc`; shape and strides point into this struct */
  int64_t shape[6];
  int64_t strides[6];
  void *alloc;
  size_t alloc_bytes;
} host_tensor;

/* Element offset (in elements from t.data + byte_offset) of a multi-index. */
static inline int64_t ht_offset(const host_tensor *h, const int64_t *idx) {
  int64_t off = 0;
  for (int i = 0; i < h->t.ndim; i++) off += idx[i] * h->strides[i];
  return off;
}
static inline int64_t ht_numel(const host_tensor *h) {
  int64_t n = 1;
  for (int i = 0; i < h->t.ndim; i++) n *= h->shape[i];
  return n;
}
static inline char *ht_base(const host_tensor *h) { return (char *)h->t.data + h->t.byte_offset; }

static inline double ht_get_off(const host_tensor *h, int64_t off) {
  const char *p = ht_base(h);
  DLDataType d = h->t.dtype;
  if (tdt_eq(d, TDT_F16)) return t_half_to_float(((const uint16_t *)p)[off]);
  if (tdt_eq(d, TDT_BF16)) return t_bf16_to_float(((const uint16_t *)p)[off]);
  if (tdt_eq(d, TDT_F32)) return ((const float *)p)[off];
  if (tdt_eq(d, TDT_F64)) return ((const double *)p)[off];
  if (tdt_eq(d, TDT_I32)) return ((const int32_t *)p)[off];
  if (tdt_eq(d, TDT_U8)) return ((const uint8_t *)p)[off];
  return NAN;
}
static inline void ht_set_off(const host_tensor *h, int64_t off, double v) {
  char *p = ht_base(h);
  DLDataType d = h->t.dtype;
  if (tdt_eq(d, TDT_F16)) ((uint16_t *)p)[off] = t_float_to_half((float)v);
  else if (tdt_eq(d, TDT_BF16)) ((uint16_t *)p)[off] = t_float_to_bf16((float)v);
  else if (tdt_eq(d, TDT_F32)) ((float *)p)[off] = (float)v;
  else if (tdt_eq(d, TDT_F64)) ((double *)p)[off] = v;
  else if (tdt_eq(d, TDT_I32)) ((int32_t *)p)[off] = (int32_t)v;
  else if (tdt_eq(d, TDT_U8)) ((uint8_t *)p)[off] = (uint8_t)v;
}
static inline double ht_get(const host_tensor *h, const int64_t *idx) { return ht_get_off(h, ht_offset(h, idx)); }
static inline void ht_set(const host_tensor *h, const int64_t *idx, double v) { ht_set_off(h, ht_offset(h, idx), v); }

/* Step a multi-index through a shape in row-major order; returns 0 after the last element. */
static inline int ht_next(int ndim, const int64_t *shape, int64_t *idx) {
  for (int i = ndim - 1; i >= 0; i--) {
    if (++idx[i] < shape[i]) return 1;
    idx[i] = 0;
  }
  return 0;
}

/* Fill every byte of the allocation with a NaN pattern of the dtype (0xFF bytes: NaN for f16,
 * bf16, f32 and f64 alike), gaps between strided elements included. */
static inline void ht_poison(host_tensor *h) {
  if (h->alloc) memset(h->alloc, 0xFF, h->alloc_bytes);
}

/* Allocate with explicit strides (elements) and a byte offset; the whole allocation starts
 * poisoned with NaN. 64-byte aligned at data + byte_offset when byte_offset is. Returns 0 on OOM. */
static inline int ht_alloc_strided(host_tensor *h, DLDataType dt, int ndim, const int64_t *shape,
                                   const int64_t *strides, uint64_t byte_offset) {
  memset(h, 0, sizeof *h);
  int64_t span = 1; /* elements from the first to past the last */
  int empty = 0;
  for (int i = 0; i < ndim; i++) {
    h->shape[i] = shape[i];
    h->strides[i] = strides[i];
    if (shape[i] == 0) empty = 1;
    else span += (shape[i] - 1) * strides[i];
  }
  size_t bytes = (size_t)byte_offset + (size_t)(empty ? 0 : span) * tdt_size(dt);
  h->alloc_bytes = (bytes + 63) / 64 * 64;
  if (h->alloc_bytes == 0) h->alloc_bytes = 64;
  h->alloc = aligned_alloc(64, h->alloc_bytes);
  if (!h->alloc) return 0;
  ht_poison(h);
  h->t.data = h->alloc;
  h->t.device.device_type = kDLCPU;
  h->t.device.device_id = 0;
  h->t.ndim = ndim;
  h->t.dtype = dt;
  h->t.shape = h->shape;
  h->t.strides = h->strides;
  h->t.byte_offset = byte_offset;
  return 1;
}

/* Compact row-major. */
static inline int ht_alloc(host_tensor *h, DLDataType dt, int ndim, const int64_t *shape) {
  int64_t st[6], s = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    st[i] = s;
    s *= shape[i] > 0 ? shape[i] : 1;
  }
  return ht_alloc_strided(h, dt, ndim, shape, st, 0);
}

/* Non-contiguous: every dimension's extent padded by `pad` elements (the innermost keeps stride 1
 * unless inner_stride > 1), and a byte offset of 64 so byte_offset is honoured. The gaps hold NaN. */
static inline int ht_alloc_padded(host_tensor *h, DLDataType dt, int ndim, const int64_t *shape, int pad,
                                  int inner_stride) {
  int64_t st[6], s = inner_stride > 1 ? inner_stride : 1;
  for (int i = ndim - 1; i >= 0; i--) {
    st[i] = s;
    s *= (shape[i] > 0 ? shape[i] : 1) + pad;
  }
  return ht_alloc_strided(h, dt, ndim, shape, st, 64);
}

static inline void ht_free(host_tensor *h) {
  free(h->alloc);
  memset(h, 0, sizeof *h);
}

/* Fill every logical element with scale * N(0, 1) (rounded to the dtype). */
static inline void ht_fill_normal(host_tensor *h, test_rng *r, double scale) {
  int64_t idx[6] = {0};
  if (ht_numel(h) == 0) return;
  do ht_set(h, idx, scale * rng_normal(r));
  while (ht_next(h->t.ndim, h->shape, idx));
}

/* Copy logical elements (any dtypes, any strides, same shape). */
static inline void ht_copy(host_tensor *dst, const host_tensor *src) {
  int64_t idx[6] = {0};
  if (ht_numel(src) == 0) return;
  do ht_set(dst, idx, ht_get(src, idx));
  while (ht_next(src->t.ndim, src->shape, idx));
}

/* ||out - ref|| / ||ref|| over logical elements; NaN anywhere in out gives INFINITY; a zero ref
 * gives ||out|| (so an all-zero expectation needs an all-zero output). */
static inline double rel_error(const host_tensor *out, const host_tensor *ref) {
  int64_t idx[6] = {0};
  if (ht_numel(ref) == 0) return 0;
  double num = 0, den = 0;
  do {
    double a = ht_get(out, idx), b = ht_get(ref, idx);
    if (isnan(a) || isinf(a)) return INFINITY;
    num += (a - b) * (a - b);
    den += b * b;
  } while (ht_next(ref->t.ndim, ref->shape, idx));
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* max |a - b| over float32 LSE tensors; equal infinities count 0, NaN or one-sided inf INFINITY. */
static inline double lse_error(const host_tensor *a, const host_tensor *b) {
  int64_t idx[6] = {0};
  if (ht_numel(a) == 0) return 0;
  double worst = 0;
  do {
    double x = ht_get(a, idx), y = ht_get(b, idx);
    if (isnan(x) || isnan(y)) return INFINITY;
    if (isinf(x) || isinf(y)) {
      if (x != y) return INFINITY;
      continue;
    }
    if (fabs(x - y) > worst) worst = fabs(x - y);
  } while (ht_next(a->t.ndim, a->shape, idx));
  return worst;
}

/* Bitwise equality of the logical elements (for the poisoning / determinism tests). */
static inline int ht_bitwise_equal(const host_tensor *a, const host_tensor *b) {
  int64_t idx[6] = {0};
  size_t es = tdt_size(a->t.dtype);
  if (ht_numel(a) == 0) return 1;
  do {
    if (memcmp(ht_base(a) + ht_offset(a, idx) * (int64_t)es, ht_base(b) + ht_offset(b, idx) * (int64_t)es, es))
      return 0;
  } while (ht_next(a->t.ndim, a->shape, idx));
  return 1;
}

/* ======================================================================== random batches */

/* What to build. Start from test_spec_default() and change fields. */
typedef struct test_spec {
  int format;                /* kvattn_format */
  int layout;                /* kvattn_layout */
  int combined_kv;           /* paged: one [pages, 2, ...] tensor instead of K and V */
  int padded;                /* non-contiguous views (padded strides, byte_offset) for q, KV, out */
  int inner_stride;          /* > 1: head_dim stride of KV and q (CPU only; the GPU needs 1) */
  int batch_size;            /* paged/ragged requests */
  const int32_t *qo_lens;    /* [batch_size]; NULL = decode (one query row each, qo_indptr NULL) */
  const int32_t *kv_lens;    /* [batch_size] KV tokens per request */
  int page_size;             /* paged */
  int extra_pages;           /* paged: unreferenced pages in the cache (poisoned by tb_poison_unused) */
  int block_rows, block_cols;/* BSR */
  int64_t num_rows, num_cols;/* BSR */
  double block_density;      /* BSR: the chance a block is present */
  int num_qo_heads, num_kv_heads, head_dim;
  DLDataType q_dtype, kv_dtype, o_dtype;
  int custom_mask;           /* build a random bit mask (density mask_density) */
  double mask_density;
  int want_lse;
  double scale;              /* q, K and V are scale * N(0, 1) */
} test_spec;

static inline test_spec test_spec_default(void) {
  test_spec s;
  memset(&s, 0, sizeof s);
  s.format = KVATTN_FORMAT_PAGED;
  s.layout = KVATTN_LAYOUT_NHD;
  s.page_size = 16;
  s.block_rows = 16, s.block_cols = 16;
  s.block_density = 0.5;
  s.num_qo_heads = 4, s.num_kv_heads = 2, s.head_dim = 64;
  s.q_dtype = s.kv_dtype = s.o_dtype = TDT_F32;
  s.mask_density = 0.6;
  s.want_lse = 1;
  s.scale = 1.0;
  return s;
}

typedef struct test_batch {
  test_spec spec;
  kvattn_batch batch;        /* points at the arrays below */
  int32_t *qo_indptr, *kv_indptr, *kv_indices, *last_page_len; /* host */
  int64_t rows;              /* requests or BSR block rows */
  int64_t qo_tokens, kv_entries, num_pages, kv_tokens;
  int64_t mask_bytes;
  host_tensor q;             /* [qo_tokens, qo_heads, head_dim] */
  host_tensor k, v;          /* paged NHD [pages, P, Hk, D], HND [pages, Hk, P, D]; ragged/BSR
                                NHD [tokens, Hk, D], HND [Hk, tokens, D] (unused with combined_kv) */
  host_tensor kvc;           /* combined [pages, 2, ...] (combined_kv only) */
  host_tensor indices;       /* int32 [kv_entries] (paged, BSR) */
  host_tensor mask;          /* uint8 [mask_bytes] (custom_mask) */
  host_tensor out, ref;      /* [qo_tokens, qo_heads, head_dim] in o_dtype */
  host_tensor out_lse, ref_lse; /* float32 [qo_tokens, qo_heads] */
  kvattn_kv kv;              /* ready for kvattn_run */
} test_batch;

/* The kv_len of request/row i (paged: from pages and last_page_len; ragged: tokens; BSR: blocks*Bc
 * clipped by the data). */
static inline int64_t tb_kv_len(const test_batch *tb, int64_t i) {
  int64_t n = tb->kv_indptr[i + 1] - tb->kv_indptr[i];
  if (tb->spec.format == KVATTN_FORMAT_PAGED) return n ? (n - 1) * tb->spec.page_size + tb->last_page_len[i] : 0;
  if (tb->spec.format == KVATTN_FORMAT_RAGGED) return n;
  return n * tb->spec.block_cols;
}
static inline int64_t tb_qo_len(const test_batch *tb, int64_t i) { return tb->qo_indptr[i + 1] - tb->qo_indptr[i]; }

/* Allocate one KV-side tensor per the spec's layout and padding. */
static inline int tb_alloc_kv(const test_spec *s, host_tensor *h, int ndim, const int64_t *shape) {
  if (s->padded || s->inner_stride > 1) return ht_alloc_padded(h, s->kv_dtype, ndim, shape, s->padded ? 3 : 0, s->inner_stride);
  return ht_alloc(h, s->kv_dtype, ndim, shape);
}

static inline void tb_free(test_batch *tb) {
  free(tb->qo_indptr), free(tb->kv_indptr), free(tb->kv_indices), free(tb->last_page_len);
  ht_free(&tb->q), ht_free(&tb->k), ht_free(&tb->v), ht_free(&tb->kvc), ht_free(&tb->indices);
  ht_free(&tb->mask), ht_free(&tb->out), ht_free(&tb->ref), ht_free(&tb->out_lse), ht_free(&tb->ref_lse);
  memset(tb, 0, sizeof *tb);
}

/* Build a random batch and its tensors. Returns 1, or 0 on a bad spec or out of memory (after
 * printing why). Paged page ids are a random permutation of the cache's pages. */
static inline int tb_build(test_batch *tb, const test_spec *s, test_rng *r) {
  memset(tb, 0, sizeof *tb);
  tb->spec = *s;
  const int Hq = s->num_qo_heads, Hk = s->num_kv_heads, D = s->head_dim;
  const int hnd = s->layout == KVATTN_LAYOUT_HND;
  kvattn_batch b = KVATTN_BATCH_INIT;
  b.format = s->format;
  if (s->format == KVATTN_FORMAT_BLOCK_SPARSE) {
    const int64_t R = (s->num_rows + s->block_rows - 1) / s->block_rows;
    const int64_t C = (s->num_cols + s->block_cols - 1) / s->block_cols;
    tb->rows = R;
    tb->qo_indptr = calloc((size_t)R + 1, sizeof(int32_t));
    tb->kv_indptr = calloc((size_t)R + 1, sizeof(int32_t));
    tb->kv_indices = calloc((size_t)(R * C) + 1, sizeof(int32_t));
    if (!tb->qo_indptr || !tb->kv_indptr || !tb->kv_indices) return 0;
    int64_t n = 0;
    int32_t *cols = calloc((size_t)C + 1, sizeof(int32_t));
    for (int64_t i = 0; i < R; i++) {
      tb->qo_indptr[i + 1] = (int32_t)((i + 1) * s->block_rows < s->num_rows ? (i + 1) * s->block_rows : s->num_rows);
      /* a random subset of block columns, in a random order */
      int m = 0;
      for (int64_t c = 0; c < C; c++)
        if (rng_uniform(r) < s->block_density) cols[m++] = (int32_t)c;
      for (int x = m - 1; x > 0; x--) {
        int y = (int)rng_int(r, 0, x);
        int32_t t = cols[x];
        cols[x] = cols[y], cols[y] = t;
      }
      for (int x = 0; x < m; x++) tb->kv_indices[n++] = cols[x];
      tb->kv_indptr[i + 1] = (int32_t)n;
    }
    free(cols);
    tb->qo_tokens = s->num_rows;
    tb->kv_entries = n;
    tb->kv_tokens = s->num_cols;
    tb->num_pages = C;
    b.kv_indptr = tb->kv_indptr;
    b.kv_indices = tb->kv_indices;
    b.block_rows = s->block_rows, b.block_cols = s->block_cols;
    b.num_rows = s->num_rows, b.num_cols = s->num_cols;
  } else {
    const int B = s->batch_size;
    tb->rows = B;
    tb->qo_indptr = calloc((size_t)B + 1, sizeof(int32_t));
    tb->kv_indptr = calloc((size_t)B + 1, sizeof(int32_t));
    tb->last_page_len = calloc((size_t)B + 1, sizeof(int32_t));
    if (!tb->qo_indptr || !tb->kv_indptr || !tb->last_page_len) return 0;
    for (int i = 0; i < B; i++) {
      tb->qo_indptr[i + 1] = tb->qo_indptr[i] + (s->qo_lens ? s->qo_lens[i] : 1);
      int64_t kv = s->kv_lens[i];
      if (s->format == KVATTN_FORMAT_PAGED) {
        int64_t pages = (kv + s->page_size - 1) / s->page_size;
        tb->kv_indptr[i + 1] = tb->kv_indptr[i] + (int32_t)pages;
        tb->last_page_len[i] = pages ? (int32_t)(kv - (pages - 1) * s->page_size) : 1;
      } else {
        tb->kv_indptr[i + 1] = tb->kv_indptr[i] + (int32_t)kv;
      }
      tb->kv_tokens += kv;
    }
    tb->qo_tokens = tb->qo_indptr[B];
    tb->kv_entries = tb->kv_indptr[B];
    b.batch_size = B;
    b.qo_indptr = s->qo_lens ? tb->qo_indptr : NULL;
    b.kv_indptr = tb->kv_indptr;
    if (s->format == KVATTN_FORMAT_PAGED) {
      tb->num_pages = tb->kv_entries + s->extra_pages;
      tb->kv_indices = calloc((size_t)tb->num_pages + 1, sizeof(int32_t));
      if (!tb->kv_indices) return 0;
      for (int64_t p = 0; p < tb->num_pages; p++) tb->kv_indices[p] = (int32_t)p;
      for (int64_t x = tb->num_pages - 1; x > 0; x--) {
        int64_t y = rng_int(r, 0, x);
        int32_t t = tb->kv_indices[x];
        tb->kv_indices[x] = tb->kv_indices[y], tb->kv_indices[y] = t;
      }
      b.kv_indices = tb->kv_indices;
      b.kv_last_page_len = tb->last_page_len;
      b.page_size = s->page_size;
      b.num_pages = tb->num_pages;
    }
  }
  tb->batch = b;

  /* q and the outputs */
  int64_t qshape[3] = {tb->qo_tokens, Hq, D}, lshape[2] = {tb->qo_tokens, Hq};
  int ok = s->padded || s->inner_stride > 1 ? ht_alloc_padded(&tb->q, s->q_dtype, 3, qshape, s->padded ? 2 : 0, s->inner_stride)
                                            : ht_alloc(&tb->q, s->q_dtype, 3, qshape);
  ok = ok && (s->padded ? ht_alloc_padded(&tb->out, s->o_dtype, 3, qshape, 1, 1) : ht_alloc(&tb->out, s->o_dtype, 3, qshape));
  ok = ok && ht_alloc(&tb->ref, s->o_dtype, 3, qshape);
  ok = ok && ht_alloc(&tb->out_lse, TDT_F32, 2, lshape) && ht_alloc(&tb->ref_lse, TDT_F32, 2, lshape);
  if (!ok) return 0;
  ht_fill_normal(&tb->q, r, s->scale);

  /* the KV cache */
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.layout = s->layout;
  if (s->format == KVATTN_FORMAT_PAGED) {
    int64_t P = s->page_size;
    int64_t shp4[4] = {tb->num_pages, hnd ? Hk : P, hnd ? P : Hk, D};
    if (s->combined_kv) {
      int64_t shp5[5] = {tb->num_pages, 2, shp4[1], shp4[2], D};
      if (!tb_alloc_kv(s, &tb->kvc, 5, shp5)) return 0;
      kv.kv = &tb->kvc.t;
    } else {
      if (!tb_alloc_kv(s, &tb->k, 4, shp4) || !tb_alloc_kv(s, &tb->v, 4, shp4)) return 0;
      kv.k = &tb->k.t, kv.v = &tb->v.t;
    }
  } else {
    int64_t shp3[3] = {hnd ? Hk : tb->kv_tokens, hnd ? tb->kv_tokens : Hk, D};
    if (!tb_alloc_kv(s, &tb->k, 3, shp3) || !tb_alloc_kv(s, &tb->v, 3, shp3)) return 0;
    kv.k = &tb->k.t, kv.v = &tb->v.t;
  }
  ht_fill_normal(s->combined_kv ? &tb->kvc : &tb->k, r, s->scale);
  if (!s->combined_kv) ht_fill_normal(&tb->v, r, s->scale);
  if (s->format != KVATTN_FORMAT_RAGGED) {
    int64_t ishape[1] = {tb->kv_entries};
    if (!ht_alloc(&tb->indices, TDT_I32, 1, ishape)) return 0;
    for (int64_t e = 0; e < tb->kv_entries; e++) ((int32_t *)tb->indices.t.data)[e] = tb->kv_indices[e];
    kv.indices = &tb->indices.t;
  }
  tb->kv = kv;

  /* the custom mask: paged/ragged one qo_len x kv_len matrix per request, each starting on a byte;
   * BSR one num_rows x num_cols matrix */
  if (s->custom_mask) {
    int64_t bits = 0;
    if (s->format == KVATTN_FORMAT_BLOCK_SPARSE) bits = s->num_rows * s->num_cols;
    else
      for (int64_t i = 0; i < tb->rows; i++) bits += (tb_qo_len(tb, i) * tb_kv_len(tb, i) + 7) / 8 * 8;
    tb->mask_bytes = (bits + 7) / 8;
    int64_t mshape[1] = {tb->mask_bytes > 0 ? tb->mask_bytes : 1};
    if (!ht_alloc(&tb->mask, TDT_U8, 1, mshape)) return 0;
    uint8_t *m = (uint8_t *)tb->mask.t.data;
    memset(m, 0, (size_t)mshape[0]);
    for (int64_t bit = 0; bit < bits; bit++)
      if (rng_uniform(r) < s->mask_density) m[bit / 8] |= (uint8_t)(1u << (bit % 8));
  }
  return 1;
}

/* The mask bit of (request i, query row r, KV index j) for paged/ragged (first bit of each request
 * as kvattn_run documents). */
static inline int tb_mask_bit(const test_batch *tb, int64_t i, int64_t r, int64_t j) {
  int64_t start = 0;
  for (int64_t x = 0; x < i; x++) start += (tb_qo_len(tb, x) * tb_kv_len(tb, x) + 7) / 8 * 8;
  int64_t bit = start + r * tb_kv_len(tb, i) + j;
  return (((const uint8_t *)tb->mask.t.data)[bit / 8] >> (bit % 8)) & 1;
}

/* Element offset of (page, slot, kv_head, dim 0) of K (c = 0) or V (c = 1) of a paged cache, and
 * the tensor it lives in: hides NHD/HND and combined/separate. */
static inline const host_tensor *tb_paged_elem(const test_batch *tb, int c, int64_t page, int64_t slot, int64_t head,
                                               int64_t dim, int64_t *off) {
  const int hnd = tb->spec.layout == KVATTN_LAYOUT_HND;
  if (tb->spec.combined_kv) {
    int64_t idx[5] = {page, c, hnd ? head : slot, hnd ? slot : head, dim};
    *off = ht_offset(&tb->kvc, idx);
    return &tb->kvc;
  }
  int64_t idx[4] = {page, hnd ? head : slot, hnd ? slot : head, dim};
  const host_tensor *h = c ? &tb->v : &tb->k;
  *off = ht_offset(h, idx);
  return h;
}

/* Poison the slots no request owns: the tails of last pages and the unreferenced pages of a paged
 * cache (all heads, K and V), with NaN. A correct kernel's output must not change. */
static inline void tb_poison_unused(test_batch *tb) {
  if (tb->spec.format != KVATTN_FORMAT_PAGED) return;
  const int64_t P = tb->spec.page_size;
  char *used = calloc((size_t)tb->num_pages * (size_t)P + 1, 1);
  for (int64_t i = 0; i < tb->rows; i++)
    for (int64_t j = 0; j < tb_kv_len(tb, i); j++) {
      int64_t page = tb->kv_indices[tb->kv_indptr[i] + j / P];
      used[page * P + j % P] = 1;
    }
  for (int64_t page = 0; page < tb->num_pages; page++)
    for (int64_t slot = 0; slot < P; slot++) {
      if (used[page * P + slot]) continue;
      for (int c = 0; c < 2; c++)
        for (int64_t h = 0; h < tb->spec.num_kv_heads; h++)
          for (int64_t d = 0; d < tb->spec.head_dim; d++) {
            int64_t off;
            const host_tensor *t = tb_paged_elem(tb, c, page, slot, h, d, &off);
            ht_set_off(t, off, NAN);
          }
    }
  free(used);
}

/* The attention description matching a spec (heads, head_dim, dtypes); options stay off. */
static inline kvattn_attention_desc tb_desc(const test_spec *s) {
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_qo_heads = s->num_qo_heads;
  d.num_kv_heads = s->num_kv_heads;
  d.head_dim = s->head_dim;
  d.q_dtype = s->q_dtype;
  d.kv_dtype = s->kv_dtype;
  d.o_dtype = s->o_dtype;
  d.custom_mask = s->custom_mask;
  return d;
}

/* Create an attention for the batch's bounds, size and allocate its workspace, plan, run into
 * out/lse (poisoned first; lse may be NULL), and clean up. Returns the first failing status. */
static inline kvattn_status tb_run(kvattn_context *ctx, const kvattn_attention_desc *desc, test_batch *tb,
                                   host_tensor *out, host_tensor *lse) {
  kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
  bounds.max_batch = tb->rows > 0 ? tb->rows : 1;
  bounds.max_qo_tokens = tb->qo_tokens;
  bounds.max_kv_entries = tb->kv_entries;
  kvattn_attention *attn = NULL;
  kvattn_workspace ws;
  memset(&ws, 0, sizeof ws);
  size_t dev = 0, host = 0;
  kvattn_status s = kvattn_attention_create(ctx, desc, &bounds, &attn);
  if (s == KVATTN_SUCCESS) s = kvattn_workspace_size(ctx, desc, &bounds, &dev, &host);
  if (s == KVATTN_SUCCESS) s = kvattn_workspace_alloc(ctx, dev, host, &ws);
  if (s == KVATTN_SUCCESS) s = kvattn_plan(attn, &tb->batch, &ws, NULL);
  if (s == KVATTN_SUCCESS) {
    ht_poison(out);
    if (lse) ht_poison(lse);
    s = kvattn_run(attn, &tb->q.t, &tb->kv, tb->spec.custom_mask ? &tb->mask.t : NULL, &out->t,
                   lse ? &lse->t : NULL, NULL);
  }
  /* keep the failure's message: the cleanup calls below clear it */
  static _Thread_local char msg[1024];
  if (s != KVATTN_SUCCESS) snprintf(msg, sizeof msg, "%s", kvattn_last_error());
  kvattn_workspace_free(ctx, &ws);
  kvattn_attention_destroy(attn);
  if (s != KVATTN_SUCCESS) fprintf(stderr, "  tb_run: %s: %s\n", kvattn_status_string(s), msg);
  return s;
}

/* Run `desc` on the reference context into tb->ref / tb->ref_lse and on the subject into tb->out /
 * tb->out_lse (both poisoned first). *err = rel_error(out, ref); *lse_err = lse_error (0 when the
 * spec has want_lse = 0). Returns the first failing status. */
static inline kvattn_status tb_compare(kvattn_context *subject, kvattn_context *reference,
                                       const kvattn_attention_desc *desc, test_batch *tb, double *err,
                                       double *lse_err) {
  *err = *lse_err = INFINITY;
  int lse = tb->spec.want_lse;
  kvattn_status s = tb_run(reference, desc, tb, &tb->ref, lse ? &tb->ref_lse : NULL);
  if (s != KVATTN_SUCCESS) return s;
  s = tb_run(subject, desc, tb, &tb->out, lse ? &tb->out_lse : NULL);
  if (s != KVATTN_SUCCESS) return s;
  *err = rel_error(&tb->out, &tb->ref);
  *lse_err = lse ? lse_error(&tb->out_lse, &tb->ref_lse) : 0;
  return KVATTN_SUCCESS;
}

/* The tolerance on rel_error for a spec's input dtypes (DESIGN.md): fp32/fp64 inputs 1e-5,
 * 16-bit inputs 1e-2. */
static inline double tb_tolerance(const test_spec *s) {
  int low = tdt_size(s->q_dtype) < 4 || tdt_size(s->kv_dtype) < 4 || tdt_size(s->o_dtype) < 4;
  return low ? 1e-2 : 1e-5;
}

/* A context of the given backend (CPU contexts get `threads` workers; 0 = all cores). */
static inline kvattn_context *test_context(kvattn_backend backend, int threads) {
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.backend = backend;
  o.num_threads = threads;
  kvattn_context *ctx = NULL;
  if (kvattn_context_create(&o, &ctx) != KVATTN_SUCCESS) {
    fprintf(stderr, "  test_context: %s\n", kvattn_last_error());
    return NULL;
  }
  return ctx;
}

#endif /* KVATTN_TEST_UTIL_H */
