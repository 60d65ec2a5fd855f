/*
 * fast.c - the CPU fast path: fp32 accumulation, blocked online softmax, pthreads.
 *
 * Work is dealt in items of (work row, block of query rows, range of kv heads, KV chunk). An item
 * holds every query head of the groups of its kv heads, so each KV block is read and converted once
 * and then used by the whole group (GQA). Per item:
 *   1. the queries are loaded, rotated (RoPE) and pre-scaled by sm_scale into fp32 rows;
 *   2. the KV tokens are walked in blocks of BK: each block is gathered through the page table
 *      (the next block is prefetched), and per kv head its K and V rows are converted to fp32
 *      scratch, K rotated if RoPE is on;
 *   3. scores for all the head's queries (4 queries x 2 tokens register blocks), then per query
 *      soft-cap, ALiBi, the masks (only in blocks where a token can be masked) and the online-softmax
 *      update m' = max(m, max s), l' = l e^(m-m') + sum e^(s-m'), acc' = acc e^(m-m') + sum e^(s-m') v;
 *      in full blocks V is applied to two queries at once.
 * Items spanning several kv heads read whole token rows of an NHD page (all heads are adjacent) rather
 * than 256-byte pieces 2 KiB apart. Decode-like blocks (<= SPLIT_MAX_ROWS rows) over long KV are
 * split into chunks (split-KV) whose states are merged afterwards in KV order. Items are sorted by
 * cost (longest first) and taken from a shared counter, so one long request among short ones does
 * not leave the other threads idle at the end. Every query is computed by one item and chunk
 * boundaries depend only on the request, so the bits do not depend on the thread count or the batch.
 *
 * The inner loops use GCC vector extensions on 8-float vectors; the per-item function is cloned
 * for AVX2+FMA and picked at load time (target_clones), so the library still runs on any x86-64.
 * docs/perf.md has the measurements and the history of this file.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* The file is plain float math where contracting a*b+c into one FMA only adds accuracy; -std=c11
 * turns contraction off, so turn it back on here. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif
/* The 32-byte vector helpers are always inlined: no vector crosses a call boundary, so GCC's
 * warning that returning one changes the ABI without AVX does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define BK 32   /* KV tokens per block: four vectors of 8 */
#define VEC 8   /* floats per vector */
#define QUERIES_PER_ITEM 64 /* query heads x rows an item aims for: KV conversion is then ~1% */
#define SPLIT_TOKENS 2048   /* split-KV chunk: rows longer than two chunks are split (any batch) */
#define SPLIT_MAX_ROWS 8    /* split-KV applies to query blocks of at most this many rows (decode, drafts) */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#ifndef CPU_CLONES /* (a build may pass its own list) */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif
#endif
#define INLINE static inline __attribute__((always_inline))
/* Lane permutation of an 8-float vector (GCC and clang spell it differently). */
#if defined(__clang__)
#define SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h)
#else
#define SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shuffle(v, (v8i){a, b, c, d, e, f, g, h})
#endif

enum { KIND_F16, KIND_BF16, KIND_F32, KIND_F64 };

static int dtype_kind(DLDataType t) {
  if (dtype_eq(t, DT_F16)) return KIND_F16;
  if (dtype_eq(t, DT_BF16)) return KIND_BF16;
  if (dtype_eq(t, DT_F32)) return KIND_F32;
  if (dtype_eq(t, DT_F64)) return KIND_F64;
  return -1;
}

/* ------------------------------------------------------------------ vector helpers */

INLINE v8f splat(float x) { return (v8f){0} + x; } /* vector + scalar: one broadcast */
/* mask ? a : b per lane (mask lanes all ones or all zeros). A macro: GCC prints an ABI note for
 * every function taking 32-byte vectors by value, even inlined ones. */
#define SELECT_F(mask, a, b) ((v8f)((((v8i)(a)) & (mask)) | (((v8i)(b)) & ~(mask))))

/* e^x for x <= 0 (the softmax's s - max), relative error ~2e-7; x < -86 (and -inf) gives 0.
 * x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^6, 2^n added to the exponent. */
INLINE v8f vexp(const v8f *xp) {
  v8f x = *xp;
  const v8f shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  v8i tiny = x < splat(-86.0f);
  x = SELECT_F(tiny, splat(-86.0f), x);
  v8f t = x * splat(1.44269504088896341f) + shifter;
  v8f n = t - shifter;
  v8i ni = (v8i)t - (v8i)shifter;
  v8f r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f); /* ln2 split hi + lo */
  v8f p = splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  v8i bits = (v8i)((v8u)p + ((v8u)ni << 23)); /* unsigned: no signed-shift UB */
  return (v8f)(bits & ~tiny);
}

/* Convert n elements (element stride `stride`) of `kind` at src to fp32. Unit stride takes the
 * vector routes: f16 by rebasing its exponent with one multiply (exact, subnormals included),
 * bf16 by a shift. */
INLINE void load_row(float *dst, const char *src, int kind, int64_t stride, int n) {
  int x = 0;
  if (stride == 1) {
    if (kind == KIND_F32) {
      memcpy(dst, src, sizeof(float) * (size_t)n);
      return;
    }
    if (kind == KIND_BF16) { /* the common case, two vectors per step */
      for (; x + 2 * VEC <= n; x += 2 * VEC) {
        v8h h0, h1;
        memcpy(&h0, src + 2 * x, sizeof h0);
        memcpy(&h1, src + 2 * x + 16, sizeof h1);
        v8f f0 = (v8f)(__builtin_convertvector(h0, v8u) << 16), f1 = (v8f)(__builtin_convertvector(h1, v8u) << 16);
        memcpy(dst + x, &f0, sizeof f0);
        memcpy(dst + x + VEC, &f1, sizeof f1);
      }
    }
    if (kind == KIND_F16 || kind == KIND_BF16) {
      for (; x + VEC <= n; x += VEC) {
        v8h h;
        memcpy(&h, src + 2 * x, sizeof h);
        v8u w = __builtin_convertvector(h, v8u);
        v8f f;
        if (kind == KIND_BF16) {
          f = (v8f)(w << 16);
        } else {
          v8u em = w & 0x7fff, sign = (w & 0x8000) << 16;
          v8u normal = (v8u)((v8f)(em << 13) * splat(0x1p112f)); /* rebias 15 -> 127 */
          v8u special = (em << 13) | 0x7f800000u;                  /* inf and NaN */
          v8i is_special = (v8i)(em >= 0x7c00u);
          f = (v8f)(((normal & ~(v8u)is_special) | (special & (v8u)is_special)) | sign);
        }
        memcpy(dst + x, &f, sizeof f);
      }
    }
  }
  for (; x < n; x++) {
    const char *e = src;
    switch (kind) {
      case KIND_F16: dst[x] = half_to_float(((const uint16_t *)e)[x * stride]); break;
      case KIND_BF16: dst[x] = bf16_to_float(((const uint16_t *)e)[x * stride]); break;
      case KIND_F32: dst[x] = ((const float *)e)[x * stride]; break;
      default: dst[x] = (float)((const double *)e)[x * stride]; break;
    }
  }
}

/* fp32 -> bf16 / fp16, round to nearest even; the common (finite, normal) cases inline, the rest
 * through the library's full conversions. */
static inline uint16_t f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7f800000u) == 0x7f800000u) return float_to_bf16(f); /* inf, NaN */
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t a = x & 0x7fffffffu;
  if (a < 0x38800000u || a >= 0x477ff000u) return float_to_half(f); /* zero, subnormal, overflow, inf, NaN */
  const uint32_t r = a + 0x0fffu + ((a >> 13) & 1);                /* round at bit 13 */
  return (uint16_t)(((x >> 16) & 0x8000u) | ((r - 0x38000000u) >> 13)); /* rebias 127 -> 15 */
}

/* ------------------------------------------------------------------ the run */

typedef struct work_item {
  int32_t row, q_begin, q_end; /* query rows [q_begin, q_end) of work row `row` */
  int32_t kv_head, heads;      /* kv heads [kv_head, kv_head + heads) */
  int64_t j_lo, j_hi;          /* the KV tokens [j_lo, j_hi) of the row this item visits */
  int64_t part;                /* split KV: the item's slot in fast_run.partial; -1: writes out */
  int64_t parts;               /* split KV: chunks of its (row, query block, heads) */
  double cost;
} work_item;

typedef struct fast_run {
  const kvattn_attention_desc *d;
  const batch_view *bv;
  const run_tensors *t;
  const float *alibi_slopes;
  const int64_t *mask_first;  /* [batch]: request i's first mask bit */
  int head_dim, dpad, group;  /* dpad: head_dim rounded up to VEC */
  int q_kind, kv_kind;
  int q_rows_per_item;
  int heads_per_item;         /* kv heads an item covers (a divisor of num_kv_heads) */
  /* split KV: per chunk item, its queries' unnormalized acc [dpad] then m and l */
  float *partial;
  int64_t part_floats;        /* floats per item slot */
  work_item *items;
  int64_t num_items;
  atomic_llong next_item;
  /* RoPE: cos/sin of position p's angle for pair x at [p * half + x], p < rope_positions */
  float *rope_cos, *rope_sin;
  int64_t rope_positions;
} fast_run;

/* One thread's scratch, 64-byte aligned pieces. */
typedef struct scratch {
  float *q, *acc;   /* [queries][dpad] */
  float *m, *l;     /* [queries] running max and sum */
  float *kb;        /* [BK][dpad]: the K block (converted, rotated) */
  float *vb;        /* [BK][dpad]: the V block */
  float *s;         /* [queries of one kv head][BK]: the block's scores, then its weights */
  float *alpha;     /* [queries of one kv head]: this block's rescale of acc */
  int64_t kv_pos[BK];
  int32_t ok[BK];   /* the token exists (inside the row and the data) */
  void *mem;
} scratch;

static int64_t page_id(const fast_run *fr, int64_t e) {
  const tview *ix = &fr->t->indices;
  if (ix->data) return ((const int32_t *)ix->data)[e * ix->stride[0]];
  if (fr->bv->indices) return fr->bv->indices[e];
  return e;
}

static int mask_bit(const tview *mask, int64_t bit) {
  return (((const uint8_t *)mask->data)[(bit >> 3) * mask->stride[0]] >> (bit & 7)) & 1;
}

static int64_t q_pos_of(const fast_run *fr, int64_t i, int64_t r, int64_t qo_len, int64_t kv_len) {
  return fr->bv->bsr_positions ? fr->bv->qo_indptr[i] + r : kv_len - qo_len + r;
}

/* The KV tokens [*j_begin, *j_end) a block of query rows [q_begin, q_end) can see. Paged and ragged
 * positions are the token index, so causal and the window bound the walk; BSR walks every entry. */
static void item_kv_range(const fast_run *fr, int64_t i, int64_t q_begin, int64_t q_end, int64_t *j_begin,
                          int64_t *j_end) {
  const kvattn_attention_desc *d = fr->d;
  const int64_t qo_len = bv_qo_len(fr->bv, i), kv_len = bv_kv_len(fr->bv, i);
  *j_begin = 0, *j_end = kv_len;
  if (fr->bv->bsr_positions) return;
  const int64_t qp_lo = q_pos_of(fr, i, q_begin, qo_len, kv_len), qp_hi = q_pos_of(fr, i, q_end - 1, qo_len, kv_len);
  if (d->causal && qp_hi + 1 < *j_end) *j_end = qp_hi + 1 > 0 ? qp_hi + 1 : 0;
  if (d->window_left >= 0 && qp_lo - d->window_left > 0) *j_begin = qp_lo - d->window_left;
  if (*j_begin > *j_end) *j_begin = *j_end;
}

/* Rotate-half RoPE on an fp32 row from the table (position inside it). */
INLINE void rope_row_table(const fast_run *fr, float *x, int64_t pos) {
  const int half = fr->head_dim / 2;
  const float *c = fr->rope_cos + pos * half, *s = fr->rope_sin + pos * half;
  for (int i = 0; i < half; i++) {
    float a = x[i], b = x[i + half];
    x[i] = a * c[i] - b * s[i];
    x[i + half] = b * c[i] + a * s[i];
  }
}

/* The item's queries are numbered head by head: query qi is kv head (kv_head + qi / per_head), query
 * row q_begin + (qi % per_head) / group, and within the group (qi % group); per_head = rows * group.
 * So the queries of one kv head are contiguous and a converted KV block serves them in one sweep. */
static void query_of(const fast_run *fr, const work_item *it, int qi, int64_t *r, int *h) {
  const int per_head = (it->q_end - it->q_begin) * fr->group, in_head = qi % per_head;
  *r = it->q_begin + in_head / fr->group;
  *h = (it->kv_head + qi / per_head) * fr->group + in_head % fr->group;
}

/* Load the item's queries: q' = RoPE(q) * sm_scale, in fp32, padded with zeros to dpad. */
static void load_queries(const fast_run *fr, const work_item *it, scratch *sc, int nq, int64_t qo_len,
                         int64_t kv_len) {
  const kvattn_attention_desc *d = fr->d;
  const tview *q = &fr->t->q;
  const int half = fr->head_dim / 2;
  double tmp[1024]; /* head_dim <= 512 */
  for (int qi = 0; qi < nq; qi++) {
    int64_t r;
    int h;
    query_of(fr, it, qi, &r, &h);
    const int64_t row = fr->bv->qo_indptr[it->row] + r, pos = q_pos_of(fr, it->row, r, qo_len, kv_len);
    float *dst = sc->q + (int64_t)qi * fr->dpad;
    const int64_t base = row * q->stride[0] + h * q->stride[1];
    float row_f[512];
    load_row(row_f, q->data + base * (int64_t)dtype_size(q->dtype), fr->q_kind, q->stride[2], fr->head_dim);
    if (fr->q_kind == KIND_F64) /* keep float64 queries exact until they are scaled */
      for (int x = 0; x < fr->head_dim; x++) tmp[x] = ((const double *)q->data)[base + x * q->stride[2]];
    else
      for (int x = 0; x < fr->head_dim; x++) tmp[x] = row_f[x];
    if (d->rope) {
      for (int x = 0; x < half; x++) {
        double c, s;
        if (pos >= 0 && pos < fr->rope_positions) {
          c = fr->rope_cos[pos * half + x], s = fr->rope_sin[pos * half + x];
        } else {
          double angle = ((double)pos / d->rope_scale) * rope_frequency(d, x);
          c = cos(angle), s = sin(angle);
        }
        double a = tmp[x], b = tmp[x + half];
        tmp[x] = a * c - b * s;
        tmp[x + half] = b * c + a * s;
      }
    }
    for (int x = 0; x < fr->dpad; x++) dst[x] = x < fr->head_dim ? (float)(tmp[x] * d->sm_scale) : 0.0f;
    memset(sc->acc + (int64_t)qi * fr->dpad, 0, sizeof(float) * (size_t)fr->dpad);
    sc->m[qi] = -INFINITY;
    sc->l[qi] = 0;
  }
}

/* The sum of a vector's 8 lanes (three shuffle-and-add steps). */
INLINE float hsum(const v8f *vp) {
  v8f v = *vp;
  v = v + SHUFFLE8(v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v + SHUFFLE8(v, 2, 3, 0, 1, 6, 7, 4, 5);
  v = v + SHUFFLE8(v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

/* The largest of a vector's 8 lanes. */
INLINE float hmax(const v8f *vp) {
  v8f v = *vp;
  v8f w = SHUFFLE8(v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = SELECT_F(w > v, w, v);
  w = SHUFFLE8(v, 2, 3, 0, 1, 6, 7, 4, 5);
  v = SELECT_F(w > v, w, v);
  w = SHUFFLE8(v, 1, 0, 3, 2, 5, 4, 7, 6);
  v = SELECT_F(w > v, w, v);
  return v[0];
}

/* acc_q = acc_q * alpha_q + sum_u p_q[u] V_u over all BK tokens, for the nq queries from q0 (their
 * weights are rows of sc->s, their alphas in sc->alpha): two queries x four vectors of head_dim at a
 * time, so each V load feeds two FMAs. */
INLINE void block_pv_pairs(scratch *sc, int q0, int nq, int nvec) {
  const v8f *vb = (const v8f *)sc->vb;
  for (int qa = 0; qa < nq; qa += 2) {
    const int qb = qa + 1 < nq ? qa + 1 : qa; /* an odd last query pairs with itself, written once */
    const float *p0 = sc->s + (int64_t)qa * BK, *p1 = sc->s + (int64_t)qb * BK;
    const v8f al0 = splat(sc->alpha[qa]), al1 = splat(sc->alpha[qb]);
    v8f *acc0 = (v8f *)(sc->acc + (int64_t)(q0 + qa) * nvec * VEC), *acc1 = (v8f *)(sc->acc + (int64_t)(q0 + qb) * nvec * VEC);
    int c = 0;
    for (; c + 4 <= nvec; c += 4) {
      v8f a0 = acc0[c] * al0, a1 = acc0[c + 1] * al0, a2 = acc0[c + 2] * al0, a3 = acc0[c + 3] * al0;
      v8f b0 = acc1[c] * al1, b1 = acc1[c + 1] * al1, b2 = acc1[c + 2] * al1, b3 = acc1[c + 3] * al1;
      for (int u = 0; u < BK; u++) {
        const v8f *row = vb + (int64_t)u * nvec + c, w0 = splat(p0[u]), w1 = splat(p1[u]);
        a0 += w0 * row[0], a1 += w0 * row[1], a2 += w0 * row[2], a3 += w0 * row[3];
        b0 += w1 * row[0], b1 += w1 * row[1], b2 += w1 * row[2], b3 += w1 * row[3];
      }
      if (qb != qa) acc1[c] = b0, acc1[c + 1] = b1, acc1[c + 2] = b2, acc1[c + 3] = b3;
      acc0[c] = a0, acc0[c + 1] = a1, acc0[c + 2] = a2, acc0[c + 3] = a3;
    }
    for (; c < nvec; c++) {
      v8f a = acc0[c] * al0, b = acc1[c] * al1;
      for (int u = 0; u < BK; u++) a += splat(p0[u]) * vb[(int64_t)u * nvec + c], b += splat(p1[u]) * vb[(int64_t)u * nvec + c];
      if (qb != qa) acc1[c] = b;
      acc0[c] = a;
    }
  }
}

/* s[q][u] = <q_q, K_u> for nq queries (rows of q, [nq][dpad]) and the BK tokens of the block (rows
 * of kb). Four queries x two tokens at a time: eight accumulators share each load. */
INLINE void head_scores(const float *q, int nq, const float *kb, int nvec, float *s) {
  for (int qa = 0; qa < nq; qa += 4) {
    const v8f *qr[4];
    for (int k = 0; k < 4; k++) qr[k] = (const v8f *)(q + (int64_t)(qa + k < nq ? qa + k : nq - 1) * nvec * VEC);
    for (int u = 0; u < BK; u += 2) {
      const v8f *k0 = (const v8f *)(kb + (int64_t)u * nvec * VEC), *k1 = k0 + nvec;
      v8f a00 = splat(0), a01 = splat(0), a10 = splat(0), a11 = splat(0);
      v8f a20 = splat(0), a21 = splat(0), a30 = splat(0), a31 = splat(0);
      for (int c = 0; c < nvec; c++) {
        const v8f x0 = k0[c], x1 = k1[c];
        a00 += qr[0][c] * x0, a01 += qr[0][c] * x1;
        a10 += qr[1][c] * x0, a11 += qr[1][c] * x1;
        a20 += qr[2][c] * x0, a21 += qr[2][c] * x1;
        a30 += qr[3][c] * x0, a31 += qr[3][c] * x1;
      }
      const v8f acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
      for (int k = 0; k < 4 && qa + k < nq; k++) {
        s[(int64_t)(qa + k) * BK + u] = hsum(&acc[k][0]);
        s[(int64_t)(qa + k) * BK + u + 1] = hsum(&acc[k][1]);
      }
    }
  }
}

/* Prefetch the K and V rows (all the item's heads) of the up-to-BK tokens from token j of a row. */
INLINE void prefetch_block(const fast_run *fr, const run_tensors *t, const work_item *it, int64_t e0, int64_t j,
                           int64_t j_end) {
  const int64_t page_size = fr->bv->page_size;
  const int64_t k_bytes = (int64_t)dtype_size(t->k.dtype), v_bytes = (int64_t)dtype_size(t->v.dtype);
  const int64_t k_row = fr->head_dim * t->k.stride[3] * k_bytes, v_row = fr->head_dim * t->v.stride[3] * v_bytes;
  const int64_t end = j + BK < j_end ? j + BK : j_end;
  for (; j < end; j++) {
    const int64_t page = page_id(fr, e0 + j / page_size), slot = j % page_size;
    for (int hh = 0; hh < it->heads; hh++) {
      const int64_t h = it->kv_head + hh;
      const char *k = t->k.data + (page * t->k.stride[0] + slot * t->k.stride[1] + h * t->k.stride[2]) * k_bytes;
      const char *v = t->v.data + (page * t->v.stride[0] + slot * t->v.stride[1] + h * t->v.stride[2]) * v_bytes;
      for (int64_t b = 0; b < k_row; b += 64) __builtin_prefetch(k + b);
      for (int64_t b = 0; b < v_row; b += 64) __builtin_prefetch(v + b);
    }
  }
}

/* o[x * stride] = acc[x] * inv as bf16 or f16 (round to nearest even), eight at a time where the
 * row is contiguous; lanes outside f16's normal range go through the full scalar conversion. */
CPU_CLONES
static void store_row_16(const fast_run *fr, uint16_t *o, int64_t stride, const float *acc, float inv, int bf16) {
  const int n = fr->head_dim;
  int x = 0;
  if (stride == 1) {
    for (; x + VEC <= n; x += VEC) {
      v8f f;
      memcpy(&f, acc + x, sizeof f);
      f = f * splat(inv);
      const v8u b = (v8u)f, a = b & 0x7fffffffu;
      v8u r;
      if (bf16) {
        const v8i nan = (v8i)(a > 0x7f800000u);
        r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        r = (r & ~(v8u)nan) | (((b >> 16) | 0x40u) & (v8u)nan);
      } else {
        r = ((b >> 16) & 0x8000u) | ((a + 0x0fffu + ((a >> 13) & 1u) - 0x38000000u) >> 13);
      }
      v8h h = __builtin_convertvector(r, v8h);
      if (!bf16) { /* zero, subnormal, overflow, inf, NaN: the slow path, lane by lane */
        const v8i normal = (v8i)(a >= 0x38800000u) & (v8i)(a < 0x477ff000u);
        for (int k = 0; k < VEC; k++)
          if (!normal[k]) h[k] = float_to_half(f[k]);
      }
      memcpy(o + x, &h, sizeof h);
    }
  }
  for (; x < n; x++) o[x * stride] = bf16 ? f32_to_bf16(acc[x] * inv) : f32_to_f16(acc[x] * inv);
}

/* o = acc / l per query of the item; a query that saw nothing gets o = 0, lse = -inf. */
static void write_outputs(const fast_run *fr, const work_item *it, int nq, const float *acc_all, const float *m,
                          const float *l_all) {
  const run_tensors *t = fr->t;
  const int head_dim = fr->head_dim;
  for (int qi = 0; qi < nq; qi++) {
    int64_t r;
    int h;
    query_of(fr, it, qi, &r, &h);
    const int64_t row = fr->bv->qo_indptr[it->row] + r;
    const float l = l_all[qi];
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    const float *acc = acc_all + (int64_t)qi * fr->dpad;
    const int64_t ob = row * t->out.stride[0] + h * t->out.stride[1], os = t->out.stride[2];
    if (dtype_eq(t->out.dtype, DT_F32)) {
      float *o = (float *)t->out.data + ob;
      for (int x = 0; x < head_dim; x++) o[x * os] = acc[x] * inv;
    } else if (dtype_eq(t->out.dtype, DT_BF16) || dtype_eq(t->out.dtype, DT_F16)) {
      store_row_16(fr, (uint16_t *)t->out.data + ob, os, acc, inv, dtype_eq(t->out.dtype, DT_BF16));
    } else {
      for (int x = 0; x < head_dim; x++) tview_set(&t->out, ob + x * os, acc[x] * inv);
    }
    if (t->lse.data)
      ((float *)t->lse.data)[row * t->lse.stride[0] + h * t->lse.stride[1]] =
          l > 0 ? (float)((double)m[qi] + log((double)l)) : -INFINITY;
  }
}

/* Merge the chunk states of a split item (slots part .. part + parts - 1, in KV order, so the
 * bits do not depend on which thread ran which chunk) and write the outputs. */
static void merge_parts(const fast_run *fr, const work_item *it, float *acc, float *m, float *l) {
  const int nq = (it->q_end - it->q_begin) * fr->group * it->heads, dpad = fr->dpad;
  for (int qi = 0; qi < nq; qi++) {
    float mx = -INFINITY;
    for (int64_t c = 0; c < it->parts; c++) {
      const float *src = fr->partial + (it->part + c) * fr->part_floats;
      float mc = src[(int64_t)nq * dpad + qi];
      mx = mc > mx ? mc : mx;
    }
    float *a = acc + (int64_t)qi * dpad, sum = 0;
    memset(a, 0, sizeof(float) * (size_t)dpad);
    for (int64_t c = 0; c < it->parts && mx > -INFINITY; c++) {
      const float *src = fr->partial + (it->part + c) * fr->part_floats;
      const float mc = src[(int64_t)nq * dpad + qi], lc = src[(int64_t)nq * (dpad + 1) + qi];
      if (lc == 0) continue; /* an empty chunk: its acc is 0 and its m -inf */
      const float w = expf(mc - mx);
      sum += lc * w;
      for (int x = 0; x < dpad; x++) a[x] += w * src[(int64_t)qi * dpad + x];
    }
    m[qi] = mx;
    l[qi] = sum;
  }
  write_outputs(fr, it, nq, acc, m, l);
}

CPU_CLONES
static void run_item(const fast_run *fr, const work_item *it, scratch *sc) {
  const kvattn_attention_desc *d = fr->d;
  const batch_view *bv = fr->bv;
  const run_tensors *t = fr->t;
  const int64_t i = it->row, qo_len = bv_qo_len(bv, i), kv_len = bv_kv_len(bv, i);
  const int64_t e0 = bv->kv_indptr[i], page_size = bv->page_size;
  const int head_dim = fr->head_dim, dpad = fr->dpad, nvec = dpad / VEC;
  const int per_head = (it->q_end - it->q_begin) * fr->group, nq = per_head * it->heads;
  const int64_t qp_lo = q_pos_of(fr, i, it->q_begin, qo_len, kv_len);
  const int64_t qp_hi = q_pos_of(fr, i, it->q_end - 1, qo_len, kv_len);
  const int windowed = d->window_left >= 0, has_mask = t->mask.data != NULL;
  const float cap = d->logits_soft_cap;

  load_queries(fr, it, sc, nq, qo_len, kv_len);

  /* this item's share of the row's KV (all of it unless the KV is split) */
  const int64_t j_begin = it->j_lo, j_end = it->j_hi;

  for (int64_t jb = j_begin; jb < j_end; jb += BK) {
    const int count = (int)(j_end - jb < BK ? j_end - jb : BK);
    /* Gather: where each token lives and its position. */
    int64_t kmin = INT64_MAX, kmax = INT64_MIN;
    int all_ok = 1;
    int64_t k_off[BK], v_off[BK];
    for (int u = 0; u < BK; u++) {
      sc->ok[u] = 0;
      if (u >= count) continue;
      const int64_t j = jb + u, page = page_id(fr, e0 + j / page_size), slot = j % page_size;
      const int64_t pos = bv->bsr_positions ? page * page_size + slot : j;
      sc->kv_pos[u] = pos;
      if (pos >= bv->kv_token_limit) { all_ok = 0; continue; }
      sc->ok[u] = 1;
      k_off[u] = page * t->k.stride[0] + slot * t->k.stride[1];
      v_off[u] = page * t->v.stride[0] + slot * t->v.stride[1];
      if (pos < kmin) kmin = pos;
      if (pos > kmax) kmax = pos;
    }
    if (kmin == INT64_MAX) continue;
    if (d->causal && kmin > qp_hi) continue;
    if (windowed && kmax < qp_lo - d->window_left) continue;
    if (count < BK) all_ok = 0;
    /* Pages are scattered, so the hardware prefetchers see no stream: ask for the next block's
     * rows now, and they arrive while this block is computed (3x on decode over a paged cache). */
    if (jb + BK < j_end) prefetch_block(fr, t, it, e0, jb + BK, j_end);

    /* Per kv head of the item: convert the block (K transposed and rotated, V as rows; absent
     * tokens are zeros), then update that head's queries. */
    const size_t k_es = dtype_size(t->k.dtype), v_es = dtype_size(t->v.dtype);
    for (int hh = 0; hh < it->heads; hh++) {
    const int64_t k_head = (it->kv_head + hh) * t->k.stride[2], v_head = (it->kv_head + hh) * t->v.stride[2];
    for (int u = 0; u < BK; u++) {
      float *krow = sc->kb + (int64_t)u * dpad, *vrow = sc->vb + (int64_t)u * dpad;
      if (!sc->ok[u]) {
        memset(krow, 0, sizeof(float) * (size_t)dpad);
        memset(vrow, 0, sizeof(float) * (size_t)dpad);
        continue;
      }
      load_row(krow, t->k.data + (k_off[u] + k_head) * (int64_t)k_es, fr->kv_kind, t->k.stride[3], head_dim);
      if (d->rope) rope_row_table(fr, krow, sc->kv_pos[u]);
      load_row(vrow, t->v.data + (v_off[u] + v_head) * (int64_t)v_es, fr->kv_kind, t->v.stride[3], head_dim);
      for (int x = head_dim; x < dpad; x++) krow[x] = vrow[x] = 0;
    }
    head_scores(sc->q + (int64_t)hh * per_head * dpad, per_head, sc->kb, nvec, sc->s);

    /* A full block: every token exists and no query of the item can have any of them masked.
     * Then the weights of two queries are applied to V together, with no per-token bookkeeping. */
    const int full_block = all_ok && !has_mask && !(d->causal && kmax > qp_lo) &&
                           !(windowed && kmin < qp_hi - d->window_left);
    for (int qi = hh * per_head; qi < (hh + 1) * per_head; qi++) {
      int64_t r;
      int h;
      query_of(fr, it, qi, &r, &h);
      const int64_t q_pos = q_pos_of(fr, i, r, qo_len, kv_len);
      float *s = sc->s + (int64_t)(qi - hh * per_head) * BK;
      if (cap > 0)
        for (int u = 0; u < count; u++) s[u] = cap * tanhf(s[u] / cap);
      if (d->alibi) {
        const float slope = fr->alibi_slopes[h];
        for (int u = 0; u < count; u++) s[u] += slope * (float)(sc->kv_pos[u] - q_pos);
      }
      /* Masks, only where some token of the block may be masked for this query. */
      int need_mask = !full_block && (!all_ok || has_mask || (d->causal && kmax > q_pos) ||
                                      (windowed && kmin < q_pos - d->window_left));
      if (need_mask) {
        const int64_t row = bv->qo_indptr[i] + r;
        for (int u = 0; u < BK; u++) {
          int keep = sc->ok[u] && visible(d, q_pos, sc->kv_pos[u]);
          if (keep && has_mask) {
            int64_t bit = bv->bsr_positions ? row * bv->kv_token_limit + sc->kv_pos[u]
                                            : fr->mask_first[i] + r * kv_len + (jb + u);
            keep = mask_bit(&t->mask, bit);
          }
          if (!keep) s[u] = -INFINITY;
        }
      }
      v8f *sv = (v8f *)s;
      v8f vmax = sv[0];
      for (int c = 1; c < BK / VEC; c++) vmax = SELECT_F(sv[c] > vmax, sv[c], vmax);
      float mx = hmax(&vmax);
      if (mx == -INFINITY) { /* nothing visible in this block for this query (never in a full block) */
        sc->alpha[qi - hh * per_head] = 1.0f;
        memset(s, 0, sizeof(float) * BK); /* weights 0 (only NaN/inf inputs get here in a full block) */
        continue;
      }

      float m_old = sc->m[qi], m_new = m_old > mx ? m_old : mx;
      float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
      v8f mn = splat(m_new), sum = splat(0);
      for (int c = 0; c < BK / VEC; c++) { /* the scores become the weights, in place */
        const v8f centered = sv[c] - mn;
        sv[c] = vexp(&centered);
        sum += sv[c];
      }
      sc->l[qi] = sc->l[qi] * alpha + hsum(&sum);
      sc->m[qi] = m_new;
      sc->alpha[qi - hh * per_head] = alpha;
      if (full_block) continue; /* V is applied below, two queries at a time */

      /* acc = acc * alpha + sum_u p_u V_u over the tokens with weight (masked ones are skipped,
       * so whatever their V holds cannot reach the output). */
      int nlive = 0;
      const v8f *live_row[BK];
      float live_w[BK];
      for (int u = 0; u < BK; u++)
        if (s[u] != 0) live_row[nlive] = (const v8f *)(sc->vb + (int64_t)u * dpad), live_w[nlive++] = s[u];
      v8f *acc = (v8f *)(sc->acc + (int64_t)qi * dpad);
      /* four accumulators at a time stay in registers while the live tokens stream past */
      int c = 0;
      for (; c + 4 <= nvec; c += 4) {
        v8f a0 = acc[c] * splat(alpha), a1 = acc[c + 1] * splat(alpha);
        v8f a2 = acc[c + 2] * splat(alpha), a3 = acc[c + 3] * splat(alpha);
        for (int k = 0; k < nlive; k++) {
          const v8f pk = splat(live_w[k]), *row = live_row[k] + c;
          a0 += pk * row[0], a1 += pk * row[1], a2 += pk * row[2], a3 += pk * row[3];
        }
        acc[c] = a0, acc[c + 1] = a1, acc[c + 2] = a2, acc[c + 3] = a3;
      }
      for (; c < nvec; c++) {
        v8f a = acc[c] * splat(alpha);
        for (int k = 0; k < nlive; k++) a += splat(live_w[k]) * live_row[k][c];
        acc[c] = a;
      }
    }
    if (full_block) block_pv_pairs(sc, hh * per_head, per_head, nvec);
    } /* kv heads */
  }

  if (it->part >= 0) { /* one chunk of a split KV: keep the state for the merge */
    float *dst = fr->partial + it->part * fr->part_floats;
    memcpy(dst, sc->acc, sizeof(float) * (size_t)nq * (size_t)dpad);
    memcpy(dst + (int64_t)nq * dpad, sc->m, sizeof(float) * (size_t)nq);
    memcpy(dst + (int64_t)nq * (dpad + 1), sc->l, sizeof(float) * (size_t)nq);
    return;
  }
  write_outputs(fr, it, nq, sc->acc, sc->m, sc->l);
}

/* ------------------------------------------------------------------ threads */

static size_t scratch_floats(const fast_run *fr, size_t *parts) {
  size_t per_head = (size_t)fr->q_rows_per_item * (size_t)fr->group, dp = (size_t)fr->dpad;
  size_t nq = per_head * (size_t)fr->heads_per_item;
  size_t sizes[8] = {nq * dp, nq * dp, nq, nq, dp * BK, dp * BK, per_head * BK, per_head};
  size_t total = 0;
  for (int i = 0; i < 8; i++) {
    parts[i] = total;
    total += align_up(sizes[i], 16); /* 64 bytes */
  }
  return total;
}

static int scratch_init(const fast_run *fr, scratch *sc) {
  size_t parts[8], total = scratch_floats(fr, parts);
  float *mem = aligned_alloc(64, total * sizeof(float));
  if (!mem) return 0;
  sc->mem = mem;
  sc->q = mem + parts[0], sc->acc = mem + parts[1], sc->m = mem + parts[2], sc->l = mem + parts[3];
  sc->kb = mem + parts[4], sc->vb = mem + parts[5], sc->s = mem + parts[6], sc->alpha = mem + parts[7];
  return 1;
}

typedef struct worker {
  fast_run *fr;
  scratch *sc;
} worker;

static void *worker_main(void *arg) {
  worker *w = arg;
  for (;;) {
    long long k = atomic_fetch_add(&w->fr->next_item, 1);
    if (k >= w->fr->num_items) break;
    run_item(w->fr, &w->fr->items[k], w->sc);
  }
  return NULL;
}

static int by_cost_desc(const void *a, const void *b) {
  double ca = ((const work_item *)a)->cost, cb = ((const work_item *)b)->cost;
  return ca < cb ? 1 : ca > cb ? -1 : 0;
}

/* cos/sin of every KV position's angles, by the angle-addition recurrence in float64 (re-seeded
 * exactly every 256 positions, so the drift stays ~1e-14): one sin/cos per 256 entries. */
static kvattn_status rope_table(fast_run *fr, int64_t positions) {
  const int half = fr->head_dim / 2;
  fr->rope_positions = positions;
  if (positions == 0 || half == 0) return KVATTN_SUCCESS;
  size_t n = (size_t)positions * (size_t)half;
  fr->rope_cos = malloc(sizeof(float) * n);
  fr->rope_sin = malloc(sizeof(float) * n);
  RETURN_IF(!fr->rope_cos || !fr->rope_sin, KVATTN_ERROR_OUT_OF_MEMORY,
            "kvattn_run: RoPE table of %lld positions x %d pairs", (long long)positions, half);
  for (int x = 0; x < half; x++) {
    const double step = rope_frequency(fr->d, x) / fr->d->rope_scale;
    const double c1 = cos(step), s1 = sin(step);
    double c = 1, s = 0;
    for (int64_t p = 0; p < positions; p++) {
      if (p % 256 == 0) c = cos((double)p * step), s = sin((double)p * step);
      fr->rope_cos[p * half + x] = (float)c;
      fr->rope_sin[p * half + x] = (float)s;
      double cn = c * c1 - s * s1;
      s = s * c1 + c * s1;
      c = cn;
    }
  }
  return KVATTN_SUCCESS;
}

kvattn_status cpu_attention_fast(const cpu_problem *p, int num_threads) {
  const kvattn_attention_desc *d = p->desc;
  const batch_view *bv = p->bv;
  const run_tensors *t = p->t;
  fast_run fr;
  memset(&fr, 0, sizeof fr);
  fr.d = d, fr.bv = bv, fr.t = t, fr.alibi_slopes = p->alibi_slopes;
  fr.head_dim = d->head_dim;
  fr.dpad = (int)align_up((size_t)d->head_dim, VEC);
  fr.group = d->num_qo_heads / d->num_kv_heads;
  fr.q_kind = dtype_kind(t->q.dtype);
  fr.kv_kind = dtype_kind(t->k.dtype);
  RETURN_IF(fr.q_kind < 0 || fr.kv_kind < 0 || dtype_kind(t->out.dtype) < 0, KVATTN_ERROR_UNSUPPORTED,
            "kvattn_run: the CPU backend reads float16, bfloat16, float32 and float64 (q %s, kv %s, out %s)",
            dtype_name(t->q.dtype), dtype_name(t->k.dtype), dtype_name(t->out.dtype));
  RETURN_IF(d->head_dim > 512, KVATTN_ERROR_UNSUPPORTED, "kvattn_run: head_dim=%d > 512 on the CPU", d->head_dim);
  RETURN_IF(d->alibi && !p->alibi_slopes, KVATTN_ERROR_INTERNAL, "kvattn_run: ALiBi without slopes");

  const int64_t num_pages = t->k.shape[0];
  for (int64_t e = 0; e < bv->kv_entries; e++) {
    int64_t page = page_id(&fr, e);
    RETURN_IF(page < 0 || page >= num_pages, KVATTN_ERROR_INVALID_INDEX,
              "kvattn_run: indices[%lld]=%lld is outside the cache's %lld pages", (long long)e,
              (long long)page, (long long)num_pages);
  }

  /* Items: (work row, block of query rows, range of kv heads). One item takes as many kv heads as
   * keeps enough items for the threads (4 per thread) and at most QUERIES_PER_ITEM queries: a
   * decode item then reads whole token rows of an NHD page (all heads are adjacent there) instead
   * of 256-byte pieces 2 KiB apart, which costs a TLB miss per row on large caches. */
  fr.q_rows_per_item = QUERIES_PER_ITEM / fr.group > 0 ? QUERIES_PER_ITEM / fr.group : 1;
  int64_t kv_len_max = 0, mask_bits = 0, max_rows = 1;
  for (int64_t i = 0; i < bv->batch; i++) {
    int64_t qo_len = bv_qo_len(bv, i);
    if (qo_len > max_rows) max_rows = qo_len;
    if (bv_kv_len(bv, i) > kv_len_max) kv_len_max = bv_kv_len(bv, i);
  }
  if (max_rows > fr.q_rows_per_item) max_rows = fr.q_rows_per_item;
  /* Split KV: a row longer than two chunks (decode-like: few query rows) is cut into chunks whose
   * states are merged after.
   * The chunk depends only on the desc (fixed_split_size pages, or SPLIT_TOKENS), never on the
   * batch or the thread count, so a request gets the same bits in any batch on any machine. */
  int64_t chunk = INT64_MAX;
  if (!d->disable_split_kv)
    chunk = d->fixed_split_size > 0 ? (int64_t)d->fixed_split_size * bv->page_size : SPLIT_TOKENS;
  const int64_t split_above = chunk == INT64_MAX ? INT64_MAX : d->fixed_split_size > 0 ? chunk : 2 * chunk;
  kvattn_status st = KVATTN_SUCCESS;
  int64_t *mask_first = NULL;
  scratch *scs = NULL;
  pthread_t *tids = NULL;
  worker *workers = NULL;
  int *started = NULL;
  work_item *groups = NULL; /* the split items' first chunks, for the merge */
  int threads = 0;
  int64_t num_items = 0, num_groups = 0, num_parts = 0;
  fr.heads_per_item = d->num_kv_heads; /* pass 0 counts (row, query block, chunk) units with all heads */
  for (int pass = 0; pass < 2; pass++) { /* pass 0 counts, pass 1 fills */
    int64_t n = 0, g = 0, part = 0;
    mask_bits = 0;
    for (int64_t i = 0; i < bv->batch; i++) {
      const int64_t qo_len = bv_qo_len(bv, i), kv_len = bv_kv_len(bv, i);
      if (pass) mask_first[i] = p->mask_offset ? p->mask_offset[i] : mask_bits;
      mask_bits += ceil_div64(qo_len * kv_len, 8) * 8;
      for (int64_t qb = 0; qb < qo_len; qb += fr.q_rows_per_item) {
        const int64_t qe = qb + fr.q_rows_per_item < qo_len ? qb + fr.q_rows_per_item : qo_len;
        int64_t jb, je;
        item_kv_range(&fr, i, qb, qe, &jb, &je);
        /* chunks start at multiples of `chunk` from token 0, whatever the query block; only blocks
         * of few query rows are split (long ones have parallelism enough, and states to keep) */
        const int split = je - jb > split_above && qe - qb <= SPLIT_MAX_ROWS;
        const int64_t c0 = split ? jb / chunk : 0;
        const int64_t parts = split ? ceil_div64(je, chunk) - c0 : 1;
        for (int h = 0; h < d->num_kv_heads; h += fr.heads_per_item) {
          for (int64_t c = 0; c < parts; c++, n++) {
            if (!pass) continue;
            int64_t lo = parts > 1 ? (c0 + c) * chunk : jb, hi = parts > 1 ? (c0 + c + 1) * chunk : je;
            lo = lo < jb ? jb : lo, hi = hi > je ? je : hi;
            work_item w = {(int32_t)i, (int32_t)qb, (int32_t)qe, h, fr.heads_per_item, lo, hi,
                           parts > 1 ? part + c : -1, parts,
                           (double)(qe - qb) * fr.heads_per_item * (double)(hi - lo + BK)};
            fr.items[n] = w;
            if (parts > 1 && c == 0) groups[g] = w;
          }
          if (parts > 1) g++, part += parts;
        }
      }
    }
    if (!pass) {
      /* n units (all heads together): take as many kv heads per item as keeps 4 items per thread */
      const int64_t units = n;
      fr.heads_per_item = 1;
      for (int hp = d->num_kv_heads; hp > 1; hp--) {
        if (d->num_kv_heads % hp) continue;
        if (max_rows * fr.group * hp > QUERIES_PER_ITEM) continue;
        if (units * (d->num_kv_heads / hp) < 4 * (int64_t)(num_threads > 1 ? num_threads : 1)) continue;
        fr.heads_per_item = hp;
        break;
      }
      const int64_t per_unit = d->num_kv_heads / fr.heads_per_item;
      n *= per_unit, g *= per_unit, part *= per_unit;
      num_items = n, num_groups = g, num_parts = part;
      fr.part_floats = (int64_t)(max_rows < SPLIT_MAX_ROWS ? max_rows : SPLIT_MAX_ROWS) * fr.group *
                       fr.heads_per_item * (fr.dpad + 2);
      fr.items = malloc(sizeof(work_item) * (size_t)(n > 0 ? n : 1));
      groups = malloc(sizeof(work_item) * (size_t)(g > 0 ? g : 1));
      mask_first = malloc(sizeof(int64_t) * (size_t)(bv->batch > 0 ? bv->batch : 1));
      fr.partial = part ? malloc(sizeof(float) * (size_t)part * (size_t)fr.part_floats) : NULL;
      if (!fr.items || !groups || !mask_first || (part && !fr.partial)) {
        st = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_run: %lld work items, %lld split-KV chunks",
                       (long long)n, (long long)part);
        goto done;
      }
    }
  }
  int64_t n = num_items;
  fr.num_items = n;
  fr.mask_first = mask_first;
  qsort(fr.items, (size_t)n, sizeof(work_item), by_cost_desc);
  if (d->rope) {
    int64_t positions = bv->bsr_positions ? bv->kv_token_limit : kv_len_max;
    TRY_GOTO(rope_table(&fr, positions), st, done);
  }
  atomic_init(&fr.next_item, 0);

  threads = num_threads < 1 ? 1 : num_threads;
  if (threads > n) threads = n > 0 ? (int)n : 1;
  /* scratch holds 32-byte aligned arrays (vector stores): calloc only promises 16. */
  scs = aligned_alloc(64, align_up((size_t)threads * sizeof(scratch), 64));
  if (scs) memset(scs, 0, (size_t)threads * sizeof(scratch));
  tids = calloc((size_t)threads, sizeof(pthread_t));
  workers = calloc((size_t)threads, sizeof(worker));
  started = calloc((size_t)threads, sizeof(int));
  if (!scs || !tids || !workers || !started) {
    st = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_run: state for %d threads", threads);
    goto done;
  }
  for (int w = 0; w < threads; w++) {
    if (!scratch_init(&fr, &scs[w])) {
      st = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_run: scratch for %d threads", threads);
      goto done;
    }
    workers[w] = (worker){&fr, &scs[w]};
  }
  /* The calling thread is worker 0; if a thread cannot start, the others take its share. */
  for (int w = 1; w < threads; w++) started[w] = pthread_create(&tids[w], NULL, worker_main, &workers[w]) == 0;
  worker_main(&workers[0]);
  for (int w = 1; w < threads; w++)
    if (started[w]) pthread_join(tids[w], NULL);
  /* Split KV: merge each split item's chunks (small next to the chunks themselves). */
  for (int64_t g = 0; g < num_groups; g++) merge_parts(&fr, &groups[g], scs[0].acc, scs[0].m, scs[0].l);
  (void)num_parts;

done:
  if (scs)
    for (int w = 0; w < threads; w++) free(scs[w].mem);
  free(scs), free(tids), free(workers), free(started);
  free(fr.items), free(groups), free(mask_first), free(fr.rope_cos), free(fr.rope_sin), free(fr.partial);
  return st;
}
