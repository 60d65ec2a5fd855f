/*
 * test_reference.c - the float64 reference against hand-computed cases and an independent dense
 * formula.
 *
 * Part 1: tiny cases whose outputs are written down by hand (one head, head_dim 2, float64 tensors).
 * Part 2: random batches in every format; this file gathers them into dense per-request Q, K, V
 * and a dense visibility matrix, computes softmax(scores) V directly (with its own RoPE frequency
 * formula, llama-3.1 scaling included), and requires agreement to ~1e-12.
 */
#include "test.h"
#include "util.h"

static kvattn_context *ref_ctx(void) {
  static kvattn_context *c;
  if (!c) c = test_context(KVATTN_BACKEND_REFERENCE, 1);
  return c;
}

/* ------------------------------------------------------------------ part 1: by hand */

/* One ragged request of one head, head_dim 2, float64: q [qo][2], k/v [kv][2]. */
typedef struct tiny {
  test_batch tb;
  test_spec sp;
  int32_t qo, kv;
} tiny;

static int tiny_build(tiny *t, int qo, int kv, const double *q, const double *k, const double *v) {
  t->qo = qo, t->kv = kv;
  t->sp = test_spec_default();
  t->sp.format = KVATTN_FORMAT_RAGGED;
  t->sp.num_qo_heads = t->sp.num_kv_heads = 1;
  t->sp.head_dim = 2;
  t->sp.q_dtype = t->sp.kv_dtype = t->sp.o_dtype = TDT_F64;
  t->sp.batch_size = 1;
  t->sp.qo_lens = &t->qo;
  t->sp.kv_lens = &t->kv;
  test_rng r = rng_seed(1);
  if (!tb_build(&t->tb, &t->sp, &r)) return 0;
  for (int i = 0; i < qo; i++)
    for (int d = 0; d < 2; d++) ht_set(&t->tb.q, (int64_t[]){i, 0, d}, q[2 * i + d]);
  for (int j = 0; j < kv; j++)
    for (int d = 0; d < 2; d++) {
      ht_set(&t->tb.k, (int64_t[]){j, 0, d}, k[2 * j + d]);
      ht_set(&t->tb.v, (int64_t[]){j, 0, d}, v[2 * j + d]);
    }
  return 1;
}
static kvattn_attention_desc tiny_desc(const tiny *t) {
  kvattn_attention_desc d = tb_desc(&t->sp);
  d.sm_scale = 1.0f;
  return d;
}
static double out_at(const tiny *t, int i, int d) { return ht_get(&t->tb.out, (int64_t[]){i, 0, d}); }
static double lse_at(const tiny *t, int i) { return ht_get(&t->tb.out_lse, (int64_t[]){i, 0}); }

#define NEAR(a, b, tol) (fabs((a) - (b)) <= (tol))

TEST(two_keys_softmax_by_hand) {
  /* scores <q,k0> = 1, <q,k1> = 0: weights e/(e+1), 1/(e+1) */
  static const double q[] = {1, 0}, k[] = {1, 0, 0, 1}, v[] = {1, 2, 3, 4};
  tiny t;
  CHECK(tiny_build(&t, 1, 2, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  double e = exp(1.0), w0 = e / (e + 1), w1 = 1 / (e + 1);
  CHECK(NEAR(out_at(&t, 0, 0), w0 * 1 + w1 * 3, 1e-14));
  CHECK(NEAR(out_at(&t, 0, 1), w0 * 2 + w1 * 4, 1e-14));
  CHECK(NEAR(lse_at(&t, 0), log(e + 1), 1e-6));
  tb_free(&t.tb);
}

TEST(sm_scale_multiplies_the_scores) {
  static const double q[] = {2, 0}, k[] = {1, 0, 0, 0}, v[] = {1, 0, 0, 1};
  tiny t;
  CHECK(tiny_build(&t, 1, 2, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  d.sm_scale = 0.5f; /* scores 1 and 0 */
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  double e = exp(1.0);
  CHECK(NEAR(out_at(&t, 0, 0), e / (e + 1), 1e-14));
  CHECK(NEAR(lse_at(&t, 0), log(e + 1), 1e-6));
  tb_free(&t.tb);
}

TEST(causal_is_bottom_right_aligned) {
  /* qo 2, kv 3: query 0 sits at position 1 (sees keys 0, 1), query 1 at 2 (sees 0, 1, 2). q = 0
   * makes the weights uniform, so o is the mean of the visible V rows. */
  static const double q[] = {0, 0, 0, 0}, k[] = {1, 1, 2, 2, 3, 3}, v[] = {1, 10, 2, 20, 6, 60};
  tiny t;
  CHECK(tiny_build(&t, 2, 3, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  d.causal = 1;
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  CHECK(NEAR(out_at(&t, 0, 0), 1.5, 1e-14) && NEAR(out_at(&t, 0, 1), 15, 1e-13));
  CHECK(NEAR(out_at(&t, 1, 0), 3.0, 1e-14) && NEAR(out_at(&t, 1, 1), 30, 1e-13));
  CHECK(NEAR(lse_at(&t, 0), log(2.0), 1e-6) && NEAR(lse_at(&t, 1), log(3.0), 1e-6));
  tb_free(&t.tb);
}

TEST(causal_rows_before_the_cache_are_fully_masked) {
  /* qo 3 > kv 1: queries at positions -2, -1 see nothing (o = 0, lse = -inf); the last sees key 0 */
  static const double q[] = {1, 1, 1, 1, 1, 0}, k[] = {2, 0}, v[] = {7, 8};
  tiny t;
  CHECK(tiny_build(&t, 3, 1, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  d.causal = 1;
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  for (int i = 0; i < 2; i++) {
    CHECK(out_at(&t, i, 0) == 0 && out_at(&t, i, 1) == 0);
    CHECK(isinf(lse_at(&t, i)) && lse_at(&t, i) < 0);
  }
  CHECK(out_at(&t, 2, 0) == 7 && out_at(&t, 2, 1) == 8);
  CHECK(NEAR(lse_at(&t, 2), 2.0, 1e-6)); /* one key: lse = its score */
  tb_free(&t.tb);
}

TEST(sliding_window_keeps_window_left_plus_one_keys) {
  /* decode over 5 keys at q_pos 4, window_left 1: keys 3 and 4 */
  static const double q[] = {0, 0}, k[10] = {0}, v[] = {1, 0, 2, 0, 3, 0, 4, 0, 5, 0};
  tiny t;
  CHECK(tiny_build(&t, 1, 5, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  d.window_left = 1;
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  CHECK(NEAR(out_at(&t, 0, 0), 4.5, 1e-14));
  CHECK(NEAR(lse_at(&t, 0), log(2.0), 1e-6));
  tb_free(&t.tb);
}

TEST(custom_mask_bits_select_keys) {
  /* bits 0b0101 over 4 keys: keys 0 and 2 */
  static const double q[] = {0, 0}, k[8] = {0}, v[] = {1, 0, 2, 0, 4, 0, 8, 0};
  tiny t;
  CHECK(tiny_build(&t, 1, 4, q, k, v));
  t.tb.spec.custom_mask = 1;
  int64_t one = 1;
  CHECK(ht_alloc(&t.tb.mask, TDT_U8, 1, &one));
  ((uint8_t *)t.tb.mask.t.data)[0] = 0x5;
  kvattn_attention_desc d = tiny_desc(&t);
  d.custom_mask = 1;
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  CHECK(NEAR(out_at(&t, 0, 0), 2.5, 1e-14));
  tb_free(&t.tb);
}

TEST(soft_cap_applies_tanh_before_softmax) {
  /* raw scores 10 and 0, cap 5: 5 tanh(2) and 0 */
  static const double q[] = {10, 0}, k[] = {1, 0, 0, 1}, v[] = {1, 0, 0, 1};
  tiny t;
  CHECK(tiny_build(&t, 1, 2, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  d.logits_soft_cap = 5.0f;
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  double s0 = 5 * tanh(2.0), w0 = exp(s0) / (exp(s0) + 1);
  CHECK(NEAR(out_at(&t, 0, 0), w0, 1e-14) && NEAR(out_at(&t, 0, 1), 1 - w0, 1e-14));
  CHECK(NEAR(lse_at(&t, 0), log(exp(s0) + 1), 1e-6));
  tb_free(&t.tb);
}

TEST(alibi_adds_slope_times_distance) {
  /* decode at q_pos 2 over 3 keys with raw scores 0, slope 0.5: biases -1, -0.5, 0 */
  static const double q[] = {0, 0}, k[6] = {0}, v[] = {1, 0, 0, 1, 0, 0};
  static const float slope[1] = {0.5f};
  tiny t;
  CHECK(tiny_build(&t, 1, 3, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  d.alibi = 1;
  d.alibi_slopes = slope;
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  double z = exp(-1.0) + exp(-0.5) + 1;
  CHECK(NEAR(out_at(&t, 0, 0), exp(-1.0) / z, 1e-14) && NEAR(out_at(&t, 0, 1), exp(-0.5) / z, 1e-14));
  CHECK(NEAR(lse_at(&t, 0), log(z), 1e-6));
  tb_free(&t.tb);
}

TEST(alibi_standard_slopes_follow_the_formula) {
  /* 2 heads: slopes 2^-4 and 2^-8 (n = 2: 2^(-8(h+1)/2)). One key at distance 1 from each query
   * and one at distance 0, raw scores 0: o picks v by weights e^(-slope) and 1. */
  test_spec sp = test_spec_default();
  static const int32_t qo[1] = {1}, kv[1] = {2};
  sp.format = KVATTN_FORMAT_RAGGED, sp.batch_size = 1, sp.qo_lens = qo, sp.kv_lens = kv;
  sp.num_qo_heads = 2, sp.num_kv_heads = 1, sp.head_dim = 2;
  sp.q_dtype = sp.kv_dtype = sp.o_dtype = TDT_F64;
  test_rng r = rng_seed(3);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  for (int h = 0; h < 2; h++)
    for (int x = 0; x < 2; x++) ht_set(&tb.q, (int64_t[]){0, h, x}, 0);
  for (int j = 0; j < 2; j++)
    for (int x = 0; x < 2; x++) ht_set(&tb.v, (int64_t[]){j, 0, x}, j == x);
  kvattn_attention_desc d = tb_desc(&sp);
  d.alibi = 1;
  CHECK_OK(tb_run(ref_ctx(), &d, &tb, &tb.out, &tb.out_lse));
  for (int h = 0; h < 2; h++) {
    double slope = pow(2.0, -8.0 * (h + 1) / 2), w0 = exp(-slope) / (exp(-slope) + 1);
    CHECK_MSG(NEAR(ht_get(&tb.out, (int64_t[]){0, h, 0}), w0, 1e-7), "head %d", h);
  }
  tb_free(&tb);
}

TEST(rope_rotates_q_and_k_by_their_positions) {
  /* head_dim 2: one pair, frequency theta^0 = 1, so position p rotates by p radians.
   * decode at q_pos 1: q = (1,0) -> (cos 1, sin 1); k0 = (1,0) at 0 stays; k1 = (1,0) at 1 -> q.
   * scores: cos 1 and 1. */
  static const double q[] = {1, 0}, k[] = {1, 0, 1, 0}, v[] = {1, 0, 0, 1};
  tiny t;
  CHECK(tiny_build(&t, 1, 2, q, k, v));
  kvattn_attention_desc d = tiny_desc(&t);
  d.rope = 1;
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  double z = exp(cos(1.0)) + exp(1.0);
  CHECK(NEAR(out_at(&t, 0, 0), exp(cos(1.0)) / z, 1e-12));
  CHECK(NEAR(lse_at(&t, 0), log(z), 1e-6));
  tb_free(&t.tb);
}

TEST(empty_kv_gives_zero_output_and_minus_inf_lse) {
  static const double q[] = {1, 2};
  tiny t;
  CHECK(tiny_build(&t, 1, 0, q, NULL, NULL));
  kvattn_attention_desc d = tiny_desc(&t);
  CHECK_OK(tb_run(ref_ctx(), &d, &t.tb, &t.tb.out, &t.tb.out_lse));
  CHECK(out_at(&t, 0, 0) == 0 && out_at(&t, 0, 1) == 0);
  CHECK(isinf(lse_at(&t, 0)) && lse_at(&t, 0) < 0);
  tb_free(&t.tb);
}

/* ------------------------------------------------------------------ part 2: dense formula */

/* The RoPE inverse frequency of pair x, written from the llama-3.1 recipe independently of the
 * library. */
static double dense_rope_freq(const kvattn_attention_desc *d, int x) {
  double theta = d->rope_theta > 0 ? d->rope_theta : 10000.0;
  double f = pow(theta, -2.0 * x / d->head_dim);
  if (d->rope_llama31_factor > 0) {
    double lo = d->rope_llama31_low_freq_factor > 0 ? d->rope_llama31_low_freq_factor : 1;
    double hi = d->rope_llama31_high_freq_factor > 0 ? d->rope_llama31_high_freq_factor : 4;
    double orig = d->rope_llama31_original_max_pos > 0 ? d->rope_llama31_original_max_pos : 8192;
    double wavelen = 6.283185307179586 / f;
    if (wavelen > orig / lo) {
      f = f / d->rope_llama31_factor; /* long wavelengths: scaled */
    } else if (wavelen >= orig / hi) { /* between: a linear blend */
      double smooth = (orig / wavelen - lo) / (hi - lo);
      f = (1 - smooth) * f / d->rope_llama31_factor + smooth * f;
    }
  }
  return f;
}
static void dense_rope(const kvattn_attention_desc *d, double *x, double pos) {
  int half = d->head_dim / 2;
  double scale = d->rope_scale > 0 ? d->rope_scale : 1;
  for (int i = 0; i < half; i++) {
    double a = (pos / scale) * dense_rope_freq(d, i), c = cos(a), s = sin(a);
    double u = x[i], w = x[i + half];
    x[i] = u * c - w * s;
    x[i + half] = w * c + u * s;
  }
}

/* The K (c=0) or V (c=1) vector of KV token j of request/block-row i, gathered from the batch's
 * tensors, and its position. For BSR, j runs over the row's blocks' columns in index order. */
static int dense_kv(const test_batch *tb, int c, int64_t i, int64_t j, int64_t head, double *out, int64_t *pos) {
  const test_spec *s = &tb->spec;
  const int hnd = s->layout == KVATTN_LAYOUT_HND;
  const host_tensor *t = c ? &tb->v : &tb->k;
  if (s->format == KVATTN_FORMAT_PAGED) {
    int64_t page = tb->kv_indices[tb->kv_indptr[i] + j / s->page_size], slot = j % s->page_size;
    for (int d = 0; d < s->head_dim; d++) {
      int64_t off;
      const host_tensor *h = tb_paged_elem(tb, c, page, slot, head, d, &off);
      out[d] = ht_get_off(h, off);
    }
    *pos = j;
    return 1;
  }
  int64_t tok;
  if (s->format == KVATTN_FORMAT_RAGGED) {
    tok = tb->kv_indptr[i] + j;
    *pos = j;
  } else {
    tok = (int64_t)tb->kv_indices[tb->kv_indptr[i] + j / s->block_cols] * s->block_cols + j % s->block_cols;
    *pos = tok;
    if (tok >= s->num_cols) return 0; /* past the data: a partial last block column */
  }
  for (int d = 0; d < s->head_dim; d++) {
    int64_t idx[3] = {hnd ? head : tok, hnd ? tok : head, d};
    out[d] = ht_get(t, idx);
  }
  return 1;
}

/* softmax(scores) V per query row and head, straight from the definition. */
static void dense_attention(const test_batch *tb, const kvattn_attention_desc *d, host_tensor *out, host_tensor *lse) {
  const test_spec *s = &tb->spec;
  const int D = s->head_dim, group = s->num_qo_heads / s->num_kv_heads;
  const double scale = d->sm_scale > 0 ? d->sm_scale : 1 / sqrt((double)D);
  double q[512], k[512], v[512];
  for (int64_t i = 0; i < tb->rows; i++) {
    const int64_t qo = tb_qo_len(tb, i), kv = tb_kv_len(tb, i);
    double *scores = malloc(sizeof(double) * (size_t)(kv + 1));
    char *keep = malloc((size_t)kv + 1);
    for (int64_t r = 0; r < qo; r++) {
      const int64_t row = tb->qo_indptr[i] + r;
      const int64_t q_pos = s->format == KVATTN_FORMAT_BLOCK_SPARSE ? row : kv - qo + r;
      for (int h = 0; h < s->num_qo_heads; h++) {
        for (int x = 0; x < D; x++) q[x] = ht_get(&tb->q, (int64_t[]){row, h, x});
        if (d->rope) dense_rope(d, q, (double)q_pos);
        double mx = -INFINITY;
        for (int64_t j = 0; j < kv; j++) {
          int64_t pos;
          keep[j] = (char)dense_kv(tb, 0, i, j, h / group, k, &pos);
          if (d->causal && pos > q_pos) keep[j] = 0;
          if (d->window_left >= 0 && pos < q_pos - d->window_left) keep[j] = 0;
          if (keep[j] && d->custom_mask) {
            if (s->format == KVATTN_FORMAT_BLOCK_SPARSE) {
              int64_t bit = row * s->num_cols + pos;
              keep[j] = (char)((((const uint8_t *)tb->mask.t.data)[bit / 8] >> (bit % 8)) & 1);
            } else {
              keep[j] = (char)tb_mask_bit(tb, i, r, j);
            }
          }
          if (!keep[j]) continue;
          if (d->rope) dense_rope(d, k, (double)pos);
          double sc = 0;
          for (int x = 0; x < D; x++) sc += q[x] * k[x];
          sc *= scale;
          if (d->logits_soft_cap > 0) sc = d->logits_soft_cap * tanh(sc / d->logits_soft_cap);
          if (d->alibi) sc += d->alibi_slopes[h] * (double)(pos - q_pos);
          scores[j] = sc;
          if (sc > mx) mx = sc;
        }
        double o[512] = {0}, z = 0;
        for (int64_t j = 0; j < kv && mx > -INFINITY; j++) {
          if (!keep[j]) continue;
          int64_t pos;
          dense_kv(tb, 1, i, j, h / group, v, &pos);
          double w = exp(scores[j] - mx);
          z += w;
          for (int x = 0; x < D; x++) o[x] += w * v[x];
        }
        for (int x = 0; x < D; x++) ht_set(out, (int64_t[]){row, h, x}, z > 0 ? o[x] / z : 0);
        ht_set(lse, (int64_t[]){row, h}, z > 0 ? mx + log(z) : -INFINITY);
      }
    }
    free(scores), free(keep);
  }
}

/* Reference vs dense on one random batch of the spec (float64 tensors). */
static int dense_case(test_spec sp, int batch, const int32_t *qo, const int32_t *kv, const kvattn_attention_desc *opts,
                      uint64_t seed, double *err_out) {
  sp.q_dtype = sp.kv_dtype = sp.o_dtype = TDT_F64;
  sp.batch_size = batch, sp.qo_lens = qo, sp.kv_lens = kv;
  test_rng r = rng_seed(seed);
  test_batch tb;
  if (!tb_build(&tb, &sp, &r)) return 0;
  kvattn_attention_desc d = *opts;
  d.num_qo_heads = sp.num_qo_heads, d.num_kv_heads = sp.num_kv_heads, d.head_dim = sp.head_dim;
  d.q_dtype = d.kv_dtype = d.o_dtype = TDT_F64;
  d.custom_mask = sp.custom_mask;
  kvattn_status s = tb_run(ref_ctx(), &d, &tb, &tb.out, &tb.out_lse);
  if (s == KVATTN_SUCCESS) {
    dense_attention(&tb, &d, &tb.ref, &tb.ref_lse);
    double e = rel_error(&tb.out, &tb.ref), l = lse_error(&tb.out_lse, &tb.ref_lse);
    *err_out = e > l ? e : l;
  }
  tb_free(&tb);
  return s == KVATTN_SUCCESS;
}

static const int32_t QO4[4] = {5, 1, 12, 3}, KV4[4] = {40, 17, 12, 0};
#define DENSE_TOL 2e-6 /* lse is float32; outputs agree to ~1e-15 */
#define EXPECT_DENSE(sp, batch, qo, kv, opts)                                        \
  do {                                                                               \
    for (int seed_ = 0; seed_ < 2; seed_++) {                                         \
      double err_ = INFINITY;                                                        \
      CHECK(dense_case((sp), (batch), (qo), (kv), &(opts), 31u * __LINE__ + seed_, &err_)); \
      CHECK_MSG(err_ < DENSE_TOL, "seed %d: error %g", seed_, err_);                 \
    }                                                                                \
  } while (0)

TEST(reference_matches_dense_paged_nhd_plain) {
  test_spec sp = test_spec_default();
  sp.page_size = 6;
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  EXPECT_DENSE(sp, 4, QO4, KV4, o);
}
TEST(reference_matches_dense_paged_hnd_causal_gqa) {
  test_spec sp = test_spec_default();
  sp.layout = KVATTN_LAYOUT_HND;
  sp.num_qo_heads = 8, sp.num_kv_heads = 2, sp.page_size = 4;
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  o.causal = 1;
  EXPECT_DENSE(sp, 4, QO4, KV4, o);
}
TEST(reference_matches_dense_combined_kv_with_window) {
  test_spec sp = test_spec_default();
  sp.combined_kv = 1;
  sp.padded = 1;
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  o.causal = 1;
  o.window_left = 6;
  EXPECT_DENSE(sp, 4, QO4, KV4, o);
}
TEST(reference_matches_dense_ragged_custom_mask) {
  test_spec sp = test_spec_default();
  sp.format = KVATTN_FORMAT_RAGGED;
  sp.custom_mask = 1;
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  EXPECT_DENSE(sp, 4, QO4, KV4, o);
}
TEST(reference_matches_dense_ragged_hnd_softcap_alibi) {
  test_spec sp = test_spec_default();
  sp.format = KVATTN_FORMAT_RAGGED;
  sp.layout = KVATTN_LAYOUT_HND;
  sp.scale = 2.0;
  static const float slopes[4] = {0.25f, 0.5f, 0.0625f, 0.125f};
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  o.causal = 1;
  o.logits_soft_cap = 4.0f;
  o.alibi = 1;
  o.alibi_slopes = slopes;
  EXPECT_DENSE(sp, 4, QO4, KV4, o);
}
TEST(reference_matches_dense_rope) {
  test_spec sp = test_spec_default();
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  o.causal = 1;
  o.rope = 1;
  o.rope_theta = 500.0f;
  o.rope_scale = 2.0f;
  EXPECT_DENSE(sp, 4, QO4, KV4, o);
}
TEST(reference_matches_dense_rope_llama31) {
  test_spec sp = test_spec_default();
  sp.head_dim = 128;
  sp.num_qo_heads = 2, sp.num_kv_heads = 1;
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  o.rope = 1;
  o.rope_theta = 500000.0f;
  o.rope_llama31_factor = 8.0f;
  o.rope_llama31_low_freq_factor = 1.0f;
  o.rope_llama31_high_freq_factor = 4.0f;
  o.rope_llama31_original_max_pos = 16; /* every band is hit with head_dim 128 */
  EXPECT_DENSE(sp, 4, QO4, KV4, o);
}
TEST(reference_matches_dense_bsr_partial_blocks) {
  test_spec sp = test_spec_default();
  sp.format = KVATTN_FORMAT_BLOCK_SPARSE;
  sp.num_rows = 21, sp.num_cols = 30, sp.block_rows = 4, sp.block_cols = 7;
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  EXPECT_DENSE(sp, 0, NULL, NULL, o);
}
TEST(reference_matches_dense_bsr_causal_mask_rope) {
  test_spec sp = test_spec_default();
  sp.format = KVATTN_FORMAT_BLOCK_SPARSE;
  sp.layout = KVATTN_LAYOUT_HND;
  sp.num_rows = 24, sp.num_cols = 24, sp.block_rows = 8, sp.block_cols = 5;
  sp.block_density = 0.8;
  sp.custom_mask = 1;
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  o.causal = 1;
  o.rope = 1;
  EXPECT_DENSE(sp, 0, NULL, NULL, o);
}

TEST(nhd_and_hnd_layouts_give_identical_results) {
  /* the same logical cache stored both ways: the reference must not care */
  test_spec a = test_spec_default(), b;
  static const int32_t kv[3] = {30, 5, 17};
  a.batch_size = 3, a.kv_lens = kv, a.q_dtype = a.kv_dtype = a.o_dtype = TDT_F64;
  b = a;
  b.layout = KVATTN_LAYOUT_HND;
  test_rng ra = rng_seed(9), rb = rng_seed(9);
  test_batch ta, tb;
  CHECK(tb_build(&ta, &a, &ra));
  CHECK(tb_build(&tb, &b, &rb));
  /* the same page table; then every element of a's cache copied into b's */
  for (int64_t page = 0; page < ta.num_pages; page++) tb.kv_indices[page] = ta.kv_indices[page];
  for (int64_t e = 0; e < ta.kv_entries; e++) ((int32_t *)tb.indices.t.data)[e] = ta.kv_indices[e];
  ht_copy(&tb.q, &ta.q);
  for (int c = 0; c < 2; c++)
    for (int64_t page = 0; page < ta.num_pages; page++)
      for (int64_t slot = 0; slot < a.page_size; slot++)
        for (int64_t h = 0; h < a.num_kv_heads; h++)
          for (int64_t d = 0; d < a.head_dim; d++) {
            int64_t oa, ob;
            const host_tensor *ha = tb_paged_elem(&ta, c, page, slot, h, d, &oa), *hb = tb_paged_elem(&tb, c, page, slot, h, d, &ob);
            ht_set_off(hb, ob, ht_get_off(ha, oa));
          }
  kvattn_attention_desc d = tb_desc(&a);
  d.causal = 1;
  CHECK_OK(tb_run(ref_ctx(), &d, &ta, &ta.out, &ta.out_lse));
  CHECK_OK(tb_run(ref_ctx(), &d, &tb, &tb.out, &tb.out_lse));
  int same = ht_bitwise_equal(&ta.out, &tb.out) && ht_bitwise_equal(&ta.out_lse, &tb.out_lse);
  tb_free(&ta);
  tb_free(&tb);
  CHECK(same);
}

TEST(custom_mask_of_causal_pattern_equals_causal) {
  /* a mask holding exactly the causal pattern gives the causal result, bit for bit */
  test_spec sp = test_spec_default();
  sp.format = KVATTN_FORMAT_RAGGED;
  sp.custom_mask = 1;
  sp.q_dtype = sp.kv_dtype = sp.o_dtype = TDT_F64;
  static const int32_t qo[3] = {4, 9, 1}, kv[3] = {10, 9, 6};
  sp.batch_size = 3, sp.qo_lens = qo, sp.kv_lens = kv;
  test_rng r = rng_seed(77);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  uint8_t *m = (uint8_t *)tb.mask.t.data;
  memset(m, 0, (size_t)tb.mask_bytes);
  int64_t start = 0;
  for (int i = 0; i < 3; i++) {
    for (int64_t row = 0; row < qo[i]; row++)
      for (int64_t j = 0; j < kv[i]; j++)
        if (j <= kv[i] - qo[i] + row) m[(start + row * kv[i] + j) / 8] |= (uint8_t)(1u << ((start + row * kv[i] + j) % 8));
    start += (qo[i] * kv[i] + 7) / 8 * 8;
  }
  kvattn_attention_desc masked = tb_desc(&sp), causal = masked;
  causal.custom_mask = 0;
  causal.causal = 1;
  CHECK_OK(tb_run(ref_ctx(), &masked, &tb, &tb.out, &tb.out_lse));
  tb.spec.custom_mask = 0;
  CHECK_OK(tb_run(ref_ctx(), &causal, &tb, &tb.ref, &tb.ref_lse));
  int same = ht_bitwise_equal(&tb.out, &tb.ref) && ht_bitwise_equal(&tb.out_lse, &tb.ref_lse);
  tb_free(&tb);
  CHECK(same);
}

TEST_MAIN()
