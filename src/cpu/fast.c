/*
 * fast.c - the CPU fast path: fp32 accumulation, blocked online softmax, pthreads.
 *
 * Work is dealt in items of (work row, kv_head, block of query rows). An item holds every query
 * head of its kv_head's group for its query rows, so each KV block is read and converted once and
 * then used by all of them (GQA). Per item:
 *   1. the queries are loaded, rotated (RoPE) and pre-scaled by sm_scale into fp32 rows;
 *   2. the row's KV tokens are walked in blocks of BK: each block is gathered through the page
 *      table, converted to fp32 (K transposed to [head_dim][BK] so the score loop runs along the
 *      tokens with no horizontal sums; V as [BK][head_dim]), rotated if RoPE is on;
 *   3. for each query: scores, soft-cap, ALiBi, masks, then the online-softmax update
 *      m' = max(m, max s), l' = l e^(m-m') + sum e^(s-m'), acc' = acc e^(m-m') + sum e^(s-m') v.
 * Items are sorted by cost (longest first) and taken from a shared counter, so one long request
 * among short ones does not leave the other threads idle at the end.
 *
 * The inner loops use GCC vector extensions on 8-float vectors; the per-item function is cloned
 * for AVX2+FMA and picked at load time (target_clones), so the library still runs on any x86-64.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* The file is plain float math where contracting a*b+c into one FMA only adds accuracy; -std=c11
 * turns contraction off, so turn it back on here. */
#pragma GCC optimize("fp-contract=fast")
/* The 32-byte vector helpers are always inlined: no vector ever crosses a call boundary, so the
 * ABI note GCC prints for them does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define BK 32   /* KV tokens per block: four vectors of 8 */
#define VEC 8   /* floats per vector */
#define QUERIES_PER_ITEM 64 /* query heads x rows an item aims for: KV conversion is then ~1% */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

enum { KIND_F16, KIND_BF16, KIND_F32, KIND_F64 };

static int dtype_kind(DLDataType t) {
  if (dtype_eq(t, DT_F16)) return KIND_F16;
  if (dtype_eq(t, DT_BF16)) return KIND_BF16;
  if (dtype_eq(t, DT_F32)) return KIND_F32;
  if (dtype_eq(t, DT_F64)) return KIND_F64;
  return -1;
}

/* ------------------------------------------------------------------ vector helpers */

INLINE v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
INLINE v8f select_f(v8i mask, v8f a, v8f b) { return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* e^x for x <= 0 (the softmax's s - max), relative error ~2e-7; x < -86 (and -inf) gives 0.
 * x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^6, 2^n added to the exponent. */
INLINE v8f vexp(v8f x) {
  const v8f shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  v8i tiny = x < splat(-86.0f);
  x = select_f(tiny, splat(-86.0f), x);
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
  v8i bits = (v8i)p + (ni << 23);
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

/* ------------------------------------------------------------------ the run */

typedef struct work_item {
  int32_t row, kv_head, q_begin, q_end; /* query rows [q_begin, q_end) of work row `row` */
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
  float *kt;        /* [dpad][BK]: the K block, transposed */
  float *vb;        /* [BK][dpad]: the V block */
  float *krow;      /* [dpad] */
  float s[BK] __attribute__((aligned(32)));
  float p[BK] __attribute__((aligned(32)));
  int64_t kv_pos[BK];
  int32_t ok[BK];   /* the token exists (inside the row and the data) */
  int32_t live[BK]; /* tokens with a nonzero weight for the current query */
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

/* Load the item's queries: q' = RoPE(q) * sm_scale, in fp32, padded with zeros to dpad. */
static void load_queries(const fast_run *fr, const work_item *it, scratch *sc, int64_t qo_len, int64_t kv_len) {
  const kvattn_attention_desc *d = fr->d;
  const tview *q = &fr->t->q;
  const int half = fr->head_dim / 2;
  double tmp[1024]; /* head_dim <= 512 */
  int qi = 0;
  for (int64_t r = it->q_begin; r < it->q_end; r++) {
    const int64_t row = fr->bv->qo_indptr[it->row] + r, pos = q_pos_of(fr, it->row, r, qo_len, kv_len);
    for (int g = 0; g < fr->group; g++, qi++) {
      const int h = it->kv_head * fr->group + g;
      float *dst = sc->q + (int64_t)qi * fr->dpad;
      const int64_t base = row * q->stride[0] + h * q->stride[1];
      for (int x = 0; x < fr->head_dim; x++) tmp[x] = tview_get(q, base + x * q->stride[2]);
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
}

/* s[t] = <q, K_t> for the BK tokens of the block (K transposed: one vector FMA per dim and
 * 8 tokens, no horizontal sum). */
INLINE void block_scores(const float *q, const float *kt, int head_dim, float *s) {
  v8f a0 = splat(0), a1 = splat(0), a2 = splat(0), a3 = splat(0);
  for (int x = 0; x < head_dim; x++) {
    const v8f *k = (const v8f *)(kt + (int64_t)x * BK);
    v8f qx = splat(q[x]);
    a0 += qx * k[0];
    a1 += qx * k[1];
    a2 += qx * k[2];
    a3 += qx * k[3];
  }
  v8f *o = (v8f *)s;
  o[0] = a0, o[1] = a1, o[2] = a2, o[3] = a3;
}

CPU_CLONES
static void run_item(const fast_run *fr, const work_item *it, scratch *sc) {
  const kvattn_attention_desc *d = fr->d;
  const batch_view *bv = fr->bv;
  const run_tensors *t = fr->t;
  const int64_t i = it->row, qo_len = bv_qo_len(bv, i), kv_len = bv_kv_len(bv, i);
  const int64_t e0 = bv->kv_indptr[i], page_size = bv->page_size;
  const int head_dim = fr->head_dim, dpad = fr->dpad, nvec = dpad / VEC;
  const int nq = (it->q_end - it->q_begin) * fr->group;
  const int64_t qp_lo = q_pos_of(fr, i, it->q_begin, qo_len, kv_len);
  const int64_t qp_hi = q_pos_of(fr, i, it->q_end - 1, qo_len, kv_len);
  const int windowed = d->window_left >= 0, has_mask = t->mask.data != NULL;
  const float cap = d->logits_soft_cap;

  load_queries(fr, it, sc, qo_len, kv_len);

  /* Paged and ragged positions are the token index, so causal and window bound the walk. */
  int64_t j_begin = 0, j_end = kv_len;
  if (!bv->bsr_positions) {
    if (d->causal && qp_hi + 1 < j_end) j_end = qp_hi + 1 > 0 ? qp_hi + 1 : 0;
    if (windowed && qp_lo - d->window_left > 0) j_begin = qp_lo - d->window_left;
  }
  const int64_t k_head = it->kv_head * t->k.stride[2], v_head = it->kv_head * t->v.stride[2];

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
      k_off[u] = page * t->k.stride[0] + slot * t->k.stride[1] + k_head;
      v_off[u] = page * t->v.stride[0] + slot * t->v.stride[1] + v_head;
      if (pos < kmin) kmin = pos;
      if (pos > kmax) kmax = pos;
    }
    if (kmin == INT64_MAX) continue;
    if (d->causal && kmin > qp_hi) continue;
    if (windowed && kmax < qp_lo - d->window_left) continue;
    if (count < BK) all_ok = 0;

    /* Convert the block: K transposed (and rotated), V as rows; absent tokens are zeros. */
    const size_t k_es = dtype_size(t->k.dtype), v_es = dtype_size(t->v.dtype);
    for (int u = 0; u < BK; u++) {
      float *vrow = sc->vb + (int64_t)u * dpad;
      if (!sc->ok[u]) {
        for (int x = 0; x < dpad; x++) sc->kt[(int64_t)x * BK + u] = 0, vrow[x] = 0;
        continue;
      }
      load_row(sc->krow, t->k.data + k_off[u] * (int64_t)k_es, fr->kv_kind, t->k.stride[3], head_dim);
      if (d->rope) rope_row_table(fr, sc->krow, sc->kv_pos[u]);
      for (int x = 0; x < head_dim; x++) sc->kt[(int64_t)x * BK + u] = sc->krow[x];
      load_row(vrow, t->v.data + v_off[u] * (int64_t)v_es, fr->kv_kind, t->v.stride[3], head_dim);
      for (int x = head_dim; x < dpad; x++) vrow[x] = 0;
    }

    for (int qi = 0; qi < nq; qi++) {
      const int64_t r = it->q_begin + qi / fr->group;
      const int h = it->kv_head * fr->group + qi % fr->group;
      const int64_t q_pos = q_pos_of(fr, i, r, qo_len, kv_len);
      float *s = sc->s;
      block_scores(sc->q + (int64_t)qi * dpad, sc->kt, head_dim, s);
      if (cap > 0)
        for (int u = 0; u < count; u++) s[u] = cap * tanhf(s[u] / cap);
      if (d->alibi) {
        const float slope = fr->alibi_slopes[h];
        for (int u = 0; u < count; u++) s[u] += slope * (float)(sc->kv_pos[u] - q_pos);
      }
      /* Masks, only where some token of the block may be masked for this query. */
      int need_mask = !all_ok || has_mask || (d->causal && kmax > q_pos) ||
                      (windowed && kmin < q_pos - d->window_left);
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
      float mx = -INFINITY;
      for (int u = 0; u < BK; u++) mx = s[u] > mx ? s[u] : mx;
      if (mx == -INFINITY) continue; /* nothing visible in this block for this query */

      float m_old = sc->m[qi], m_new = m_old > mx ? m_old : mx;
      float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
      v8f *pv = (v8f *)sc->p, *sv = (v8f *)s;
      v8f mn = splat(m_new), sum = splat(0);
      for (int c = 0; c < BK / VEC; c++) {
        pv[c] = vexp(sv[c] - mn);
        sum += pv[c];
      }
      float psum = 0;
      for (int c = 0; c < VEC; c++) psum += sum[c];
      sc->l[qi] = sc->l[qi] * alpha + psum;
      sc->m[qi] = m_new;

      /* acc = acc * alpha + sum_u p_u V_u over the tokens with weight (masked ones are skipped,
       * so whatever their V holds cannot reach the output). */
      int nlive = 0;
      for (int u = 0; u < BK; u++)
        if (sc->p[u] != 0) sc->live[nlive++] = u;
      v8f *acc = (v8f *)(sc->acc + (int64_t)qi * dpad);
      const v8f *vb = (const v8f *)sc->vb;
      for (int c = 0; c < nvec; c++) {
        v8f a = acc[c] * splat(alpha);
        for (int k = 0; k < nlive; k++) a += splat(sc->p[sc->live[k]]) * vb[(int64_t)sc->live[k] * nvec + c];
        acc[c] = a;
      }
    }
  }

  /* o = acc / l; a query that saw nothing gets o = 0, lse = -inf. */
  for (int qi = 0; qi < nq; qi++) {
    const int64_t row = bv->qo_indptr[i] + it->q_begin + qi / fr->group;
    const int h = it->kv_head * fr->group + qi % fr->group;
    const float l = sc->l[qi];
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    const float *acc = sc->acc + (int64_t)qi * dpad;
    const int64_t ob = row * t->out.stride[0] + h * t->out.stride[1], os = t->out.stride[2];
    if (dtype_eq(t->out.dtype, DT_F32)) {
      float *o = (float *)t->out.data + ob;
      for (int x = 0; x < head_dim; x++) o[x * os] = acc[x] * inv;
    } else {
      for (int x = 0; x < head_dim; x++) tview_set(&t->out, ob + x * os, acc[x] * inv);
    }
    if (t->lse.data)
      ((float *)t->lse.data)[row * t->lse.stride[0] + h * t->lse.stride[1]] =
          l > 0 ? (float)((double)sc->m[qi] + log((double)l)) : -INFINITY;
  }
}

/* ------------------------------------------------------------------ threads */

static size_t scratch_floats(const fast_run *fr, size_t *parts) {
  size_t nq = (size_t)fr->q_rows_per_item * (size_t)fr->group, dp = (size_t)fr->dpad;
  size_t sizes[7] = {nq * dp, nq * dp, nq, nq, dp * BK, dp * BK, dp};
  size_t total = 0;
  for (int i = 0; i < 7; i++) {
    parts[i] = total;
    total += align_up(sizes[i], 16); /* 64 bytes */
  }
  return total;
}

static int scratch_init(const fast_run *fr, scratch *sc) {
  size_t parts[7], total = scratch_floats(fr, parts);
  float *mem = aligned_alloc(64, total * sizeof(float));
  if (!mem) return 0;
  sc->mem = mem;
  sc->q = mem + parts[0], sc->acc = mem + parts[1], sc->m = mem + parts[2], sc->l = mem + parts[3];
  sc->kt = mem + parts[4], sc->vb = mem + parts[5], sc->krow = mem + parts[6];
  memset(sc->krow, 0, sizeof(float) * (size_t)fr->dpad);
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

  fr.q_rows_per_item = QUERIES_PER_ITEM / fr.group > 0 ? QUERIES_PER_ITEM / fr.group : 1;
  int64_t num_items = 0, kv_len_max = 0, mask_bits = 0;
  for (int64_t i = 0; i < bv->batch; i++) {
    num_items += ceil_div64(bv_qo_len(bv, i), fr.q_rows_per_item) * d->num_kv_heads;
    if (bv_kv_len(bv, i) > kv_len_max) kv_len_max = bv_kv_len(bv, i);
  }
  kvattn_status st = KVATTN_SUCCESS;
  int64_t *mask_first = NULL;
  scratch *scs = NULL;
  pthread_t *tids = NULL;
  worker *workers = NULL;
  int *started = NULL;
  int threads = 0;
  fr.items = malloc(sizeof(work_item) * (size_t)(num_items > 0 ? num_items : 1));
  mask_first = malloc(sizeof(int64_t) * (size_t)(bv->batch > 0 ? bv->batch : 1));
  if (!fr.items || !mask_first) {
    st = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_run: %lld work items", (long long)num_items);
    goto done;
  }
  /* Work items; the cost is the (query x KV token) pairs the item visits. */
  int64_t n = 0;
  for (int64_t i = 0; i < bv->batch; i++) {
    const int64_t qo_len = bv_qo_len(bv, i), kv_len = bv_kv_len(bv, i);
    mask_first[i] = p->mask_offset ? p->mask_offset[i] : mask_bits;
    mask_bits += ceil_div64(qo_len * kv_len, 8) * 8;
    for (int64_t qb = 0; qb < qo_len; qb += fr.q_rows_per_item) {
      int64_t qe = qb + fr.q_rows_per_item < qo_len ? qb + fr.q_rows_per_item : qo_len;
      double kv_seen = (double)kv_len;
      if (d->causal && !bv->bsr_positions) {
        double last = (double)(kv_len - qo_len + qe);
        kv_seen = last < 0 ? 0 : last < kv_seen ? last : kv_seen;
      }
      for (int h = 0; h < d->num_kv_heads; h++)
        fr.items[n++] = (work_item){(int32_t)i, h, (int32_t)qb, (int32_t)qe, (double)(qe - qb) * (kv_seen + BK)};
    }
  }
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

done:
  if (scs)
    for (int w = 0; w < threads; w++) free(scs[w].mem);
  free(scs), free(tids), free(workers), free(started);
  free(fr.items), free(mask_first), free(fr.rope_cos), free(fr.rope_sin);
  return st;
}
