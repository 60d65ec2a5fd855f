/*
 * plan_prefill.c - the prefill family's planner: (request, KV head, query tile, KV chunk) work
 * items dealt over a fixed grid per query-tile size, longest first onto the least loaded CTA.
 *
 * Query tiles: a request's packed rows (qo_len * group) go in tiles of 16, 64 or 128 rows, the
 * smallest that holds them (so a 3-token speculative draft does not pay for a 128-row tile).
 * KV ranges: causal trims a tile's range to the last query's position + 1 and a sliding window
 * its start (paged/ragged positions only: block-sparse positions come from the block ids).
 * Split-KV: when a tile kind has fewer items than its grid has CTAs (few query rows against long
 * KV: chunked prefill, speculative verification), the smallest chunk size that keeps the items
 * within the grid is found by bisection; each chunk writes a partial (o, lse) and a merge entry
 * combines them. The partial rows of a kind never exceed grid * tile rows.
 * Tail balance (config balance_tail): with more items than CTAs, whole items go longest first onto
 * the least loaded CTA while they fit under the mean load; the rest (the "tail": for 4096 equal items
 * on 264 CTAs, the 136 of a 16th round that would leave 128 CTAs idle for one item's time) are laid
 * end to end and cut in whole KV tiles to fill every CTA to one water level, the pieces of a cut item
 * merged like split-KV chunks, when the tail's items average 32 KV tiles or more (shorter ones cost
 * more in partial states and the merge than they gain; config tail_min_tiles) and it lowers the
 * heaviest CTA's load by >= 1%. A CTA runs its pieces first (tail_first). Its
 * pieces use at most 2 * grid * tile partial rows, the kind's budget (prefill_layout.part_budget),
 * which sizes the workspace from the bounds alone.
 */
#include <stdlib.h>
#include <string.h>

#include "plan_prefill.h"

#define ITEM_WORDS ((int64_t)(sizeof(prefill_item) / 4))
#define MERGE_WORDS ((int64_t)(sizeof(prefill_merge_entry) / 4))

/* Scratch: the base tiles and the expanded items (prefill_item), sort keys, CTA loads. */
typedef struct sort_key {
  int64_t cost;
  int64_t index;
} sort_key;

static int grid_max(const prefill_config *c) {
  int g = 0;
  for (int k = 0; k < PREFILL_TILE_KINDS; k++)
    if (c->grid[k] > g) g = c->grid[k];
  return g;
}

kvattn_status prefill_layout_compute(const prefill_config *c, prefill_layout *l) {
  memset(l, 0, sizeof *l);
  RETURN_IF(c->group_size < 1 || c->num_kv_heads < 1 || c->kv_tile < 16 || c->kv_tile % 16, KVATTN_ERROR_INTERNAL,
            "prefill: bad config (group %d, kv_heads %d, kv_tile %d)", c->group_size, c->num_kv_heads, c->kv_tile);
  RETURN_IF(c->max_batch < 0 || c->max_qo_tokens < 0 || c->max_kv_entries < 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "prefill: negative bounds");
  int64_t grid_sum = 0;
  for (int k = 0; k < PREFILL_TILE_KINDS; k++) {
    RETURN_IF(c->grid[k] < 1 || c->grid[k] >= (1 << 20), KVATTN_ERROR_INTERNAL, "prefill: grid[%d]=%d", k, c->grid[k]);
    grid_sum += c->grid[k];
  }
  /* Every request's tiles: ceil(qo * group / T) <= qo * group / 16 + 1 whatever T is. Splitting
   * happens only for a kind with fewer items than its grid and keeps it within the grid; the tail
   * balance cuts fewer than grid times, so it adds fewer than grid items and merges. */
  int64_t tiles = c->max_qo_tokens * c->group_size / 16 + c->max_batch;
  l->max_items = tiles * c->num_kv_heads + grid_sum;
  l->max_merges = grid_sum;
  int64_t at = PREFILL_META_WORDS;
  l->rope_off = at;
  at += 128;
  l->alibi_off = at;
  at += (c->num_qo_heads + 3) / 4 * 4;
  for (int k = 0; k < PREFILL_TILE_KINDS; k++) {
    l->cta_off[k] = at;
    at += (c->grid[k] + 1 + 3) / 4 * 4;
  }
  l->merge_off = at;
  at += l->max_merges * MERGE_WORDS;
  l->items_off = at;
  at += l->max_items * ITEM_WORDS;
  l->list_words = at;
  RETURN_IF(at > INT32_MAX || l->max_items > INT32_MAX, KVATTN_ERROR_BOUNDS_EXCEEDED,
            "prefill: bounds (max_batch=%lld, max_qo_tokens=%lld) need %lld work items, more than 2^31",
            (long long)c->max_batch, (long long)c->max_qo_tokens, (long long)l->max_items);
  int64_t rows = 0;
  for (int k = 0; k < PREFILL_TILE_KINDS; k++) {
    l->part_base[k] = rows;
    l->part_budget[k] = 2 * (int64_t)c->grid[k] * prefill_tile_rows[k];
    rows += l->part_budget[k];
  }
  l->part_rows = rows;
  /* items (base, expanded), keys x2, owners; per CTA: heap, loads, order, fill */
  l->scratch_bytes = (size_t)l->max_items * (2 * sizeof(prefill_item) + 2 * sizeof(sort_key) + sizeof(int32_t)) +
                     (size_t)(grid_max(c) + 1) * (2 * sizeof(int64_t) + sizeof(int32_t) * 2);
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- min-heap of CTA loads */

/* A heap entry is one key, load << 20 | cta (grids are < 2^20 CTAs, loads < 2^43): one compare
 * orders by load and breaks ties by CTA, so the deal is deterministic. Sift the root down. */
#define HEAP_CTA_BITS 20
static void heap_sift_down(uint64_t *heap, int n, int i) {
  const uint64_t x = heap[i];
  for (;;) {
    int a = 2 * i + 1;
    if (a >= n) break;
    if (a + 1 < n && heap[a + 1] < heap[a]) a++;
    if (heap[a] >= x) break;
    heap[i] = heap[a];
    i = a;
  }
  heap[i] = x;
}

/* Sort keys by cost, largest first, ties in index order: an LSD radix sort over the bytes of
 * (2^62 - cost), stable, O(n) (qsort made the plan of 4096 items cost 250 us). `tmp` holds n keys. */
static void sort_cost_desc(sort_key *keys, sort_key *tmp, int64_t n) {
  int64_t max_cost = 0;
  for (int64_t i = 0; i < n; i++)
    if (keys[i].cost > max_cost) max_cost = keys[i].cost;
  int bytes = 0;
  while (bytes < 8 && (max_cost >> (8 * bytes)) != 0) bytes++;
  sort_key *src = keys, *dst = tmp;
  for (int b = 0; b < bytes; b++) {
    int64_t count[257] = {0};
    const int shift = 8 * b;
    for (int64_t i = 0; i < n; i++) count[((uint64_t)(max_cost - src[i].cost) >> shift & 0xff) + 1]++;
    for (int d = 0; d < 256; d++) count[d + 1] += count[d];
    for (int64_t i = 0; i < n; i++) dst[count[(uint64_t)(max_cost - src[i].cost) >> shift & 0xff]++] = src[i];
    sort_key *t = src;
    src = dst;
    dst = t;
  }
  if (src != keys) memcpy(keys, src, (size_t)n * sizeof *keys);
}

/* The merge entry of a tile whose `chunks` pieces (of item `b`) wrote partial rows from `part`. */
static void merge_entry_of(prefill_merge_entry *e, const prefill_item *b, int64_t part, int64_t chunks, int T) {
  memset(e, 0, sizeof *e);
  e->part = (int32_t)part;
  e->chunks = (int32_t)chunks;
  e->q_start = b->q_start;
  e->qo_len = b->qo_len;
  e->kv_head = b->kv_head;
  e->row_start = b->row_start;
  e->rows = T;
}

/* Longest first onto the least loaded CTA: keys (sorted by cost, largest first) dealt over `grid` CTAs;
 * owner[item] = its CTA. Returns the heaviest CTA's load. */
static int64_t lpt_deal(const sort_key *keys, int64_t m, int grid, uint64_t *heap, int32_t *owner) {
  for (int b = 0; b < grid; b++) heap[b] = (uint64_t)b; /* load 0: already a heap */
  const uint64_t cta_mask = (1ull << HEAP_CTA_BITS) - 1;
  for (int64_t t = 0; t < m; t++) {
    owner[keys[t].index] = (int32_t)(heap[0] & cta_mask);
    heap[0] += (uint64_t)keys[t].cost << HEAP_CTA_BITS;
    heap_sift_down(heap, grid, 0);
  }
  uint64_t mx = 0;
  for (int b = 0; b < grid; b++)
    if (heap[b] > mx) mx = heap[b];
  return (int64_t)(mx >> HEAP_CTA_BITS);
}

/* The tail balance's state (see the header comment): exp/keys/owner as in prefill_plan_build, the
 * kind's partial-row budget and the merge entries it may still write. */
typedef struct tail_plan {
  prefill_item *exp;
  sort_key *keys;
  int32_t *owner;
  uint64_t *heap;
  int64_t *loads;
  int32_t *order;
  int64_t m;         /* items; on success, the items after the cut */
  int64_t max_items; /* room in exp, keys, owner */
  int T, kv_tile;
  int64_t min_tiles; /* the tail's items must average this many KV tiles */
  int first;         /* 1: the pieces go first in their CTAs' lists */
  int64_t part_base, part_budget;
  prefill_merge_entry *merge;
  int64_t max_merges;
  int64_t merges, part_used, pieces; /* out */
} tail_plan;

/* The tail (keys[t_tail, m)) laid end to end over the CTAs in ascending load order, each CTA filled up
 * to `water`: a piece costs its tokens plus the fixed cost F, and is cut at whole KV tiles from its
 * item's start. apply 0: whether the tail fits; 1: also write the pieces (exp[m, ...), owner[]), the
 * merge entries and partial rows of the items cut, and the CTAs' loads. Returns whether it fits (and,
 * applied, the budgets held). */
static int tail_walk(tail_plan *tp, int grid, int64_t t_tail, int64_t water, int apply) {
  const int64_t kt = tp->kv_tile, F = 2 * kt;
  int64_t e = tp->m, k = t_tail, off = 0, first = tp->m;
  if (apply) tp->merges = tp->part_used = 0;
  for (int i = 0; i < grid && k < tp->m; i++) {
    const int b = tp->order[i];
    int64_t room = water - tp->loads[b];
    while (room >= F + kt && k < tp->m) {
      const int64_t cap = (room - F) / kt * kt;
      const prefill_item *src = &tp->exp[tp->keys[k].index];
      const int64_t len = src->kv_end - src->kv_begin, left = len - off;
      const int64_t whole = (left > 0 ? ceil_div64(left, kt) : 1) * kt;
      const int64_t piece = whole <= cap ? left : cap;
      room -= (whole <= cap ? whole : cap) + F;
      off += piece;
      if (apply) {
        if (e >= tp->max_items) return 0;
        prefill_item *it = &tp->exp[e];
        *it = *src;
        it->kv_begin = (int32_t)(src->kv_begin + off - piece);
        it->kv_end = (int32_t)(it->kv_begin + piece);
        it->part = -1;
        tp->owner[e] = (int32_t)b;
        tp->loads[b] += piece + F;
      }
      e++;
      if (off < len) continue;
      /* the item is done: its pieces [first, e) */
      const int64_t chunks = e - first;
      if (apply && chunks > 1) {
        if (tp->merges >= tp->max_merges || tp->part_used + chunks * tp->T > tp->part_budget) return 0;
        const int64_t part = tp->part_base + tp->part_used;
        for (int64_t x = 0; x < chunks; x++) tp->exp[first + x].part = (int32_t)(part + x * tp->T);
        merge_entry_of(&tp->merge[tp->merges++], src, part, chunks, tp->T);
        tp->part_used += chunks * tp->T;
      }
      first = e;
      off = 0;
      k++;
    }
  }
  if (apply) tp->pieces = e - tp->m;
  return k == tp->m;
}

/* Whole items longest first while they fit under the mean load, then the rest cut to the lowest water
 * level that holds them. Returns 1 when it pays (the heaviest CTA >= 1% lighter than lpt_max), with
 * owner[], keys[0, m) (the whole items and the pieces, in list order), the merge entries and the partial rows
 * written; 0 otherwise, with owner[], keys[0, m) and exp[0, m) as lpt_deal left them (its whole-item deal
 * repeats lpt_deal's first steps, so the owners it writes are the same; pieces go past m). */
static int tail_balance(tail_plan *tp, int grid, int64_t cost_sum, int64_t lpt_max) {
  const int64_t level = (cost_sum + grid - 1) / grid;
  const uint64_t cta_mask = (1ull << HEAP_CTA_BITS) - 1;
  uint64_t *heap = tp->heap;
  sort_key *keys = tp->keys;
  for (int b = 0; b < grid; b++) heap[b] = (uint64_t)b;
  int64_t t_tail = 0;
  for (; t_tail < tp->m; t_tail++) {
    const int64_t load = (int64_t)(heap[0] >> HEAP_CTA_BITS);
    if (load + keys[t_tail].cost > level) break;
    tp->owner[keys[t_tail].index] = (int32_t)(heap[0] & cta_mask);
    heap[0] += (uint64_t)keys[t_tail].cost << HEAP_CTA_BITS;
    heap_sift_down(heap, grid, 0);
  }
  if (t_tail == tp->m) return 0;
  int64_t tail_cost = 0;
  for (int64_t t = t_tail; t < tp->m; t++) tail_cost += keys[t].cost;
  /* a cut item's pieces write fp32 partial states (2x its output bytes) that a second launch merges:
   * against items of 16 KV tiles that cost more than the balance gained (H200, full 16x1024: -1%; 64
   * and 256 tiles: +1%), so only a tail whose items average min_tiles tiles or more is cut */
  if (tail_cost - (tp->m - t_tail) * 2 * tp->kv_tile < (tp->m - t_tail) * tp->min_tiles * tp->kv_tile) return 0;
  /* CTAs in ascending load order (popped off the min-heap) */
  for (int i = 0, n = grid; i < grid; i++) {
    const uint64_t top = heap[0];
    tp->order[i] = (int32_t)(top & cta_mask);
    tp->loads[top & cta_mask] = (int64_t)(top >> HEAP_CTA_BITS);
    heap[0] = heap[--n];
    heap_sift_down(heap, n, 0);
  }
  /* the lowest water level that holds the tail; at hi every piece fits on the lightest CTA alone */
  int64_t lo = tp->loads[tp->order[0]], hi = lo + tail_cost + (tp->m - t_tail) * tp->kv_tile;
  if (hi >= lpt_max) hi = lpt_max; /* above it the balance cannot pay */
  if (!tail_walk(tp, grid, t_tail, hi, 0)) return 0;
  while (lo < hi) {
    const int64_t w = lo + (hi - lo) / 2;
    if (tail_walk(tp, grid, t_tail, w, 0))
      hi = w;
    else
      lo = w + 1;
  }
  if (!tail_walk(tp, grid, t_tail, lo, 1)) return 0;
  int64_t new_max = 0;
  for (int b = 0; b < grid; b++)
    if (tp->loads[b] > new_max) new_max = tp->loads[b];
  if (new_max * 100 > lpt_max * 99) return 0;
  /* keys (the order of each CTA's list): the whole items as dealt, then the pieces; or (first) the pieces
   * first, so their partial states are written while other CTAs still compute, not in a burst at the end */
  if (tp->first) {
    memmove(keys + tp->pieces, keys, (size_t)t_tail * sizeof *keys);
    for (int64_t x = 0; x < tp->pieces; x++) keys[x].index = tp->m + x;
  } else {
    for (int64_t x = 0; x < tp->pieces; x++) keys[t_tail + x].index = tp->m + x;
  }
  tp->m = t_tail + tp->pieces;
  return 1;
}

/* Items of ranges `len` split in chunks of `chunk` tokens (0: unsplit). */
static int64_t count_chunks(const prefill_item *base, int64_t n, int64_t chunk) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; i++) {
    int64_t len = base[i].kv_end - base[i].kv_begin;
    total += (chunk > 0 && len > chunk) ? ceil_div64(len, chunk) : 1;
  }
  return total;
}

kvattn_status prefill_plan_build(const prefill_config *c, const prefill_layout *l, const batch_view *bv,
                                 const int64_t *mask_offset, const float *rope_freq, const float *alibi_slopes,
                                 int32_t *lists, void *scratch, prefill_plan_out *out) {
  memset(out, 0, sizeof *out);
  const int G = c->group_size;
  char *sp = scratch;
  prefill_item *base = (prefill_item *)sp;
  sp += (size_t)l->max_items * sizeof(prefill_item);
  prefill_item *exp = (prefill_item *)sp;
  sp += (size_t)l->max_items * sizeof(prefill_item);
  sort_key *keys = (sort_key *)sp;
  sp += (size_t)l->max_items * sizeof(sort_key);
  sort_key *keys_tmp = (sort_key *)sp;
  sp += (size_t)l->max_items * sizeof(sort_key);
  /* the 8-byte heap goes before the 4-byte arrays, so an odd item count cannot misalign it */
  uint64_t *heap = (uint64_t *)sp;
  sp += (size_t)(grid_max(c) + 1) * sizeof(uint64_t);
  int64_t *loads = (int64_t *)sp;
  sp += (size_t)(grid_max(c) + 1) * sizeof(int64_t);
  int32_t *owner = (int32_t *)sp;
  sp += (size_t)l->max_items * sizeof(int32_t);
  int32_t *order = (int32_t *)sp;
  sp += (size_t)(grid_max(c) + 1) * sizeof(int32_t);
  int32_t *fill = (int32_t *)sp;

  memset(lists, 0, (size_t)PREFILL_META_WORDS * 4);
  float *rope = (float *)(lists + l->rope_off);
  for (int i = 0; i < 128; i++) rope[i] = (rope_freq && i < c->head_dim / 2) ? rope_freq[i] : 0.f;
  float *slopes = (float *)(lists + l->alibi_off);
  for (int h = 0; h < c->num_qo_heads; h++) slopes[h] = alibi_slopes ? alibi_slopes[h] : 0.f;

  int64_t next_item = 0; /* items written so far (all kinds) */
  int64_t merges = 0;
  prefill_merge_entry *merge = (prefill_merge_entry *)(lists + l->merge_off);
  prefill_item *items = (prefill_item *)(lists + l->items_off);

  for (int kind = 0; kind < PREFILL_TILE_KINDS; kind++) {
    const int T = prefill_tile_rows[kind];
    const int grid = c->grid[kind];
    /* ---- base tiles of this kind */
    int64_t n = 0;
    for (int64_t i = 0; i < bv->batch; i++) {
      const int64_t qo_len = bv_qo_len(bv, i), kv_len = bv_kv_len(bv, i);
      if (qo_len <= 0) continue;
      const int64_t packed = qo_len * G;
      if (prefill_tile_kind(packed) != kind) continue;
      const int64_t q_pos_base = bv->bsr_positions ? bv->qo_indptr[i] : kv_len - qo_len;
      const int64_t mask_first = mask_offset ? mask_offset[i] : 0;
      for (int64_t row = 0; row < packed; row += T) {
        const int64_t r0 = row / G, r1 = (row + T - 1) / G < qo_len - 1 ? (row + T - 1) / G : qo_len - 1;
        int64_t begin = 0, end = kv_len;
        if (!bv->bsr_positions) {
          if (c->causal && q_pos_base + r1 + 1 < end) end = q_pos_base + r1 + 1;
          if (c->window_left >= 0 && q_pos_base + r0 - c->window_left > begin) begin = q_pos_base + r0 - c->window_left;
          if (end < 0) end = 0;
          if (begin > end) begin = end;
        }
        for (int h = 0; h < c->num_kv_heads; h++) {
          RETURN_IF(n >= l->max_items, KVATTN_ERROR_BOUNDS_EXCEEDED,
                    "kvattn_plan: the batch needs more than %lld prefill work items (bounds)", (long long)l->max_items);
          prefill_item *it = &base[n++];
          memset(it, 0, sizeof *it);
          it->q_start = bv->qo_indptr[i];
          it->qo_len = (int32_t)qo_len;
          it->kv_len = (int32_t)kv_len;
          it->kv_entry = bv->kv_indptr[i];
          it->kv_head = h;
          it->row_start = (int32_t)row;
          it->kv_begin = (int32_t)begin;
          it->kv_end = (int32_t)end;
          it->part = -1;
          it->q_pos_base = (int32_t)q_pos_base;
          it->mask_lo = (int32_t)(uint32_t)(mask_first & 0xffffffffu);
          it->mask_hi = (int32_t)(mask_first >> 32);
        }
      }
    }

    /* ---- split-KV chunk size */
    int64_t chunk = 0, max_len = 0;
    for (int64_t t = 0; t < n; t++)
      if (base[t].kv_end - base[t].kv_begin > max_len) max_len = base[t].kv_end - base[t].kv_begin;
    if (!c->disable_split && n > 0 && n < grid) {
      const int64_t kt = c->kv_tile;
      int64_t lo = ceil_div64(c->min_chunk > kt ? c->min_chunk : kt, kt); /* in kv_tile units */
      int64_t hi = ceil_div64(max_len, kt);
      if (hi > lo) {
        while (lo < hi) { /* the smallest chunk whose items fit the grid */
          int64_t mid = (lo + hi) / 2;
          if (count_chunks(base, n, mid * kt) <= grid)
            hi = mid;
          else
            lo = mid + 1;
        }
        if (lo * kt < max_len) chunk = lo * kt;
      }
    }

    /* ---- expand into items (chunks), partial rows and merge entries */
    int64_t m = 0, part_used = 0;
    for (int64_t t = 0; t < n; t++) {
      const prefill_item *b = &base[t];
      const int64_t len = b->kv_end - b->kv_begin;
      if (chunk == 0 || len <= chunk) {
        exp[m++] = *b;
        continue;
      }
      const int64_t chunks = ceil_div64(len, chunk);
      RETURN_IF(l->part_base[kind] + part_used + chunks * T > l->part_base[kind] + (int64_t)grid * T ||
                    merges >= l->max_merges || m + chunks > l->max_items,
                KVATTN_ERROR_INTERNAL, "prefill plan: split budget exceeded (kind %d)", kind);
      const int64_t part = l->part_base[kind] + part_used;
      for (int64_t ch = 0; ch < chunks; ch++) {
        prefill_item *it = &exp[m++];
        *it = *b;
        it->kv_begin = (int32_t)(b->kv_begin + ch * chunk);
        it->kv_end = (int32_t)(b->kv_begin + (ch + 1) * chunk < b->kv_end ? b->kv_begin + (ch + 1) * chunk : b->kv_end);
        it->part = (int32_t)(part + ch * T);
      }
      merge_entry_of(&merge[merges++], b, part, chunks, T);
      part_used += chunks * T;
      out->split_tiles++;
    }

    /* ---- longest first onto the least loaded CTA; the fixed cost stands for Q load + epilogue */
    int64_t cost_sum = 0;
    for (int64_t t = 0; t < m; t++) {
      keys[t].cost = (int64_t)(exp[t].kv_end - exp[t].kv_begin) + 2 * c->kv_tile;
      keys[t].index = t;
      cost_sum += keys[t].cost;
    }
    /* the heap keys hold loads in 43 bits: coarsen the costs of an absurdly large batch */
    int cost_shift = 0;
    while ((cost_sum >> cost_shift) >= (1ll << 42)) cost_shift++;
    if (cost_shift)
      for (int64_t t = 0; t < m; t++) keys[t].cost = (keys[t].cost >> cost_shift) + 1;
    sort_cost_desc(keys, keys_tmp, m);
    const int64_t lpt_max = lpt_deal(keys, m, grid, heap, owner);
    if (c->balance_tail && !c->disable_split && chunk == 0 && !cost_shift && m > grid) {
      tail_plan tp = {exp, keys, owner, heap, loads, order, m, l->max_items, T, c->kv_tile,
                      c->tail_min_tiles > 0 ? c->tail_min_tiles : PREFILL_TAIL_MIN_TILES, c->tail_first,
                      l->part_base[kind], l->part_budget[kind], merge + merges, l->max_merges - merges, 0, 0, 0};
      if (tail_balance(&tp, grid, cost_sum, lpt_max)) {
        m = tp.m;
        merges += tp.merges;
        part_used = tp.part_used;
        out->split_tiles += tp.merges;
        out->balanced_tiles += tp.merges;
      }
    }
    out->part_rows_used += part_used;
    for (int b = 0; b < grid; b++) fill[b] = 0;
    for (int64_t t = 0; t < m; t++) fill[owner[keys[t].index]]++;
    /* CTA b's items are contiguous: an exclusive scan of the counts, then a scatter in LPT order */
    RETURN_IF(next_item + m > l->max_items, KVATTN_ERROR_BOUNDS_EXCEEDED,
              "kvattn_plan: the batch needs more than %lld prefill work items (bounds)", (long long)l->max_items);
    int32_t *cta_indptr = lists + l->cta_off[kind];
    int32_t acc = 0;
    for (int b = 0; b < grid; b++) {
      cta_indptr[b] = acc;
      acc += fill[b];
      fill[b] = cta_indptr[b];
    }
    cta_indptr[grid] = acc;
    prefill_item *dst = items + next_item;
    for (int64_t t = 0; t < m; t++) {
      int64_t src = keys[t].index;
      dst[fill[owner[src]]++] = exp[src];
    }
    out->items[kind] = m;
    out->items_off[kind] = l->items_off + next_item * ITEM_WORDS;
    lists[PREFILL_META_ITEMS_OFF + kind] = (int32_t)out->items_off[kind];
    next_item += m;
  }
  lists[PREFILL_META_MERGE_COUNT] = (int32_t)merges;
  out->merges = merges;
  out->copy_words = l->items_off + next_item * ITEM_WORDS;
  return KVATTN_SUCCESS;
}
