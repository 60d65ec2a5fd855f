/*
 * test_append.c - kvattn_append_paged_kv on the CPU: tokens land at page
 * indices[kv_indptr[r] + pos / page_size], slot pos % page_size, in every layout and storage;
 * nothing else in the cache changes; a bad argument is its exact status with the cache untouched.
 */
#include "test.h"
#include "util.h"

static kvattn_context *cpu_ctx(void) {
  static kvattn_context *c;
  if (!c) c = test_context(KVATTN_BACKEND_CPU, 2);
  return c;
}
static kvattn_context *ref_ctx(void) {
  static kvattn_context *c;
  if (!c) c = test_context(KVATTN_BACKEND_REFERENCE, 1);
  return c;
}

/* A paged cache from test_batch plus new tokens to append: for each request, `per_request` tokens
 * at random positions inside its pages. */
typedef struct append_case {
  test_batch tb;
  host_tensor k_new, v_new, batch_indices, positions, kv_indptr;
  int64_t tokens;
} append_case;

static int append_make(append_case *c, test_spec sp, int per_request, uint64_t seed) {
  memset(c, 0, sizeof *c);
  static const int32_t kv[4] = {37, 1, 16, 60};
  sp.batch_size = 4, sp.kv_lens = kv, sp.qo_lens = NULL;
  sp.num_qo_heads = 4, sp.num_kv_heads = 2, sp.head_dim = 32;
  test_rng r = rng_seed(seed);
  if (!tb_build(&c->tb, &sp, &r)) return 0;
  c->tokens = 4 * per_request;
  int64_t ts[3] = {c->tokens, sp.num_kv_heads, sp.head_dim}, n1[1] = {c->tokens}, b1[1] = {5};
  int ok = sp.padded ? ht_alloc_padded(&c->k_new, sp.kv_dtype, 3, ts, 2, 1) && ht_alloc_padded(&c->v_new, sp.kv_dtype, 3, ts, 1, 1)
                     : ht_alloc(&c->k_new, sp.kv_dtype, 3, ts) && ht_alloc(&c->v_new, sp.kv_dtype, 3, ts);
  ok = ok && ht_alloc(&c->batch_indices, TDT_I32, 1, n1) && ht_alloc(&c->positions, TDT_I32, 1, n1) &&
       ht_alloc(&c->kv_indptr, TDT_I32, 1, b1);
  if (!ok) return 0;
  ht_fill_normal(&c->k_new, &r, 1), ht_fill_normal(&c->v_new, &r, 1);
  for (int i = 0; i < 5; i++) ((int32_t *)c->kv_indptr.t.data)[i] = c->tb.kv_indptr[i];
  /* distinct positions per request (a later duplicate would overwrite an earlier one) */
  for (int i = 0, t = 0; i < 4; i++) {
    int64_t cap = (c->tb.kv_indptr[i + 1] - c->tb.kv_indptr[i]) * sp.page_size;
    for (int k = 0; k < per_request; k++, t++) {
      ((int32_t *)c->batch_indices.t.data)[t] = i;
      ((int32_t *)c->positions.t.data)[t] = (int32_t)((k * cap) / per_request + rng_int(&r, 0, cap / per_request - 1 > 0 ? cap / per_request - 1 : 0));
    }
  }
  return 1;
}
static void append_free(append_case *c) {
  tb_free(&c->tb);
  ht_free(&c->k_new), ht_free(&c->v_new), ht_free(&c->batch_indices), ht_free(&c->positions), ht_free(&c->kv_indptr);
}
static kvattn_status append_run(kvattn_context *ctx, append_case *c) {
  return kvattn_append_paged_kv(ctx, &c->k_new.t, &c->v_new.t, &c->batch_indices.t, &c->positions.t, &c->tb.kv,
                                &c->kv_indptr.t, NULL);
}

/* Every appended token's K and V sit bitwise at their slot, and every other slot of the cache is
 * bitwise what it was in `before` (a copy of the cache allocation taken before the append). */
static int append_verify(const append_case *c, const char *before_k, const char *before_v) {
  const test_batch *tb = &c->tb;
  const test_spec *s = &tb->spec;
  const int64_t P = s->page_size;
  size_t es = tdt_size(s->kv_dtype);
  /* expected = before, with the appended tokens written in order */
  const host_tensor *kt = s->combined_kv ? &tb->kvc : &tb->k;
  size_t bytes_k = kt->alloc_bytes, bytes_v = s->combined_kv ? 0 : tb->v.alloc_bytes;
  char *want_k = malloc(bytes_k), *want_v = malloc(bytes_v + 1);
  memcpy(want_k, before_k, bytes_k);
  if (bytes_v) memcpy(want_v, before_v, bytes_v);
  for (int64_t t = 0; t < c->tokens; t++) {
    int32_t r = ((int32_t *)c->batch_indices.t.data)[t], pos = ((int32_t *)c->positions.t.data)[t];
    int64_t page = tb->kv_indices[tb->kv_indptr[r] + pos / P], slot = pos % P;
    for (int cc = 0; cc < 2; cc++)
      for (int64_t h = 0; h < s->num_kv_heads; h++)
        for (int64_t d = 0; d < s->head_dim; d++) {
          int64_t off;
          const host_tensor *dst = tb_paged_elem(tb, cc, page, slot, h, d, &off);
          const host_tensor *src = cc ? &c->v_new : &c->k_new;
          char *base = (dst == kt ? want_k : want_v) + dst->t.byte_offset;
          memcpy(base + off * (int64_t)es, ht_base(src) + ht_offset(src, (int64_t[]){t, h, d}) * (int64_t)es, es);
        }
  }
  int ok = memcmp(want_k, kt->alloc, bytes_k) == 0 && (!bytes_v || memcmp(want_v, tb->v.alloc, bytes_v) == 0);
  free(want_k), free(want_v);
  return ok;
}

/* Snapshot, append, verify. */
#define EXPECT_APPEND_CORRECT(spec_arg, per_request, seed)                                              \
  do {                                                                                                \
    append_case c_;                                                                                   \
    CHECK(append_make(&c_, (spec_arg), (per_request), (seed)));                                           \
    const host_tensor *kt_ = c_.tb.spec.combined_kv ? &c_.tb.kvc : &c_.tb.k;                          \
    char *bk_ = malloc(kt_->alloc_bytes), *bv_ = malloc(c_.tb.v.alloc_bytes + 1);                     \
    memcpy(bk_, kt_->alloc, kt_->alloc_bytes);                                                        \
    if (c_.tb.v.alloc) memcpy(bv_, c_.tb.v.alloc, c_.tb.v.alloc_bytes);                               \
    kvattn_status s_ = append_run(cpu_ctx(), &c_);                                                    \
    int ok_ = s_ == KVATTN_SUCCESS && append_verify(&c_, bk_, bv_);                                   \
    if (s_ != KVATTN_SUCCESS) fprintf(stderr, "  %s: %s\n", kvattn_status_string(s_), kvattn_last_error()); \
    free(bk_), free(bv_);                                                                             \
    append_free(&c_);                                                                                 \
    CHECK(ok_);                                                                                       \
  } while (0)

static test_spec paged(int layout, DLDataType dt, int page_size) {
  test_spec sp = test_spec_default();
  sp.layout = layout;
  sp.q_dtype = sp.kv_dtype = sp.o_dtype = dt;
  sp.page_size = page_size;
  return sp;
}

TEST(append_nhd_f16_writes_each_token_to_its_slot_only) { EXPECT_APPEND_CORRECT(paged(KVATTN_LAYOUT_NHD, TDT_F16, 16), 1, 1); }
TEST(append_hnd_bf16_writes_each_token_to_its_slot_only) { EXPECT_APPEND_CORRECT(paged(KVATTN_LAYOUT_HND, TDT_BF16, 8), 3, 2); }
TEST(append_f32_and_f64_are_bit_exact) {
  EXPECT_APPEND_CORRECT(paged(KVATTN_LAYOUT_NHD, TDT_F32, 5), 4, 3);
  EXPECT_APPEND_CORRECT(paged(KVATTN_LAYOUT_HND, TDT_F64, 3), 2, 4);
}
TEST(append_page_size_one) { EXPECT_APPEND_CORRECT(paged(KVATTN_LAYOUT_NHD, TDT_F16, 1), 1, 5); }
TEST(append_into_combined_kv_tensor_nhd_and_hnd) {
  test_spec a = paged(KVATTN_LAYOUT_NHD, TDT_F16, 16), b = paged(KVATTN_LAYOUT_HND, TDT_BF16, 4);
  a.combined_kv = b.combined_kv = 1;
  EXPECT_APPEND_CORRECT(a, 2, 6);
  EXPECT_APPEND_CORRECT(b, 2, 7);
}
TEST(append_into_noncontiguous_cache_from_strided_inputs) {
  test_spec a = paged(KVATTN_LAYOUT_NHD, TDT_F32, 16), b = paged(KVATTN_LAYOUT_HND, TDT_F16, 6);
  a.padded = b.padded = 1;
  b.combined_kv = 1;
  EXPECT_APPEND_CORRECT(a, 3, 8);
  EXPECT_APPEND_CORRECT(b, 3, 9);
}

TEST(append_then_decode_equals_decode_over_the_filled_cache) {
  /* The serving step: each request's last token is "new". Run decode over the full cache, then
   * wipe those slots with NaN, append the tokens back, run again: bitwise the same output. */
  test_spec sp = paged(KVATTN_LAYOUT_NHD, TDT_BF16, 16);
  static const int32_t kv[5] = {1, 16, 17, 100, 33};
  sp.batch_size = 5, sp.kv_lens = kv;
  test_rng r = rng_seed(10);
  test_batch tb;
  CHECK(tb_build(&tb, &sp, &r));
  kvattn_attention_desc d = tb_desc(&sp);
  CHECK_OK(tb_run(cpu_ctx(), &d, &tb, &tb.ref, &tb.ref_lse));
  host_tensor kn, vn, bi, pos, indptr;
  int64_t ts[3] = {5, sp.num_kv_heads, sp.head_dim}, n1[1] = {5}, b1[1] = {6};
  CHECK(ht_alloc(&kn, TDT_BF16, 3, ts) && ht_alloc(&vn, TDT_BF16, 3, ts) && ht_alloc(&bi, TDT_I32, 1, n1) &&
        ht_alloc(&pos, TDT_I32, 1, n1) && ht_alloc(&indptr, TDT_I32, 1, b1));
  for (int i = 0; i < 6; i++) ((int32_t *)indptr.t.data)[i] = tb.kv_indptr[i];
  for (int i = 0; i < 5; i++) {
    ((int32_t *)bi.t.data)[i] = i;
    ((int32_t *)pos.t.data)[i] = kv[i] - 1;
    int64_t page = tb.kv_indices[tb.kv_indptr[i] + (kv[i] - 1) / 16], slot = (kv[i] - 1) % 16;
    for (int c = 0; c < 2; c++)
      for (int64_t h = 0; h < sp.num_kv_heads; h++)
        for (int64_t x = 0; x < sp.head_dim; x++) {
          int64_t off;
          const host_tensor *src = tb_paged_elem(&tb, c, page, slot, h, x, &off);
          ht_set(c ? &vn : &kn, (int64_t[]){i, h, x}, ht_get_off(src, off));
          ht_set_off(src, off, NAN);
        }
  }
  CHECK_OK(kvattn_append_paged_kv(cpu_ctx(), &kn.t, &vn.t, &bi.t, &pos.t, &tb.kv, &indptr.t, NULL));
  CHECK_OK(tb_run(cpu_ctx(), &d, &tb, &tb.out, &tb.out_lse));
  int same = ht_bitwise_equal(&tb.out, &tb.ref) && ht_bitwise_equal(&tb.out_lse, &tb.ref_lse);
  /* and the reference agrees with what the fast path computed over the appended cache */
  CHECK_OK(tb_run(ref_ctx(), &d, &tb, &tb.ref, NULL));
  double err = rel_error(&tb.out, &tb.ref);
  ht_free(&kn), ht_free(&vn), ht_free(&bi), ht_free(&pos), ht_free(&indptr);
  tb_free(&tb);
  CHECK(same);
  CHECK_MSG(err < 1e-2, "err %g", err);
}

TEST(append_of_zero_tokens_is_a_no_op) {
  append_case c;
  CHECK(append_make(&c, paged(KVATTN_LAYOUT_NHD, TDT_F16, 16), 1, 11));
  char *before = malloc(c.tb.k.alloc_bytes);
  memcpy(before, c.tb.k.alloc, c.tb.k.alloc_bytes);
  c.k_new.shape[0] = c.v_new.shape[0] = c.batch_indices.shape[0] = c.positions.shape[0] = 0;
  kvattn_status s = append_run(cpu_ctx(), &c);
  int same = memcmp(before, c.tb.k.alloc, c.tb.k.alloc_bytes) == 0;
  free(before);
  append_free(&c);
  CHECK(s == KVATTN_SUCCESS && same);
}

/* ------------------------------------------------------------------ bad input: exact status, cache untouched */

typedef void (*corrupt_fn)(append_case *c);

static kvattn_status bad_append(corrupt_fn corrupt, int *untouched) {
  append_case c;
  if (!append_make(&c, paged(KVATTN_LAYOUT_NHD, TDT_F16, 16), 2, 12)) return KVATTN_ERROR_INTERNAL;
  char *bk = malloc(c.tb.k.alloc_bytes), *bv = malloc(c.tb.v.alloc_bytes);
  memcpy(bk, c.tb.k.alloc, c.tb.k.alloc_bytes);
  memcpy(bv, c.tb.v.alloc, c.tb.v.alloc_bytes);
  corrupt(&c);
  kvattn_status s = append_run(cpu_ctx(), &c);
  if (s != KVATTN_SUCCESS) fprintf(stderr, "  (message: %s)\n", kvattn_last_error());
  *untouched = memcmp(bk, c.tb.k.alloc, c.tb.k.alloc_bytes) == 0 && memcmp(bv, c.tb.v.alloc, c.tb.v.alloc_bytes) == 0;
  free(bk), free(bv);
  append_free(&c);
  return s;
}
#define EXPECT_BAD_APPEND(fn, status)                 \
  do {                                                \
    int untouched_ = 0;                               \
    CHECK_STATUS(bad_append(fn, &untouched_), status); \
    CHECK_MSG(untouched_, "the cache changed");       \
  } while (0)

/* the last token's corruption: earlier tokens are valid, so a write-as-you-go append would fail */
static void last_token_bad_request(append_case *c) { ((int32_t *)c->batch_indices.t.data)[c->tokens - 1] = 4; }
static void last_token_negative_request(append_case *c) { ((int32_t *)c->batch_indices.t.data)[c->tokens - 1] = -1; }
static void last_token_past_its_pages(append_case *c) {
  int32_t r = ((int32_t *)c->batch_indices.t.data)[c->tokens - 1];
  ((int32_t *)c->positions.t.data)[c->tokens - 1] = (c->tb.kv_indptr[r + 1] - c->tb.kv_indptr[r]) * c->tb.spec.page_size;
}
static void last_token_negative_position(append_case *c) { ((int32_t *)c->positions.t.data)[c->tokens - 1] = -3; }
static void page_id_out_of_range(append_case *c) {
  int32_t r = ((int32_t *)c->batch_indices.t.data)[c->tokens - 1], p = ((int32_t *)c->positions.t.data)[c->tokens - 1];
  ((int32_t *)c->tb.indices.t.data)[c->tb.kv_indptr[r] + p / c->tb.spec.page_size] = (int32_t)c->tb.num_pages;
}
static void indptr_past_indices(append_case *c) { ((int32_t *)c->kv_indptr.t.data)[4] = (int32_t)c->tb.kv_entries + 1; }
static void indptr_decreasing(append_case *c) {
  int32_t *ip = (int32_t *)c->kv_indptr.t.data;
  ip[4] = ip[3] - 1;
}
static void k_new_wrong_dtype(append_case *c) { c->k_new.t.dtype = TDT_BF16; }
static void v_new_wrong_heads(append_case *c) { c->v_new.shape[1] = 3; }
static void k_new_wrong_head_dim(append_case *c) { c->k_new.shape[2] = 16; }
static void positions_wrong_length(append_case *c) { c->positions.shape[0] = c->tokens - 1; }
static void positions_int64(append_case *c) { c->positions.t.dtype = (DLDataType){kDLInt, 64, 1}; }
static void indices_float(append_case *c) { c->tb.indices.t.dtype = TDT_F32; }
static void kv_indptr_2d(append_case *c) { c->kv_indptr.t.ndim = 2; c->kv_indptr.shape[1] = 1; c->kv_indptr.strides[1] = 1; }
static void k_new_on_gpu(append_case *c) { c->k_new.t.device.device_type = kDLCUDA; }
static void cache_on_gpu(append_case *c) { c->tb.k.t.device.device_type = kDLCUDA; }
static void k_new_null(append_case *c) { c->tb.kv.k = NULL; }
static void both_k_and_kv(append_case *c) { c->tb.kv.kv = &c->tb.k.t; }
static void bad_layout(append_case *c) { c->tb.kv.layout = 7; }
static void no_indices(append_case *c) { c->tb.kv.indices = NULL; }
static void k_new_negative_stride(append_case *c) { c->k_new.strides[2] = -1; }
static void v_cache_shape_differs(append_case *c) { c->tb.v.shape[0] = c->tb.v.shape[0] - 1; }
static void k_new_aliases_cache(append_case *c) { c->k_new.t.data = c->tb.k.t.data; c->k_new.t.byte_offset = c->tb.k.t.byte_offset; }
static void cache_fp8_unsupported_dtype(append_case *c) { c->tb.k.t.dtype = (DLDataType){kDLInt, 16, 1}; }

TEST(append_bad_request_index_is_invalid_index) { EXPECT_BAD_APPEND(last_token_bad_request, KVATTN_ERROR_INVALID_INDEX); }
TEST(append_negative_request_index_is_invalid_index) { EXPECT_BAD_APPEND(last_token_negative_request, KVATTN_ERROR_INVALID_INDEX); }
TEST(append_position_past_the_request_pages_is_invalid_index) { EXPECT_BAD_APPEND(last_token_past_its_pages, KVATTN_ERROR_INVALID_INDEX); }
TEST(append_negative_position_is_invalid_index) { EXPECT_BAD_APPEND(last_token_negative_position, KVATTN_ERROR_INVALID_INDEX); }
TEST(append_page_id_outside_cache_is_invalid_index) { EXPECT_BAD_APPEND(page_id_out_of_range, KVATTN_ERROR_INVALID_INDEX); }
TEST(append_indptr_past_indices_is_invalid_index) { EXPECT_BAD_APPEND(indptr_past_indices, KVATTN_ERROR_INVALID_INDEX); }
TEST(append_indptr_decreasing_is_invalid_index) { EXPECT_BAD_APPEND(indptr_decreasing, KVATTN_ERROR_INVALID_INDEX); }
TEST(append_k_new_dtype_not_the_cache_dtype_is_invalid_dtype) { EXPECT_BAD_APPEND(k_new_wrong_dtype, KVATTN_ERROR_INVALID_DTYPE); }
TEST(append_v_new_head_count_mismatch_is_invalid_shape) { EXPECT_BAD_APPEND(v_new_wrong_heads, KVATTN_ERROR_INVALID_SHAPE); }
TEST(append_k_new_head_dim_mismatch_is_invalid_shape) { EXPECT_BAD_APPEND(k_new_wrong_head_dim, KVATTN_ERROR_INVALID_SHAPE); }
TEST(append_positions_length_mismatch_is_invalid_shape) { EXPECT_BAD_APPEND(positions_wrong_length, KVATTN_ERROR_INVALID_SHAPE); }
TEST(append_positions_int64_is_invalid_dtype) { EXPECT_BAD_APPEND(positions_int64, KVATTN_ERROR_INVALID_DTYPE); }
TEST(append_indices_float_is_invalid_dtype) { EXPECT_BAD_APPEND(indices_float, KVATTN_ERROR_INVALID_DTYPE); }
TEST(append_kv_indptr_2d_is_invalid_shape) { EXPECT_BAD_APPEND(kv_indptr_2d, KVATTN_ERROR_INVALID_SHAPE); }
TEST(append_k_new_on_gpu_is_device_mismatch) { EXPECT_BAD_APPEND(k_new_on_gpu, KVATTN_ERROR_DEVICE_MISMATCH); }
TEST(append_cache_on_gpu_is_device_mismatch) { EXPECT_BAD_APPEND(cache_on_gpu, KVATTN_ERROR_DEVICE_MISMATCH); }
TEST(append_missing_k_is_invalid_argument) { EXPECT_BAD_APPEND(k_new_null, KVATTN_ERROR_INVALID_ARGUMENT); }
TEST(append_k_v_and_combined_kv_together_is_invalid_argument) { EXPECT_BAD_APPEND(both_k_and_kv, KVATTN_ERROR_INVALID_ARGUMENT); }
TEST(append_unknown_layout_is_invalid_argument) { EXPECT_BAD_APPEND(bad_layout, KVATTN_ERROR_INVALID_ARGUMENT); }
TEST(append_missing_indices_is_invalid_argument) { EXPECT_BAD_APPEND(no_indices, KVATTN_ERROR_INVALID_ARGUMENT); }
TEST(append_negative_stride_is_invalid_stride) { EXPECT_BAD_APPEND(k_new_negative_stride, KVATTN_ERROR_INVALID_STRIDE); }
TEST(append_v_cache_shape_differs_from_k_is_invalid_shape) { EXPECT_BAD_APPEND(v_cache_shape_differs, KVATTN_ERROR_INVALID_SHAPE); }
TEST(append_new_tokens_aliasing_the_cache_is_invalid_argument) { EXPECT_BAD_APPEND(k_new_aliases_cache, KVATTN_ERROR_INVALID_ARGUMENT); }
TEST(append_cache_of_integer_dtype_is_invalid_dtype) { EXPECT_BAD_APPEND(cache_fp8_unsupported_dtype, KVATTN_ERROR_INVALID_DTYPE); }

TEST(append_null_context_is_invalid_argument) {
  append_case c;
  CHECK(append_make(&c, paged(KVATTN_LAYOUT_NHD, TDT_F16, 16), 1, 13));
  kvattn_status s = kvattn_append_paged_kv(NULL, &c.k_new.t, &c.v_new.t, &c.batch_indices.t, &c.positions.t, &c.tb.kv,
                                           &c.kv_indptr.t, NULL);
  append_free(&c);
  CHECK_STATUS(s, KVATTN_ERROR_INVALID_ARGUMENT);
}

TEST_MAIN()
