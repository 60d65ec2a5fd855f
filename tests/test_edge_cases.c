/*
 * test_edge_cases.c - the edge-shape table (DESIGN.md "Correctness", RELIABILITY.md classes 3-5):
 * each case names the shape it pins down and runs the CPU fast path against the float64
 * reference, with outputs poisoned with NaN before each run.
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

/* Build the batch of `sp` (lengths given), run both backends with `d`'s options on top of the
 * spec's shape, and report the errors. The batch stays built in *tb for further checks. */
static int compare(test_batch *tb, test_spec sp, const kvattn_attention_desc *opts, uint64_t seed, double *err,
                   double *lse_err) {
  test_rng r = rng_seed(seed);
  if (!tb_build(tb, &sp, &r)) return 0;
  kvattn_attention_desc d = tb_desc(&sp);
  if (opts) {
    d.causal = opts->causal;
    d.window_left = opts->window_left;
    d.logits_soft_cap = opts->logits_soft_cap;
    d.rope = opts->rope;
  }
  return tb_compare(cpu_ctx(), ref_ctx(), &d, tb, err, lse_err) == KVATTN_SUCCESS;
}

#define EXPECT_MATCH(sp, opts, seed)                                                           \
  do {                                                                                         \
    test_batch tb_;                                                                            \
    double e_ = INFINITY, l_ = INFINITY;                                                       \
    int ran_ = compare(&tb_, (sp), (opts), (seed), &e_, &l_);                                  \
    double tol_ = tb_tolerance(&tb_.spec);                                                     \
    tb_free(&tb_);                                                                             \
    CHECK(ran_);                                                                               \
    CHECK_MSG(e_ < tol_ && l_ < 1e-3, "rel err %g (tol %g), lse err %g", e_, tol_, l_);        \
  } while (0)

/* Rows of `h` (an output) for query token `row` are all 0 and its lse -inf. */
static int row_is_empty(const test_batch *tb, const host_tensor *out, const host_tensor *lse, int64_t row) {
  for (int64_t h = 0; h < tb->spec.num_qo_heads; h++) {
    double l = ht_get(lse, (int64_t[]){row, h});
    if (!(isinf(l) && l < 0)) return 0;
    for (int64_t x = 0; x < tb->spec.head_dim; x++)
      if (ht_get(out, (int64_t[]){row, h, x}) != 0) return 0;
  }
  return 1;
}

static test_spec base(DLDataType dt) {
  test_spec sp = test_spec_default();
  sp.q_dtype = sp.kv_dtype = sp.o_dtype = dt;
  return sp;
}
static const kvattn_attention_desc CAUSAL = {sizeof(kvattn_attention_desc), KVATTN_VERSION_NUMBER, 0, 0, 0, {0, 0, 0},
                                             {0, 0, 0}, {0, 0, 0}, 0.0f, 1, -1, 0.0f, 0, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0,
                                             0, NULL, 0, KVATTN_KERNEL_AUTO, 0, 0};

/* ------------------------------------------------------------------ empty things */

TEST(kv_len_zero_gives_zero_output_and_minus_inf_lse) {
  test_spec sp = base(TDT_F16);
  static const int32_t kv[5] = {0, 30, 0, 1, 0};
  sp.batch_size = 5, sp.kv_lens = kv;
  test_batch tb;
  double e, l;
  CHECK(compare(&tb, sp, NULL, 1, &e, &l));
  int empty = row_is_empty(&tb, &tb.out, &tb.out_lse, 0) && row_is_empty(&tb, &tb.out, &tb.out_lse, 2) &&
              row_is_empty(&tb, &tb.out, &tb.out_lse, 4) && row_is_empty(&tb, &tb.ref, &tb.ref_lse, 0);
  tb_free(&tb);
  CHECK(empty);
  CHECK_MSG(e < 1e-2 && l < 1e-3, "err %g lse %g", e, l);
}

TEST(every_request_empty) {
  test_spec sp = base(TDT_F32);
  static const int32_t qo[3] = {2, 1, 3}, kv[3] = {0, 0, 0};
  sp.batch_size = 3, sp.qo_lens = qo, sp.kv_lens = kv;
  test_batch tb;
  double e, l;
  CHECK(compare(&tb, sp, &CAUSAL, 2, &e, &l));
  int empty = 1;
  for (int64_t row = 0; row < tb.qo_tokens; row++) empty &= row_is_empty(&tb, &tb.out, &tb.out_lse, row);
  tb_free(&tb);
  CHECK(empty);
}

TEST(qo_len_zero_requests_among_others) {
  test_spec sp = base(TDT_F32);
  static const int32_t qo[4] = {0, 5, 0, 3}, kv[4] = {20, 9, 0, 40};
  sp.batch_size = 4, sp.qo_lens = qo, sp.kv_lens = kv;
  EXPECT_MATCH(sp, &CAUSAL, 3);
}

TEST(qo_len_greater_than_kv_len_with_causal) {
  /* queries before the cache's first position see nothing: o = 0, lse = -inf, no NaN */
  test_spec sp = base(TDT_BF16);
  static const int32_t qo[3] = {10, 7, 33}, kv[3] = {4, 1, 20};
  sp.batch_size = 3, sp.qo_lens = qo, sp.kv_lens = kv;
  test_batch tb;
  double e, l;
  CHECK(compare(&tb, sp, &CAUSAL, 4, &e, &l));
  int empty = row_is_empty(&tb, &tb.out, &tb.out_lse, 0) && row_is_empty(&tb, &tb.out, &tb.out_lse, 5) &&
              !row_is_empty(&tb, &tb.out, &tb.out_lse, 6);
  tb_free(&tb);
  CHECK(empty);
  CHECK_MSG(e < 1e-2 && l < 1e-3, "err %g lse %g", e, l);
}

TEST(custom_mask_of_all_zeros_gives_empty_rows) {
  test_spec sp = base(TDT_F32);
  static const int32_t qo[2] = {3, 4}, kv[2] = {10, 12};
  sp.batch_size = 2, sp.qo_lens = qo, sp.kv_lens = kv;
  sp.custom_mask = 1;
  sp.mask_density = 0;
  test_batch tb;
  double e, l;
  CHECK(compare(&tb, sp, NULL, 5, &e, &l));
  int empty = 1;
  for (int64_t row = 0; row < tb.qo_tokens; row++) empty &= row_is_empty(&tb, &tb.out, &tb.out_lse, row);
  tb_free(&tb);
  CHECK(empty);
}

TEST(bsr_block_rows_without_blocks_give_empty_rows) {
  test_spec sp = base(TDT_F32);
  sp.format = KVATTN_FORMAT_BLOCK_SPARSE;
  sp.num_rows = 40, sp.num_cols = 40, sp.block_rows = 8, sp.block_cols = 8;
  sp.block_density = 0.1; /* with this seed some block rows draw no block at all */
  test_batch tb;
  double e, l;
  CHECK(compare(&tb, sp, NULL, 6, &e, &l));
  int saw_empty = 0, ok = 1;
  for (int64_t i = 0; i < tb.rows; i++)
    if (tb.kv_indptr[i + 1] == tb.kv_indptr[i]) {
      saw_empty = 1;
      for (int64_t row = tb.qo_indptr[i]; row < tb.qo_indptr[i + 1]; row++) ok &= row_is_empty(&tb, &tb.out, &tb.out_lse, row);
    }
  tb_free(&tb);
  CHECK(ok);
  CHECK_MSG(e < 1e-5 && l < 1e-4, "err %g lse %g", e, l);
  CHECK_MSG(saw_empty, "the seed drew no empty block row: pick another");
}

/* ------------------------------------------------------------------ pages */

TEST(page_size_one_decode_and_prefill) {
  test_spec sp = base(TDT_F16);
  sp.page_size = 1;
  static const int32_t qo[3] = {1, 9, 4}, kv[3] = {50, 9, 31};
  sp.batch_size = 3, sp.kv_lens = kv;
  EXPECT_MATCH(sp, NULL, 7);
  sp.qo_lens = qo;
  EXPECT_MATCH(sp, &CAUSAL, 8);
}

TEST(last_page_of_one_entry) {
  test_spec sp = base(TDT_F32);
  static const int32_t kv[3] = {17, 1, 33}; /* 16-token pages: 1 token in each last page */
  sp.batch_size = 3, sp.kv_lens = kv;
  EXPECT_MATCH(sp, NULL, 9);
}

TEST(last_page_full) {
  test_spec sp = base(TDT_F32);
  static const int32_t qo[3] = {16, 3, 1}, kv[3] = {16, 48, 32};
  sp.batch_size = 3, sp.qo_lens = qo, sp.kv_lens = kv;
  EXPECT_MATCH(sp, &CAUSAL, 10);
}

TEST(single_partial_page_shorter_than_page_size) {
  test_spec sp = base(TDT_F16);
  sp.page_size = 64;
  static const int32_t kv[4] = {5, 63, 1, 2};
  sp.batch_size = 4, sp.kv_lens = kv;
  EXPECT_MATCH(sp, NULL, 11);
}

TEST(page_size_256) {
  test_spec sp = base(TDT_BF16);
  sp.page_size = 256;
  static const int32_t qo[2] = {3, 1}, kv[2] = {300, 700};
  sp.batch_size = 2, sp.qo_lens = qo, sp.kv_lens = kv;
  EXPECT_MATCH(sp, &CAUSAL, 12);
}

/* NaN in the slots no request owns (page tails, unreferenced pages) must not reach the output:
 * the poisoned run is bitwise the clean one. */
static int poison_case(kvattn_context *ctx, test_spec sp, const kvattn_attention_desc *opts, uint64_t seed) {
  test_rng r = rng_seed(seed);
  test_batch tb;
  if (!tb_build(&tb, &sp, &r)) return 0;
  kvattn_attention_desc d = tb_desc(&sp);
  if (opts) d.causal = opts->causal;
  int ok = tb_run(ctx, &d, &tb, &tb.ref, &tb.ref_lse) == KVATTN_SUCCESS;
  tb_poison_unused(&tb);
  ok = ok && tb_run(ctx, &d, &tb, &tb.out, &tb.out_lse) == KVATTN_SUCCESS;
  ok = ok && ht_bitwise_equal(&tb.out, &tb.ref) && ht_bitwise_equal(&tb.out_lse, &tb.ref_lse);
  tb_free(&tb);
  return ok;
}

TEST(nan_in_unused_page_tails_does_not_change_the_output) {
  test_spec sp = base(TDT_F16);
  static const int32_t qo[4] = {1, 5, 2, 9}, kv[4] = {17, 5, 40, 9};
  sp.batch_size = 4, sp.qo_lens = qo, sp.kv_lens = kv;
  sp.extra_pages = 5;
  CHECK(poison_case(cpu_ctx(), sp, &CAUSAL, 13));
  CHECK(poison_case(ref_ctx(), sp, &CAUSAL, 13));
}

TEST(nan_in_unused_slots_with_hnd_combined_page_size_one) {
  test_spec sp = base(TDT_BF16);
  sp.layout = KVATTN_LAYOUT_HND;
  sp.combined_kv = 1;
  sp.page_size = 1;
  sp.extra_pages = 7;
  static const int32_t kv[3] = {3, 11, 1};
  sp.batch_size = 3, sp.kv_lens = kv;
  CHECK(poison_case(cpu_ctx(), sp, NULL, 14));
  sp.page_size = 5;
  CHECK(poison_case(cpu_ctx(), sp, NULL, 15));
}

TEST(no_byte_outside_the_outputs_changes) {
  /* padded outputs: the gaps between rows hold NaN bytes before the run and must after it */
  test_spec sp = base(TDT_F32);
  sp.padded = 1;
  static const int32_t kv[3] = {9, 30, 2};
  sp.batch_size = 3, sp.kv_lens = kv;
  test_rng r = rng_seed(16);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  kvattn_attention_desc d = tb_desc(&sp);
  CHECK_OK(tb_run(cpu_ctx(), &d, &tb, &tb.out, &tb.out_lse));
  /* mark the logical elements, then every other byte of the allocation must be 0xFF still */
  char *touched = calloc(tb.out.alloc_bytes, 1);
  int64_t idx[3] = {0};
  do {
    int64_t byte = (int64_t)tb.out.t.byte_offset + ht_offset(&tb.out, idx) * 4;
    memset(touched + byte, 1, 4);
  } while (ht_next(3, tb.out.shape, idx));
  int clean = 1;
  for (size_t b = 0; b < tb.out.alloc_bytes; b++)
    if (!touched[b] && ((unsigned char *)tb.out.alloc)[b] != 0xFF) clean = 0;
  free(touched);
  tb_free(&tb);
  CHECK(clean);
}

/* ------------------------------------------------------------------ heads, dims, batch */

static void group_case(int *failed_, int group) {
  test_spec sp = base(TDT_F16);
  sp.num_kv_heads = 2, sp.num_qo_heads = 2 * group;
  static const int32_t qo[3] = {1, 6, 2}, kv[3] = {70, 6, 30};
  sp.batch_size = 3, sp.qo_lens = qo, sp.kv_lens = kv;
  EXPECT_MATCH(sp, &CAUSAL, 20 + group);
  sp.qo_lens = NULL; /* decode */
  EXPECT_MATCH(sp, NULL, 30 + group);
}
TEST(gqa_group_size_1) { group_case(failed_, 1); }
TEST(gqa_group_size_2) { group_case(failed_, 2); }
TEST(gqa_group_size_4) { group_case(failed_, 4); }
TEST(gqa_group_size_8) { group_case(failed_, 8); }

static void head_dim_case(int *failed_, int dim) {
  test_spec sp = base(TDT_BF16);
  sp.head_dim = dim;
  static const int32_t qo[2] = {1, 5}, kv[2] = {90, 20};
  sp.batch_size = 2, sp.qo_lens = qo, sp.kv_lens = kv;
  kvattn_attention_desc o = CAUSAL;
  o.rope = 1;
  EXPECT_MATCH(sp, &o, 40 + dim);
}
TEST(head_dim_64) { head_dim_case(failed_, 64); }
TEST(head_dim_128) { head_dim_case(failed_, 128); }
TEST(head_dim_256) { head_dim_case(failed_, 256); }

TEST(batch_of_one) {
  test_spec sp = base(TDT_F16);
  static const int32_t qo[1] = {7}, kv[1] = {123};
  sp.batch_size = 1, sp.kv_lens = kv;
  EXPECT_MATCH(sp, NULL, 50);
  sp.qo_lens = qo;
  EXPECT_MATCH(sp, &CAUSAL, 51);
}

TEST(batch_of_1024_decode) {
  test_spec sp = base(TDT_BF16);
  sp.num_qo_heads = 4, sp.num_kv_heads = 1;
  static int32_t kv[1024];
  test_rng r = rng_seed(52);
  for (int i = 0; i < 1024; i++) kv[i] = (int32_t)rng_int(&r, 0, 64);
  sp.batch_size = 1024, sp.kv_lens = kv;
  EXPECT_MATCH(sp, NULL, 53);
}

TEST(one_128k_token_request_among_short_ones) {
  /* a 131072-token request (appending 4 queries, causal) beside decode-like short ones */
  test_spec sp = base(TDT_F16);
  sp.num_qo_heads = 2, sp.num_kv_heads = 1;
  sp.page_size = 64;
  static const int32_t qo[4] = {1, 4, 1, 2}, kv[4] = {10, 131072, 3, 77};
  sp.batch_size = 4, sp.qo_lens = qo, sp.kv_lens = kv;
  EXPECT_MATCH(sp, &CAUSAL, 54);
}

/* ------------------------------------------------------------------ numerics */

TEST(huge_logits_do_not_overflow) {
  test_spec sp = base(TDT_F32);
  sp.scale = 12.0; /* scores of ~1000 */
  static const int32_t qo[2] = {3, 1}, kv[2] = {40, 64};
  sp.batch_size = 2, sp.qo_lens = qo, sp.kv_lens = kv;
  test_batch tb;
  double e, l;
  CHECK(compare(&tb, sp, &CAUSAL, 60, &e, &l));
  tb_free(&tb);
  /* with scores this large, a 1-ulp fp32 score difference moves weights by ~1e-4: judge loosely */
  CHECK_MSG(e < 1e-3 && l < 1e-2, "err %g lse %g", e, l);
}

TEST(decode_with_null_qo_indptr_equals_explicit_ones) {
  test_spec sp = base(TDT_F16);
  static const int32_t qo[4] = {1, 1, 1, 1}, kv[4] = {33, 2, 64, 15};
  sp.batch_size = 4, sp.kv_lens = kv;
  test_rng r = rng_seed(61);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  kvattn_attention_desc d = tb_desc(&sp);
  CHECK_OK(tb_run(cpu_ctx(), &d, &tb, &tb.ref, &tb.ref_lse));
  tb.batch.qo_indptr = tb.qo_indptr; /* the same batch, as a prefill of one row each */
  CHECK_OK(tb_run(cpu_ctx(), &d, &tb, &tb.out, &tb.out_lse));
  int same = ht_bitwise_equal(&tb.out, &tb.ref) && ht_bitwise_equal(&tb.out_lse, &tb.ref_lse);
  tb_free(&tb);
  (void)qo;
  CHECK(same);
}

TEST(kv_indices_out_of_cache_at_run_is_invalid_index) {
  /* the run's device indices are checked too (the plan may have had no host copy) */
  test_spec sp = base(TDT_F32);
  static const int32_t kv[2] = {20, 5};
  sp.batch_size = 2, sp.kv_lens = kv;
  test_rng r = rng_seed(62);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  tb.batch.kv_indices = NULL;
  ((int32_t *)tb.indices.t.data)[1] = (int32_t)tb.num_pages + 3;
  kvattn_attention_desc d = tb_desc(&sp);
  kvattn_status a = tb_run(cpu_ctx(), &d, &tb, &tb.out, NULL), b = tb_run(ref_ctx(), &d, &tb, &tb.ref, NULL);
  tb_free(&tb);
  CHECK_STATUS(a, KVATTN_ERROR_INVALID_INDEX);
  CHECK_STATUS(b, KVATTN_ERROR_INVALID_INDEX);
}

TEST_MAIN()
