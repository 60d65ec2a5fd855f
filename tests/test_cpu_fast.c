/*
 * test_cpu_fast.c - the CPU fast path (fp32, blocked, threaded) against the float64 reference.
 *
 * Every case builds fresh random inputs (fixed seeds), poisons both outputs with NaN, runs the
 * reference context and the CPU context through the public API, and requires
 * ||out - ref|| / ||ref|| < 1e-5 for fp32 inputs, < 1e-2 for fp16/bf16, and the LSE to agree.
 * Cases cover format (paged NHD/HND, combined KV, strided views, ragged, BSR) x mode (decode,
 * prefill, append) x option (causal, custom mask, window, soft-cap, ALiBi, RoPE) x dtype.
 */
#include "test.h"
#include "util.h"

static kvattn_context *ref_ctx(void) {
  static kvattn_context *c;
  if (!c) c = test_context(KVATTN_BACKEND_REFERENCE, 1);
  return c;
}
static kvattn_context *cpu_ctx(void) {
  static kvattn_context *c;
  if (!c) c = test_context(KVATTN_BACKEND_CPU, 2);
  return c;
}

enum { DECODE, PREFILL, APPEND };
static const char *mode_name[] = {"decode", "prefill", "append"};

/* The options of `opts` on top of the spec's shape. */
static kvattn_attention_desc desc_with(const test_spec *sp, const kvattn_attention_desc *opts) {
  kvattn_attention_desc d = tb_desc(sp);
  d.causal = opts->causal;
  d.window_left = opts->window_left;
  d.logits_soft_cap = opts->logits_soft_cap;
  d.sm_scale = opts->sm_scale;
  d.rope = opts->rope;
  d.rope_theta = opts->rope_theta;
  d.rope_scale = opts->rope_scale;
  d.rope_llama31_factor = opts->rope_llama31_factor;
  d.rope_llama31_low_freq_factor = opts->rope_llama31_low_freq_factor;
  d.rope_llama31_high_freq_factor = opts->rope_llama31_high_freq_factor;
  d.rope_llama31_original_max_pos = opts->rope_llama31_original_max_pos;
  d.alibi = opts->alibi;
  d.alibi_slopes = opts->alibi_slopes;
  d.disable_split_kv = opts->disable_split_kv;
  d.fixed_split_size = opts->fixed_split_size;
  return d;
}

/* One random case: `batch` requests (paged/ragged) of lengths drawn for `mode` with KV up to
 * max_kv, or the spec's BSR shape. Returns 0 when the fast path matches, 1 (after printing) if not. */
static int fast_case(test_spec sp, int mode, int batch, int max_kv, const kvattn_attention_desc *opts,
                     uint64_t seed) {
  test_rng r = rng_seed(seed);
  int32_t *qo = calloc((size_t)batch + 1, sizeof(int32_t)), *kv = calloc((size_t)batch + 1, sizeof(int32_t));
  for (int i = 0; i < batch; i++) {
    if (mode == DECODE) {
      qo[i] = 1;
      kv[i] = (int32_t)rng_int(&r, 1, max_kv);
    } else if (mode == PREFILL) {
      qo[i] = kv[i] = (int32_t)rng_int(&r, 1, max_kv);
    } else {
      qo[i] = (int32_t)rng_int(&r, 1, max_kv / 4 + 1);
      kv[i] = qo[i] + (int32_t)rng_int(&r, 0, max_kv);
    }
  }
  sp.batch_size = batch;
  sp.qo_lens = mode == DECODE ? NULL : qo;
  sp.kv_lens = kv;
  test_batch tb;
  int bad = 1;
  if (!tb_build(&tb, &sp, &r)) {
    fprintf(stderr, "  tb_build failed\n");
    goto out;
  }
  kvattn_attention_desc d = desc_with(&sp, opts);
  double err, lse_err;
  kvattn_status s = tb_compare(cpu_ctx(), ref_ctx(), &d, &tb, &err, &lse_err);
  double tol = tb_tolerance(&sp), lse_tol = tol < 1e-4 ? 1e-4 : 1e-3;
  if (s != KVATTN_SUCCESS) {
    fprintf(stderr, "  seed %llu: status %s\n", (unsigned long long)seed, kvattn_status_string(s));
  } else if (!(err < tol) || !(lse_err < lse_tol)) {
    fprintf(stderr, "  seed %llu (%s, format %d, layout %d, q %s kv %s o %s, heads %d/%d, dim %d): rel err %.3g (tol %.0e), "
            "lse err %.3g\n", (unsigned long long)seed, mode_name[mode], sp.format, sp.layout, tdt_name(sp.q_dtype),
            tdt_name(sp.kv_dtype), tdt_name(sp.o_dtype), sp.num_qo_heads, sp.num_kv_heads, sp.head_dim, err, tol,
            lse_err);
  } else {
    bad = 0;
    if (getenv("KVATTN_TEST_VERBOSE"))
      fprintf(stderr, "  seed %llu: rel err %.3g, lse err %.3g\n", (unsigned long long)seed, err, lse_err);
  }
out:
  tb_free(&tb);
  free(qo), free(kv);
  return bad;
}

/* Run `n` seeds of a case; fail the test on the first mismatch. */
#define EXPECT_FAST_MATCHES(sp, mode, batch, max_kv, opts, n)                                    \
  do {                                                                                            \
    for (int seed_ = 0; seed_ < (n); seed_++)                                                     \
      CHECK_MSG(fast_case((sp), (mode), (batch), (max_kv), &(opts), 7919u * (uint64_t)__LINE__ + (uint64_t)seed_) == 0, \
                "case %d of %d", seed_, (n));                                                     \
  } while (0)

static test_spec spec_of(int format, int layout, DLDataType dt) {
  test_spec sp = test_spec_default();
  sp.format = format;
  sp.layout = layout;
  sp.q_dtype = sp.kv_dtype = sp.o_dtype = dt;
  return sp;
}
static const kvattn_attention_desc NO_OPTS = KVATTN_ATTENTION_DESC_INIT;
static kvattn_attention_desc causal_opts(void) {
  kvattn_attention_desc o = KVATTN_ATTENTION_DESC_INIT;
  o.causal = 1;
  return o;
}

/* ------------------------------------------------------------------ paged, plain */

TEST(paged_nhd_decode_f32_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  EXPECT_FAST_MATCHES(sp, DECODE, 7, 300, NO_OPTS, 3);
}
TEST(paged_nhd_decode_f16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F16);
  EXPECT_FAST_MATCHES(sp, DECODE, 7, 300, NO_OPTS, 3);
}
TEST(paged_nhd_decode_bf16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  EXPECT_FAST_MATCHES(sp, DECODE, 7, 300, NO_OPTS, 3);
}
TEST(paged_hnd_decode_f32_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F32);
  sp.page_size = 5;
  EXPECT_FAST_MATCHES(sp, DECODE, 9, 200, NO_OPTS, 3);
}
TEST(paged_hnd_decode_f16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
  EXPECT_FAST_MATCHES(sp, DECODE, 5, 300, NO_OPTS, 2);
}
TEST(paged_nhd_prefill_causal_f32_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, PREFILL, 4, 97, o, 3);
}
TEST(paged_hnd_prefill_causal_f16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 97, o, 2);
}
TEST(paged_nhd_prefill_noncausal_bf16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 80, NO_OPTS, 2);
}
TEST(paged_append_causal_f32_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.page_size = 7;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 5, 150, o, 3);
}
TEST(paged_append_causal_bf16_hnd_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_BF16);
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 4, 150, o, 2);
}
TEST(paged_append_noncausal_f16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F16);
  EXPECT_FAST_MATCHES(sp, APPEND, 4, 150, NO_OPTS, 2);
}

/* ------------------------------------------------------------------ paged storage variants */

TEST(paged_combined_kv_tensor_nhd_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F16);
  sp.combined_kv = 1;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 4, 120, o, 2);
}
TEST(paged_combined_kv_tensor_hnd_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F32);
  sp.combined_kv = 1;
  EXPECT_FAST_MATCHES(sp, DECODE, 6, 200, NO_OPTS, 2);
}
TEST(paged_noncontiguous_strided_views_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.padded = 1;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 4, 100, o, 2);
}
TEST(paged_noncontiguous_combined_hnd_f16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
  sp.padded = 1;
  sp.combined_kv = 1;
  EXPECT_FAST_MATCHES(sp, DECODE, 5, 100, NO_OPTS, 2);
}
TEST(paged_head_dim_stride_not_one_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  sp.inner_stride = 2;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 100, o, 2);
}
TEST(paged_unreferenced_pages_in_cache_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.extra_pages = 20;
  EXPECT_FAST_MATCHES(sp, DECODE, 5, 100, NO_OPTS, 2);
}

/* ------------------------------------------------------------------ ragged */

TEST(ragged_prefill_causal_f32_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_F32);
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, PREFILL, 4, 90, o, 3);
}
TEST(ragged_prefill_noncausal_f16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_F16);
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 90, NO_OPTS, 2);
}
TEST(ragged_hnd_append_causal_bf16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_HND, TDT_BF16);
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 4, 100, o, 2);
}
TEST(ragged_decode_f32_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_F32);
  EXPECT_FAST_MATCHES(sp, DECODE, 8, 150, NO_OPTS, 2);
}
TEST(ragged_noncontiguous_views_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_HND, TDT_F32);
  sp.padded = 1;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 80, o, 2);
}

/* ------------------------------------------------------------------ block-sparse */

static test_spec bsr_spec(DLDataType dt, int64_t rows, int64_t cols, int br, int bc) {
  test_spec sp = spec_of(KVATTN_FORMAT_BLOCK_SPARSE, KVATTN_LAYOUT_NHD, dt);
  sp.num_rows = rows, sp.num_cols = cols, sp.block_rows = br, sp.block_cols = bc;
  return sp;
}
TEST(bsr_partial_blocks_f32_matches_reference) {
  test_spec sp = bsr_spec(TDT_F32, 45, 77, 8, 16); /* both the last block row and column are partial */
  EXPECT_FAST_MATCHES(sp, PREFILL, 0, 0, NO_OPTS, 3);
}
TEST(bsr_partial_blocks_f16_hnd_matches_reference) {
  test_spec sp = bsr_spec(TDT_F16, 33, 50, 4, 7);
  sp.layout = KVATTN_LAYOUT_HND;
  EXPECT_FAST_MATCHES(sp, PREFILL, 0, 0, NO_OPTS, 2);
}
TEST(bsr_block_size_one_by_one_matches_reference) {
  test_spec sp = bsr_spec(TDT_F32, 12, 20, 1, 1);
  sp.block_density = 0.3;
  EXPECT_FAST_MATCHES(sp, PREFILL, 0, 0, NO_OPTS, 2);
}
TEST(bsr_causal_uses_global_positions) {
  test_spec sp = bsr_spec(TDT_F32, 64, 64, 16, 8);
  sp.block_density = 0.7;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, PREFILL, 0, 0, o, 2);
}
TEST(bsr_custom_mask_matches_reference) {
  test_spec sp = bsr_spec(TDT_BF16, 40, 70, 8, 16);
  sp.custom_mask = 1;
  EXPECT_FAST_MATCHES(sp, PREFILL, 0, 0, NO_OPTS, 2);
}
TEST(bsr_window_and_rope_match_reference) {
  test_spec sp = bsr_spec(TDT_F32, 48, 60, 16, 8);
  sp.block_density = 0.8;
  kvattn_attention_desc o = causal_opts();
  o.window_left = 13;
  o.rope = 1;
  EXPECT_FAST_MATCHES(sp, PREFILL, 0, 0, o, 2);
}
TEST(bsr_noncontiguous_views_match_reference) {
  test_spec sp = bsr_spec(TDT_F32, 30, 40, 8, 8);
  sp.padded = 1;
  EXPECT_FAST_MATCHES(sp, PREFILL, 0, 0, NO_OPTS, 2);
}

/* ------------------------------------------------------------------ masks */

TEST(custom_mask_paged_prefill_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.custom_mask = 1;
  EXPECT_FAST_MATCHES(sp, PREFILL, 4, 60, NO_OPTS, 3);
}
TEST(custom_mask_with_causal_ragged_append_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_F16);
  sp.custom_mask = 1;
  sp.mask_density = 0.3;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 4, 80, o, 2);
}
TEST(custom_mask_decode_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F32);
  sp.custom_mask = 1;
  sp.mask_density = 0.1; /* some rows end fully masked */
  EXPECT_FAST_MATCHES(sp, DECODE, 9, 40, NO_OPTS, 3);
}
TEST(sliding_window_decode_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  kvattn_attention_desc o = NO_OPTS;
  o.window_left = 37;
  EXPECT_FAST_MATCHES(sp, DECODE, 6, 300, o, 3);
}
TEST(sliding_window_causal_prefill_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  kvattn_attention_desc o = causal_opts();
  o.window_left = 20;
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 120, o, 2);
}
TEST(sliding_window_zero_keeps_only_the_diagonal) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_F32);
  kvattn_attention_desc o = causal_opts();
  o.window_left = 0;
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 50, o, 2);
}

/* ------------------------------------------------------------------ logits transforms */

TEST(soft_cap_prefill_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.scale = 3.0; /* large logits, so the cap bites */
  kvattn_attention_desc o = causal_opts();
  o.logits_soft_cap = 5.0f;
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 80, o, 2);
}
TEST(soft_cap_decode_bf16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  sp.scale = 3.0;
  kvattn_attention_desc o = NO_OPTS;
  o.logits_soft_cap = 30.0f;
  EXPECT_FAST_MATCHES(sp, DECODE, 6, 200, o, 2);
}
TEST(custom_sm_scale_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  kvattn_attention_desc o = NO_OPTS;
  o.sm_scale = 0.37f;
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 80, o, 2);
}
TEST(alibi_standard_slopes_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.num_qo_heads = 6, sp.num_kv_heads = 3; /* not a power of two: the interleaved slopes */
  kvattn_attention_desc o = causal_opts();
  o.alibi = 1;
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 100, o, 2);
}
TEST(alibi_given_slopes_decode_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
  static const float slopes[4] = {0.5f, 0.125f, 0.03f, 1.0f};
  kvattn_attention_desc o = NO_OPTS;
  o.alibi = 1;
  o.alibi_slopes = slopes;
  EXPECT_FAST_MATCHES(sp, DECODE, 5, 200, o, 2);
}
TEST(alibi_ragged_prefill_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  kvattn_attention_desc o = causal_opts();
  o.alibi = 1;
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 70, o, 2);
}

/* ------------------------------------------------------------------ RoPE */

TEST(rope_decode_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  kvattn_attention_desc o = NO_OPTS;
  o.rope = 1;
  EXPECT_FAST_MATCHES(sp, DECODE, 5, 600, o, 2);
}
TEST(rope_prefill_causal_f16_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
  kvattn_attention_desc o = causal_opts();
  o.rope = 1;
  EXPECT_FAST_MATCHES(sp, PREFILL, 3, 90, o, 2);
}
TEST(rope_llama31_scaling_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.head_dim = 128;
  kvattn_attention_desc o = causal_opts();
  o.rope = 1;
  o.rope_theta = 500000.0f;
  o.rope_llama31_factor = 8.0f;
  o.rope_llama31_low_freq_factor = 1.0f;
  o.rope_llama31_high_freq_factor = 4.0f;
  o.rope_llama31_original_max_pos = 64; /* small, so short test sequences span all three bands */
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 300, o, 2);
}
TEST(rope_theta_and_linear_scale_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  kvattn_attention_desc o = causal_opts();
  o.rope = 1;
  o.rope_theta = 1000.0f;
  o.rope_scale = 4.0f;
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 100, o, 2);
}
TEST(rope_with_qo_longer_than_kv_noncausal_matches_reference) {
  /* queries at negative positions (kv_len - qo_len + r < 0) are rotated by negative angles */
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  static const int32_t qo[2] = {20, 9}, kv[2] = {5, 9};
  sp.batch_size = 2, sp.qo_lens = qo, sp.kv_lens = kv;
  test_rng r = rng_seed(11);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  kvattn_attention_desc d = tb_desc(&sp);
  d.rope = 1;
  double err, lse_err;
  CHECK_OK(tb_compare(cpu_ctx(), ref_ctx(), &d, &tb, &err, &lse_err));
  tb_free(&tb);
  CHECK_MSG(err < 1e-5 && lse_err < 1e-4, "err %g lse %g", err, lse_err);
}

/* ------------------------------------------------------------------ dtypes, shapes, everything */

TEST(f16_inputs_f32_output_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F16);
  sp.o_dtype = TDT_F32;
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 100, o, 2);
}
TEST(bf16_q_f16_kv_mixed_dtypes_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  sp.kv_dtype = TDT_F16;
  sp.o_dtype = TDT_F32;
  EXPECT_FAST_MATCHES(sp, DECODE, 4, 100, NO_OPTS, 2);
}
TEST(f64_inputs_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_NHD, TDT_F64);
  kvattn_attention_desc o = causal_opts();
  EXPECT_FAST_MATCHES(sp, APPEND, 3, 80, o, 2);
}
TEST(head_dims_not_multiple_of_eight_match_reference) {
  static const int dims[] = {1, 2, 6, 40, 72, 100};
  for (int k = 0; k < 6; k++) {
    test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
    sp.head_dim = dims[k];
    kvattn_attention_desc o = causal_opts();
    o.rope = dims[k] % 2 == 0;
    CHECK_MSG(fast_case(sp, APPEND, 2, 60, &o, 100 + k) == 0, "head_dim %d", dims[k]);
  }
}
TEST(head_dim_512_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  sp.head_dim = 512;
  sp.num_qo_heads = 2, sp.num_kv_heads = 1;
  EXPECT_FAST_MATCHES(sp, DECODE, 3, 100, NO_OPTS, 1);
}
TEST(mha_and_large_groups_match_reference) {
  static const int groups[][2] = {{4, 4}, {16, 1}, {12, 3}, {32, 8}};
  for (int k = 0; k < 4; k++) {
    test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
    sp.num_qo_heads = groups[k][0], sp.num_kv_heads = groups[k][1];
    sp.head_dim = 32;
    kvattn_attention_desc o = causal_opts();
    CHECK_MSG(fast_case(sp, APPEND, 3, 50, &o, 200 + k) == 0, "heads %d/%d", groups[k][0], groups[k][1]);
  }
}
TEST(all_options_together_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
  sp.custom_mask = 1;
  sp.padded = 1;
  sp.page_size = 3;
  kvattn_attention_desc o = causal_opts();
  o.window_left = 25;
  o.logits_soft_cap = 8.0f;
  o.alibi = 1;
  o.rope = 1;
  o.rope_llama31_factor = 4.0f;
  o.rope_llama31_original_max_pos = 32;
  EXPECT_FAST_MATCHES(sp, APPEND, 4, 90, o, 2);
}

/* A sweep of random configurations over every axis at once. */
TEST(random_configurations_match_reference) {
  test_rng r = rng_seed(2024);
  static const DLDataType dts[3] = {{kDLFloat, 32, 1}, {kDLFloat, 16, 1}, {kDLBfloat, 16, 1}};
  for (int k = 0; k < 24; k++) {
    test_spec sp = test_spec_default();
    sp.format = (int)rng_int(&r, 0, 2);
    sp.layout = (int)rng_int(&r, 0, 1);
    sp.q_dtype = sp.kv_dtype = sp.o_dtype = dts[rng_int(&r, 0, 2)];
    sp.page_size = (int)rng_int(&r, 1, 20);
    sp.combined_kv = sp.format == KVATTN_FORMAT_PAGED && rng_int(&r, 0, 3) == 0;
    sp.padded = rng_int(&r, 0, 3) == 0;
    sp.num_kv_heads = (int)rng_int(&r, 1, 3);
    sp.num_qo_heads = sp.num_kv_heads * (int)rng_int(&r, 1, 5);
    sp.head_dim = 8 * (int)rng_int(&r, 1, 12);
    sp.custom_mask = rng_int(&r, 0, 4) == 0;
    sp.num_rows = rng_int(&r, 1, 50), sp.num_cols = rng_int(&r, 1, 80);
    sp.block_rows = (int)rng_int(&r, 1, 16), sp.block_cols = (int)rng_int(&r, 1, 16);
    kvattn_attention_desc o = NO_OPTS;
    o.causal = (int)rng_int(&r, 0, 1);
    o.window_left = rng_int(&r, 0, 3) == 0 ? (int)rng_int(&r, 0, 40) : -1;
    o.logits_soft_cap = rng_int(&r, 0, 3) == 0 ? 10.0f : 0.0f;
    o.alibi = rng_int(&r, 0, 3) == 0;
    o.rope = rng_int(&r, 0, 2) == 0;
    int mode = (int)rng_int(&r, 0, 2);
    CHECK_MSG(fast_case(sp, mode, (int)rng_int(&r, 1, 6), (int)rng_int(&r, 1, 120), &o, 5000 + k) == 0,
              "configuration %d", k);
  }
}

/* ------------------------------------------------------------------ split KV */

TEST(split_kv_fixed_size_every_option_matches_reference) {
  /* fixed_split_size 2 pages of 4 tokens: every decode/draft row longer than 8 tokens is split
   * into chunks whose states are merged */
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.page_size = 4;
  sp.custom_mask = 1;
  kvattn_attention_desc o = causal_opts();
  o.fixed_split_size = 2;
  EXPECT_FAST_MATCHES(sp, DECODE, 6, 200, o, 2);
  o.window_left = 30;
  o.logits_soft_cap = 10.0f;
  o.alibi = 1;
  o.rope = 1;
  EXPECT_FAST_MATCHES(sp, APPEND, 5, 20, o, 2); /* query blocks of <= 8 rows split; longer ones not */
}
TEST(split_kv_fixed_size_ragged_and_bsr_match_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_RAGGED, KVATTN_LAYOUT_HND, TDT_BF16);
  kvattn_attention_desc o = causal_opts();
  o.fixed_split_size = 7; /* ragged: 7-token chunks */
  EXPECT_FAST_MATCHES(sp, DECODE, 5, 100, o, 2);
  test_spec b = bsr_spec(TDT_F32, 24, 90, 4, 6);
  b.block_density = 0.9;
  kvattn_attention_desc ob = NO_OPTS;
  ob.fixed_split_size = 3; /* BSR: 3 block columns per chunk, block rows of 4 query rows */
  EXPECT_FAST_MATCHES(b, PREFILL, 0, 0, ob, 2);
}
TEST(split_kv_long_decode_rows_match_reference) {
  /* the automatic split (rows beyond 4096 tokens) */
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_HND, TDT_F16);
  sp.num_qo_heads = 4, sp.num_kv_heads = 1, sp.head_dim = 32;
  kvattn_attention_desc o = NO_OPTS;
  o.rope = 1;
  EXPECT_FAST_MATCHES(sp, DECODE, 3, 9000, o, 1);
}
TEST(disable_split_kv_matches_reference) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.num_qo_heads = 2, sp.num_kv_heads = 2, sp.head_dim = 16;
  kvattn_attention_desc o = NO_OPTS;
  o.disable_split_kv = 1;
  EXPECT_FAST_MATCHES(sp, DECODE, 2, 6000, o, 1);
}
TEST(fixed_split_size_gives_a_request_the_same_bits_in_any_batch) {
  /* request A alone, then A among others (in another position): its output rows are bitwise equal */
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_BF16);
  static const int32_t kv_alone[1] = {700}, kv_mixed[4] = {33, 5000, 700, 2};
  test_spec a = sp, m = sp;
  a.batch_size = 1, a.kv_lens = kv_alone;
  m.batch_size = 4, m.kv_lens = kv_mixed;
  test_rng ra = rng_seed(3), rm = rng_seed(4);
  test_batch ta, tm;
  CHECK(tb_build(&ta, &a, &ra));
  CHECK(tb_build(&tm, &m, &rm));
  /* copy A's query and KV into request 2 of the mixed batch */
  for (int64_t h = 0; h < sp.num_qo_heads; h++)
    for (int64_t x = 0; x < sp.head_dim; x++) ht_set(&tm.q, (int64_t[]){2, h, x}, ht_get(&ta.q, (int64_t[]){0, h, x}));
  for (int c = 0; c < 2; c++)
    for (int64_t j = 0; j < 700; j++)
      for (int64_t h = 0; h < sp.num_kv_heads; h++)
        for (int64_t x = 0; x < sp.head_dim; x++) {
          int64_t oa, om;
          const host_tensor *ha = tb_paged_elem(&ta, c, ta.kv_indices[j / 16], j % 16, h, x, &oa);
          const host_tensor *hm = tb_paged_elem(&tm, c, tm.kv_indices[tm.kv_indptr[2] + j / 16], j % 16, h, x, &om);
          ht_set_off(hm, om, ht_get_off(ha, oa));
        }
  kvattn_attention_desc d = tb_desc(&sp);
  d.fixed_split_size = 8;
  CHECK_OK(tb_run(cpu_ctx(), &d, &ta, &ta.out, &ta.out_lse));
  kvattn_context *three = test_context(KVATTN_BACKEND_CPU, 3);
  CHECK(three);
  CHECK_OK(tb_run(three, &d, &tm, &tm.out, &tm.out_lse));
  kvattn_context_destroy(three);
  int same = 1;
  for (int64_t h = 0; h < sp.num_qo_heads; h++) {
    same &= ht_get(&ta.out_lse, (int64_t[]){0, h}) == ht_get(&tm.out_lse, (int64_t[]){2, h});
    for (int64_t x = 0; x < sp.head_dim; x++)
      same &= ht_get(&ta.out, (int64_t[]){0, h, x}) == ht_get(&tm.out, (int64_t[]){2, h, x});
  }
  tb_free(&ta);
  tb_free(&tm);
  CHECK(same);
}

/* ------------------------------------------------------------------ determinism */

TEST(thread_count_does_not_change_a_bit) {
  kvattn_context *one = test_context(KVATTN_BACKEND_CPU, 1), *many = test_context(KVATTN_BACKEND_CPU, 3);
  CHECK(one && many);
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F16);
  static const int32_t qo[5] = {1, 33, 7, 1, 64}, kv[5] = {500, 40, 90, 3, 200};
  sp.batch_size = 5, sp.qo_lens = qo, sp.kv_lens = kv;
  test_rng r = rng_seed(5);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  kvattn_attention_desc d = tb_desc(&sp);
  d.causal = 1;
  CHECK_OK(tb_run(one, &d, &tb, &tb.ref, &tb.ref_lse));
  CHECK_OK(tb_run(many, &d, &tb, &tb.out, &tb.out_lse));
  int same = ht_bitwise_equal(&tb.out, &tb.ref) && ht_bitwise_equal(&tb.out_lse, &tb.ref_lse);
  for (int k = 0; k < 5 && same; k++) { /* and rerunning gives the same bits */
    CHECK_OK(tb_run(many, &d, &tb, &tb.out, &tb.out_lse));
    same = ht_bitwise_equal(&tb.out, &tb.ref) && ht_bitwise_equal(&tb.out_lse, &tb.ref_lse);
  }
  tb_free(&tb);
  kvattn_context_destroy(one);
  kvattn_context_destroy(many);
  CHECK(same);
}

TEST(lse_is_omitted_when_null) {
  test_spec sp = spec_of(KVATTN_FORMAT_PAGED, KVATTN_LAYOUT_NHD, TDT_F32);
  sp.want_lse = 0;
  EXPECT_FAST_MATCHES(sp, DECODE, 4, 100, NO_OPTS, 1);
}

TEST_MAIN()
