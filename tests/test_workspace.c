/*
 * test_workspace.c - the workspace and plan/run memory contract (RELIABILITY.md tests 2 and 5, CPU
 * side).
 *
 *   - kvattn_workspace_size() for several bounds: deterministic, growing with the bounds.
 *   - A run with exactly the reported size, placed between canary bytes, leaves the canaries
 *     intact after plan + run, for every format, with and without a custom mask (whose offsets are
 *     the last thing the CPU plan writes); one byte less is WORKSPACE_TOO_SMALL naming the bytes
 *     needed and had.
 *   - One attention and one workspace re-planned over batches of different sizes within its bounds
 *     gives, each time, the bits a fresh attention gives.
 *   - Poisoning: the workspace (NaN/0xFF), out and lse (NaN), padding between strided q rows and
 *     the ragged KV past kv_indptr[end] (NaN) never leak: outputs are bitwise those of clean memory.
 *   - kvattn_workspace_alloc/free on the CPU.
 * Runs on the CPU fast path and on the float64 reference.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvattn.h"
#include "test.h"

static const DLDataType F32 = {kDLFloat, 32, 1}, I32 = {kDLInt, 32, 1}, U8 = {kDLUInt, 8, 1};
enum { QO_HEADS = 4, KV_HEADS = 2, HEAD_DIM = 8 };
static const int BACKENDS[] = {KVATTN_BACKEND_CPU, KVATTN_BACKEND_REFERENCE};

/* ---------------------------------------------------------------- tensors the tests own */

/* A host tensor whose DLTensor points at its own shape/strides arrays: never copy one by value. */
typedef struct tens {
  DLTensor t;
  int64_t shape[6];
  int64_t strides[6];
  void *mem;
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
  x->bytes = n * (dt.bits / 8);
  size_t cap = (x->bytes + 64 + 63) / 64 * 64;
  x->mem = aligned_alloc(64, cap);
  memset(x->mem, 0, cap);
  x->t.data = n ? x->mem : NULL; /* zero-size tensors travel with data NULL */
  x->t.device.device_type = kDLCPU;
  x->t.ndim = ndim;
  x->t.dtype = dt;
  x->t.shape = x->shape;
}

static uint32_t rng;
static uint32_t next_u32(void) {
  rng ^= rng << 13, rng ^= rng >> 17, rng ^= rng << 5;
  return rng;
}
static int rand_int(int lo, int hi) { return lo + (int)(next_u32() % (uint32_t)(hi - lo + 1)); }
static void fill_random(tens *x) {
  float *p = x->mem;
  for (size_t i = 0; i < x->bytes / 4; i++) p[i] = (float)((next_u32() >> 8) * (2.0 / 16777216.0) - 1.0);
}
static void fill_nan(tens *x) {
  float *p = x->mem;
  for (size_t i = 0; i < x->bytes / 4; i++) p[i] = NAN;
}

/* ---------------------------------------------------------------- random problems */

enum { FMT_PAGED = KVATTN_FORMAT_PAGED, FMT_RAGGED = KVATTN_FORMAT_RAGGED, FMT_BSR = KVATTN_FORMAT_BLOCK_SPARSE };

/* One batch and its tensors. Paged: page_size 3, pages shuffled in a cache with spare pages.
 * Ragged: K/V with one spare token past kv_indptr[end]. BSR: rows = 2 per block row, 11 columns
 * in blocks of 3 (the last block partial), random block columns per block row. */
typedef struct problem {
  int format, batch, custom_mask;
  int32_t qo_indptr[1100], kv_indptr[1100], indices[8192], last[1100];
  kvattn_batch b;
  tens q, k, v, ix, out, lse, mask;
  kvattn_kv kv;
} problem;

static void problem_free(problem *p) {
  tens *all[] = {&p->q, &p->k, &p->v, &p->ix, &p->out, &p->lse, &p->mask};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tens_free(all[i]);
}

static void problem_make(problem *p, int format, int batch, int custom_mask, uint32_t seed) {
  problem_free(p);
  rng = seed * 2654435761u + 1;
  p->format = format;
  p->batch = batch;
  p->custom_mask = custom_mask;
  p->b = (kvattn_batch)KVATTN_BATCH_INIT;
  p->b.format = format;
  p->b.batch_size = batch;
  int64_t qo_tokens, kv_store, entries = 0, mask_bytes = 0;
  if (format == FMT_BSR) {
    const int Br = 2, Bc = 3, cols = 11, col_blocks = 4;
    p->kv_indptr[0] = 0;
    for (int r = 0; r < batch; r++) {
      int n = rand_int(0, col_blocks), start = rand_int(0, col_blocks - 1);
      for (int j = 0; j < n; j++) p->indices[entries++] = (start + j) % col_blocks; /* distinct columns */
      p->kv_indptr[r + 1] = (int32_t)entries;
    }
    p->b.kv_indptr = p->kv_indptr;
    p->b.kv_indices = p->indices;
    p->b.block_rows = Br;
    p->b.block_cols = Bc;
    p->b.num_rows = (int64_t)batch * Br - (batch ? 1 : 0); /* a partial last block row too */
    p->b.num_cols = cols;
    qo_tokens = p->b.num_rows;
    kv_store = cols;
    mask_bytes = (p->b.num_rows * cols + 7) / 8;
  } else {
    const int page_size = format == FMT_PAGED ? 3 : 1;
    p->qo_indptr[0] = p->kv_indptr[0] = 0;
    int64_t tokens = 0;
    for (int i = 0; i < batch; i++) {
      int qo_len = rand_int(0, 3), kv_len = rand_int(0, 9);
      if (rand_int(0, 7) == 0) kv_len = 0; /* some empty requests */
      int pages = (kv_len + page_size - 1) / page_size;
      p->qo_indptr[i + 1] = p->qo_indptr[i] + qo_len;
      p->kv_indptr[i + 1] = p->kv_indptr[i] + pages;
      p->last[i] = pages ? kv_len - (pages - 1) * page_size : 0;
      tokens += kv_len;
      mask_bytes += ((int64_t)qo_len * kv_len + 7) / 8;
    }
    qo_tokens = p->qo_indptr[batch];
    entries = p->kv_indptr[batch];
    p->b.qo_indptr = p->qo_indptr;
    p->b.kv_indptr = p->kv_indptr;
    if (format == FMT_PAGED) {
      int64_t num_pages = entries + 2;
      /* a shuffled page table over a cache with 2 spare pages */
      int32_t perm[8192];
      for (int64_t i = 0; i < num_pages; i++) perm[i] = (int32_t)i;
      for (int64_t i = num_pages - 1; i > 0; i--) {
        int64_t j = next_u32() % (uint64_t)(i + 1);
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
      }
      memcpy(p->indices, perm, (size_t)entries * 4);
      p->b.kv_indices = p->indices;
      p->b.kv_last_page_len = p->last;
      p->b.page_size = page_size;
      p->b.num_pages = num_pages;
      kv_store = num_pages;
    } else {
      kv_store = tokens + 1; /* a spare token past the end */
    }
  }
  int64_t qs[] = {qo_tokens, QO_HEADS, HEAD_DIM}, ls[] = {qo_tokens, QO_HEADS}, is[] = {entries},
          ms[] = {mask_bytes};
  tens_alloc(&p->q, F32, 3, qs);
  tens_alloc(&p->out, F32, 3, qs);
  tens_alloc(&p->lse, F32, 2, ls);
  if (format == FMT_PAGED) {
    int64_t ks[] = {kv_store, 3, KV_HEADS, HEAD_DIM};
    tens_alloc(&p->k, F32, 4, ks);
    tens_alloc(&p->v, F32, 4, ks);
  } else {
    int64_t ks[] = {kv_store, KV_HEADS, HEAD_DIM};
    tens_alloc(&p->k, F32, 3, ks);
    tens_alloc(&p->v, F32, 3, ks);
  }
  fill_random(&p->q);
  fill_random(&p->k);
  fill_random(&p->v);
  p->kv = (kvattn_kv)KVATTN_KV_INIT;
  p->kv.k = &p->k.t;
  p->kv.v = &p->v.t;
  if (format != FMT_RAGGED) {
    tens_alloc(&p->ix, I32, 1, is);
    if (entries) memcpy(p->ix.mem, p->indices, (size_t)entries * 4);
    p->kv.indices = &p->ix.t;
  }
  tens_alloc(&p->mask, U8, 1, ms);
  for (size_t i = 0; i < p->mask.bytes; i++) ((uint8_t *)p->mask.mem)[i] = (uint8_t)next_u32();
}

static int64_t problem_qo_tokens(const problem *p) { return p->q.shape[0]; }

static kvattn_attention_desc make_desc(int custom_mask) {
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_qo_heads = QO_HEADS;
  d.num_kv_heads = KV_HEADS;
  d.head_dim = HEAD_DIM;
  d.q_dtype = F32;
  d.custom_mask = custom_mask;
  return d;
}

/* The tightest bounds for a problem. */
static kvattn_bounds bounds_of(const problem *p) {
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_batch = p->format == FMT_BSR ? (p->b.num_rows + p->b.block_rows - 1) / p->b.block_rows : p->batch;
  b.max_qo_tokens = problem_qo_tokens(p);
  b.max_kv_entries = p->kv_indptr[b.max_batch];
  return b;
}

static kvattn_status run_problem(kvattn_attention *attn, const kvattn_workspace *ws, problem *p) {
  fill_nan(&p->out); /* every element must be written */
  fill_nan(&p->lse);
  kvattn_status s = kvattn_plan(attn, &p->b, ws, NULL);
  if (s == KVATTN_SUCCESS)
    s = kvattn_run(attn, &p->q.t, &p->kv, p->custom_mask ? &p->mask.t : NULL, &p->out.t, &p->lse.t, NULL);
  if (s != KVATTN_SUCCESS) fprintf(stderr, "  %s: %s\n", kvattn_status_string(s), kvattn_last_error());
  return s;
}

static int no_nan(const tens *x) {
  for (size_t i = 0; i < x->bytes / 4; i++)
    if (isnan(((const float *)x->mem)[i])) {
      fprintf(stderr, "  NaN at element %zu\n", i);
      return 0;
    }
  return 1;
}

/* The outputs of a fresh attention with its own generously sized, zeroed workspace. */
static void solve_fresh(int *failed_, kvattn_context *ctx, const kvattn_bounds *bounds, problem *p, float *out,
                        float *lse) {
  kvattn_attention_desc d = make_desc(p->custom_mask);
  kvattn_attention *attn = NULL;
  CHECK_OK(kvattn_attention_create(ctx, &d, bounds, &attn));
  size_t dev, host;
  CHECK_OK(kvattn_workspace_size(ctx, &d, bounds, &dev, &host));
  kvattn_workspace ws;
  CHECK_OK(kvattn_workspace_alloc(ctx, dev + 4096, host, &ws));
  kvattn_status s = run_problem(attn, &ws, p);
  kvattn_workspace_free(ctx, &ws);
  kvattn_attention_destroy(attn);
  CHECK_OK(s);
  memcpy(out, p->out.mem, p->out.bytes);
  memcpy(lse, p->lse.mem, p->lse.bytes);
}

static kvattn_context *context(int backend) {
  static kvattn_context *ctx[4];
  if (!ctx[backend]) {
    kvattn_options opt = KVATTN_OPTIONS_INIT;
    opt.backend = backend;
    opt.num_threads = 2;
    kvattn_context_create(&opt, &ctx[backend]);
  }
  return ctx[backend];
}

#define CALL(expr)        \
  do {                    \
    expr;                 \
    if (*failed_) return; \
  } while (0)

/* ---------------------------------------------------------------- sizes */

TEST(workspace_size_is_deterministic_and_grows_with_the_bounds) {
  kvattn_attention_desc d = make_desc(0);
  const int64_t batches[] = {0, 1, 2, 17, 64, 1024, 65536, 1 << 24};
  size_t prev = 0;
  for (int i = 0; i < 8; i++) {
    kvattn_bounds b = KVATTN_BOUNDS_INIT;
    b.max_batch = batches[i];
    b.max_qo_tokens = batches[i] * 4;
    b.max_kv_entries = batches[i] * 16;
    size_t dev = 0, host = 99, dev2 = 0, host2 = 99, dev_ref = 0, host_ref = 99;
    CHECK_OK(kvattn_workspace_size(context(KVATTN_BACKEND_CPU), &d, &b, &dev, &host));
    CHECK_OK(kvattn_workspace_size(context(KVATTN_BACKEND_CPU), &d, &b, &dev2, &host2));
    CHECK_OK(kvattn_workspace_size(context(KVATTN_BACKEND_REFERENCE), &d, &b, &dev_ref, &host_ref));
    fprintf(stderr, "  max_batch %lld: %zu device bytes, %zu host bytes\n", (long long)batches[i], dev, host);
    CHECK(dev == dev2 && host == host2);
    CHECK(dev == dev_ref && host == host_ref);
    CHECK(host == 0);       /* the CPU has no pinned staging area */
    CHECK(dev >= prev);     /* more requests never need less */
    CHECK(dev >= (size_t)(batches[i] + 1) * 2 * sizeof(int32_t)); /* at least the two indptr copies */
    prev = dev;
  }
}

TEST(workspace_size_depends_on_the_bounds_not_on_any_batch) {
  /* the same bounds with a custom mask or other options may differ, but never below the plain size */
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_batch = 100;
  b.max_qo_tokens = 1000;
  b.max_kv_entries = 5000;
  kvattn_attention_desc plain = make_desc(0), masked = make_desc(1);
  size_t a, h, m, hm;
  CHECK_OK(kvattn_workspace_size(context(KVATTN_BACKEND_CPU), &plain, &b, &a, &h));
  CHECK_OK(kvattn_workspace_size(context(KVATTN_BACKEND_CPU), &masked, &b, &m, &hm));
  CHECK(m >= a);
}

/* ---------------------------------------------------------------- the exact size, between canaries */

enum { CANARY = 256 };

/* Plan and run `p` with a workspace of exactly the reported size between canaries, the workspace
 * itself poisoned with `poison`; the outputs must equal a fresh run's bits and the canaries stay. */
static void exact_workspace_case(int *failed_, int backend, int format, int custom_mask, int batch, uint32_t seed,
                                 unsigned char poison) {
  static problem p;
  problem_make(&p, format, batch, custom_mask, seed);
  kvattn_context *ctx = context(backend);
  CHECK(ctx != NULL);
  kvattn_bounds bounds = bounds_of(&p);
  kvattn_attention_desc d = make_desc(custom_mask);
  size_t dev, host;
  CHECK_OK(kvattn_workspace_size(ctx, &d, &bounds, &dev, &host));
  CHECK(host == 0);

  float *want_out = malloc(p.out.bytes + 4), *want_lse = malloc(p.lse.bytes + 4);
  solve_fresh(failed_, ctx, &bounds, &p, want_out, want_lse);
  if (*failed_) {
    free(want_out), free(want_lse);
    return;
  }

  unsigned char *block = aligned_alloc(64, dev + 2 * CANARY);
  memset(block, 0xC3, CANARY);
  memset(block + CANARY, poison, dev);
  memset(block + CANARY + dev, 0x3C, CANARY);
  kvattn_workspace ws = {block + CANARY, dev, NULL, 0};
  kvattn_attention *attn = NULL;
  kvattn_status s = kvattn_attention_create(ctx, &d, &bounds, &attn);
  if (s == KVATTN_SUCCESS) s = run_problem(attn, &ws, &p);
  int front = 1, back = 1;
  for (int i = 0; i < CANARY; i++) {
    front &= block[i] == 0xC3;
    back &= block[CANARY + dev + i] == 0x3C;
  }
  int same = s == KVATTN_SUCCESS && memcmp(want_out, p.out.mem, p.out.bytes) == 0 &&
             memcmp(want_lse, p.lse.mem, p.lse.bytes) == 0;
  int clean = s == KVATTN_SUCCESS && no_nan(&p.out) && no_nan(&p.lse);

  /* one byte less: refused, naming both sizes, and nothing written */
  ws.device_bytes = dev - 1;
  memset(block + CANARY, poison, dev);
  kvattn_status short_s = kvattn_plan(attn, &p.b, &ws, NULL);
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", kvattn_last_error());
  int untouched = 1;
  for (size_t i = 0; i < dev; i++) untouched &= block[CANARY + i] == poison;
  kvattn_attention_destroy(attn);
  free(block);
  free(want_out);
  free(want_lse);

  CHECK_OK(s);
  CHECK_MSG(front && back, "canary before: %s, after: %s", front ? "intact" : "OVERWRITTEN",
            back ? "intact" : "OVERWRITTEN");
  CHECK(clean);
  CHECK_MSG(same, "outputs differ from a fresh run with a clean workspace");
  CHECK_STATUS(short_s, KVATTN_ERROR_WORKSPACE_TOO_SMALL);
  char need[64], had[64];
  snprintf(need, sizeof need, "%zu", dev);
  snprintf(had, sizeof had, "device_bytes=%zu", dev - 1);
  CHECK_MSG(strstr(msg, need) && strstr(msg, had), "message \"%s\" lacks %s or %s", msg, need, had);
  CHECK(untouched);
}

TEST(exact_workspace_keeps_canaries_paged) {
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_PAGED, 0, 17, 1, 0xFF));
}

TEST(exact_workspace_keeps_canaries_paged_with_custom_mask) {
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_PAGED, 1, 17, 2, 0xFF));
}

TEST(exact_workspace_keeps_canaries_ragged) {
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_RAGGED, 0, 9, 3, 0x7F)); /* 0x7F7F7F7F: NaN */
}

TEST(exact_workspace_keeps_canaries_ragged_with_custom_mask) {
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_RAGGED, 1, 9, 4, 0xFF));
}

TEST(exact_workspace_keeps_canaries_block_sparse) {
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_BSR, 0, 6, 5, 0xFF));
}

TEST(exact_workspace_keeps_canaries_block_sparse_with_custom_mask) {
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_BSR, 1, 6, 6, 0xFF));
}

TEST(exact_workspace_keeps_canaries_batch_of_one) {
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_PAGED, 1, 1, 7, 0xFF));
}

TEST(exact_workspace_keeps_canaries_batch_1024) {
  CALL(exact_workspace_case(failed_, KVATTN_BACKEND_CPU, FMT_PAGED, 1, 1024, 8, 0xFF));
  CALL(exact_workspace_case(failed_, KVATTN_BACKEND_CPU, FMT_RAGGED, 0, 1024, 9, 0xFF));
}

TEST(workspace_of_zero_bounds_plans_an_empty_batch) {
  /* bounds of 0 still need (and report) a workspace; an empty batch plans and runs in it */
  for (int b = 0; b < 2; b++)
    CALL(exact_workspace_case(failed_, BACKENDS[b], FMT_PAGED, 0, 0, 10, 0xFF));
}

/* ---------------------------------------------------------------- one plan slot, many batches */

TEST(plan_reused_across_batches_of_different_sizes_within_bounds) {
  static problem p;
  for (int bi = 0; bi < 2; bi++) {
    kvattn_context *ctx = context(BACKENDS[bi]);
    kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
    bounds.max_batch = 40;
    bounds.max_qo_tokens = 40 * 3;
    bounds.max_kv_entries = 40 * 9;
    for (int mask = 0; mask < 2; mask++) {
      kvattn_attention_desc d = make_desc(mask);
      kvattn_attention *attn = NULL;
      CHECK_OK(kvattn_attention_create(ctx, &d, &bounds, &attn));
      size_t dev, host;
      CHECK_OK(kvattn_workspace_size(ctx, &d, &bounds, &dev, &host));
      kvattn_workspace ws;
      CHECK_OK(kvattn_workspace_alloc(ctx, dev, host, &ws));
      const int sizes[] = {1, 40, 3, 0, 17, 40, 2};
      for (int step = 0; step < 7; step++) {
        int format = step % 3 == 2 ? FMT_RAGGED : FMT_PAGED;
        problem_make(&p, format, sizes[step], mask, 100 + step);
        float *want_out = malloc(p.out.bytes + 4), *want_lse = malloc(p.lse.bytes + 4);
        solve_fresh(failed_, ctx, &bounds, &p, want_out, want_lse);
        kvattn_status s = *failed_ ? KVATTN_ERROR_INTERNAL : run_problem(attn, &ws, &p);
        int same = s == KVATTN_SUCCESS && memcmp(want_out, p.out.mem, p.out.bytes) == 0 &&
                   memcmp(want_lse, p.lse.mem, p.lse.bytes) == 0;
        free(want_out);
        free(want_lse);
        if (*failed_) return;
        CHECK_OK(s);
        CHECK_MSG(same, "backend %d mask %d step %d (batch %d): re-planned run differs from a fresh one",
                  BACKENDS[bi], mask, step, sizes[step]);
        CHECK(no_nan(&p.out) && no_nan(&p.lse));
      }
      kvattn_workspace_free(ctx, &ws);
      kvattn_attention_destroy(attn);
    }
  }
}

TEST(plans_may_alternate_between_two_workspaces) {
  /* double buffering, as a serving loop plans step n+1 while step n runs */
  static problem a, b;
  kvattn_context *ctx = context(KVATTN_BACKEND_CPU);
  kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
  bounds.max_batch = 8;
  bounds.max_qo_tokens = 24;
  bounds.max_kv_entries = 72;
  kvattn_attention_desc d = make_desc(0);
  size_t dev, host;
  CHECK_OK(kvattn_workspace_size(ctx, &d, &bounds, &dev, &host));
  kvattn_workspace w1, w2;
  CHECK_OK(kvattn_workspace_alloc(ctx, dev, host, &w1));
  CHECK_OK(kvattn_workspace_alloc(ctx, dev, host, &w2));
  kvattn_attention *attn = NULL;
  CHECK_OK(kvattn_attention_create(ctx, &d, &bounds, &attn));
  problem_make(&a, FMT_PAGED, 8, 0, 200);
  problem_make(&b, FMT_PAGED, 5, 0, 201);
  float *ao = malloc(a.out.bytes + 4), *al = malloc(a.lse.bytes + 4), *bo = malloc(b.out.bytes + 4),
        *bl = malloc(b.lse.bytes + 4);
  solve_fresh(failed_, ctx, &bounds, &a, ao, al);
  if (!*failed_) solve_fresh(failed_, ctx, &bounds, &b, bo, bl);
  int ok = !*failed_;
  for (int step = 0; ok && step < 4; step++) {
    problem *p = step % 2 ? &b : &a;
    ok = run_problem(attn, step % 2 ? &w2 : &w1, p) == KVATTN_SUCCESS &&
         memcmp(p->out.mem, step % 2 ? bo : ao, p->out.bytes) == 0 &&
         memcmp(p->lse.mem, step % 2 ? bl : al, p->lse.bytes) == 0;
  }
  free(ao), free(al), free(bo), free(bl);
  kvattn_attention_destroy(attn);
  kvattn_workspace_free(ctx, &w1);
  kvattn_workspace_free(ctx, &w2);
  CHECK(ok);
}

TEST(workspace_planned_into_by_another_attention_is_refused_at_run) {
  /* a workspace holds one plan: after B plans into A's workspace, A's run must not read B's arrays
   * (they index A's tensors out of bounds); A plans again and runs */
  static problem pa, pb;
  for (int bi = 0; bi < 2; bi++) {
    kvattn_context *ctx = context(BACKENDS[bi]);
    problem_make(&pa, FMT_PAGED, 3, 0, 700);
    problem_make(&pb, FMT_PAGED, 8, 0, 701);
    kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
    bounds.max_batch = 8;
    bounds.max_qo_tokens = 24;
    bounds.max_kv_entries = 72;
    kvattn_attention_desc d = make_desc(0);
    float *want_out = malloc(pa.out.bytes + 4), *want_lse = malloc(pa.lse.bytes + 4);
    solve_fresh(failed_, ctx, &bounds, &pa, want_out, want_lse);
    kvattn_attention *a = NULL, *b = NULL;
    size_t dev, host;
    kvattn_workspace ws = {0};
    kvattn_status s = kvattn_attention_create(ctx, &d, &bounds, &a);
    if (s == KVATTN_SUCCESS) s = kvattn_attention_create(ctx, &d, &bounds, &b);
    if (s == KVATTN_SUCCESS) s = kvattn_workspace_size(ctx, &d, &bounds, &dev, &host);
    if (s == KVATTN_SUCCESS) s = kvattn_workspace_alloc(ctx, dev, host, &ws);
    if (s == KVATTN_SUCCESS) s = kvattn_plan(a, &pa.b, &ws, NULL);
    if (s == KVATTN_SUCCESS) s = kvattn_plan(b, &pb.b, &ws, NULL);
    memset(pa.out.mem, 0xA5, pa.out.bytes);
    kvattn_status refused = kvattn_run(a, &pa.q.t, &pa.kv, NULL, &pa.out.t, &pa.lse.t, NULL);
    char msg[512];
    snprintf(msg, sizeof msg, "%s", kvattn_last_error());
    int untouched = 1;
    for (size_t i = 0; i < pa.out.bytes; i++) untouched &= ((unsigned char *)pa.out.mem)[i] == 0xA5;
    kvattn_status again = s == KVATTN_SUCCESS ? run_problem(a, &ws, &pa) : s;
    int same = again == KVATTN_SUCCESS && memcmp(want_out, pa.out.mem, pa.out.bytes) == 0 &&
               memcmp(want_lse, pa.lse.mem, pa.lse.bytes) == 0;
    kvattn_attention_destroy(a);
    kvattn_attention_destroy(b);
    kvattn_workspace_free(ctx, &ws);
    free(want_out), free(want_lse);
    if (*failed_) return;
    CHECK_OK(s);
    CHECK_STATUS(refused, KVATTN_ERROR_INVALID_USAGE);
    CHECK_MSG(strstr(msg, "plan again") != NULL, "message: %s", msg);
    CHECK(untouched);
    CHECK_OK(again);
    CHECK(same);
  }
}

TEST(workspace_rewritten_after_plan_is_refused_at_run) {
  static problem p;
  kvattn_context *ctx = context(KVATTN_BACKEND_CPU);
  problem_make(&p, FMT_RAGGED, 6, 1, 800);
  kvattn_bounds bounds = bounds_of(&p);
  kvattn_attention_desc d = make_desc(1);
  kvattn_attention *a = NULL;
  CHECK_OK(kvattn_attention_create(ctx, &d, &bounds, &a));
  size_t dev, host;
  CHECK_OK(kvattn_workspace_size(ctx, &d, &bounds, &dev, &host));
  kvattn_workspace ws;
  CHECK_OK(kvattn_workspace_alloc(ctx, dev, host, &ws));
  kvattn_status plan = kvattn_plan(a, &p.b, &ws, NULL);
  memset(ws.device, 0x7F, ws.device_bytes);
  memset(p.out.mem, 0xA5, p.out.bytes);
  kvattn_status run = kvattn_run(a, &p.q.t, &p.kv, &p.mask.t, &p.out.t, &p.lse.t, NULL);
  int untouched = 1;
  for (size_t i = 0; i < p.out.bytes; i++) untouched &= ((unsigned char *)p.out.mem)[i] == 0xA5;
  kvattn_attention_destroy(a);
  kvattn_workspace_free(ctx, &ws);
  CHECK_OK(plan);
  CHECK_STATUS(run, KVATTN_ERROR_INVALID_USAGE);
  CHECK(untouched);
}

/* ---------------------------------------------------------------- poisoning */

TEST(poisoned_padding_between_strided_q_rows_is_not_read) {
  static problem p;
  for (int bi = 0; bi < 2; bi++) {
    kvattn_context *ctx = context(BACKENDS[bi]);
    problem_make(&p, FMT_PAGED, 11, 0, 300);
    kvattn_bounds bounds = bounds_of(&p);
    int64_t rows = problem_qo_tokens(&p);
    float *want_out = malloc(p.out.bytes + 4), *want_lse = malloc(p.lse.bytes + 4);
    solve_fresh(failed_, ctx, &bounds, &p, want_out, want_lse);
    if (*failed_) return;
    /* q as a view into a buffer with 5 NaN floats after every head and 7 after every row */
    const int64_t head_stride = HEAD_DIM + 5, row_stride = QO_HEADS * head_stride + 7;
    tens wide = {0};
    int64_t ws_[] = {rows * row_stride};
    tens_alloc(&wide, F32, 1, ws_);
    fill_nan(&wide);
    for (int64_t r = 0; r < rows; r++)
      for (int h = 0; h < QO_HEADS; h++)
        memcpy((float *)wide.mem + r * row_stride + h * head_stride,
               (float *)p.q.mem + (r * QO_HEADS + h) * HEAD_DIM, HEAD_DIM * 4);
    p.q.t.data = wide.mem;
    p.q.strides[0] = row_stride;
    p.q.strides[1] = head_stride;
    p.q.strides[2] = 1;
    p.q.t.strides = p.q.strides;
    float *got_out = malloc(p.out.bytes + 4), *got_lse = malloc(p.lse.bytes + 4);
    solve_fresh(failed_, ctx, &bounds, &p, got_out, got_lse);
    int same = !*failed_ && memcmp(want_out, got_out, p.out.bytes) == 0 &&
               memcmp(want_lse, got_lse, p.lse.bytes) == 0;
    tens_free(&wide);
    free(want_out), free(want_lse), free(got_out), free(got_lse);
    if (*failed_) return;
    CHECK_MSG(same, "backend %d: strided q with NaN padding gave other bits", BACKENDS[bi]);
  }
}

TEST(poisoned_ragged_tokens_past_the_last_request_are_not_read) {
  static problem p;
  for (int bi = 0; bi < 2; bi++) {
    kvattn_context *ctx = context(BACKENDS[bi]);
    problem_make(&p, FMT_RAGGED, 7, 1, 400);
    kvattn_bounds bounds = bounds_of(&p);
    float *want_out = malloc(p.out.bytes + 4), *want_lse = malloc(p.lse.bytes + 4);
    float *got_out = malloc(p.out.bytes + 4), *got_lse = malloc(p.lse.bytes + 4);
    solve_fresh(failed_, ctx, &bounds, &p, want_out, want_lse);
    if (!*failed_) {
      int64_t end = p.kv_indptr[p.batch], row = KV_HEADS * HEAD_DIM;
      for (int64_t t = end; t < p.k.shape[0]; t++)
        for (int64_t x = 0; x < row; x++) ((float *)p.k.mem)[t * row + x] = ((float *)p.v.mem)[t * row + x] = NAN;
      solve_fresh(failed_, ctx, &bounds, &p, got_out, got_lse);
    }
    int same = !*failed_ && memcmp(want_out, got_out, p.out.bytes) == 0 && memcmp(want_lse, got_lse, p.lse.bytes) == 0;
    free(want_out), free(want_lse), free(got_out), free(got_lse);
    if (*failed_) return;
    CHECK(same);
  }
}

TEST(poisoned_spare_pages_are_not_read) {
  static problem p;
  for (int bi = 0; bi < 2; bi++) {
    kvattn_context *ctx = context(BACKENDS[bi]);
    problem_make(&p, FMT_PAGED, 13, 1, 500);
    kvattn_bounds bounds = bounds_of(&p);
    float *want_out = malloc(p.out.bytes + 4), *want_lse = malloc(p.lse.bytes + 4);
    float *got_out = malloc(p.out.bytes + 4), *got_lse = malloc(p.lse.bytes + 4);
    solve_fresh(failed_, ctx, &bounds, &p, want_out, want_lse);
    if (!*failed_) {
      /* mark which (page, slot) the batch reads; poison every other slot with NaN */
      int64_t pages = p.k.shape[0], slots = pages * 3, row = KV_HEADS * HEAD_DIM;
      char *used = calloc((size_t)slots, 1);
      for (int i = 0; i < p.batch; i++)
        for (int e = p.kv_indptr[i]; e < p.kv_indptr[i + 1]; e++) {
          int n = e == p.kv_indptr[i + 1] - 1 ? p.last[i] : 3;
          for (int s = 0; s < n; s++) used[p.indices[e] * 3 + s] = 1;
        }
      for (int64_t s = 0; s < slots; s++)
        if (!used[s])
          for (int64_t x = 0; x < row; x++) ((float *)p.k.mem)[s * row + x] = ((float *)p.v.mem)[s * row + x] = NAN;
      free(used);
      solve_fresh(failed_, ctx, &bounds, &p, got_out, got_lse);
    }
    int same = !*failed_ && memcmp(want_out, got_out, p.out.bytes) == 0 && memcmp(want_lse, got_lse, p.lse.bytes) == 0;
    free(want_out), free(want_lse), free(got_out), free(got_lse);
    if (*failed_) return;
    CHECK(same);
  }
}

/* ---------------------------------------------------------------- alloc / free */

TEST(workspace_alloc_and_free_on_the_cpu) {
  kvattn_context *ctx = context(KVATTN_BACKEND_CPU);
  kvattn_workspace ws;
  memset(&ws, 0xAB, sizeof ws);
  CHECK_OK(kvattn_workspace_alloc(ctx, 4099, 100, &ws));
  CHECK(ws.device != NULL && ws.device_bytes == 4099);
  CHECK(ws.host != NULL && ws.host_bytes == 100);
  for (size_t i = 0; i < ws.device_bytes; i++) CHECK(((unsigned char *)ws.device)[i] == 0); /* zeroed */
  for (size_t i = 0; i < ws.host_bytes; i++) CHECK(((unsigned char *)ws.host)[i] == 0);
  memset(ws.device, 1, ws.device_bytes); /* it is real, writable memory */
  CHECK_OK(kvattn_workspace_free(ctx, &ws));
  CHECK(ws.device == NULL && ws.host == NULL && ws.device_bytes == 0 && ws.host_bytes == 0);
  CHECK_OK(kvattn_workspace_free(ctx, &ws)); /* freeing the emptied struct again is harmless */

  CHECK_OK(kvattn_workspace_alloc(ctx, 0, 0, &ws));
  CHECK(ws.device == NULL && ws.device_bytes == 0 && ws.host == NULL);
  CHECK_OK(kvattn_workspace_free(ctx, &ws));
}

TEST(workspace_alloc_of_an_impossible_size_is_out_of_memory) {
  kvattn_context *ctx = context(KVATTN_BACKEND_CPU);
  kvattn_workspace ws;
  CHECK_STATUS(kvattn_workspace_alloc(ctx, SIZE_MAX / 2, 0, &ws), KVATTN_ERROR_OUT_OF_MEMORY);
  CHECK(ws.device == NULL && ws.device_bytes == 0);
  CHECK(strstr(kvattn_last_error(), "kvattn_workspace_alloc") != NULL);
}

TEST(allocated_workspace_of_the_reported_size_serves_plan_and_run) {
  static problem p;
  kvattn_context *ctx = context(KVATTN_BACKEND_CPU);
  problem_make(&p, FMT_PAGED, 5, 0, 600);
  kvattn_bounds bounds = bounds_of(&p);
  kvattn_attention_desc d = make_desc(0);
  size_t dev, host;
  CHECK_OK(kvattn_workspace_size(ctx, &d, &bounds, &dev, &host));
  kvattn_workspace ws;
  CHECK_OK(kvattn_workspace_alloc(ctx, dev, host, &ws));
  kvattn_attention *attn = NULL;
  CHECK_OK(kvattn_attention_create(ctx, &d, &bounds, &attn));
  kvattn_status s = run_problem(attn, &ws, &p);
  kvattn_attention_destroy(attn);
  kvattn_workspace_free(ctx, &ws);
  CHECK_OK(s);
  CHECK(no_nan(&p.out) && no_nan(&p.lse));
}

TEST_MAIN()
