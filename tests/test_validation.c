/*
 * test_validation.c - the API's contract on bad input (issue 3 item 4, RELIABILITY.md test 11).
 *
 * Every bad description, bound, batch, tensor and call order gets its exact status and a message
 * naming the argument and the bad value; and a failing call changes no byte anywhere: the test
 * fills q, the KV cache, the index arrays (host and device copies), out, lse, the custom mask and
 * the workspace with known bytes, and compares all of them after the call (out and lse included:
 * a failing call must fail before it runs).
 *
 * Then the inputs that look odd but are valid (RELIABILITY.md test 4, the edge-shape table): empty
 * requests, a batch of 0, queries longer than the KV under causal, partial pages, one huge request
 * among tiny ones; each has a defined result, checked on the CPU fast path and on the float64
 * reference. These need the CPU kernels (src/cpu/); without them those cases fail with the
 * backend's "not built" message.
 *
 * Uses the public API only.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvattn.h"
#include "test.h"

/* A helper that CHECKs takes `failed_` like a TEST body; CALL returns when it failed. */
#define CALL(expr)            \
  do {                        \
    expr;                     \
    if (*failed_) return;     \
  } while (0)

#define CHECK_ERROR_HAS(fragment)                                                              \
  CHECK_MSG(strstr(kvattn_last_error(), (fragment)) != NULL, "message \"%s\" lacks \"%s\"", \
            kvattn_last_error(), (fragment))

static const DLDataType F16 = {kDLFloat, 16, 1}, F32 = {kDLFloat, 32, 1}, F64 = {kDLFloat, 64, 1},
                        I32 = {kDLInt, 32, 1}, I64 = {kDLInt, 64, 1}, U8 = {kDLUInt, 8, 1};

/* ---------------------------------------------------------------- tensors the tests own */

/* A host tensor whose DLTensor points at its own shape/strides arrays: never copy one by value. */
typedef struct tens {
  DLTensor t;
  int64_t shape[6];
  int64_t strides[6];
  void *mem; /* 64-byte aligned allocation, at least 64 bytes */
  size_t bytes;
} tens;

static void tens_free(tens *x) {
  free(x->mem);
  memset(x, 0, sizeof *x);
}

static void tens_alloc(tens *x, DLDataType dt, int ndim, const int64_t *shape) {
  tens_free(x);
  size_t n = 1;
  for (int i = 0; i < ndim; i++) {
    x->shape[i] = shape[i];
    n *= (size_t)shape[i];
  }
  x->bytes = n * (dt.bits / 8) * dt.lanes;
  x->mem = aligned_alloc(64, (x->bytes + 64 + 63) / 64 * 64);
  memset(x->mem, 0, (x->bytes + 64 + 63) / 64 * 64);
  x->t.data = x->mem;
  x->t.device.device_type = kDLCPU;
  x->t.device.device_id = 0;
  x->t.ndim = ndim;
  x->t.dtype = dt;
  x->t.shape = x->shape;
  x->t.strides = NULL;
  x->t.byte_offset = 0;
}

static uint32_t rng_state = 12345;
static float rnd(void) { /* uniform in [-1, 1) */
  rng_state = rng_state * 1664525u + 1013904223u;
  return (float)((rng_state >> 8) * (1.0 / 8388608.0)) - 1.0f;
}
static void fill_random_f32(tens *x) {
  float *p = x->mem;
  for (size_t i = 0; i < x->bytes / 4; i++) p[i] = rnd();
}

/* ---------------------------------------------------------------- "no byte changed" */

typedef struct region {
  const char *name;
  const void *p;
  size_t n;
  unsigned char *copy;
} region;
#define MAX_REGIONS 24
static region regions[MAX_REGIONS];
static int num_regions;

static void untrack_all(void) {
  for (int i = 0; i < num_regions; i++) free(regions[i].copy);
  num_regions = 0;
}
static void track(const char *name, const void *p, size_t n) {
  if (num_regions == MAX_REGIONS || !p || !n) return;
  regions[num_regions++] = (region){name, p, n, malloc(n)};
}
static void snapshot(void) {
  for (int i = 0; i < num_regions; i++) memcpy(regions[i].copy, regions[i].p, regions[i].n);
}
/* 1 if every tracked byte is as at the last snapshot; else names the first changed byte. */
static int unchanged(void) {
  for (int i = 0; i < num_regions; i++)
    if (memcmp(regions[i].copy, regions[i].p, regions[i].n)) {
      size_t at = 0;
      while (((const unsigned char *)regions[i].p)[at] == regions[i].copy[at]) at++;
      fprintf(stderr, "  byte %zu of %s changed (0x%02x -> 0x%02x)\n", at, regions[i].name, regions[i].copy[at],
              ((const unsigned char *)regions[i].p)[at]);
      return 0;
    }
  return 1;
}

/* ---------------------------------------------------------------- the fixture */

/* One small valid problem per format, f32, 4 query heads over 2 KV heads, head_dim 8:
 *   paged:  3 requests, page_size 4; request 1 has no KV (and one query row);
 *           qo_indptr [0,2,3,5], kv_indptr [0,2,2,5], pages {5,1 | - | 0,3,6} of 8, last [3,1,4]
 *   ragged: 2 requests, qo_indptr [0,2,5], kv_indptr [0,3,7] over an 8-token K/V
 *   BSR:    5 x 10 with blocks 2 x 4 (3 block rows, 3 block columns, the last one partial),
 *           kv_indptr [0,2,3,5], block columns {0,2 | 1 | 0,1} */
enum { FX_PAGED, FX_RAGGED, FX_BSR };
enum { QO_HEADS = 4, KV_HEADS = 2, HEAD_DIM = 8, NUM_PAGES = 8, PAGE_SIZE = 4 };

typedef struct fixture {
  int format;
  kvattn_context *ctx;
  kvattn_attention_desc desc;
  kvattn_bounds bounds;
  kvattn_attention *attn;
  kvattn_batch batch;
  int32_t qo_indptr[16], kv_indptr[16], kv_indices[16], last_page_len[16];
  kvattn_workspace ws;
  size_t ws_need;
  void *ws_mem;
  tens q, k, v, indices, out, lse, mask, extra;
  kvattn_kv kv;
} fixture;
static fixture F;

static void fx_teardown(void) {
  kvattn_attention_destroy(F.attn);
  kvattn_context_destroy(F.ctx);
  free(F.ws_mem);
  tens *all[] = {&F.q, &F.k, &F.v, &F.indices, &F.out, &F.lse, &F.mask, &F.extra};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tens_free(all[i]);
  untrack_all();
  memset(&F, 0, sizeof F);
}

static kvattn_attention_desc base_desc(void) {
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_qo_heads = QO_HEADS;
  d.num_kv_heads = KV_HEADS;
  d.head_dim = HEAD_DIM;
  d.q_dtype = F32;
  return d;
}

static void track_fixture(void) {
  untrack_all();
  track("q", F.q.mem, F.q.bytes);
  track("k", F.k.mem, F.k.bytes);
  track("v", F.v.mem, F.v.bytes);
  track("indices", F.indices.mem, F.indices.bytes);
  track("out", F.out.mem, F.out.bytes);
  track("lse", F.lse.mem, F.lse.bytes);
  track("custom_mask", F.mask.mem, F.mask.bytes);
  track("extra", F.extra.mem, F.extra.bytes);
  track("workspace", F.ws_mem, F.ws_need + 64);
  track("qo_indptr", F.qo_indptr, sizeof F.qo_indptr);
  track("kv_indptr", F.kv_indptr, sizeof F.kv_indptr);
  track("kv_indices", F.kv_indices, sizeof F.kv_indices);
  track("kv_last_page_len", F.last_page_len, sizeof F.last_page_len);
  track("batch", &F.batch, sizeof F.batch);
  track("desc", &F.desc, sizeof F.desc);
  track("bounds", &F.bounds, sizeof F.bounds);
}

/* Build the fixture on `backend` (CPU or REFERENCE); the attention is created, not planned. */
static void fx_setup_on(int *failed_, int format, int custom_mask, int backend) {
  fx_teardown();
  F.format = format;
  kvattn_options opt = KVATTN_OPTIONS_INIT;
  opt.backend = backend;
  opt.num_threads = 2;
  CHECK_OK(kvattn_context_create(&opt, &F.ctx));
  F.desc = base_desc();
  F.desc.custom_mask = custom_mask;
  F.bounds = (kvattn_bounds)KVATTN_BOUNDS_INIT;
  F.bounds.max_batch = 4;
  F.bounds.max_qo_tokens = 8;
  F.bounds.max_kv_entries = 8;

  F.batch = (kvattn_batch)KVATTN_BATCH_INIT;
  F.batch.format = format;
  int64_t kv_tokens = 0, entries = 0;
  if (format == FX_PAGED) {
    const int32_t qo[] = {0, 2, 3, 5}, kv[] = {0, 2, 2, 5}, ix[] = {5, 1, 0, 3, 6}, last[] = {3, 1, 4};
    memcpy(F.qo_indptr, qo, sizeof qo);
    memcpy(F.kv_indptr, kv, sizeof kv);
    memcpy(F.kv_indices, ix, sizeof ix);
    memcpy(F.last_page_len, last, sizeof last);
    F.batch.batch_size = 3;
    F.batch.qo_indptr = F.qo_indptr;
    F.batch.kv_indptr = F.kv_indptr;
    F.batch.kv_indices = F.kv_indices;
    F.batch.kv_last_page_len = F.last_page_len;
    F.batch.page_size = PAGE_SIZE;
    F.batch.num_pages = NUM_PAGES;
    entries = 5;
  } else if (format == FX_RAGGED) {
    const int32_t qo[] = {0, 2, 5}, kv[] = {0, 3, 7};
    memcpy(F.qo_indptr, qo, sizeof qo);
    memcpy(F.kv_indptr, kv, sizeof kv);
    F.batch.batch_size = 2;
    F.batch.qo_indptr = F.qo_indptr;
    F.batch.kv_indptr = F.kv_indptr;
    kv_tokens = 8;
  } else {
    const int32_t kv[] = {0, 2, 3, 5}, ix[] = {0, 2, 1, 0, 1};
    memcpy(F.kv_indptr, kv, sizeof kv);
    memcpy(F.kv_indices, ix, sizeof ix);
    F.batch.kv_indptr = F.kv_indptr;
    F.batch.kv_indices = F.kv_indices;
    F.batch.block_rows = 2;
    F.batch.block_cols = 4;
    F.batch.num_rows = 5;
    F.batch.num_cols = 10;
    kv_tokens = 10;
    entries = 5;
  }

  int64_t qshape[] = {5, QO_HEADS, HEAD_DIM}, lshape[] = {5, QO_HEADS};
  tens_alloc(&F.q, F32, 3, qshape);
  tens_alloc(&F.out, F32, 3, qshape);
  tens_alloc(&F.lse, F32, 2, lshape);
  fill_random_f32(&F.q);
  memset(F.out.mem, 0xA5, F.out.bytes);
  memset(F.lse.mem, 0xA5, F.lse.bytes);
  if (format == FX_PAGED) {
    int64_t kshape[] = {NUM_PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM};
    tens_alloc(&F.k, F32, 4, kshape);
    tens_alloc(&F.v, F32, 4, kshape);
  } else {
    int64_t kshape[] = {kv_tokens, KV_HEADS, HEAD_DIM};
    tens_alloc(&F.k, F32, 3, kshape);
    tens_alloc(&F.v, F32, 3, kshape);
  }
  fill_random_f32(&F.k);
  fill_random_f32(&F.v);
  if (entries) {
    int64_t ishape[] = {entries};
    tens_alloc(&F.indices, I32, 1, ishape);
    memcpy(F.indices.mem, F.kv_indices, (size_t)entries * 4);
  }
  int64_t mshape[] = {8};
  tens_alloc(&F.mask, U8, 1, mshape);
  memset(F.mask.mem, 0xFF, F.mask.bytes);

  F.kv = (kvattn_kv)KVATTN_KV_INIT;
  F.kv.k = &F.k.t;
  F.kv.v = &F.v.t;
  F.kv.indices = entries ? &F.indices.t : NULL;

  CHECK_OK(kvattn_attention_create(F.ctx, &F.desc, &F.bounds, &F.attn));
  size_t host = 1;
  CHECK_OK(kvattn_workspace_size(F.ctx, &F.desc, &F.bounds, &F.ws_need, &host));
  CHECK(host == 0);
  /* the workspace is followed by 64 tracked bytes, so an overrun shows as a changed byte */
  F.ws_mem = aligned_alloc(64, (F.ws_need + 64 + 63) / 64 * 64);
  memset(F.ws_mem, 0x5A, F.ws_need + 64);
  F.ws.device = F.ws_mem;
  F.ws.device_bytes = F.ws_need;
  track_fixture();
}

static void fx_setup(int *failed_, int format, int custom_mask) {
  fx_setup_on(failed_, format, custom_mask, KVATTN_BACKEND_CPU);
}

static kvattn_status fx_plan(void) { return kvattn_plan(F.attn, &F.batch, &F.ws, NULL); }
static kvattn_status fx_run(void) {
  return kvattn_run(F.attn, &F.q.t, &F.kv, F.desc.custom_mask ? &F.mask.t : NULL, &F.out.t, &F.lse.t, NULL);
}

/* Runs the fixture with NaN-poisoned out/lse and copies them out (defined further down). */
static int run_fixture_into(float *out_copy, float *lse_copy);

/* The call fails with `want`, its message contains `fragment`, and no byte changed. */
static void expect_plan_rejected(int *failed_, kvattn_status want, const char *fragment) {
  snapshot();
  CHECK_STATUS(fx_plan(), want);
  CHECK_ERROR_HAS(fragment);
  CHECK(unchanged());
}

static void expect_run_rejected(int *failed_, kvattn_status want, const char *fragment) {
  snapshot();
  CHECK_STATUS(fx_run(), want);
  CHECK_ERROR_HAS(fragment);
  CHECK(unchanged());
}

/* Plan the fixture, then expect the run (with whatever the test changed) to fail untouched. */
static void planned_run_rejected(int *failed_, kvattn_status want, const char *fragment) {
  snapshot();
  CHECK_OK(fx_plan());
  CALL(expect_run_rejected(failed_, want, fragment));
}

/* A plan that fails on a fresh attention leaves it unplanned: a run is INVALID_USAGE. The
 * message must hold both fragments (the second may be NULL). */
static void fresh_plan_rejected2(int *failed_, kvattn_status want, const char *fragment, const char *fragment2) {
  CALL(expect_plan_rejected(failed_, want, fragment));
  if (fragment2) CHECK_ERROR_HAS(fragment2);
  snapshot();
  CHECK_STATUS(fx_run(), KVATTN_ERROR_INVALID_USAGE);
  CHECK(unchanged());
}
static void fresh_plan_rejected(int *failed_, kvattn_status want, const char *fragment) {
  fresh_plan_rejected2(failed_, want, fragment, NULL);
}

/* ---------------------------------------------------------------- descriptions */

static kvattn_context *cpu_ctx(void) {
  static kvattn_context *ctx;
  if (!ctx) {
    kvattn_options opt = KVATTN_OPTIONS_INIT;
    opt.backend = KVATTN_BACKEND_CPU;
    opt.num_threads = 1;
    kvattn_context_create(&opt, &ctx);
  }
  return ctx;
}

static void expect_desc_rejected(int *failed_, const kvattn_attention_desc *d, kvattn_status want,
                                 const char *fragment) {
  kvattn_context *ctx = cpu_ctx();
  CHECK(ctx != NULL);
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_batch = 4;
  b.max_qo_tokens = 8;
  b.max_kv_entries = 8;
  kvattn_attention_desc before = *d;
  kvattn_attention *attn = (kvattn_attention *)(uintptr_t)0x1;
  CHECK_STATUS(kvattn_attention_create(ctx, d, &b, &attn), want);
  CHECK_ERROR_HAS(fragment);
  CHECK(attn == NULL);
  CHECK(memcmp(&before, d, sizeof before) == 0);
  /* the workspace query reads the same description and must refuse it the same way */
  size_t dev = 777, host = 777;
  CHECK_STATUS(kvattn_workspace_size(ctx, d, &b, &dev, &host), want);
  CHECK_ERROR_HAS(fragment);
  CHECK(dev == 777 && host == 777);
}

TEST(desc_null_is_invalid_argument) {
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  kvattn_attention *attn = NULL;
  CHECK_STATUS(kvattn_attention_create(cpu_ctx(), NULL, &b, &attn), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("desc");
  CHECK(attn == NULL);
}

TEST(desc_struct_size_zero_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.struct_size = 0;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "struct_size=0"));
}

TEST(desc_struct_size_too_small_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.struct_size = 16;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "struct_size=16"));
}

TEST(desc_zero_qo_heads_is_invalid_shape) {
  kvattn_attention_desc d = base_desc();
  d.num_qo_heads = 0;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_SHAPE, "num_qo_heads=0"));
}

TEST(desc_negative_kv_heads_is_invalid_shape) {
  kvattn_attention_desc d = base_desc();
  d.num_kv_heads = -2;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_SHAPE, "num_kv_heads=-2"));
}

TEST(desc_heads_not_divisible_is_invalid_shape) {
  kvattn_attention_desc d = base_desc();
  d.num_qo_heads = 6;
  d.num_kv_heads = 4;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_SHAPE, "num_qo_heads=6"));
  CHECK_ERROR_HAS("num_kv_heads=4");
}

TEST(desc_more_kv_heads_than_qo_heads_is_invalid_shape) {
  kvattn_attention_desc d = base_desc();
  d.num_qo_heads = 2;
  d.num_kv_heads = 4;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_SHAPE, "num_kv_heads=4"));
}

TEST(desc_head_dim_zero_is_invalid_shape) {
  kvattn_attention_desc d = base_desc();
  d.head_dim = 0;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_SHAPE, "head_dim=0"));
}

TEST(desc_head_dim_513_is_invalid_shape) {
  kvattn_attention_desc d = base_desc();
  d.head_dim = 513;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_SHAPE, "head_dim=513"));
}

TEST(desc_q_dtype_int32_is_invalid_dtype) {
  kvattn_attention_desc d = base_desc();
  d.q_dtype = I32;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_DTYPE, "q_dtype=int32"));
}

TEST(desc_kv_dtype_two_lanes_is_invalid_dtype) {
  kvattn_attention_desc d = base_desc();
  d.kv_dtype = (DLDataType){kDLFloat, 32, 2};
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_DTYPE, "kv_dtype"));
  CHECK_ERROR_HAS("lanes=2");
}

TEST(desc_o_dtype_float8_is_invalid_dtype) {
  kvattn_attention_desc d = base_desc();
  d.o_dtype = (DLDataType){kDLFloat8_e4m3fn, 8, 1};
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_DTYPE, "o_dtype"));
}

TEST(desc_q_dtype_float_with_24_bits_is_invalid_dtype) {
  kvattn_attention_desc d = base_desc();
  d.q_dtype = (DLDataType){kDLFloat, 24, 1};
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_DTYPE, "bits=24"));
}

TEST(desc_sm_scale_nan_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.sm_scale = NAN;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "sm_scale=nan"));
}

TEST(desc_sm_scale_infinite_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.sm_scale = INFINITY;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "sm_scale=inf"));
}

TEST(desc_sm_scale_negative_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.sm_scale = -0.5f;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "sm_scale=-0.5"));
}

TEST(desc_window_left_minus_two_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.window_left = -2;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "window_left=-2"));
}

TEST(desc_soft_cap_negative_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.logits_soft_cap = -30.0f;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "logits_soft_cap=-30"));
}

TEST(desc_soft_cap_nan_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.logits_soft_cap = NAN;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "logits_soft_cap=nan"));
}

TEST(desc_causal_two_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.causal = 2;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "causal=2"));
}

TEST(desc_rope_with_odd_head_dim_is_invalid_shape) {
  kvattn_attention_desc d = base_desc();
  d.rope = 1;
  d.head_dim = 7;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_SHAPE, "head_dim=7"));
}

TEST(desc_rope_theta_negative_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.rope = 1;
  d.rope_theta = -1.0f;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "rope_theta=-1"));
}

TEST(desc_llama31_low_freq_factor_above_high_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.rope = 1;
  d.rope_llama31_factor = 8.0f;
  d.rope_llama31_low_freq_factor = 4.0f;
  d.rope_llama31_high_freq_factor = 2.0f;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "low_freq_factor=4"));
}

TEST(desc_alibi_slope_nan_is_invalid_argument) {
  float slopes[QO_HEADS] = {0.5f, 0.25f, NAN, 0.0625f};
  kvattn_attention_desc d = base_desc();
  d.alibi = 1;
  d.alibi_slopes = slopes;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "alibi_slopes[2]=nan"));
}

TEST(desc_kernel_choice_out_of_range_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.kernel = 3;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "kernel=3"));
}

TEST(desc_custom_mask_two_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.custom_mask = 2;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "custom_mask=2"));
}

TEST(desc_fixed_split_size_negative_is_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  d.fixed_split_size = -16;
  CALL(expect_desc_rejected(failed_, &d, KVATTN_ERROR_INVALID_ARGUMENT, "fixed_split_size=-16"));
}

TEST(desc_defaults_are_accepted) {
  /* the counterpart: a zeroed-but-initialised desc with only the heads and head_dim set works */
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_qo_heads = 8;
  d.num_kv_heads = 1;
  d.head_dim = 512;
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  kvattn_attention *attn = NULL;
  CHECK_OK(kvattn_attention_create(cpu_ctx(), &d, &b, &attn));
  CHECK(attn != NULL);
  CHECK(strcmp(kvattn_last_error(), "") == 0);
  kvattn_attention_destroy(attn);
}

/* ---------------------------------------------------------------- bounds */

static void expect_bounds_rejected(int *failed_, const kvattn_bounds *b, kvattn_status want, const char *fragment) {
  kvattn_attention_desc d = base_desc();
  kvattn_attention *attn = NULL;
  CHECK_STATUS(kvattn_attention_create(cpu_ctx(), &d, b, &attn), want);
  CHECK_ERROR_HAS(fragment);
  CHECK(attn == NULL);
  size_t dev = 777, host = 777;
  CHECK_STATUS(kvattn_workspace_size(cpu_ctx(), &d, b, &dev, &host), want);
  CHECK(dev == 777 && host == 777);
}

TEST(bounds_null_is_invalid_argument) {
  CALL(expect_bounds_rejected(failed_, NULL, KVATTN_ERROR_INVALID_ARGUMENT, "bounds is NULL"));
}

TEST(bounds_struct_size_zero_is_invalid_argument) {
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.struct_size = 0;
  CALL(expect_bounds_rejected(failed_, &b, KVATTN_ERROR_INVALID_ARGUMENT, "bounds.struct_size=0"));
}

TEST(bounds_negative_max_batch_is_invalid_argument) {
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_batch = -1;
  CALL(expect_bounds_rejected(failed_, &b, KVATTN_ERROR_INVALID_ARGUMENT, "max_batch=-1"));
}

TEST(bounds_max_qo_tokens_beyond_int32_is_invalid_argument) {
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_qo_tokens = (int64_t)1 << 32;
  CALL(expect_bounds_rejected(failed_, &b, KVATTN_ERROR_INVALID_ARGUMENT, "max_qo_tokens=4294967296"));
}

TEST(bounds_negative_max_kv_entries_is_invalid_argument) {
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_kv_entries = -5;
  CALL(expect_bounds_rejected(failed_, &b, KVATTN_ERROR_INVALID_ARGUMENT, "max_kv_entries=-5"));
}

/* ---------------------------------------------------------------- batches (plan) */

TEST(plan_batch_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  snapshot();
  CHECK_STATUS(kvattn_plan(F.attn, NULL, &F.ws, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("batch is NULL");
  CHECK(unchanged());
}

TEST(plan_batch_struct_size_zero_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.struct_size = 0;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "batch.struct_size=0"));
}

TEST(plan_format_seven_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.format = 7;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "batch.format=7"));
}

TEST(plan_negative_batch_size_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.batch_size = -1;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "batch.batch_size=-1"));
}

TEST(plan_null_kv_indptr_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.kv_indptr = NULL;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "kv_indptr is NULL"));
}

TEST(plan_ragged_null_kv_indptr_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_RAGGED, 0));
  F.batch.kv_indptr = NULL;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "kv_indptr is NULL"));
}

TEST(plan_qo_indptr_not_starting_at_zero_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.qo_indptr[0] = 1;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "qo_indptr[0]=1"));
}

TEST(plan_kv_indptr_not_starting_at_zero_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv_indptr[0] = -1;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_indptr[0]=-1"));
}

TEST(plan_kv_indptr_decreasing_names_index_and_values) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  const int32_t kv[] = {0, 10, 20, 17};
  memcpy(F.kv_indptr, kv, sizeof kv);
  CALL(fresh_plan_rejected2(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_indptr[3]=17 < kv_indptr[2]=20", "non-decreasing"));
}

TEST(plan_qo_indptr_decreasing_names_index_and_values) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  const int32_t qo[] = {0, 3, 2, 5};
  memcpy(F.qo_indptr, qo, sizeof qo);
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "qo_indptr[2]=2 < qo_indptr[1]=3"));
}

TEST(plan_ragged_kv_indptr_decreasing_is_invalid_index) {
  CALL(fx_setup(failed_, FX_RAGGED, 0));
  F.kv_indptr[2] = 2;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_indptr[2]=2 < kv_indptr[1]=3"));
}

TEST(plan_bsr_kv_indptr_decreasing_is_invalid_index) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.kv_indptr[1] = 4;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_indptr[2]=3 < kv_indptr[1]=4"));
}

TEST(plan_kv_index_past_the_cache_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv_indices[4] = NUM_PAGES;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_indices[4]=8"));
}

TEST(plan_negative_kv_index_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv_indices[1] = -1;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_indices[1]=-1"));
}

TEST(plan_bsr_block_column_past_num_cols_is_invalid_index) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.kv_indices[3] = 3; /* 10 columns in blocks of 4: block columns 0..2 */
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_indices[3]=3"));
}

TEST(plan_last_page_len_zero_for_nonempty_request_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.last_page_len[2] = 0;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_last_page_len[2]=0"));
}

TEST(plan_last_page_len_above_page_size_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.last_page_len[0] = PAGE_SIZE + 1;
  CALL(fresh_plan_rejected2(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_last_page_len[0]=5", "page_size=4"));
}

TEST(plan_last_page_len_negative_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.last_page_len[0] = -3;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv_last_page_len[0]=-3"));
}

TEST(plan_last_page_len_of_empty_request_is_ignored) {
  /* request 1 has no pages: its last_page_len (0, or anything) is not looked at */
  CALL(fx_setup(failed_, FX_PAGED, 0));
  static float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS], got_out[5 * QO_HEADS * HEAD_DIM],
      got_lse[5 * QO_HEADS];
  CHECK_OK(fx_plan());
  CHECK(run_fixture_into(want_out, want_lse));
  const int32_t odd[] = {0, 1000, -7};
  for (int i = 0; i < 3; i++) {
    F.last_page_len[1] = odd[i];
    CHECK_OK(fx_plan());
    CHECK(run_fixture_into(got_out, got_lse));
    CHECK(memcmp(want_out, got_out, sizeof want_out) == 0 && memcmp(want_lse, got_lse, sizeof want_lse) == 0);
  }
}

TEST(plan_null_last_page_len_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.kv_last_page_len = NULL;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "kv_last_page_len is NULL"));
}

TEST(plan_page_size_zero_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.page_size = 0;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "page_size=0"));
}

TEST(plan_negative_num_pages_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.num_pages = -8;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "num_pages=-8"));
}

TEST(plan_bsr_block_rows_zero_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.batch.block_rows = 0;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "block_rows=0"));
}

TEST(plan_bsr_block_cols_negative_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.batch.block_cols = -4;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "block_cols=-4"));
}

TEST(plan_bsr_negative_num_rows_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.batch.num_rows = -5;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "num_rows=-5"));
}

TEST(plan_bsr_num_cols_beyond_int32_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.batch.num_cols = (int64_t)1 << 31;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "num_cols=2147483648"));
}

/* ---------------------------------------------------------------- bounds exceeded (plan) */

TEST(plan_more_requests_than_max_batch_is_bounds_exceeded) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  const int32_t qo[] = {0, 1, 2, 3, 4, 5}, kv[] = {0, 1, 2, 3, 4, 5}, last[] = {1, 1, 1, 1, 1};
  memcpy(F.qo_indptr, qo, sizeof qo);
  memcpy(F.kv_indptr, kv, sizeof kv);
  memcpy(F.last_page_len, last, sizeof last);
  F.batch.batch_size = 5;
  CALL(fresh_plan_rejected2(failed_, KVATTN_ERROR_BOUNDS_EXCEEDED, "max_batch=4", "5 requests"));
}

TEST(plan_more_query_rows_than_max_qo_tokens_is_bounds_exceeded) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.qo_indptr[3] = 9;
  CALL(fresh_plan_rejected2(failed_, KVATTN_ERROR_BOUNDS_EXCEEDED, "max_qo_tokens=8", "9 query rows"));
}

TEST(plan_more_kv_entries_than_max_kv_entries_is_bounds_exceeded) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv_indptr[3] = 9; /* request 2 now has 7 pages; indices 5..8 are valid pages */
  const int32_t ix[] = {5, 1, 0, 3, 6, 7, 2, 4, 0};
  memcpy(F.kv_indices, ix, sizeof ix);
  CALL(fresh_plan_rejected2(failed_, KVATTN_ERROR_BOUNDS_EXCEEDED, "kv_indptr[3]=9", "max_kv_entries=8"));
}

TEST(plan_ragged_more_kv_tokens_than_bounds_is_bounds_exceeded) {
  CALL(fx_setup(failed_, FX_RAGGED, 0));
  F.kv_indptr[2] = 12;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_BOUNDS_EXCEEDED, "max_kv_entries=8"));
}

TEST(plan_bsr_more_block_rows_than_max_batch_is_bounds_exceeded) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.batch.block_rows = 1; /* 5 block rows > 4 */
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_BOUNDS_EXCEEDED, "5 block rows"));
}

/* ---------------------------------------------------------------- workspace (plan) */

TEST(plan_workspace_one_byte_short_is_workspace_too_small) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.ws.device_bytes = F.ws_need - 1;
  char need[64], had[64];
  snprintf(need, sizeof need, "need %zu bytes", F.ws_need);
  snprintf(had, sizeof had, "device_bytes=%zu", F.ws_need - 1);
  CALL(fresh_plan_rejected2(failed_, KVATTN_ERROR_WORKSPACE_TOO_SMALL, need, had));
}

TEST(plan_workspace_null_device_is_workspace_too_small) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.ws.device = NULL;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_WORKSPACE_TOO_SMALL, "kvattn_workspace_size"));
}

TEST(plan_misaligned_workspace_is_invalid_stride) {
  /* the plan stores int32/int64 arrays in the workspace: its base must be 16-byte aligned */
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.ws.device = (char *)F.ws_mem + 4;
  F.ws.device_bytes = F.ws_need;
  CALL(fresh_plan_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "must be 16-byte aligned"));
  F.ws.device = (char *)F.ws_mem + 16; /* 16 is enough (the tracked tail has room) */
  CHECK_OK(fx_plan());
}

TEST(plan_workspace_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  snapshot();
  CHECK_STATUS(kvattn_plan(F.attn, &F.batch, NULL, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("ws is NULL");
  CHECK(unchanged());
}

TEST(plan_attention_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  snapshot();
  CHECK_STATUS(kvattn_plan(NULL, &F.batch, &F.ws, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("attn is NULL");
  CHECK(unchanged());
}

/* ---------------------------------------------------------------- run: order and plan match */

TEST(run_before_plan_is_invalid_usage) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CALL(expect_run_rejected(failed_, KVATTN_ERROR_INVALID_USAGE, "kvattn_plan"));
}

TEST(run_with_more_q_rows_than_planned_is_invalid_usage) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  F.q.shape[0] = 4; /* the plan has 5 query rows */
  CALL(expect_run_rejected(failed_, KVATTN_ERROR_INVALID_USAGE, "q.shape[0]=4"));
}

TEST(run_with_out_rows_other_than_planned_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.out.shape[0] = 4;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "out.shape[0]=4"));
}

TEST(run_after_replan_for_smaller_batch_rejects_old_q) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  F.batch.batch_size = 2; /* now 3 query rows */
  CHECK_OK(fx_plan());
  CALL(expect_run_rejected(failed_, KVATTN_ERROR_INVALID_USAGE, "3 query rows"));
}

TEST(run_attention_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  snapshot();
  CHECK_STATUS(kvattn_run(NULL, &F.q.t, &F.kv, NULL, &F.out.t, &F.lse.t, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(unchanged());
}

TEST(run_q_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  snapshot();
  CHECK_STATUS(kvattn_run(F.attn, NULL, &F.kv, NULL, &F.out.t, &F.lse.t, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("q is NULL");
  CHECK(unchanged());
}

TEST(run_out_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  snapshot();
  CHECK_STATUS(kvattn_run(F.attn, &F.q.t, &F.kv, NULL, NULL, &F.lse.t, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("out is NULL");
  CHECK(unchanged());
}

TEST(run_kv_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  snapshot();
  CHECK_STATUS(kvattn_run(F.attn, &F.q.t, NULL, NULL, &F.out.t, &F.lse.t, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("kv is NULL");
  CHECK(unchanged());
}

TEST(run_kv_struct_size_zero_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv.struct_size = 0;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "kv.struct_size=0"));
}

TEST(run_kv_layout_two_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv.layout = 2;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "kv.layout=2"));
}

/* ---------------------------------------------------------------- run: dtypes */

TEST(run_q_dtype_code_int_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.dtype = I32;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "q has dtype int32, expected float32"));
}

TEST(run_q_dtype_bits_16_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.dtype = F16;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "q has dtype float16"));
}

TEST(run_q_dtype_two_lanes_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.dtype = (DLDataType){kDLFloat, 32, 2};
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "lanes=2"));
}

TEST(run_k_dtype_float64_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.k.t.dtype = F64;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "kv.k has dtype float64"));
}

TEST(run_v_dtype_bfloat16_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.v.t.dtype = (DLDataType){kDLBfloat, 16, 1};
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "kv.v has dtype bfloat16"));
}

TEST(run_out_dtype_float16_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.out.t.dtype = F16;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "out has dtype float16"));
}

TEST(run_int64_indices_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  int64_t ishape[] = {5};
  tens_alloc(&F.extra, I64, 1, ishape);
  for (int i = 0; i < 5; i++) ((int64_t *)F.extra.mem)[i] = F.kv_indices[i];
  F.kv.indices = &F.extra.t;
  track_fixture();
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "kv.indices has dtype (code=0, bits=64"));
}

TEST(run_lse_float64_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.lse.t.dtype = F64;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "lse has dtype float64"));
}

/* ---------------------------------------------------------------- run: shapes */

TEST(run_q_two_dimensional_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.ndim = 2;
  F.q.shape[1] = QO_HEADS * HEAD_DIM;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "q has ndim=2, expected 3"));
}

TEST(run_k_three_dimensional_for_paged_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.k.t.ndim = 3;
  F.k.shape[0] = NUM_PAGES * PAGE_SIZE;
  F.k.shape[1] = KV_HEADS;
  F.k.shape[2] = HEAD_DIM;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.k has ndim=3, expected 4"));
}

TEST(run_q_wrong_head_count_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.shape[1] = 2;
  F.q.shape[2] = 16;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "q.shape[1]=2, expected 4"));
}

TEST(run_q_head_dim_mismatch_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.shape[2] = 4;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "q.shape[2]=4, expected 8"));
}

TEST(run_k_wrong_kv_heads_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.k.shape[2] = 1;
  F.k.shape[3] = 16;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.k.shape[2]=1, expected 2"));
}

TEST(run_k_page_size_other_than_planned_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.k.shape[0] = NUM_PAGES / 2;
  F.k.shape[1] = PAGE_SIZE * 2;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.k.shape[1]=8, expected 4"));
}

TEST(run_v_with_other_page_count_than_k_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.v.shape[0] = NUM_PAGES - 1;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.v.shape[0]=7, expected 8"));
}

TEST(run_hnd_layout_with_nhd_tensors_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv.layout = KVATTN_LAYOUT_HND; /* expects [pages, kv_heads=2, page_size=4, dim] */
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.k.shape[1]=4, expected 2"));
}

TEST(run_q_negative_dimension_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.shape[0] = -5;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "q.shape[0]=-5 is negative"));
}

TEST(run_q_shape_null_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.shape = NULL;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "q has shape=NULL"));
}

TEST(run_q_data_null_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.data = NULL;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "q.data is NULL for a tensor of 160 elements"));
}

TEST(run_lse_wrong_heads_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.lse.shape[1] = 2;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "lse.shape[1]=2, expected 4"));
}

TEST(run_lse_wrong_rows_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.lse.shape[0] = 4;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "lse.shape[0]=4, expected 5"));
}

TEST(run_lse_three_dimensional_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.lse.t.ndim = 3;
  F.lse.shape[2] = 1;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "lse has ndim=3, expected 2"));
}

TEST(run_indices_shorter_than_planned_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.indices.shape[0] = 4;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.indices.shape[0]=4, expected 5"));
}

TEST(run_paged_without_indices_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv.indices = NULL;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "kv.indices is NULL"));
}

/* ---------------------------------------------------------------- run: strides and alignment */

TEST(run_q_negative_stride_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.strides[0] = QO_HEADS * HEAD_DIM;
  F.q.strides[1] = HEAD_DIM;
  F.q.strides[2] = -1;
  F.q.t.strides = F.q.strides;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "q.strides[2]=-1 is negative"));
}

TEST(run_k_negative_page_stride_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  const int64_t st[] = {-PAGE_SIZE * KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HEAD_DIM, 1};
  memcpy(F.k.strides, st, sizeof st);
  F.k.t.strides = F.k.strides;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "kv.k.strides[0]=-64 is negative"));
}

TEST(run_q_stride_overflowing_the_address_space_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  const int64_t st[] = {(int64_t)1 << 62, HEAD_DIM, 1};
  memcpy(F.q.strides, st, sizeof st);
  F.q.t.strides = F.q.strides;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "q.strides[0]=4611686018427387904 reaches past"));
}

TEST(run_k_strides_summing_past_the_address_space_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  const int64_t st[] = {(int64_t)1 << 58, (int64_t)1 << 58, (int64_t)1 << 58, 1};
  memcpy(F.k.strides, st, sizeof st);
  F.k.t.strides = F.k.strides;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "kv.k.strides"));
}

TEST(run_out_zero_stride_over_heads_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  const int64_t st[] = {QO_HEADS * HEAD_DIM, 0, 1};
  memcpy(F.out.strides, st, sizeof st);
  F.out.t.strides = F.out.strides;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "out.strides[1]=0"));
}

TEST(run_q_misaligned_byte_offset_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.byte_offset = 2; /* float32 needs 4-byte alignment */
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "not aligned to 4 bytes"));
}

TEST(run_out_misaligned_data_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.out.t.data = (char *)F.out.mem + 1;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "out data+byte_offset"));
}

TEST(run_indices_misaligned_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.indices.t.byte_offset = 1;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "kv.indices data+byte_offset"));
}

/* ---------------------------------------------------------------- run: devices */

TEST(run_q_on_cuda_with_cpu_context_is_device_mismatch) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.q.t.device.device_type = kDLCUDA;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_DEVICE_MISMATCH, "q is on cuda:0, the context is on cpu"));
}

TEST(run_k_on_cuda_with_cpu_context_is_device_mismatch) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.k.t.device.device_type = kDLCUDA;
  F.k.t.device.device_id = 1;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_DEVICE_MISMATCH, "kv.k is on cuda:1"));
}

TEST(run_out_on_cuda_with_cpu_context_is_device_mismatch) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.out.t.device.device_type = kDLCUDA;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_DEVICE_MISMATCH, "out is on cuda"));
}

TEST(run_lse_on_opencl_is_device_mismatch) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.lse.t.device.device_type = kDLOpenCL;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_DEVICE_MISMATCH, "lse is on other"));
}

TEST(run_indices_on_cuda_with_cpu_context_is_device_mismatch) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.indices.t.device.device_type = kDLCUDA;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_DEVICE_MISMATCH, "kv.indices is on cuda"));
}

/* ---------------------------------------------------------------- run: indices and KV extent */

TEST(run_index_past_the_cache_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan()); /* the host copy was fine; the device copy says otherwise */
  ((int32_t *)F.indices.mem)[2] = NUM_PAGES;
  CALL(expect_run_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv.indices[2]=8"));
}

TEST(run_negative_index_is_invalid_index) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  ((int32_t *)F.indices.mem)[4] = -100;
  CALL(expect_run_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv.indices[4]=-100"));
}

TEST(run_index_past_cache_unchecked_at_plan_is_invalid_index) {
  /* num_pages 0: the plan cannot check; the run must, against the cache tensor it is given */
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.num_pages = 0;
  F.kv_indices[0] = 100;
  ((int32_t *)F.indices.mem)[0] = 100;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv.indices[0]=100"));
}

TEST(run_bsr_block_column_past_num_cols_is_invalid_index) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  CHECK_OK(fx_plan());
  ((int32_t *)F.indices.mem)[1] = 3;
  CALL(expect_run_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "kv.indices[1]=3"));
}

TEST(run_cache_with_fewer_pages_than_planned_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.k.shape[0] = F.v.shape[0] = 7; /* every index is < 7, but the plan said 8 pages */
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "the cache has 7 pages"));
  CHECK_ERROR_HAS("num_pages=8");
}

TEST(run_ragged_kv_shorter_than_kv_indptr_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_RAGGED, 0));
  F.k.shape[0] = F.v.shape[0] = 6; /* kv_indptr ends at 7 */
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.k has 6 tokens but kv_indptr[2]=7"));
}

TEST(run_bsr_kv_shorter_than_num_cols_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.k.shape[0] = F.v.shape[0] = 9;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.k has 9 tokens but the plan's batch.num_cols=10"));
}

TEST(run_bsr_kv_longer_than_num_cols_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  int64_t kshape[] = {12, KV_HEADS, HEAD_DIM};
  tens_alloc(&F.k, F32, 3, kshape);
  tens_alloc(&F.v, F32, 3, kshape);
  track_fixture();
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.k has 12 tokens"));
}

TEST(run_ragged_v_with_other_token_count_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_RAGGED, 0));
  F.v.shape[0] = 7;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.v.shape[0]=7, expected 8"));
}

/* ---------------------------------------------------------------- run: how K and V are given */

TEST(run_k_and_kv_both_given_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv.kv = &F.k.t;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "give either kv.k and kv.v, or kv.kv"));
}

TEST(run_k_without_v_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv.v = NULL;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "give either kv.k and kv.v, or kv.kv"));
}

TEST(run_nothing_for_kv_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.kv.k = F.kv.v = NULL;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "give either kv.k and kv.v, or kv.kv"));
}

TEST(run_combined_kv_with_three_planes_is_invalid_shape) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  int64_t shape[] = {NUM_PAGES, 3, PAGE_SIZE, KV_HEADS, HEAD_DIM};
  tens_alloc(&F.extra, F32, 5, shape);
  F.kv.k = F.kv.v = NULL;
  F.kv.kv = &F.extra.t;
  track_fixture();
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "kv.kv.shape[1]=3, expected 2"));
}

TEST(run_combined_kv_for_ragged_is_unsupported) {
  CALL(fx_setup(failed_, FX_RAGGED, 0));
  F.kv.k = F.kv.v = NULL;
  F.kv.kv = &F.k.t;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_UNSUPPORTED, "paged KV only"));
}

TEST(run_combined_kv_for_block_sparse_is_unsupported) {
  CALL(fx_setup(failed_, FX_BSR, 0));
  F.kv.kv = &F.k.t;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_UNSUPPORTED, "block-sparse"));
}

TEST(run_ragged_without_v_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_RAGGED, 0));
  F.kv.v = NULL;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "kv.k and kv.v are needed"));
}

/* ---------------------------------------------------------------- run: custom mask */

TEST(run_mask_without_desc_custom_mask_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  snapshot();
  CHECK_STATUS(kvattn_run(F.attn, &F.q.t, &F.kv, &F.mask.t, &F.out.t, &F.lse.t, NULL),
               KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("desc.custom_mask=0");
  CHECK(unchanged());
}

TEST(run_missing_mask_with_desc_custom_mask_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 1));
  CHECK_OK(fx_plan());
  snapshot();
  CHECK_STATUS(kvattn_run(F.attn, &F.q.t, &F.kv, NULL, &F.out.t, &F.lse.t, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("custom_mask is NULL");
  CHECK(unchanged());
}

TEST(run_mask_with_too_few_bytes_is_invalid_shape) {
  /* paged fixture: 2x7 bits (2 bytes) + 1x0 + 2x12 bits (3 bytes) = 5 bytes */
  CALL(fx_setup(failed_, FX_PAGED, 1));
  F.mask.shape[0] = 4;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "custom_mask has 4 bytes but the planned batch needs 5"));
}

TEST(run_bsr_mask_with_too_few_bytes_is_invalid_shape) {
  /* BSR: one 5 x 10 bit matrix = 50 bits = 7 bytes */
  CALL(fx_setup(failed_, FX_BSR, 1));
  F.mask.shape[0] = 6;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_SHAPE, "needs 7"));
}

TEST(run_mask_int32_is_invalid_dtype) {
  CALL(fx_setup(failed_, FX_RAGGED, 1));
  F.mask.t.dtype = I32;
  F.mask.shape[0] = 2;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_DTYPE, "custom_mask has dtype int32, expected uint8"));
}

TEST(run_mask_with_stride_two_is_invalid_stride) {
  CALL(fx_setup(failed_, FX_RAGGED, 1));
  F.mask.shape[0] = 3;
  F.mask.strides[0] = 2;
  F.mask.t.strides = F.mask.strides;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_STRIDE, "custom_mask.strides[0]=2"));
}

/* ---------------------------------------------------------------- run: aliasing */

TEST(run_out_overlapping_q_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.out.t.data = F.q.mem;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "out overlaps q"));
}

TEST(run_out_overlapping_q_partially_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  int64_t shape[] = {10, QO_HEADS, HEAD_DIM};
  tens_alloc(&F.extra, F32, 3, shape);
  track_fixture();
  F.q.t.data = F.extra.mem;
  F.out.t.data = (float *)F.extra.mem + 4 * QO_HEADS * HEAD_DIM; /* rows 4.. of q are rows 0.. of out */
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "out overlaps q"));
}

TEST(run_out_overlapping_kv_cache_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.out.t.data = F.v.mem;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "out overlaps the KV cache"));
}

TEST(run_lse_overlapping_out_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.lse.t.data = F.out.mem;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "lse overlaps"));
}

TEST(run_lse_overlapping_kv_cache_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.lse.t.data = F.k.mem;
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "lse overlaps"));
}

TEST(run_out_overlapping_indices_is_invalid_argument) {
  /* writing out would rewrite the page table the kernels are still reading */
  CALL(fx_setup(failed_, FX_PAGED, 0));
  int64_t shape[] = {5 * QO_HEADS * HEAD_DIM};
  tens_alloc(&F.extra, F32, 1, shape);
  memcpy(F.extra.mem, F.kv_indices, 5 * sizeof(int32_t));
  F.indices.t.data = F.extra.mem;
  F.out.t.data = F.extra.mem;
  track_fixture();
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "overlaps"));
}

TEST(run_out_overlapping_mask_is_invalid_argument) {
  CALL(fx_setup(failed_, FX_PAGED, 1));
  int64_t shape[] = {5 * QO_HEADS * HEAD_DIM};
  tens_alloc(&F.extra, F32, 1, shape);
  memset(F.extra.mem, 0xFF, F.extra.bytes);
  F.mask.t.data = F.extra.mem;
  F.out.t.data = F.extra.mem;
  track_fixture();
  CALL(planned_run_rejected(failed_, KVATTN_ERROR_INVALID_ARGUMENT, "overlaps"));
}

/* ---------------------------------------------------------------- valid runs the checks must let through */

/* out and lse after a run of the fixture as it stands (copied out; NaN-poisoned before). */
static int run_fixture_into(float *out_copy, float *lse_copy) {
  for (size_t i = 0; i < F.out.bytes / 4; i++) ((float *)F.out.mem)[i] = NAN;
  for (size_t i = 0; i < F.lse.bytes / 4; i++) ((float *)F.lse.mem)[i] = NAN;
  kvattn_status s = fx_run();
  if (s != KVATTN_SUCCESS) {
    fprintf(stderr, "  run: %s (%s)\n", kvattn_status_string(s), kvattn_last_error());
    return 0;
  }
  memcpy(out_copy, F.out.mem, F.out.bytes);
  memcpy(lse_copy, F.lse.mem, F.lse.bytes);
  return 1;
}

TEST(run_honours_byte_offset) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS], got_out[5 * QO_HEADS * HEAD_DIM],
      got_lse[5 * QO_HEADS];
  CHECK(run_fixture_into(want_out, want_lse));
  /* the same q, k and indices placed 64/128/4 bytes into bigger buffers, reached via byte_offset */
  int64_t qs[] = {5 * QO_HEADS * HEAD_DIM + 16}, ks[] = {NUM_PAGES * PAGE_SIZE * KV_HEADS * HEAD_DIM + 32};
  tens q2 = {0}, k2 = {0}, ix2 = {0};
  tens_alloc(&q2, F32, 1, qs);
  tens_alloc(&k2, F32, 1, ks);
  int64_t is[] = {6};
  tens_alloc(&ix2, I32, 1, is);
  memcpy((char *)q2.mem + 64, F.q.mem, F.q.bytes);
  memcpy((char *)k2.mem + 128, F.k.mem, F.k.bytes);
  memcpy((char *)ix2.mem + 4, F.indices.mem, F.indices.bytes);
  F.q.t.data = q2.mem;
  F.q.t.byte_offset = 64;
  F.k.t.data = k2.mem;
  F.k.t.byte_offset = 128;
  F.indices.t.data = ix2.mem;
  F.indices.t.byte_offset = 4;
  int ok = run_fixture_into(got_out, got_lse);
  tens_free(&q2);
  tens_free(&k2);
  tens_free(&ix2);
  CHECK(ok);
  CHECK(memcmp(want_out, got_out, sizeof want_out) == 0);
  CHECK(memcmp(want_lse, got_lse, sizeof want_lse) == 0);
}

TEST(run_accepts_cuda_host_pinned_tensors_on_cpu) {
  /* pinned host memory is host memory: a CPU context reads it */
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS], got_out[5 * QO_HEADS * HEAD_DIM],
      got_lse[5 * QO_HEADS];
  CHECK(run_fixture_into(want_out, want_lse));
  F.q.t.device.device_type = kDLCUDAHost;
  F.k.t.device.device_type = kDLCUDAHost;
  CHECK(run_fixture_into(got_out, got_lse));
  CHECK(memcmp(want_out, got_out, sizeof want_out) == 0);
}

TEST(failed_plan_keeps_the_previous_plan) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS], got_out[5 * QO_HEADS * HEAD_DIM],
      got_lse[5 * QO_HEADS];
  CHECK(run_fixture_into(want_out, want_lse));
  memcpy(F.out.mem, want_out, sizeof want_out);
  memcpy(F.lse.mem, want_lse, sizeof want_lse);

  /* three failed plans of different kinds: a bad index array, beyond the bounds, too small a
   * workspace (a different one, which must not be adopted) */
  kvattn_batch good = F.batch;
  int32_t bad_kv[] = {0, 3, 2, 5}, big_qo[] = {0, 2, 3, 9};
  F.batch.kv_indptr = bad_kv;
  snapshot();
  CHECK_STATUS(fx_plan(), KVATTN_ERROR_INVALID_INDEX);
  CHECK(unchanged());
  F.batch = good;
  F.batch.qo_indptr = big_qo;
  snapshot();
  CHECK_STATUS(fx_plan(), KVATTN_ERROR_BOUNDS_EXCEEDED);
  CHECK(unchanged());
  F.batch = good;
  kvattn_workspace small = F.ws;
  small.device_bytes -= 1;
  snapshot();
  CHECK_STATUS(kvattn_plan(F.attn, &F.batch, &small, NULL), KVATTN_ERROR_WORKSPACE_TOO_SMALL);
  CHECK(unchanged());

  CHECK(run_fixture_into(got_out, got_lse));
  CHECK(memcmp(want_out, got_out, sizeof want_out) == 0);
  CHECK(memcmp(want_lse, got_lse, sizeof want_lse) == 0);
}

TEST(plan_reads_the_batch_only_during_the_call) {
  /* the plan copies what it needs: rewriting the host arrays after it changes nothing */
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS], got_out[5 * QO_HEADS * HEAD_DIM],
      got_lse[5 * QO_HEADS];
  CHECK(run_fixture_into(want_out, want_lse));
  memset(F.qo_indptr, 0x7F, sizeof F.qo_indptr);
  memset(F.kv_indptr, 0x7F, sizeof F.kv_indptr);
  memset(F.last_page_len, 0x7F, sizeof F.last_page_len);
  memset(F.kv_indices, 0x7F, sizeof F.kv_indices);
  CHECK(run_fixture_into(got_out, got_lse));
  CHECK(memcmp(want_out, got_out, sizeof want_out) == 0);
  CHECK(memcmp(want_lse, got_lse, sizeof want_lse) == 0);
}

/* The same problem handed over in another valid form must give the same bits. Runs the fixture
 * as it stands into want_*, lets `change` rewrite the tensors, runs again; on CPU and reference. */
static void same_bits_after(int *failed_, int format, void (*change)(void)) {
  static float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS], got_out[5 * QO_HEADS * HEAD_DIM],
      got_lse[5 * QO_HEADS];
  const int backends[] = {KVATTN_BACKEND_CPU, KVATTN_BACKEND_REFERENCE};
  for (int b = 0; b < 2; b++) {
    CALL(fx_setup_on(failed_, format, 0, backends[b]));
    CHECK_OK(fx_plan());
    CHECK(run_fixture_into(want_out, want_lse));
    change();
    CHECK(run_fixture_into(got_out, got_lse));
    CHECK_MSG(memcmp(want_out, got_out, sizeof want_out) == 0 && memcmp(want_lse, got_lse, sizeof want_lse) == 0,
              "backend %d: other bits", backends[b]);
  }
}

/* K and V as one [pages, 2, page_size, kv_heads, dim] tensor */
static void to_combined_kv(void) {
  int64_t shape[] = {NUM_PAGES, 2, PAGE_SIZE, KV_HEADS, HEAD_DIM};
  tens_alloc(&F.extra, F32, 5, shape);
  size_t page = PAGE_SIZE * KV_HEADS * HEAD_DIM * sizeof(float);
  for (int p = 0; p < NUM_PAGES; p++) {
    memcpy((char *)F.extra.mem + (2 * p) * page, (char *)F.k.mem + p * page, page);
    memcpy((char *)F.extra.mem + (2 * p + 1) * page, (char *)F.v.mem + p * page, page);
  }
  F.kv.k = F.kv.v = NULL;
  F.kv.kv = &F.extra.t;
}

/* HND: [pages, kv_heads, page_size, dim] copies of K and V */
static void to_hnd(void) {
  int64_t shape[] = {NUM_PAGES, KV_HEADS, PAGE_SIZE, HEAD_DIM};
  tens *src[] = {&F.k, &F.v};
  static tens hnd[2];
  for (int i = 0; i < 2; i++) {
    tens_alloc(&hnd[i], F32, 4, shape);
    const float *a = src[i]->mem;
    float *b = hnd[i].mem;
    for (int p = 0; p < NUM_PAGES; p++)
      for (int s = 0; s < PAGE_SIZE; s++)
        for (int h = 0; h < KV_HEADS; h++)
          memcpy(b + ((p * KV_HEADS + h) * PAGE_SIZE + s) * HEAD_DIM, a + ((p * PAGE_SIZE + s) * KV_HEADS + h) * HEAD_DIM,
                 HEAD_DIM * sizeof(float));
  }
  F.kv.layout = KVATTN_LAYOUT_HND;
  F.kv.k = &hnd[0].t;
  F.kv.v = &hnd[1].t;
}

/* ragged HND: [kv_heads, tokens, dim] */
static void to_ragged_hnd(void) {
  int64_t tokens = F.k.shape[0], shape[] = {KV_HEADS, tokens, HEAD_DIM};
  tens *src[] = {&F.k, &F.v};
  static tens hnd[2];
  for (int i = 0; i < 2; i++) {
    tens_alloc(&hnd[i], F32, 3, shape);
    for (int64_t t = 0; t < tokens; t++)
      for (int h = 0; h < KV_HEADS; h++)
        memcpy((float *)hnd[i].mem + (h * tokens + t) * HEAD_DIM, (float *)src[i]->mem + (t * KV_HEADS + h) * HEAD_DIM,
               HEAD_DIM * sizeof(float));
  }
  F.kv.layout = KVATTN_LAYOUT_HND;
  F.kv.k = &hnd[0].t;
  F.kv.v = &hnd[1].t;
}

/* K as every other page of a twice-as-big cache (a non-contiguous view), V with head_dim padded */
static void to_strided_views(void) {
  int64_t kshape[] = {2 * NUM_PAGES * PAGE_SIZE * KV_HEADS * HEAD_DIM}, vshape[] = {NUM_PAGES * PAGE_SIZE * KV_HEADS * (HEAD_DIM + 3)};
  static tens big_k, big_v;
  tens_alloc(&big_k, F32, 1, kshape);
  tens_alloc(&big_v, F32, 1, vshape);
  for (size_t i = 0; i < big_k.bytes / 4; i++) ((float *)big_k.mem)[i] = NAN;
  for (size_t i = 0; i < big_v.bytes / 4; i++) ((float *)big_v.mem)[i] = NAN;
  size_t page = PAGE_SIZE * KV_HEADS * HEAD_DIM;
  for (int p = 0; p < NUM_PAGES; p++) memcpy((float *)big_k.mem + 2 * p * page, (float *)F.k.mem + p * page, page * 4);
  for (int r = 0; r < NUM_PAGES * PAGE_SIZE * KV_HEADS; r++)
    memcpy((float *)big_v.mem + r * (HEAD_DIM + 3), (float *)F.v.mem + r * HEAD_DIM, HEAD_DIM * 4);
  F.k.t.data = big_k.mem;
  const int64_t ks[] = {2 * (int64_t)page, KV_HEADS * HEAD_DIM, HEAD_DIM, 1};
  memcpy(F.k.strides, ks, sizeof ks);
  F.k.t.strides = F.k.strides;
  F.v.t.data = big_v.mem;
  const int64_t vs[] = {PAGE_SIZE * KV_HEADS * (HEAD_DIM + 3), KV_HEADS * (HEAD_DIM + 3), HEAD_DIM + 3, 1};
  memcpy(F.v.strides, vs, sizeof vs);
  F.v.t.strides = F.v.strides;
}

/* every tensor with explicit compact strides instead of NULL */
static void to_explicit_strides(void) {
  tens *all[] = {&F.q, &F.k, &F.v, &F.indices, &F.out, &F.lse};
  for (int i = 0; i < 6; i++) {
    tens *x = all[i];
    int64_t st = 1;
    for (int d = x->t.ndim - 1; d >= 0; d--) {
      x->strides[d] = st;
      st *= x->shape[d];
    }
    x->t.strides = x->strides;
  }
}

/* q with head_dim interleaved (inner stride 2, NaN between): the CPU takes any non-negative
 * strides (only the GPU needs the last stride to be 1) */
static void to_non_unit_inner_strides(void) {
  static tens wide_q;
  int64_t n[] = {5 * QO_HEADS * HEAD_DIM * 2};
  tens_alloc(&wide_q, F32, 1, n);
  for (int i = 0; i < 5 * QO_HEADS * HEAD_DIM; i++) {
    ((float *)wide_q.mem)[2 * i] = ((float *)F.q.mem)[i];
    ((float *)wide_q.mem)[2 * i + 1] = NAN;
  }
  F.q.t.data = wide_q.mem;
  const int64_t qs[] = {2 * QO_HEADS * HEAD_DIM, 2 * HEAD_DIM, 2};
  memcpy(F.q.strides, qs, sizeof qs);
  F.q.t.strides = F.q.strides;
}

TEST(non_unit_inner_strides_run_on_the_cpu) { CALL(same_bits_after(failed_, FX_PAGED, to_non_unit_inner_strides)); }

TEST(combined_kv_tensor_gives_the_bits_of_separate_k_and_v) { CALL(same_bits_after(failed_, FX_PAGED, to_combined_kv)); }
TEST(hnd_layout_gives_the_bits_of_nhd) { CALL(same_bits_after(failed_, FX_PAGED, to_hnd)); }
TEST(ragged_hnd_layout_gives_the_bits_of_nhd) { CALL(same_bits_after(failed_, FX_RAGGED, to_ragged_hnd)); }
TEST(non_contiguous_cache_views_give_the_bits_of_compact_ones) {
  CALL(same_bits_after(failed_, FX_PAGED, to_strided_views));
}
TEST(explicit_compact_strides_give_the_bits_of_null_strides) {
  CALL(same_bits_after(failed_, FX_PAGED, to_explicit_strides));
  CALL(same_bits_after(failed_, FX_BSR, to_explicit_strides));
}

TEST(size_one_dimensions_with_odd_strides_run) {
  /* one decode request: q and out are [1, heads, dim]; their row stride is never stepped over */
  CALL(fx_setup(failed_, FX_PAGED, 0));
  F.batch.batch_size = 1;
  F.batch.qo_indptr = NULL;
  CHECK_OK(fx_plan());
  F.q.shape[0] = F.out.shape[0] = F.lse.shape[0] = 1;
  F.indices.shape[0] = 2;
  float want_out[QO_HEADS * HEAD_DIM], want_lse[QO_HEADS], got_out[QO_HEADS * HEAD_DIM], got_lse[QO_HEADS];
  float tmp_out[5 * QO_HEADS * HEAD_DIM], tmp_lse[5 * QO_HEADS];
  CHECK(run_fixture_into(tmp_out, tmp_lse));
  memcpy(want_out, tmp_out, sizeof want_out);
  memcpy(want_lse, tmp_lse, sizeof want_lse);
  const int64_t odd3[] = {123456789, HEAD_DIM, 1}, odd2[] = {-5, 1};
  memcpy(F.q.strides, odd3, sizeof odd3);
  memcpy(F.out.strides, odd3, sizeof odd3);
  memcpy(F.lse.strides, odd2, sizeof odd2);
  F.q.t.strides = F.q.strides;
  F.out.t.strides = F.out.strides;
  F.lse.t.strides = F.lse.strides;
  CHECK(run_fixture_into(tmp_out, tmp_lse));
  memcpy(got_out, tmp_out, sizeof got_out);
  memcpy(got_lse, tmp_lse, sizeof got_lse);
  CHECK(memcmp(want_out, got_out, sizeof want_out) == 0);
  CHECK(memcmp(want_lse, got_lse, sizeof want_lse) == 0);
}

TEST(lse_may_be_null) {
  CALL(fx_setup(failed_, FX_PAGED, 0));
  CHECK_OK(fx_plan());
  float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS];
  CHECK(run_fixture_into(want_out, want_lse));
  memset(F.out.mem, 0, F.out.bytes);
  memset(F.lse.mem, 0x5A, F.lse.bytes);
  CHECK_OK(kvattn_run(F.attn, &F.q.t, &F.kv, NULL, &F.out.t, NULL, NULL));
  CHECK(memcmp(want_out, F.out.mem, sizeof want_out) == 0);
  for (size_t i = 0; i < F.lse.bytes; i++) CHECK(((unsigned char *)F.lse.mem)[i] == 0x5A);
}

TEST(bsr_out_right_after_a_cache_with_a_partial_last_block_is_not_aliasing) {
  /* 10 KV tokens in blocks of 4: the last block is partial. out and lse placed right after K and V
   * in one buffer touch no byte of them, and must be accepted (and give the same bits). */
  CALL(fx_setup(failed_, FX_BSR, 0));
  CHECK_OK(fx_plan());
  float want_out[5 * QO_HEADS * HEAD_DIM], want_lse[5 * QO_HEADS], got_out[5 * QO_HEADS * HEAD_DIM],
      got_lse[5 * QO_HEADS];
  CHECK(run_fixture_into(want_out, want_lse));
  int64_t n[] = {(int64_t)((2 * F.k.bytes + F.out.bytes + F.lse.bytes) / 4)};
  tens_alloc(&F.extra, F32, 1, n);
  char *arena = F.extra.mem;
  memcpy(arena, F.k.mem, F.k.bytes);
  memcpy(arena + F.k.bytes + F.out.bytes, F.v.mem, F.v.bytes);
  F.k.t.data = arena;                                           /* K, then out, then V, then lse */
  F.out.t.data = arena + F.k.bytes;
  F.v.t.data = arena + F.k.bytes + F.out.bytes;
  F.lse.t.data = arena + 2 * F.k.bytes + F.out.bytes;
  kvattn_status s = fx_run();
  CHECK_OK(s);
  memcpy(got_out, arena + F.k.bytes, sizeof got_out);
  memcpy(got_lse, arena + 2 * F.k.bytes + F.out.bytes, sizeof got_lse);
  CHECK(memcmp(want_out, got_out, sizeof want_out) == 0);
  CHECK(memcmp(want_lse, got_lse, sizeof want_lse) == 0);
}

/* ---------------------------------------------------------------- skip_validation */

TEST(skip_validation_plans_without_reading_the_indices_and_run_still_refuses_bad_ones) {
  /* the option skips the plan's O(index arrays) host checks; the CPU kernels still check the
   * run's index tensor against the cache before reading any page */
  const int backends[] = {KVATTN_BACKEND_CPU, KVATTN_BACKEND_REFERENCE};
  for (int b = 0; b < 2; b++) {
    CALL(fx_setup_on(failed_, FX_PAGED, 0, backends[b]));
    kvattn_options opt = KVATTN_OPTIONS_INIT;
    opt.backend = backends[b];
    opt.skip_validation = 1;
    kvattn_context *fast = NULL;
    CHECK_OK(kvattn_context_create(&opt, &fast));
    kvattn_attention *attn = NULL;
    kvattn_status s = kvattn_attention_create(fast, &F.desc, &F.bounds, &attn);
    kvattn_attention_destroy(F.attn);
    F.attn = attn;
    kvattn_context_destroy(F.ctx);
    F.ctx = fast;
    CHECK_OK(s);
    /* a good batch: the same bits as with validation */
    CHECK_OK(fx_plan());
    float out1[5 * QO_HEADS * HEAD_DIM], lse1[5 * QO_HEADS];
    CHECK(run_fixture_into(out1, lse1));
    /* an index past the cache: the plan does not look; the run refuses, writing nothing */
    F.kv_indices[3] = 1000;
    ((int32_t *)F.indices.mem)[3] = 1000;
    memset(F.out.mem, 0xA5, F.out.bytes);
    memset(F.lse.mem, 0xA5, F.lse.bytes);
    CHECK_OK(fx_plan());
    CALL(expect_run_rejected(failed_, KVATTN_ERROR_INVALID_INDEX, "1000"));
  }
}

/* ---------------------------------------------------------------- merge_state */

typedef struct merge_fixture {
  kvattn_context *ctx;
  tens va, vb, sa, sb, vo, so, v4, s3;
} merge_fixture;
static merge_fixture M;

static void merge_setup(int *failed_) {
  tens *all[] = {&M.va, &M.vb, &M.sa, &M.sb, &M.vo, &M.so, &M.v4, &M.s3};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tens_free(all[i]);
  M.ctx = cpu_ctx();
  CHECK(M.ctx != NULL);
  int64_t vs[] = {3, 4, 8}, ss[] = {3, 4}, v4s[] = {3, 2, 4, 8}, s3s[] = {3, 2, 4};
  tens_alloc(&M.va, F32, 3, vs);
  tens_alloc(&M.vb, F32, 3, vs);
  tens_alloc(&M.vo, F32, 3, vs);
  tens_alloc(&M.sa, F32, 2, ss);
  tens_alloc(&M.sb, F32, 2, ss);
  tens_alloc(&M.so, F32, 2, ss);
  tens_alloc(&M.v4, F32, 4, v4s);
  tens_alloc(&M.s3, F32, 3, s3s);
  tens *in[] = {&M.va, &M.vb, &M.sa, &M.sb, &M.v4, &M.s3};
  for (size_t i = 0; i < sizeof in / sizeof in[0]; i++) fill_random_f32(in[i]);
  memset(M.vo.mem, 0xA5, M.vo.bytes);
  memset(M.so.mem, 0xA5, M.so.bytes);
  untrack_all();
  const char *names[] = {"v_a", "v_b", "s_a", "s_b", "v_out", "s_out", "v", "s"};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) track(names[i], all[i]->mem, all[i]->bytes);
}

static kvattn_status merge2(void) {
  return kvattn_merge_state(M.ctx, &M.va.t, &M.sa.t, &M.vb.t, &M.sb.t, &M.vo.t, &M.so.t, NULL);
}
static kvattn_status merge_n(void) { return kvattn_merge_states(M.ctx, &M.v4.t, &M.s3.t, &M.vo.t, &M.so.t, NULL); }

static void expect_merge_rejected(int *failed_, kvattn_status (*call)(void), kvattn_status want, const char *fragment) {
  snapshot();
  CHECK_STATUS(call(), want);
  CHECK_ERROR_HAS(fragment);
  CHECK(unchanged());
}

TEST(merge_state_null_context_is_invalid_argument) {
  CALL(merge_setup(failed_));
  snapshot();
  CHECK_STATUS(kvattn_merge_state(NULL, &M.va.t, &M.sa.t, &M.vb.t, &M.sb.t, &M.vo.t, &M.so.t, NULL),
               KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("ctx is NULL");
  CHECK(unchanged());
}

TEST(merge_state_null_v_b_is_invalid_argument) {
  CALL(merge_setup(failed_));
  snapshot();
  CHECK_STATUS(kvattn_merge_state(M.ctx, &M.va.t, &M.sa.t, NULL, &M.sb.t, &M.vo.t, &M.so.t, NULL),
               KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(unchanged());
}

TEST(merge_state_null_v_out_is_invalid_argument) {
  CALL(merge_setup(failed_));
  snapshot();
  CHECK_STATUS(kvattn_merge_state(M.ctx, &M.va.t, &M.sa.t, &M.vb.t, &M.sb.t, NULL, &M.so.t, NULL),
               KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(unchanged());
}

TEST(merge_state_integer_v_is_invalid_dtype) {
  CALL(merge_setup(failed_));
  M.va.t.dtype = I32;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_DTYPE, "v_a has dtype int32"));
}

TEST(merge_state_v_b_other_dtype_is_invalid_dtype) {
  CALL(merge_setup(failed_));
  M.vb.t.dtype = F16;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_DTYPE, "v_b has dtype float16"));
}

TEST(merge_state_lse_float64_is_invalid_dtype) {
  CALL(merge_setup(failed_));
  M.sa.t.dtype = F64;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_DTYPE, "s_a has dtype float64"));
}

TEST(merge_state_v_out_integer_is_invalid_dtype) {
  CALL(merge_setup(failed_));
  M.vo.t.dtype = I32;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_DTYPE, "v_out has dtype int32"));
}

TEST(merge_state_v_b_other_shape_is_invalid_shape) {
  CALL(merge_setup(failed_));
  M.vb.shape[1] = 2;
  M.vb.shape[2] = 16;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_SHAPE, "v_b.shape[1]=2, expected 4"));
}

TEST(merge_state_s_b_other_shape_is_invalid_shape) {
  CALL(merge_setup(failed_));
  M.sb.shape[0] = 2;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_SHAPE, "s_b.shape[0]=2, expected 3"));
}

TEST(merge_state_s_out_other_shape_is_invalid_shape) {
  CALL(merge_setup(failed_));
  M.so.shape[1] = 3;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_SHAPE, "s_out.shape[1]=3, expected 4"));
}

TEST(merge_state_v_a_on_cuda_is_device_mismatch) {
  CALL(merge_setup(failed_));
  M.va.t.device.device_type = kDLCUDA;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_DEVICE_MISMATCH, "v_a is on cuda"));
}

TEST(merge_state_different_layouts_is_invalid_stride) {
  CALL(merge_setup(failed_));
  /* v_b as a [3,4,8] view with the heads and head_dim strides swapped (still in bounds) */
  const int64_t st[] = {32, 1, 4};
  memcpy(M.vb.strides, st, sizeof st);
  M.vb.t.strides = M.vb.strides;
  CALL(expect_merge_rejected(failed_, merge2, KVATTN_ERROR_INVALID_STRIDE, "v_a.strides[1]=8 differs from v_b.strides[1]=1"));
}

TEST(merge_states_three_dimensional_v_is_invalid_shape) {
  CALL(merge_setup(failed_));
  M.v4.t.ndim = 3;
  CALL(expect_merge_rejected(failed_, merge_n, KVATTN_ERROR_INVALID_SHAPE, "v has ndim=3, expected 4"));
}

TEST(merge_states_s_with_other_state_count_is_invalid_shape) {
  CALL(merge_setup(failed_));
  M.s3.shape[1] = 1;
  CALL(expect_merge_rejected(failed_, merge_n, KVATTN_ERROR_INVALID_SHAPE, "s.shape[1]=1, expected 2"));
}

TEST(merge_states_v_out_other_head_dim_is_invalid_shape) {
  CALL(merge_setup(failed_));
  M.vo.shape[2] = 4;
  CALL(expect_merge_rejected(failed_, merge_n, KVATTN_ERROR_INVALID_SHAPE, "v_out.shape[2]=4, expected 8"));
}

TEST(merge_states_null_s_is_invalid_argument) {
  CALL(merge_setup(failed_));
  snapshot();
  CHECK_STATUS(kvattn_merge_states(M.ctx, &M.v4.t, NULL, &M.vo.t, &M.so.t, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(unchanged());
}

TEST(merge_state_output_may_alias_input_a) {
  /* the header allows v_out/s_out == v_a/s_a: the result equals the unaliased one */
  CALL(merge_setup(failed_));
  CHECK_OK(merge2());
  float want_v[3 * 4 * 8], want_s[3 * 4];
  memcpy(want_v, M.vo.mem, sizeof want_v);
  memcpy(want_s, M.so.mem, sizeof want_s);
  CHECK_OK(kvattn_merge_state(M.ctx, &M.va.t, &M.sa.t, &M.vb.t, &M.sb.t, &M.va.t, &M.sa.t, NULL));
  CHECK(memcmp(want_v, M.va.mem, sizeof want_v) == 0);
  CHECK(memcmp(want_s, M.sa.mem, sizeof want_s) == 0);
}

/* ---------------------------------------------------------------- contexts, options, NULLs */

static void expect_options_rejected(int *failed_, const kvattn_options *opt, const char *fragment) {
  kvattn_context *ctx = (kvattn_context *)(uintptr_t)0x1;
  CHECK_STATUS(kvattn_context_create(opt, &ctx), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(fragment);
  CHECK(ctx == NULL);
}

TEST(options_struct_size_zero_is_invalid_argument) {
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.struct_size = 0;
  CALL(expect_options_rejected(failed_, &o, "options.struct_size=0"));
}

TEST(options_backend_out_of_range_is_invalid_argument) {
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.backend = 4;
  CALL(expect_options_rejected(failed_, &o, "options.backend=4"));
  o.backend = -1;
  CALL(expect_options_rejected(failed_, &o, "options.backend=-1"));
}

TEST(options_negative_device_id_is_invalid_argument) {
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.backend = KVATTN_BACKEND_CPU;
  o.device_id = -1;
  CALL(expect_options_rejected(failed_, &o, "options.device_id=-1"));
}

TEST(options_thread_count_out_of_range_is_invalid_argument) {
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.backend = KVATTN_BACKEND_CPU;
  o.num_threads = -2;
  CALL(expect_options_rejected(failed_, &o, "options.num_threads=-2"));
  o.num_threads = 100000;
  CALL(expect_options_rejected(failed_, &o, "options.num_threads=100000"));
}

TEST(options_skip_validation_two_is_invalid_argument) {
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.backend = KVATTN_BACKEND_CPU;
  o.skip_validation = 2;
  CALL(expect_options_rejected(failed_, &o, "options.skip_validation=2"));
}

TEST(context_create_null_output_is_invalid_argument) {
  CHECK_STATUS(kvattn_context_create(NULL, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("ctx");
}

TEST(context_queries_with_nulls_are_invalid_argument) {
  kvattn_backend b = (kvattn_backend)99;
  char buf[8] = "xxxxxxx";
  CHECK_STATUS(kvattn_context_backend(NULL, &b), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(b == (kvattn_backend)99);
  CHECK_STATUS(kvattn_context_backend(cpu_ctx(), NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_context_info(NULL, buf, sizeof buf), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_context_info(cpu_ctx(), NULL, 8), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_context_info(cpu_ctx(), buf, 0), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(strcmp(buf, "xxxxxxx") == 0);
}

TEST(attention_create_nulls_are_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  kvattn_attention *attn = (kvattn_attention *)(uintptr_t)0x1;
  CHECK_STATUS(kvattn_attention_create(NULL, &d, &b, &attn), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("ctx is NULL");
  CHECK(attn == NULL);
  CHECK_STATUS(kvattn_attention_create(cpu_ctx(), &d, &b, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
}

TEST(workspace_calls_with_nulls_are_invalid_argument) {
  kvattn_attention_desc d = base_desc();
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  size_t dev = 777, host = 777;
  CHECK_STATUS(kvattn_workspace_size(NULL, &d, &b, &dev, &host), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_workspace_size(cpu_ctx(), &d, &b, NULL, &host), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_workspace_size(cpu_ctx(), &d, &b, &dev, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_workspace_size(cpu_ctx(), NULL, &b, &dev, &host), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(dev == 777 && host == 777);
  kvattn_workspace ws;
  CHECK_STATUS(kvattn_workspace_alloc(NULL, 64, 0, &ws), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_workspace_alloc(cpu_ctx(), 64, 0, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_workspace_free(NULL, &ws), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_OK(kvattn_workspace_free(cpu_ctx(), NULL));
}

TEST(destroying_null_handles_is_a_no_op) {
  CHECK_OK(kvattn_attention_destroy(NULL));
  CHECK_OK(kvattn_context_destroy(NULL));
}

/* ---------------------------------------------------------------- the same checks on a CUDA context */

/* RELIABILITY.md class 2 (wrong device) and the GPU's layout rules, on a real CUDA context when
 * there is one (skipped otherwise). All tensors are carved out of device memory from
 * kvattn_workspace_alloc (zeroed), so even a check that wrongly passed would launch on valid
 * memory. Decode over a paged f16 cache: 3 requests, page_size 16, head_dim 64, 4 pages. */
enum { G_HEAD_DIM = 64, G_PAGE = 16, G_PAGES = 4, G_ROWS = 3 };

typedef struct gpu_fixture {
  int tried, ok;
  kvattn_context *ctx;
  kvattn_attention *attn;
  kvattn_workspace ws, mem;
  int32_t kv_indptr[8], last[8], indices[8];
  kvattn_batch batch;
  tens q, k, v, ix, out, lse;
  kvattn_kv kv;
} gpu_fixture;
static gpu_fixture G;

static void gview(tens *x, char *base, size_t *at, DLDataType dt, int ndim, const int64_t *shape) {
  memset(x, 0, sizeof *x);
  size_t n = 1;
  for (int i = 0; i < ndim; i++) n *= (size_t)(x->shape[i] = shape[i]);
  x->bytes = n * (dt.bits / 8);
  x->t.data = base + *at;
  *at += (x->bytes + 255) / 256 * 256;
  x->t.device.device_type = kDLCUDA;
  x->t.device.device_id = 0;
  x->t.ndim = ndim;
  x->t.dtype = dt;
  x->t.shape = x->shape;
}

/* Fresh tensors (metadata) over the same device memory, planned; 0 when there is no GPU. */
static int gpu_setup(void) {
  if (!G.tried) {
    G.tried = 1;
    kvattn_options opt = KVATTN_OPTIONS_INIT;
    opt.backend = KVATTN_BACKEND_CUDA;
    if (kvattn_context_create(&opt, &G.ctx) != KVATTN_SUCCESS) return 0;
    kvattn_attention_desc d = base_desc();
    d.head_dim = G_HEAD_DIM;
    d.q_dtype = F16;
    kvattn_bounds b = KVATTN_BOUNDS_INIT;
    b.max_batch = G_ROWS;
    b.max_qo_tokens = G_ROWS;
    b.max_kv_entries = G_PAGES;
    size_t dev = 0, host = 0;
    kvattn_status s = kvattn_attention_create(G.ctx, &d, &b, &G.attn);
    if (s == KVATTN_SUCCESS) s = kvattn_workspace_size(G.ctx, &d, &b, &dev, &host);
    if (s == KVATTN_SUCCESS) s = kvattn_workspace_alloc(G.ctx, dev, host, &G.ws);
    if (s == KVATTN_SUCCESS) s = kvattn_workspace_alloc(G.ctx, 1 << 20, 0, &G.mem);
    if (s != KVATTN_SUCCESS) {
      fprintf(stderr, "  GPU fixture: %s (%s)\n", kvattn_status_string(s), kvattn_last_error());
      return 0;
    }
    G.ok = 1;
  }
  if (!G.ok) return 0;
  const int32_t kv[] = {0, 1, 2, 3}, last[] = {5, 16, 1}, ix[] = {2, 0, 3};
  memcpy(G.kv_indptr, kv, sizeof kv);
  memcpy(G.last, last, sizeof last);
  memcpy(G.indices, ix, sizeof ix);
  G.batch = (kvattn_batch)KVATTN_BATCH_INIT;
  G.batch.batch_size = G_ROWS;
  G.batch.kv_indptr = G.kv_indptr;
  G.batch.kv_indices = G.indices;
  G.batch.kv_last_page_len = G.last;
  G.batch.page_size = G_PAGE;
  G.batch.num_pages = G_PAGES;
  char *base = G.mem.device;
  size_t at = 0;
  int64_t qs[] = {G_ROWS, QO_HEADS, G_HEAD_DIM}, ls[] = {G_ROWS, QO_HEADS},
          ks[] = {G_PAGES, G_PAGE, KV_HEADS, G_HEAD_DIM}, is[] = {G_ROWS};
  gview(&G.q, base, &at, F16, 3, qs);
  gview(&G.out, base, &at, F16, 3, qs);
  gview(&G.lse, base, &at, F32, 2, ls);
  gview(&G.k, base, &at, F16, 4, ks);
  gview(&G.v, base, &at, F16, 4, ks);
  gview(&G.ix, base, &at, I32, 1, is); /* zeroed: every index is page 0, inside the cache */
  G.kv = (kvattn_kv)KVATTN_KV_INIT;
  G.kv.k = &G.k.t;
  G.kv.v = &G.v.t;
  G.kv.indices = &G.ix.t;
  return kvattn_plan(G.attn, &G.batch, &G.ws, NULL) == KVATTN_SUCCESS;
}

static kvattn_status gpu_run(void) { return kvattn_run(G.attn, &G.q.t, &G.kv, NULL, &G.out.t, &G.lse.t, NULL); }

#define GPU_CASE()                                                     \
  do {                                                                 \
    if (!G.tried) gpu_setup();                                         \
    if (!G.ok) SKIP("no usable GPU here");                             \
    CHECK_MSG(gpu_setup(), "plan: %s", kvattn_last_error());           \
  } while (0)

TEST(gpu_fixture_runs) {
  GPU_CASE();
  CHECK_OK(gpu_run());
}

TEST(gpu_host_q_on_a_cuda_context_is_device_mismatch) {
  GPU_CASE();
  G.q.t.device.device_type = kDLCPU;
  CHECK_STATUS(gpu_run(), KVATTN_ERROR_DEVICE_MISMATCH);
  CHECK_ERROR_HAS("q is on cpu:0, the context is on cuda:0");
}

TEST(gpu_cache_on_another_gpu_is_device_mismatch) {
  GPU_CASE();
  G.k.t.device.device_id = 1;
  CHECK_STATUS(gpu_run(), KVATTN_ERROR_DEVICE_MISMATCH);
  CHECK_ERROR_HAS("kv.k is on cuda:1, the context is on cuda:0");
}

TEST(gpu_pinned_host_out_is_device_mismatch) {
  GPU_CASE();
  G.out.t.device.device_type = kDLCUDAHost;
  CHECK_STATUS(gpu_run(), KVATTN_ERROR_DEVICE_MISMATCH);
}

TEST(gpu_host_indices_are_device_mismatch) {
  GPU_CASE();
  G.ix.t.device.device_type = kDLCPU;
  CHECK_STATUS(gpu_run(), KVATTN_ERROR_DEVICE_MISMATCH);
  CHECK_ERROR_HAS("kv.indices");
}

TEST(gpu_non_unit_inner_stride_is_invalid_stride) {
  GPU_CASE();
  const int64_t st[] = {QO_HEADS * G_HEAD_DIM * 2, G_HEAD_DIM * 2, 2};
  memcpy(G.q.strides, st, sizeof st);
  G.q.t.strides = G.q.strides; /* the view reaches into out's bytes: still inside the zeroed block */
  CHECK_STATUS(gpu_run(), KVATTN_ERROR_INVALID_STRIDE);
  CHECK_ERROR_HAS("head_dim stride must be 1 on the GPU, got 2");
}

TEST(gpu_cache_not_16_byte_aligned_is_invalid_stride) {
  GPU_CASE();
  G.k.t.byte_offset = 8;
  CHECK_STATUS(gpu_run(), KVATTN_ERROR_INVALID_STRIDE);
  CHECK_ERROR_HAS("16-byte aligned");
}

TEST(gpu_row_stride_not_multiple_of_16_bytes_is_invalid_stride) {
  GPU_CASE();
  const int64_t st[] = {G_PAGE * KV_HEADS * (G_HEAD_DIM + 4), KV_HEADS * (G_HEAD_DIM + 4), G_HEAD_DIM + 4, 1};
  memcpy(G.v.strides, st, sizeof st); /* 68 halfs = 136 bytes per head row */
  G.v.t.strides = G.v.strides;
  G.v.shape[0] = 2; /* inside the block */
  G.k.shape[0] = 2;
  G.batch.num_pages = 0;
  CHECK_OK(kvattn_plan(G.attn, &G.batch, &G.ws, NULL));
  CHECK_STATUS(gpu_run(), KVATTN_ERROR_INVALID_STRIDE);
  CHECK_ERROR_HAS("multiple of 16 bytes");
}

TEST(gpu_workspace_one_byte_short_is_workspace_too_small) {
  GPU_CASE();
  kvattn_workspace small = G.ws;
  small.device_bytes -= 1;
  CHECK_STATUS(kvattn_plan(G.attn, &G.batch, &small, NULL), KVATTN_ERROR_WORKSPACE_TOO_SMALL);
  if (G.ws.host_bytes) {
    small = G.ws;
    small.host_bytes -= 1;
    CHECK_STATUS(kvattn_plan(G.attn, &G.batch, &small, NULL), KVATTN_ERROR_WORKSPACE_TOO_SMALL);
    CHECK_ERROR_HAS("ws.host_bytes");
  }
  CHECK_OK(gpu_run()); /* the previous plan still stands */
}

TEST(gpu_more_requests_than_bounds_is_bounds_exceeded) {
  GPU_CASE();
  const int32_t kv[] = {0, 1, 2, 3, 4}, last[] = {1, 1, 1, 1};
  memcpy(G.kv_indptr, kv, sizeof kv);
  memcpy(G.last, last, sizeof last);
  G.batch.batch_size = 4;
  CHECK_STATUS(kvattn_plan(G.attn, &G.batch, &G.ws, NULL), KVATTN_ERROR_BOUNDS_EXCEEDED);
  CHECK_OK(gpu_run());
}

/* ---------------------------------------------------------------- edges: valid, defined results */

/* A tiny problem of our own: paged f32, any batch, checked on both CPU backends. Sizes are small
 * enough to hold on the stack of the test. */
typedef struct edge {
  int backend;
  int batch, page_size, causal;
  const int32_t *qo_indptr, *kv_indptr, *last;
  int64_t pages; /* the cache */
  tens q, k, v, ix, out, lse;
} edge;

static kvattn_status edge_run(edge *e, const int32_t *indices) {
  kvattn_options opt = KVATTN_OPTIONS_INIT;
  opt.backend = e->backend;
  opt.num_threads = 2;
  kvattn_context *ctx = NULL;
  kvattn_attention *attn = NULL;
  kvattn_workspace ws = {0};
  kvattn_status s = kvattn_context_create(&opt, &ctx);
  int64_t qo_tokens = e->qo_indptr ? e->qo_indptr[e->batch] : e->batch, entries = e->kv_indptr[e->batch];
  if (s == KVATTN_SUCCESS) {
    kvattn_attention_desc d = base_desc();
    d.causal = e->causal;
    kvattn_bounds b = KVATTN_BOUNDS_INIT;
    b.max_batch = e->batch;
    b.max_qo_tokens = qo_tokens;
    b.max_kv_entries = entries;
    s = kvattn_attention_create(ctx, &d, &b, &attn);
    size_t dev = 0, host = 0;
    if (s == KVATTN_SUCCESS) s = kvattn_workspace_size(ctx, &d, &b, &dev, &host);
    if (s == KVATTN_SUCCESS) s = kvattn_workspace_alloc(ctx, dev, host, &ws);
  }
  if (s == KVATTN_SUCCESS) {
    kvattn_batch batch = KVATTN_BATCH_INIT;
    batch.batch_size = e->batch;
    batch.qo_indptr = e->qo_indptr;
    batch.kv_indptr = e->kv_indptr;
    batch.kv_indices = indices;
    batch.kv_last_page_len = e->last;
    batch.page_size = e->page_size;
    batch.num_pages = e->pages;
    s = kvattn_plan(attn, &batch, &ws, NULL);
  }
  if (s == KVATTN_SUCCESS) {
    int64_t qs[] = {qo_tokens, QO_HEADS, HEAD_DIM}, ls[] = {qo_tokens, QO_HEADS},
            ks[] = {e->pages, e->page_size, KV_HEADS, HEAD_DIM}, is[] = {entries};
    if (!e->q.mem) { /* first run: inputs; later runs (other backend) reuse them */
      tens_alloc(&e->q, F32, 3, qs);
      tens_alloc(&e->k, F32, 4, ks);
      tens_alloc(&e->v, F32, 4, ks);
      tens_alloc(&e->ix, I32, 1, is);
      fill_random_f32(&e->q);
      fill_random_f32(&e->k);
      fill_random_f32(&e->v);
      if (entries) memcpy(e->ix.mem, indices, (size_t)entries * 4);
      tens_alloc(&e->out, F32, 3, qs);
      tens_alloc(&e->lse, F32, 2, ls);
    }
    for (size_t i = 0; i < e->out.bytes / 4; i++) ((float *)e->out.mem)[i] = NAN;
    for (size_t i = 0; i < e->lse.bytes / 4; i++) ((float *)e->lse.mem)[i] = NAN;
    /* zero-size tensors travel with data NULL, as DLPack producers do */
    if (!qo_tokens) e->q.t.data = e->out.t.data = e->lse.t.data = NULL;
    if (!entries) e->ix.t.data = NULL;
    kvattn_kv kv = KVATTN_KV_INIT;
    kv.k = &e->k.t;
    kv.v = &e->v.t;
    kv.indices = &e->ix.t;
    s = kvattn_run(attn, &e->q.t, &kv, NULL, &e->out.t, &e->lse.t, NULL);
  }
  if (s != KVATTN_SUCCESS) fprintf(stderr, "  %s (%s)\n", kvattn_status_string(s), kvattn_last_error());
  kvattn_workspace_free(ctx, &ws);
  kvattn_attention_destroy(attn);
  kvattn_context_destroy(ctx);
  return s;
}

static void edge_free(edge *e) {
  tens_free(&e->q), tens_free(&e->k), tens_free(&e->v), tens_free(&e->ix), tens_free(&e->out), tens_free(&e->lse);
}

/* kv_len of request i, as the header defines it */
static int64_t edge_kv_len(const edge *e, int i) {
  int64_t pages = e->kv_indptr[i + 1] - e->kv_indptr[i];
  return pages ? (pages - 1) * e->page_size + e->last[i] : 0;
}

/* No NaN anywhere; rows that see no KV position are exactly o = 0, lse = -inf; every other row
 * has a finite lse. Returns 0 and prints the first violation. */
static int edge_rows_defined(const edge *e) {
  const float *o = e->out.mem, *l = e->lse.mem;
  for (int i = 0; i < e->batch; i++) {
    int64_t q0 = e->qo_indptr ? e->qo_indptr[i] : i, q1 = e->qo_indptr ? e->qo_indptr[i + 1] : i + 1;
    int64_t kv_len = edge_kv_len(e, i);
    for (int64_t r = q0; r < q1; r++) {
      int64_t q_pos = kv_len - (q1 - q0) + (r - q0);
      int64_t visible = e->causal ? (q_pos + 1 < kv_len ? q_pos + 1 : kv_len) : kv_len;
      if (visible < 0) visible = 0;
      for (int h = 0; h < QO_HEADS; h++) {
        float lse = l[r * QO_HEADS + h];
        if (visible == 0 && !(isinf(lse) && lse < 0)) {
          fprintf(stderr, "  request %d row %lld head %d sees no KV but lse=%g\n", i, (long long)r, h, lse);
          return 0;
        }
        if (visible > 0 && !isfinite(lse)) {
          fprintf(stderr, "  request %d row %lld head %d: lse=%g\n", i, (long long)r, h, lse);
          return 0;
        }
        for (int x = 0; x < HEAD_DIM; x++) {
          float v = o[(r * QO_HEADS + h) * HEAD_DIM + x];
          if (isnan(v) || (visible == 0 && v != 0.0f)) {
            fprintf(stderr, "  request %d row %lld head %d: out[%d]=%g\n", i, (long long)r, h, x, v);
            return 0;
          }
        }
      }
    }
  }
  return 1;
}

/* Run on the float64 reference and the CPU fast path; both defined, and within f32 tolerance. */
static void edge_check_both(int *failed_, edge *e, const int32_t *indices) {
  e->backend = KVATTN_BACKEND_REFERENCE;
  CHECK_OK(edge_run(e, indices));
  CHECK(edge_rows_defined(e));
  int64_t n = (int64_t)(e->out.bytes / 4), nl = (int64_t)(e->lse.bytes / 4);
  float *ref = malloc((size_t)(n + nl + 1) * 4);
  memcpy(ref, e->out.mem, e->out.bytes);
  memcpy(ref + n, e->lse.mem, e->lse.bytes);
  e->backend = KVATTN_BACKEND_CPU;
  kvattn_status s = edge_run(e, indices);
  int defined = s == KVATTN_SUCCESS && edge_rows_defined(e);
  double worst = 0;
  for (int64_t i = 0; defined && i < n + nl; i++) {
    float a = i < n ? ((float *)e->out.mem)[i] : ((float *)e->lse.mem)[i - n], b = ref[i];
    if (isinf(a) || isinf(b)) {
      if (a != b) worst = INFINITY;
      continue;
    }
    double d = fabs((double)a - b) / (1.0 + fabs((double)b));
    if (d > worst) worst = d;
  }
  free(ref);
  CHECK_STATUS(s, KVATTN_SUCCESS);
  CHECK(defined);
  CHECK_MSG(worst < 1e-5, "CPU fast path vs reference: worst relative difference %g", worst);
}

TEST(edge_empty_request_gives_zero_output_and_minus_inf_lse) {
  const int32_t qo[] = {0, 1, 3, 4}, kv[] = {0, 2, 2, 3}, last[] = {2, 0, 4}, ix[] = {3, 0, 2};
  edge e = {.batch = 3, .page_size = 4, .qo_indptr = qo, .kv_indptr = kv, .last = last, .pages = 4};
  edge_check_both(failed_, &e, ix);
  edge_free(&e);
}

TEST(edge_all_requests_empty) {
  const int32_t qo[] = {0, 1, 3, 4}, kv[] = {0, 0, 0, 0}, last[] = {0, 0, 0};
  edge e = {.batch = 3, .page_size = 4, .qo_indptr = qo, .kv_indptr = kv, .last = last, .pages = 2};
  edge_check_both(failed_, &e, NULL);
  edge_free(&e);
}

TEST(edge_batch_of_zero_requests_with_null_data) {
  const int32_t kv[] = {0};
  edge e = {.batch = 0, .page_size = 4, .qo_indptr = NULL, .kv_indptr = kv, .last = NULL, .pages = 2};
  edge_check_both(failed_, &e, NULL);
  edge_free(&e);
}

TEST(edge_requests_with_no_query_rows) {
  const int32_t qo[] = {0, 0, 2, 2}, kv[] = {0, 1, 2, 4}, last[] = {3, 4, 1}, ix[] = {0, 1, 2, 3};
  edge e = {.batch = 3, .page_size = 4, .qo_indptr = qo, .kv_indptr = kv, .last = last, .pages = 4};
  edge_check_both(failed_, &e, ix);
  edge_free(&e);
}

TEST(edge_causal_with_more_queries_than_kv) {
  /* qo_len 4, kv_len 2: q_pos = -2, -1, 0, 1; the first two rows see nothing */
  const int32_t qo[] = {0, 4}, kv[] = {0, 1}, last[] = {2}, ix[] = {1};
  edge e = {.batch = 1, .page_size = 4, .causal = 1, .qo_indptr = qo, .kv_indptr = kv, .last = last, .pages = 2};
  edge_check_both(failed_, &e, ix);
  edge_free(&e);
}

TEST(edge_page_size_one) {
  const int32_t kv[] = {0, 3, 4, 9}, last[] = {1, 1, 1}, ix[] = {8, 0, 4, 2, 1, 3, 5, 6, 7};
  edge e = {.batch = 3, .page_size = 1, .qo_indptr = NULL, .kv_indptr = kv, .last = last, .pages = 9};
  edge_check_both(failed_, &e, ix);
  edge_free(&e);
}

TEST(edge_partial_full_and_single_entry_last_pages) {
  /* kv_len 3 (< page_size), 8 (two full pages), 5 (a last page of one entry) */
  const int32_t kv[] = {0, 1, 3, 5}, last[] = {3, 4, 1}, ix[] = {4, 0, 1, 3, 2};
  edge e = {.batch = 3, .page_size = 4, .qo_indptr = NULL, .kv_indptr = kv, .last = last, .pages = 6};
  edge_check_both(failed_, &e, ix);
  edge_free(&e);
}

TEST(edge_page_tail_garbage_is_not_read) {
  /* the slots past last_page_len hold NaN: the output must be bitwise that of a zeroed tail */
  const int32_t kv[] = {0, 1, 3}, last[] = {1, 2}, ix[] = {2, 0, 1};
  edge e = {.batch = 2, .page_size = 4, .backend = KVATTN_BACKEND_CPU, .kv_indptr = kv, .last = last, .pages = 4};
  for (int pass = 0; pass < 2; pass++) {
    e.backend = pass ? KVATTN_BACKEND_CPU : KVATTN_BACKEND_REFERENCE;
    CHECK_OK(edge_run(&e, ix));
    float clean[2 * QO_HEADS * HEAD_DIM], clean_lse[2 * QO_HEADS];
    memcpy(clean, e.out.mem, sizeof clean);
    memcpy(clean_lse, e.lse.mem, sizeof clean_lse);
    /* poison: slots 1..3 of page 2 (request 0), slots 2..3 of page 1 (request 1), all of page 3 */
    float *k = e.k.mem, *v = e.v.mem;
    const int row = KV_HEADS * HEAD_DIM, page = 4 * row;
    for (int s = 1; s < 4; s++)
      for (int x = 0; x < row; x++) k[2 * page + s * row + x] = v[2 * page + s * row + x] = NAN;
    for (int s = 2; s < 4; s++)
      for (int x = 0; x < row; x++) k[1 * page + s * row + x] = v[1 * page + s * row + x] = NAN;
    for (int x = 0; x < page; x++) k[3 * page + x] = v[3 * page + x] = INFINITY;
    CHECK_OK(edge_run(&e, ix));
    CHECK(memcmp(clean, e.out.mem, sizeof clean) == 0);
    CHECK(memcmp(clean_lse, e.lse.mem, sizeof clean_lse) == 0);
    edge_free(&e);
  }
}

TEST(edge_decode_and_prefill_of_one_row_agree) {
  /* RELIABILITY.md class 4: a one-row request must give the same answer whether the batch is
   * given as decode (qo_indptr NULL) or as prefill with qo_len 1, empty requests included (those
   * exactly: o = 0, lse = -inf) */
  const int32_t qo[] = {0, 1, 2, 3, 4}, kv[] = {0, 2, 2, 5, 6}, last[] = {1, 0, 4, 3}, ix[] = {6, 2, 0, 1, 5, 3};
  for (int b = 0; b < 2; b++) {
    int backend = b ? KVATTN_BACKEND_REFERENCE : KVATTN_BACKEND_CPU;
    edge dec = {.backend = backend, .batch = 4, .page_size = 4, .kv_indptr = kv, .last = last, .pages = 7};
    CHECK_OK(edge_run(&dec, ix));
    CHECK(edge_rows_defined(&dec));
    float da[4 * QO_HEADS * HEAD_DIM], la[4 * QO_HEADS], dp[4 * QO_HEADS * HEAD_DIM], lp[4 * QO_HEADS];
    memcpy(da, dec.out.mem, sizeof da);
    memcpy(la, dec.lse.mem, sizeof la);
    /* the same inputs as prefill: the copy shares dec's tensors (and so its output buffers) */
    edge pre = dec;
    pre.qo_indptr = qo;
    CHECK_OK(edge_run(&pre, ix));
    CHECK(edge_rows_defined(&pre));
    memcpy(dp, pre.out.mem, sizeof dp);
    memcpy(lp, pre.lse.mem, sizeof lp);
    double worst = 0;
    for (int i = 0; i < 4 * QO_HEADS * HEAD_DIM; i++) worst = fmax(worst, fabs((double)da[i] - dp[i]));
    for (int i = 0; i < 4 * QO_HEADS; i++) {
      if (isinf(la[i]) || isinf(lp[i])) CHECK(la[i] == lp[i]);
      else worst = fmax(worst, fabs((double)la[i] - lp[i]));
    }
    for (int x = 0; x < QO_HEADS * HEAD_DIM; x++) CHECK(dp[QO_HEADS * HEAD_DIM + x] == 0.0f); /* request 1 */
    edge_free(&dec);
    CHECK_MSG(worst < 1e-6, "backend %d: decode vs prefill differ by %g", backend, worst);
  }
}

TEST(edge_one_huge_request_among_tiny_ones) {
  /* 128k tokens in one request beside five of 1..5 tokens; page_size 16 */
  enum { HUGE_PAGES = 8192 };
  int32_t kv[7], last[6], *ix = malloc(sizeof(int32_t) * (HUGE_PAGES + 5));
  kv[0] = 0;
  for (int i = 0; i < 6; i++) {
    int pages = i == 3 ? HUGE_PAGES : 1;
    kv[i + 1] = kv[i] + pages;
    last[i] = i == 3 ? 16 : i + 1;
  }
  for (int p = 0; p < HUGE_PAGES + 5; p++) ix[p] = (p * 7919) % (HUGE_PAGES + 5); /* a permutation */
  edge e = {.batch = 6, .page_size = 16, .qo_indptr = NULL, .kv_indptr = kv, .last = last, .pages = HUGE_PAGES + 5};
  edge_check_both(failed_, &e, ix);
  edge_free(&e);
  free(ix);
}

TEST_MAIN()
