/*
 * test_plan_decode.c - the decode planner (src/plan_decode.c), on the CPU: random batches planned
 * and their work lists interpreted independently: every (row, KV head, head block) covered exactly
 * once over its visible KV range, split pieces numbered and merged completely, every offset inside
 * the workspace the layout reported, the grid evenly loaded; and the planner's host time.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "plan_decode.h"
#include "test.h"

/* xorshift64*: fixed seeds, reproducible cases */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 2685821657736338717ull;
}
static int64_t rnd_range(int64_t lo, int64_t hi) { return lo + (int64_t)(rnd() % (uint64_t)(hi - lo + 1)); }
static double rnd01(void) { return (double)(rnd() >> 11) / 9007199254740992.0; }

typedef struct batch {
  int32_t *qo_indptr, *kv_indptr, *last;
  batch_view bv;
} batch;

/* kv lengths in tokens -> a paged batch view (qo_len rows each) */
static void make_batch(batch *b, int n, const int64_t *kv_len, const int *qo_len, int page_size) {
  b->qo_indptr = malloc(sizeof(int32_t) * (n + 1));
  b->kv_indptr = malloc(sizeof(int32_t) * (n + 1));
  b->last = malloc(sizeof(int32_t) * (n > 0 ? n : 1));
  b->qo_indptr[0] = b->kv_indptr[0] = 0;
  int64_t kv_max = 0, qo_max = 0;
  for (int i = 0; i < n; i++) {
    int64_t pages = (kv_len[i] + page_size - 1) / page_size;
    b->kv_indptr[i + 1] = (int32_t)(b->kv_indptr[i] + pages);
    b->last[i] = pages ? (int32_t)(kv_len[i] - (pages - 1) * page_size) : 1;
    b->qo_indptr[i + 1] = b->qo_indptr[i] + qo_len[i];
    if (kv_len[i] > kv_max) kv_max = kv_len[i];
    if (qo_len[i] > qo_max) qo_max = qo_len[i];
  }
  memset(&b->bv, 0, sizeof b->bv);
  b->bv.format = KVATTN_FORMAT_PAGED;
  b->bv.batch = n;
  b->bv.page_size = page_size;
  b->bv.qo_indptr = b->qo_indptr;
  b->bv.kv_indptr = b->kv_indptr;
  b->bv.last_page_len = b->last;
  b->bv.kv_token_limit = INT64_MAX;
  b->bv.qo_tokens = b->qo_indptr[n];
  b->bv.kv_entries = b->kv_indptr[n];
  b->bv.qo_rows_max = (int32_t)qo_max;
  b->bv.kv_len_max = kv_max;
}
static void free_batch(batch *b) {
  free(b->qo_indptr);
  free(b->kv_indptr);
  free(b->last);
}

typedef struct planned {
  decode_config c;
  decode_layout l;
  decode_plan_stats st;
  void *host;
} planned;

/* the planner's tile mode (decode_config.tile) for plan_it: 0 = the token-cost planner */
static int g_plan_tile = 0;

static kvattn_status plan_it(planned *p, const batch *b, int kv_heads, int group, int head_dim, int grid, int causal,
                             int window, int disable, int fixed, int64_t slack_qo) {
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_kv_heads = kv_heads;
  d.num_qo_heads = kv_heads * group;
  d.head_dim = head_dim;
  d.causal = causal;
  d.window_left = window;
  d.disable_split_kv = disable;
  d.fixed_split_size = fixed;
  kvattn_bounds bo = KVATTN_BOUNDS_INIT;
  bo.max_batch = b->bv.batch + 3;
  bo.max_qo_tokens = b->bv.qo_tokens + slack_qo;
  bo.max_kv_entries = b->bv.kv_entries + 5;
  decode_config_init(&p->c, &d, &bo, grid);
  p->c.tile = g_plan_tile;
  decode_layout_init(&p->l, &p->c);
  p->host = malloc(p->l.worklist_bytes);
  memset(p->host, 0xA5, p->l.worklist_bytes); /* poison: the planner must write what the kernel reads */
  return plan_decode(&p->c, &p->l, &b->bv, p->host, &p->st);
}

/* Interpret the work list: returns 0 and fills *max_cost / *L when it is valid, else prints why. */
static int verify(const planned *p, const batch *b, int64_t *max_cost_out) {
  const decode_config *c = &p->c;
  const decode_layout *l = &p->l;
  const char *base = p->host;
  const int32_t *cta = (const int32_t *)(base + l->cta_indptr);
  const decode_item *it = (const decode_item *)(base + l->items);
  const decode_split *sp = (const decode_split *)(base + l->splits);
  const int32_t *counters = (const int32_t *)(base + l->counters);
  const int heads = c->num_kv_heads * c->head_blocks;
  const int64_t n = p->st.items;
#define FAIL(...) do { fprintf(stderr, "  verify: " __VA_ARGS__); fprintf(stderr, "\n"); return 1; } while (0)
  if (n > l->max_items) FAIL("%lld items > max_items %lld", (long long)n, (long long)l->max_items);
  if (p->st.upload_bytes > l->worklist_bytes) FAIL("upload %zu > worklist %zu", p->st.upload_bytes, l->worklist_bytes);
  if (l->items + (size_t)n * sizeof(decode_item) != p->st.upload_bytes) FAIL("upload bytes do not end at the last item");
  if (l->partial_lse + (size_t)l->max_slots * c->group_heads * 4 > l->device_bytes) FAIL("partial states outside the region");
  if (cta[0] != 0 || cta[c->grid] != n) FAIL("cta_indptr ends %d..%d, items %lld", cta[0], cta[c->grid], (long long)n);
  for (int bi = 0; bi < c->grid; bi++)
    if (cta[bi + 1] < cta[bi]) FAIL("cta_indptr decreases at %d", bi);
  if (p->st.splits > l->max_splits || p->st.slots > l->max_slots) FAIL("splits/slots over the layout");
  for (int64_t s = 0; s < l->max_splits; s++)
    if (counters[s] != 0) FAIL("counter %lld not zero", (long long)s);

  /* coverage per unit */
  const int64_t units = b->bv.qo_tokens * heads;
  int64_t *next_tok = malloc(sizeof(int64_t) * (units ? units : 1));
  int32_t *pieces_seen = calloc(units ? units : 1, sizeof(int32_t));
  int32_t *unit_split = malloc(sizeof(int32_t) * (units ? units : 1));
  int64_t *row_lo = malloc(sizeof(int64_t) * (b->bv.qo_tokens + 1)), *row_hi = malloc(sizeof(int64_t) * (b->bv.qo_tokens + 1));
  int32_t *row_base = malloc(sizeof(int32_t) * (b->bv.qo_tokens + 1)), *row_qpos = malloc(sizeof(int32_t) * (b->bv.qo_tokens + 1));
  uint8_t *slot_used = calloc(l->max_slots ? l->max_slots : 1, 1);
  int rc = 1;
  for (int i = 0; i < b->bv.batch; i++) {
    int64_t kv = bv_kv_len(&b->bv, i), qo = bv_qo_len(&b->bv, i);
    for (int64_t r = 0; r < qo; r++) {
      int64_t row = b->qo_indptr[i] + r, qp = kv - qo + r, lo = 0, hi = kv;
      if (c->causal && hi > qp + 1) hi = qp + 1;
      if (c->window_left >= 0 && lo < qp - c->window_left) lo = qp - c->window_left;
      if (hi < 0) hi = 0;
      if (lo > hi) lo = hi;
      row_lo[row] = lo;
      row_hi[row] = hi;
      row_base[row] = b->kv_indptr[i];
      row_qpos[row] = (int32_t)qp;
    }
  }
  for (int64_t u = 0; u < units; u++) {
    next_tok[u] = row_lo[u / heads];
    unit_split[u] = -2;
  }
  int64_t max_cost = 0;
  for (int bi = 0; bi < c->grid; bi++) {
    int64_t cost = 0;
    for (int64_t k = cta[bi]; k < cta[bi + 1]; k++) {
      const decode_item *x = &it[k];
      if (x->row < 0 || x->row >= b->bv.qo_tokens || x->unit_head < 0 || x->unit_head >= heads) {
        fprintf(stderr, "  verify: item %lld: row %d head %d out of range\n", (long long)k, x->row, x->unit_head);
        goto out;
      }
      int64_t u = (int64_t)x->row * heads + x->unit_head;
      if (x->page_base != row_base[x->row] || x->q_pos != row_qpos[x->row]) {
        fprintf(stderr, "  verify: item %lld: page_base/q_pos wrong\n", (long long)k);
        goto out;
      }
      if (x->split < 0) {
        /* whole units: `piece` consecutive heads of the row, each over the row's whole range */
        if (x->piece < 1 || x->unit_head + x->piece > heads || x->tok_start != row_lo[x->row] ||
            x->tok_end != row_hi[x->row]) {
          fprintf(stderr, "  verify: item %lld: whole-unit item heads %d+%d range [%d,%d) (row range [%lld,%lld))\n",
                  (long long)k, x->unit_head, x->piece, x->tok_start, x->tok_end, (long long)row_lo[x->row],
                  (long long)row_hi[x->row]);
          goto out;
        }
        for (int32_t h = 0; h < x->piece; h++) {
          if (pieces_seen[u + h] != 0) {
            fprintf(stderr, "  verify: item %lld: unit %lld covered twice\n", (long long)k, (long long)(u + h));
            goto out;
          }
          pieces_seen[u + h] = 1;
          next_tok[u + h] = x->tok_end;
          unit_split[u + h] = -1;
        }
        cost += (int64_t)x->piece * (x->tok_end - x->tok_start + c->item_cost);
        continue;
      }
      /* pieces of a unit come in order on the line: each starts where the last ended */
      if (x->tok_start != next_tok[u] || x->tok_end < x->tok_start || x->tok_end > row_hi[x->row]) {
        fprintf(stderr, "  verify: item %lld: range [%d,%d) expected start %lld, hi %lld\n", (long long)k, x->tok_start,
                x->tok_end, (long long)next_tok[u], (long long)row_hi[x->row]);
        goto out;
      }
      if (pieces_seen[u] > 0 && x->tok_start == x->tok_end) {
        fprintf(stderr, "  verify: item %lld: an empty extra piece\n", (long long)k);
        goto out;
      }
      next_tok[u] = x->tok_end;
      if (x->split != (unit_split[u] == -2 ? x->split : unit_split[u]) || x->piece != pieces_seen[u] ||
          (unit_split[u] == -1)) {
        fprintf(stderr, "  verify: item %lld: split %d piece %d, expected split %d piece %d\n", (long long)k, x->split,
                x->piece, unit_split[u], pieces_seen[u]);
        goto out;
      }
      unit_split[u] = x->split;
      pieces_seen[u]++;
      cost += x->tok_end - x->tok_start + c->item_cost;
    }
    if (cost > max_cost) max_cost = cost;
  }
  for (int64_t u = 0; u < units; u++) {
    if (pieces_seen[u] == 0 || next_tok[u] != row_hi[u / heads]) {
      fprintf(stderr, "  verify: unit %lld covered %d times up to %lld of %lld\n", (long long)u, pieces_seen[u],
              (long long)next_tok[u], (long long)row_hi[u / heads]);
      goto out;
    }
    if (pieces_seen[u] == 1 && unit_split[u] != -1) {
      fprintf(stderr, "  verify: unit %lld has one piece but split %d\n", (long long)u, unit_split[u]);
      goto out;
    }
    if (pieces_seen[u] > 1) {
      int32_t s = unit_split[u];
      if (s < 0 || s >= p->st.splits || sp[s].pieces != pieces_seen[u]) {
        fprintf(stderr, "  verify: unit %lld: split %d pieces mismatch\n", (long long)u, s);
        goto out;
      }
      for (int k = 0; k < sp[s].pieces; k++) {
        int64_t slot = (int64_t)sp[s].slot_base + k;
        if (slot < 0 || slot >= l->max_slots || slot_used[slot]) {
          fprintf(stderr, "  verify: unit %lld: slot %lld outside or reused\n", (long long)u, (long long)slot);
          goto out;
        }
        slot_used[slot] = 1;
      }
    }
  }
  *max_cost_out = max_cost;
  rc = 0;
out:
  free(next_tok);
  free(pieces_seen);
  free(unit_split);
  free(row_lo);
  free(row_hi);
  free(row_base);
  free(row_qpos);
  free(slot_used);
  return rc;
#undef FAIL
}

/* heavy-tailed lengths: Pareto with shape alpha, scaled, capped */
static int64_t pareto_len(double alpha, double scale, int64_t cap) {
  double u = rnd01();
  double x = scale / pow(1.0 - u * 0.999999, 1.0 / alpha);
  return x > cap ? cap : (int64_t)x;
}

/* KVATTN_PLAN_FUZZ_N: how many random batches (default 3000; scripts/run-tests.sh runs 10^5 in its
 * first phase, as RELIABILITY.md asks, and the default under the sanitizers) */
TEST(random_batches_are_covered_exactly_once_with_complete_merges) {
  const char *env = getenv("KVATTN_PLAN_FUZZ_N");
  const int iters = env && atoi(env) > 0 ? atoi(env) : 3000;
  int cases = 0;
  for (int iter = 0; iter < iters; iter++) {
    int n = (int)(iter % 7 == 0 ? rnd_range(0, 3) : rnd_range(1, iter % 50 == 0 ? 1024 : 96));
    int page_size = (int)(rnd() % 2 ? rnd_range(1, 128) : (1 << rnd_range(0, 7)));
    int kv_heads = (int)rnd_range(1, 8), group = (int)rnd_range(1, 16);
    int grid = (int)rnd_range(1, 600);
    int mode = (int)(rnd() % 6); /* 0-3 free split, 4 disable, 5 fixed */
    int multi = mode != 5 && rnd() % 8 == 0; /* fixed splits take one row per request */
    int64_t *kv = malloc(sizeof(int64_t) * (n ? n : 1));
    int *qo = malloc(sizeof(int) * (n ? n : 1));
    int64_t maxlen = rnd() % 3 == 0 ? 1000000 : rnd_range(0, 40000);
    for (int i = 0; i < n; i++) {
      kv[i] = rnd() % 2 ? pareto_len(1.1, 200, maxlen) : rnd_range(0, maxlen);
      if (rnd() % 10 == 0) kv[i] = 0;
      qo[i] = multi ? (int)rnd_range(0, 5) : 1;
    }
    batch b;
    make_batch(&b, n, kv, qo, page_size);
    planned p;
    const int tiles[5] = {0, 0, 16, 32, 64};
    g_plan_tile = tiles[rnd() % 5];
    int causal = multi && rnd() % 2, window = rnd() % 4 == 0 ? (int)rnd_range(0, 5000) : -1;
    kvattn_status s = plan_it(&p, &b, kv_heads, group, 128, grid, causal, window, mode == 4,
                              mode == 5 ? (int)rnd_range(1, 64) : 0, rnd_range(0, 3));
    CHECK_MSG(s == KVATTN_SUCCESS, "iter %d (n %d, page %d, heads %d x %d, grid %d, mode %d, multi %d, causal %d, window %d): %s", iter, n, page_size, kv_heads, group, grid, mode, multi, causal, window, kvattn_last_error());
    int64_t max_cost = 0;
    CHECK_MSG(verify(&p, &b, &max_cost) == 0, "iter %d (n %d, page %d, heads %d x %d, grid %d, mode %d)", iter, n,
              page_size, kv_heads, group, grid, mode);
    if (mode < 4) {
      /* balance: a CTA carries at most its stretch, the underfill carried over from the previous CTA
       * (< min_chunk + item_cost) and an overfill of min_chunk/2 */
      int64_t L = (p.st.total_cost + grid - 1) / grid;
      int64_t bound = L + 3 * p.c.min_chunk / 2 + 2 * p.c.item_cost; /* carry-over + overfill */
      CHECK_MSG(max_cost <= bound, "iter %d (tile %d): heaviest CTA %lld > bound %lld (L %lld)", iter, g_plan_tile,
                (long long)max_cost, (long long)bound, (long long)L);
    }
    g_plan_tile = 0;
    free(p.host);
    free_batch(&b);
    free(kv);
    free(qo);
    cases++;
  }
  printf("planner fuzz: %d random batches verified\n", cases);
}

TEST(heavy_tailed_batch_is_balanced_per_request) {
  /* 64 requests, Pareto lengths up to 32k: every CTA within a few percent of the mean */
  int64_t kv[64];
  int qo[64];
  int64_t total = 0;
  for (int i = 0; i < 64; i++) {
    kv[i] = pareto_len(1.2, 500, 32768);
    qo[i] = 1;
    total += kv[i];
  }
  kv[7] = 32768;
  batch b;
  make_batch(&b, 64, kv, qo, 16);
  planned p;
  CHECK_OK(plan_it(&p, &b, 8, 4, 128, 264, 0, -1, 0, 0, 0));
  int64_t max_cost = 0;
  CHECK(verify(&p, &b, &max_cost) == 0);
  double mean = (double)p.st.total_cost / 264;
  printf("heavy-tailed: %lld tokens, heaviest CTA %lld vs mean %.0f (%.1f%% over), %lld items, %lld splits\n",
         (long long)total, (long long)max_cost, mean, 100.0 * (max_cost / mean - 1), (long long)p.st.items,
         (long long)p.st.splits);
  CHECK(max_cost <= mean * 1.10 + p.c.min_chunk);
  free(p.host);
  free_batch(&b);
}

TEST(empty_and_zero_length_batches_plan_cleanly) {
  int64_t kv[3] = {0, 0, 0};
  int qo[3] = {1, 1, 1};
  batch b;
  make_batch(&b, 3, kv, qo, 16);
  planned p;
  CHECK_OK(plan_it(&p, &b, 2, 2, 64, 8, 0, -1, 0, 0, 0));
  int64_t mc;
  CHECK(verify(&p, &b, &mc) == 0);
  /* one (empty) item per unit, or one over both KV heads of a request: it writes o = 0, lse = -inf */
  CHECK(p.st.items >= 3 && p.st.items <= 6);
  free(p.host);
  free_batch(&b);
  make_batch(&b, 0, kv, qo, 16);
  CHECK_OK(plan_it(&p, &b, 2, 2, 64, 8, 0, -1, 0, 0, 0));
  CHECK(p.st.items == 0);
  CHECK(verify(&p, &b, &mc) == 0);
  free(p.host);
  free_batch(&b);
}

TEST(a_single_short_request_is_spread_over_the_grid_in_pieces_of_min_chunk_small) {
  /* b1 x 4096, 8 KV heads, grid 264: a CTA's stretch (~157 tokens) is under min_chunk, so pieces of
   * min_chunk_small (128 tokens: two 64-token tiles) and nearly every CTA busy, rather than 128 CTAs
   * of 256 tokens */
  int64_t kv[1] = {4096};
  int qo[1] = {1};
  batch b;
  make_batch(&b, 1, kv, qo, 16);
  planned p;
  CHECK_OK(plan_it(&p, &b, 8, 4, 128, 264, 0, -1, 0, 0, 0));
  int64_t mc;
  CHECK(verify(&p, &b, &mc) == 0);
  const decode_item *it = (const decode_item *)((char *)p.host + p.l.items);
  const int32_t *cta = (const int32_t *)((char *)p.host + p.l.cta_indptr);
  int busy = 0;
  for (int bi = 0; bi < 264; bi++) busy += cta[bi + 1] > cta[bi];
  CHECK(p.st.items == 8 * 4096 / 128);
  CHECK(busy == 256);
  for (int64_t k = 0; k < p.st.items; k++) CHECK(it[k].tok_end - it[k].tok_start == 128);
  free(p.host);
  /* a large batch keeps min_chunk: no piece under it */
  int64_t kv64[64];
  int qo64[64];
  for (int i = 0; i < 64; i++) kv64[i] = 4096, qo64[i] = 1;
  batch b64;
  make_batch(&b64, 64, kv64, qo64, 16);
  CHECK_OK(plan_it(&p, &b64, 8, 4, 128, 264, 0, -1, 0, 0, 0));
  CHECK(verify(&p, &b64, &mc) == 0);
  it = (const decode_item *)((char *)p.host + p.l.items);
  for (int64_t k = 0; k < p.st.items; k++) CHECK(it[k].tok_end - it[k].tok_start >= p.c.min_chunk);
  free(p.host);
  free_batch(&b);
  free_batch(&b64);
}

/* Tile mode (what the GPU uses: the kernel runs a piece of n tokens as ceil(n / 64) tiles): pieces are cut
 * at whole tiles from their start, and every CTA's tiles stay within one tile (plus its items' fixed
 * cost) of the mean, where the token planner's min_chunk slivers and carried underfill left up to 5
 * more (b16 x 4096: 36 tiles on the heaviest CTA for 31 on average). */
TEST(tile_mode_cuts_whole_tiles_and_balances_tiles_per_cta) {
  const struct { int n; int64_t len; } shapes[] = {{16, 4096}, {64, 1024}, {64, 4096}, {16, 16384}, {256, 2048}, {1, 4096}};
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
    int64_t kv[256];
    int qo[256];
    for (int i = 0; i < shapes[si].n; i++) kv[i] = shapes[si].len, qo[i] = 1;
    batch b;
    make_batch(&b, shapes[si].n, kv, qo, 16);
    planned p;
    g_plan_tile = 64;
    CHECK_OK(plan_it(&p, &b, 8, 4, 128, 264, 0, -1, 0, 0, 0));
    g_plan_tile = 0;
    int64_t mc;
    CHECK(verify(&p, &b, &mc) == 0);
    const decode_item *it = (const decode_item *)((char *)p.host + p.l.items);
    const int32_t *cta = (const int32_t *)((char *)p.host + p.l.cta_indptr);
    int64_t max_tiles = 0, sum_tiles = 0;
    for (int bi = 0; bi < 264; bi++) {
      int64_t tiles = 0;
      for (int32_t k = cta[bi]; k < cta[bi + 1]; k++) {
        const int64_t n = it[k].tok_end - it[k].tok_start;
        tiles += (n + 63) / 64 * (it[k].split < 0 ? it[k].piece : 1);
        /* a piece that does not end its unit is whole tiles */
        if (it[k].tok_end < shapes[si].len) CHECK_MSG(n % 64 == 0, "%d x %lld: piece [%d, %d)", shapes[si].n,
                                                          (long long)shapes[si].len, it[k].tok_start, it[k].tok_end);
      }
      sum_tiles += tiles;
      if (tiles > max_tiles) max_tiles = tiles;
    }
    const double mean = (double)sum_tiles / 264;
    printf("tile mode, %d x %lld: heaviest CTA %lld tiles, mean %.2f, %lld items\n", shapes[si].n,
           (long long)shapes[si].len, (long long)max_tiles, mean, (long long)p.st.items);
    CHECK_MSG(max_tiles <= mean + 2, "%d x %lld: heaviest CTA %lld tiles, mean %.2f", shapes[si].n,
              (long long)shapes[si].len, (long long)max_tiles, mean);
    free(p.host);
    free_batch(&b);
  }
}

TEST(fixed_split_size_gives_request_pieces_independent_of_the_batch) {
  /* batch invariance: request 0's pieces are the same alone and among others */
  int64_t kv[5] = {5000, 100, 70000, 3, 4096};
  int qo[5] = {1, 1, 1, 1, 1};
  batch b1, b5;
  make_batch(&b1, 1, kv, qo, 16);
  make_batch(&b5, 5, kv, qo, 16);
  planned p1, p5;
  CHECK_OK(plan_it(&p1, &b1, 1, 1, 128, 132, 0, -1, 0, 8, 0));
  CHECK_OK(plan_it(&p5, &b5, 1, 1, 128, 132, 0, -1, 0, 8, 0));
  int64_t mc;
  CHECK(verify(&p1, &b1, &mc) == 0);
  CHECK(verify(&p5, &b5, &mc) == 0);
  const decode_item *i1 = (const decode_item *)((char *)p1.host + p1.l.items);
  const decode_item *i5 = (const decode_item *)((char *)p5.host + p5.l.items);
  int n1 = 0;
  for (int64_t k = 0; k < p1.st.items; k++) n1++;
  CHECK(n1 == (5000 + 127) / 128);
  int64_t k5 = 0;
  for (int64_t k = 0; k < p1.st.items; k++) {
    while (k5 < p5.st.items && i5[k5].row != 0) k5++;
    CHECK(k5 < p5.st.items);
    CHECK(i5[k5].tok_start == i1[k].tok_start && i5[k5].tok_end == i1[k].tok_end && i5[k5].piece == i1[k].piece);
    k5++;
  }
  free(p1.host);
  free(p5.host);
  free_batch(&b1);
  free_batch(&b5);
}

/* Execute a plan the way the kernel does, in float64 on the host: every item's units over their token
 * ranges, split pieces into their slots, the last piece of a split merging all slots (in slot order),
 * then compare each row and head with attention computed directly. Checks the work list's meaning
 * (ranges, multi-unit items, split/slot numbering, the merge), not just its coverage. */
static int interpret_and_compare(const planned *p, const batch *b, uint64_t seed) {
  const decode_config *c = &p->c;
  const int D = 4;
  const int64_t rows = b->bv.qo_tokens;
  int64_t total_tok = 0;
  for (int i = 0; i < b->bv.batch; i++) total_tok += bv_kv_len(&b->bv, i);
  /* q per (row, qo head), K/V per (request token, kv head); token t of request i is global
   * tok_base[i] + t */
  uint64_t st = seed;
#define R01() (st = st * 6364136223846793005ull + 1442695040888963407ull, (double)(st >> 11) / 9007199254740992.0 - 0.5)
  const int qo_heads = c->num_qo_heads;
  double *q = malloc(sizeof(double) * (rows ? rows : 1) * qo_heads * D);
  double *k = malloc(sizeof(double) * (total_tok ? total_tok : 1) * c->num_kv_heads * D);
  double *v = malloc(sizeof(double) * (total_tok ? total_tok : 1) * c->num_kv_heads * D);
  for (int64_t i = 0; i < rows * qo_heads * D; i++) q[i] = 4 * R01();
  for (int64_t i = 0; i < total_tok * c->num_kv_heads * D; i++) { k[i] = R01(); v[i] = R01(); }
  int64_t *tok_base = malloc(sizeof(int64_t) * (b->bv.batch + 1)), *row_req = malloc(sizeof(int64_t) * (rows ? rows : 1));
  tok_base[0] = 0;
  for (int i = 0; i < b->bv.batch; i++) {
    tok_base[i + 1] = tok_base[i] + bv_kv_len(&b->bv, i);
    for (int32_t r = b->qo_indptr[i]; r < b->qo_indptr[i + 1]; r++) row_req[r] = i;
  }
  /* a state (o[D], lse) of one qo head over tokens [a, e) */
#define STATE(row, h, a, e, o, lse)                                                           \
  do {                                                                                        \
    const int64_t req_ = row_req[row], kvh_ = (h) / c->group_size;                            \
    double mx_ = -INFINITY, sum_ = 0;                                                         \
    for (int d_ = 0; d_ < D; d_++) (o)[d_] = 0;                                               \
    for (int64_t t_ = (a); t_ < (e); t_++) {                                                  \
      double s_ = 0;                                                                          \
      for (int d_ = 0; d_ < D; d_++)                                                          \
        s_ += q[((row) * qo_heads + (h)) * D + d_] * k[((tok_base[req_] + t_) * c->num_kv_heads + kvh_) * D + d_]; \
      if (s_ > mx_) mx_ = s_;                                                                 \
    }                                                                                         \
    for (int64_t t_ = (a); t_ < (e); t_++) {                                                  \
      double s_ = 0;                                                                          \
      for (int d_ = 0; d_ < D; d_++)                                                          \
        s_ += q[((row) * qo_heads + (h)) * D + d_] * k[((tok_base[req_] + t_) * c->num_kv_heads + kvh_) * D + d_]; \
      double w_ = exp(s_ - mx_);                                                              \
      sum_ += w_;                                                                             \
      for (int d_ = 0; d_ < D; d_++) (o)[d_] += w_ * v[((tok_base[req_] + t_) * c->num_kv_heads + kvh_) * D + d_]; \
    }                                                                                         \
    for (int d_ = 0; d_ < D; d_++) (o)[d_] = sum_ > 0 ? (o)[d_] / sum_ : 0;                    \
    (lse) = sum_ > 0 ? mx_ + log(sum_) : -INFINITY;                                           \
  } while (0)
  double *out = malloc(sizeof(double) * (rows ? rows : 1) * qo_heads * D);
  uint8_t *written = calloc((rows ? rows : 1) * qo_heads, 1);
  const int64_t slots = p->l.max_slots ? p->l.max_slots : 1;
  double *po = malloc(sizeof(double) * slots * c->group_heads * D), *pl = malloc(sizeof(double) * slots * c->group_heads);
  int32_t *arrived = calloc(p->l.max_splits ? p->l.max_splits : 1, sizeof(int32_t));
  const char *base = p->host;
  const int32_t *cta = (const int32_t *)(base + p->l.cta_indptr);
  const decode_item *items = (const decode_item *)(base + p->l.items);
  const decode_split *sp = (const decode_split *)(base + p->l.splits);
  int rc = 0;
  for (int bi = 0; bi < c->grid; bi++)
    for (int64_t x = cta[bi]; x < cta[bi + 1]; x++) {
      const decode_item *it = &items[x];
      const int nunits = it->split < 0 ? it->piece : 1;
      for (int uu = 0; uu < nunits; uu++) {
        const int uh = it->unit_head + uu, kvh = uh / c->head_blocks, hb = uh % c->head_blocks;
        for (int g = 0; g < c->group_heads; g++) {
          const int gi = hb * c->group_heads + g;
          if (gi >= c->group_size) continue;
          const int h = kvh * c->group_size + gi;
          double o[4], lse;
          STATE(it->row, h, it->tok_start, it->tok_end, o, lse);
          if (it->split < 0) {
            memcpy(out + ((int64_t)it->row * qo_heads + h) * D, o, sizeof o);
            written[(int64_t)it->row * qo_heads + h]++;
          } else {
            const int64_t slot = sp[it->split].slot_base + it->piece;
            memcpy(po + (slot * c->group_heads + g) * D, o, sizeof o);
            pl[slot * c->group_heads + g] = lse;
          }
        }
        if (it->split >= 0 && ++arrived[it->split] == sp[it->split].pieces) {
          /* the last piece merges the split's slots */
          for (int g = 0; g < c->group_heads; g++) {
            const int gi = hb * c->group_heads + g;
            if (gi >= c->group_size) continue;
            const int h = kvh * c->group_size + gi;
            double mx = -INFINITY, sum = 0, o[4] = {0, 0, 0, 0};
            for (int kk = 0; kk < sp[it->split].pieces; kk++) {
              double l = pl[(int64_t)(sp[it->split].slot_base + kk) * c->group_heads + g];
              if (l > mx) mx = l;
            }
            for (int kk = 0; kk < sp[it->split].pieces && mx > -INFINITY; kk++) {
              const int64_t slot = sp[it->split].slot_base + kk;
              double w = exp(pl[slot * c->group_heads + g] - mx);
              sum += w;
              for (int d = 0; d < D; d++) o[d] += w * po[(slot * c->group_heads + g) * D + d];
            }
            for (int d = 0; d < D; d++) out[((int64_t)it->row * qo_heads + h) * D + d] = sum > 0 ? o[d] / sum : 0;
            written[(int64_t)it->row * qo_heads + h]++;
          }
        }
      }
    }
  for (int64_t r = 0; r < rows && !rc; r++) {
    const int64_t i = row_req[r], kv = bv_kv_len(&b->bv, i), qo = bv_qo_len(&b->bv, i);
    const int64_t qp = kv - qo + (r - b->qo_indptr[i]);
    int64_t lo = 0, hi = kv;
    if (c->causal && hi > qp + 1) hi = qp + 1;
    if (c->window_left >= 0 && lo < qp - c->window_left) lo = qp - c->window_left;
    if (hi < 0) hi = 0;
    if (lo > hi) lo = hi;
    for (int h = 0; h < qo_heads; h++) {
      double o[4], lse;
      STATE(r, h, lo, hi, o, lse);
      (void)lse;
      if (written[r * qo_heads + h] != 1) {
        fprintf(stderr, "  interpret: row %lld head %d written %d times\n", (long long)r, h, written[r * qo_heads + h]);
        rc = 1;
        break;
      }
      for (int d = 0; d < D; d++)
        if (fabs(out[(r * qo_heads + h) * D + d] - o[d]) > 1e-9) {
          fprintf(stderr, "  interpret: row %lld head %d dim %d: %g vs %g\n", (long long)r, h, d,
                  out[(r * qo_heads + h) * D + d], o[d]);
          rc = 1;
          break;
        }
    }
  }
#undef STATE
#undef R01
  free(q);
  free(k);
  free(v);
  free(tok_base);
  free(row_req);
  free(out);
  free(written);
  free(po);
  free(pl);
  free(arrived);
  return rc;
}

TEST(executing_the_work_list_gives_the_attention_of_every_row) {
  int64_t splits = 0, multi_unit_items = 0;
  for (int iter = 0; iter < 300; iter++) {
    int n = (int)rnd_range(0, 24);
    int page_size = (int)rnd_range(1, 32), kv_heads = (int)rnd_range(1, 3), group = (int)rnd_range(1, 12);
    int grid = (int)rnd_range(1, 40), mode = (int)(rnd() % 6), multi = mode != 5 && rnd() % 4 == 0;
    int64_t kv[24];
    int qo[24];
    for (int i = 0; i < n; i++) {
      kv[i] = rnd() % 8 == 0 ? 0 : rnd() % 3 == 0 ? pareto_len(1.2, 20, 3000) : rnd_range(1, 400);
      qo[i] = multi ? (int)rnd_range(0, 3) : 1;
    }
    batch b;
    make_batch(&b, n, kv, qo, page_size);
    planned p;
    g_plan_tile = rnd() % 2 ? 0 : (int)rnd_range(2, 64);
    int causal = multi && rnd() % 2, window = rnd() % 4 == 0 ? (int)rnd_range(0, 200) : -1;
    kvattn_status s = plan_it(&p, &b, kv_heads, group, 128, grid, causal, window, mode == 4,
                              mode == 5 ? (int)rnd_range(1, 8) : 0, 0);
    CHECK_MSG(s == KVATTN_SUCCESS, "iter %d: %s", iter, kvattn_last_error());
    splits += p.st.splits;
    const decode_item *its = (const decode_item *)((char *)p.host + p.l.items);
    for (int64_t x = 0; x < p.st.items; x++) multi_unit_items += its[x].split < 0 && its[x].piece > 1;
    CHECK_MSG(interpret_and_compare(&p, &b, 1000 + iter) == 0, "iter %d (n %d, page %d, heads %d x %d, grid %d, mode %d, tile %d)",
              iter, n, page_size, kv_heads, group, grid, mode, g_plan_tile);
    g_plan_tile = 0;
    free(p.host);
    free_batch(&b);
  }
  printf("work-list execution: 300 batches, %lld splits merged, %lld multi-unit items\n", (long long)splits,
         (long long)multi_unit_items);
  CHECK(splits > 100 && multi_unit_items > 100); /* both paths were exercised */
}

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

TEST(plan_for_batch_256_costs_microseconds) {
  int64_t kv[256];
  int qo[256];
  for (int i = 0; i < 256; i++) {
    kv[i] = 2048;
    qo[i] = 1;
  }
  batch b;
  make_batch(&b, 256, kv, qo, 16);
  /* the token-cost planner, and tile mode (64-token tiles: what the tensor-core decode kernel plans) */
  for (int mode = 0; mode < 2; mode++) {
    g_plan_tile = mode ? 64 : 0;
    planned p;
    CHECK_OK(plan_it(&p, &b, 8, 4, 128, 264, 0, -1, 0, 0, 0));
    double best = 1e30, sum = 0;
    const int reps = 2000;
    for (int r = 0; r < reps; r++) {
      double t0 = now_us();
      kvattn_status s = plan_decode(&p.c, &p.l, &b.bv, p.host, &p.st);
      double t1 = now_us();
      CHECK(s == KVATTN_SUCCESS);
      if (t1 - t0 < best) best = t1 - t0;
      sum += t1 - t0;
    }
    int64_t mc;
    CHECK(verify(&p, &b, &mc) == 0);
    printf("plan_decode, batch 256 x 8 KV heads, grid 264%s: best %.2f us, mean %.2f us (%lld items)\n",
           mode ? ", 64-token tiles" : "", best, sum / reps, (long long)p.st.items);
    /* the bar is 20 us for the whole kvattn_plan on the GPU machine; this CPU (shared, 2 cores) gets
     * a generous margin against noise */
    CHECK(best < 60.0);
    free(p.host);
  }
  g_plan_tile = 0;
  free_batch(&b);
}

TEST_MAIN()
