/*
 * plan_decode.c - the decode scheduler: balanced work lists for a fixed grid (see plan_decode.h).
 *
 * Why a line and not one chunk size: FlashInfer searches one KV chunk size for the whole batch, so
 * in a heavy-tailed batch the long request's chunks and the short requests' single pieces differ
 * in cost and the grid finishes with the longest CTA (we measured 2.05 TB/s vs 2.87 for a uniform
 * batch). Cutting the cost line at equal stretches gives every CTA the same number of tokens to
 * within one item's fixed cost, however the lengths are mixed, in one O(units + grid) pass.
 */
#include "plan_decode.h"

#include <string.h>

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

void decode_config_init(decode_config *c, const kvattn_attention_desc *d, const kvattn_bounds *b, int grid) {
  memset(c, 0, sizeof *c);
  c->num_qo_heads = d->num_qo_heads;
  c->num_kv_heads = d->num_kv_heads;
  c->head_dim = d->head_dim;
  c->group_size = d->num_qo_heads / (d->num_kv_heads > 0 ? d->num_kv_heads : 1);
  /* At most 8 query heads per item (the CUDA-core path's registers); a larger group is cut in equal
   * blocks. The tensor-core path takes 16 (decode_config_group_heads). */
  decode_config_group_heads(c, 8);
  c->grid = grid > 0 ? grid : 1;
  c->item_cost = 32;
  c->min_chunk = 256;
  c->min_chunk_small = 128; /* b1 x 4096 on the H200: 13.7 -> 12.8 us (256 CTAs of 2 tiles, not 128 of 4) */
  c->causal = d->causal;
  c->window_left = d->window_left;
  c->disable_split = d->disable_split_kv;
  c->fixed_split_pages = d->fixed_split_size;
  c->max_batch = b->max_batch;
  c->max_qo_tokens = b->max_qo_tokens;
  c->max_kv_entries = b->max_kv_entries;
}

void decode_config_group_heads(decode_config *c, int max_group_heads) {
  if (max_group_heads < 1) max_group_heads = 1;
  c->head_blocks = (c->group_size + max_group_heads - 1) / max_group_heads;
  if (c->head_blocks < 1) c->head_blocks = 1;
  c->group_heads = (c->group_size + c->head_blocks - 1) / c->head_blocks;
}

void decode_layout_init(decode_layout *l, const decode_config *c) {
  memset(l, 0, sizeof *l);
  const int64_t heads = (int64_t)c->num_kv_heads * c->head_blocks;
  const int64_t units = max64(c->max_qo_tokens, 0) * heads;
  if (c->fixed_split_pages > 0) {
    /* every piece is whole: a request of p pages has at most ceil(p / F) <= p / F + 1 pieces per
     * head (the planner takes one query row per request in this mode) */
    int64_t pieces = (max64(c->max_qo_tokens, 0) + (c->max_kv_entries + c->fixed_split_pages - 1) / c->fixed_split_pages) * heads;
    l->max_items = pieces;
    l->max_splits = units;
    l->max_slots = pieces;
  } else if (c->disable_split) {
    l->max_items = units;
    l->max_splits = 0;
    l->max_slots = 0;
  } else {
    /* each of the grid-1 CTA boundaries cuts at most one unit once */
    l->max_items = units + c->grid;
    l->max_splits = c->grid;
    l->max_slots = 2 * (int64_t)c->grid;
  }
  size_t off = 0;
  l->counters = off;
  off = align_up(off + (size_t)l->max_splits * sizeof(int32_t), 16);
  l->splits = off;
  off = align_up(off + (size_t)l->max_splits * sizeof(decode_split), 16);
  l->cta_indptr = off;
  off = align_up(off + ((size_t)c->grid + 1) * sizeof(int32_t), 16);
  l->rope_freq = off;
  off = align_up(off + (size_t)(c->head_dim / 2 > 0 ? c->head_dim / 2 : 1) * sizeof(float), 16);
  l->alibi = off;
  off = align_up(off + (size_t)(c->num_qo_heads > 0 ? c->num_qo_heads : 1) * sizeof(float), 16);
  l->items = off;
  off = align_up(off + (size_t)l->max_items * sizeof(decode_item), 256);
  l->worklist_bytes = off;
  l->partial_o = off;
  off = align_up(off + (size_t)l->max_slots * c->group_heads * c->head_dim * sizeof(float), 256);
  l->partial_lse = off;
  off = align_up(off + (size_t)l->max_slots * c->group_heads * sizeof(float), 256);
  l->device_bytes = off;
}

/* The visible KV range of query row r of request i: causal and the sliding window clip it here, so
 * the kernel only masks by the range's end. */
static void row_range(const decode_config *c, int64_t kv_len, int64_t qo_len, int64_t r, int64_t *lo, int64_t *hi,
                      int64_t *q_pos) {
  int64_t qp = kv_len - qo_len + r;
  int64_t a = 0, b = kv_len;
  if (c->causal) b = min64(b, qp + 1);
  if (c->window_left >= 0) a = max64(a, qp - c->window_left);
  if (b < 0) b = 0;
  if (a > b) a = b;
  *lo = a;
  *hi = b;
  *q_pos = qp;
}

/* What a piece of n tokens costs on the line: its tokens, or (tile mode) the tokens of its whole tiles:
 * round = tile - 1 for tiles of a power of two (the kernels' are), 0 in token mode. A mask, not a 64-bit
 * division: that was a sixth of plan time in tile mode. */
static inline int64_t tok_cost(int64_t round, int64_t n) { return (n + round) & ~round; }

typedef struct walker {
  const decode_config *c;
  int64_t tile;  /* > 1: tile mode (split-free planning only), a power of two */
  int64_t round; /* tile - 1 in tile mode, else 0 (tok_cost) */
  const decode_layout *l;
  decode_item *items;
  decode_split *splits;
  int32_t *cta_indptr;
  int64_t n_items, n_splits, n_slots;
  int64_t b, cap, L, cta_cost, max_cta_cost;
  int64_t consumed; /* cost laid on the line so far */
} walker;

static inline __attribute__((always_inline)) void close_cta(walker *w) {
  if (w->b >= w->c->grid - 1) return; /* the last CTA takes whatever is left */
  w->max_cta_cost = max64(w->max_cta_cost, w->cta_cost);
  w->cta_indptr[++w->b] = (int32_t)w->n_items;
  /* CTA b's stretch ends at (b+1) L on the line: what a CTA left unfilled (or overfilled) is
   * given to (taken from) the next, so slack never piles up on the last CTA */
  w->cap = (w->b + 1) * w->L - w->consumed;
  w->cta_cost = 0;
}

static inline __attribute__((always_inline)) kvattn_status emit(walker *w, int32_t row, int32_t head, int64_t a, int64_t b, int64_t q_pos, int32_t page_base) {
  if (w->n_items >= w->l->max_items)
    return set_error(KVATTN_ERROR_INTERNAL, "plan_decode: %lld items exceed the workspace's %lld (please report)",
                     (long long)w->n_items + 1, (long long)w->l->max_items);
  decode_item *it = &w->items[w->n_items++];
  it->row = row;
  it->unit_head = head;
  it->tok_start = (int32_t)a;
  it->tok_end = (int32_t)b;
  it->q_pos = (int32_t)q_pos;
  it->page_base = page_base;
  it->split = -1;
  it->piece = 1;
  int64_t cost = tok_cost(w->round, b - a) + w->c->item_cost;
  w->cap -= cost;
  w->cta_cost += cost;
  w->consumed += cost;
  return KVATTN_SUCCESS;
}

/* A whole unit [lo, hi) of head h that follows, in the same CTA, a whole-unit item of the same row
 * ending at head h - 1 joins that item instead of taking its own: a batch of many short requests
 * then needs an item per request and CTA rather than per head (plan time is mostly writing items). */
static inline __attribute__((always_inline)) int try_extend(walker *w, int32_t row, int32_t head, int64_t lo, int64_t hi) {
  if (w->n_items == 0 || w->n_items <= w->cta_indptr[w->b]) return 0;
  decode_item *it = &w->items[w->n_items - 1];
  if (it->row != row || it->split != -1 || it->unit_head + it->piece != head || it->tok_start != lo ||
      it->tok_end != hi)
    return 0;
  it->piece++;
  int64_t cost = tok_cost(w->round, hi - lo) + w->c->item_cost;
  w->cap -= cost;
  w->cta_cost += cost;
  w->consumed += cost;
  return 1;
}

/* Items [first, n_items) are the pieces of one unit: give them a split when there are several. */
static inline __attribute__((always_inline)) kvattn_status finish_unit(walker *w, int64_t first) {
  int64_t pieces = w->n_items - first;
  if (pieces <= 1) return KVATTN_SUCCESS;
  if (w->n_splits >= w->l->max_splits || w->n_slots + pieces > w->l->max_slots)
    return set_error(KVATTN_ERROR_INTERNAL, "plan_decode: split states exceed the workspace (splits %lld/%lld, slots %lld/%lld; please report)",
                     (long long)w->n_splits + 1, (long long)w->l->max_splits, (long long)(w->n_slots + pieces),
                     (long long)w->l->max_slots);
  int32_t s = (int32_t)w->n_splits++;
  w->splits[s].pieces = (int32_t)pieces;
  w->splits[s].slot_base = (int32_t)w->n_slots;
  w->n_slots += pieces;
  for (int64_t k = 0; k < pieces; k++) {
    w->items[first + k].split = s;
    w->items[first + k].piece = (int32_t)k;
  }
  return KVATTN_SUCCESS;
}

kvattn_status plan_decode(const decode_config *c, const decode_layout *l, const batch_view *bv, void *host,
                          decode_plan_stats *stats) {
  char *base = (char *)host;
  walker w;
  memset(&w, 0, sizeof w);
  w.c = c;
  w.l = l;
  w.items = (decode_item *)(base + l->items);
  w.splits = (decode_split *)(base + l->splits);
  w.cta_indptr = (int32_t *)(base + l->cta_indptr);
  const int32_t heads = c->num_kv_heads * c->head_blocks;
  const int64_t fixed_tokens = c->fixed_split_pages > 0 ? (int64_t)c->fixed_split_pages * bv->page_size : 0;

  const int split_free = !c->disable_split && fixed_tokens == 0;
  /* tile mode: costs in whole tiles, cuts at whole tiles, stretches filled to within a tile (tiles of
   * a power of two, as the kernels' are; any other tile plans in tokens, which is as correct) */
  w.tile = split_free && c->tile > 1 && (c->tile & (c->tile - 1)) == 0 ? c->tile : 0;
  w.round = w.tile ? w.tile - 1 : 0;

  /* pass 1: the line's length */
  int64_t total = 0, units = 0;
  for (int32_t i = 0; i < bv->batch; i++) {
    const int64_t kv_len = bv_kv_len(bv, i), qo_len = bv_qo_len(bv, i);
    RETURN_IF(fixed_tokens > 0 && qo_len > 1, KVATTN_ERROR_UNSUPPORTED,
              "kvattn_plan: fixed_split_size with %lld query rows in request %d: the decode planner takes one row "
              "per request in that mode", (long long)qo_len, i);
    RETURN_IF(kv_len > INT32_MAX, KVATTN_ERROR_UNSUPPORTED,
              "kvattn_plan: request %d has %lld KV tokens; the GPU decode kernels take at most 2^31-1", i, (long long)kv_len);
    for (int64_t r = 0; r < qo_len; r++) {
      int64_t lo, hi, qp;
      row_range(c, kv_len, qo_len, r, &lo, &hi, &qp);
      int64_t pieces = 1;
      if (fixed_tokens > 0 && hi > lo) pieces = (hi - 1) / fixed_tokens - lo / fixed_tokens + 1;
      total += (tok_cost(w.round, hi - lo) + c->item_cost * pieces) * heads;
      units += heads;
    }
  }
  if (units > (int64_t)c->max_qo_tokens * heads)
    return set_error(KVATTN_ERROR_INTERNAL, "plan_decode: %lld units exceed the bounds (please report)", (long long)units);
  /* each CTA boundary may cut a unit once more, adding one item's fixed cost to the line */
  const int64_t line = total + (split_free ? (int64_t)(c->grid - 1) * c->item_cost : 0);
  w.L = max64(1, (line + c->grid - 1) / c->grid);
  w.cap = w.L;
  /* smallest piece: min_chunk, or min_chunk_small when a CTA's stretch cannot hold min_chunk tokens */
  int64_t mc = c->min_chunk;
  if (c->min_chunk_small > 0 && c->min_chunk_small < mc && w.L - c->item_cost < mc) mc = c->min_chunk_small;
  /* the smallest piece a cut may leave on either side, and the overfill a CTA may take to avoid a cut:
   * min_chunk and min_chunk/2; in tile mode one tile and none. A CTA stretch then ends within a tile of
   * its target, so no CTA carries (up to min_chunk + item_cost tokens of) its predecessor's underfill:
   * b16 x 4096 on 264 CTAs, heaviest CTA 36 -> 32 tiles (31 on average). */
  const int64_t cut_min = w.tile ? (mc < w.tile ? mc : w.tile) : mc, overfill = w.tile ? 0 : mc / 2;
  w.cta_indptr[0] = 0;

  /* pass 2: walk the line */
  for (int32_t i = 0; i < bv->batch; i++) {
    const int64_t kv_len = bv_kv_len(bv, i), qo_len = bv_qo_len(bv, i);
    const int32_t page_base = bv->kv_indptr[i];
    for (int64_t r = 0; r < qo_len; r++) {
      int64_t lo, hi, qp;
      row_range(c, kv_len, qo_len, r, &lo, &hi, &qp);
      const int32_t row = (int32_t)(bv->qo_indptr[i] + r);
      for (int32_t h = 0; h < heads; h++) {
        const int64_t first = w.n_items;
        int64_t pos = lo;
        if (split_free) {
          /* the run of this row's units that go whole into the current CTA, in O(1): the per-unit
           * rule below ("the rest fits, overfilling by at most min_chunk/2; a full CTA closes")
           * applied k times at once */
          const int64_t n = tok_cost(w.round, hi - lo), uc = n + c->item_cost, half = overfill;
          int64_t avail0 = w.cap - c->item_cost;
          if (w.cta_cost == 0 && avail0 < mc) avail0 = mc;
          int64_t k = 0;
          if (w.b >= c->grid - 1) {
            k = heads - h;
          } else if (n <= avail0 + half) {
            /* one more unit fits while the room left is > 0 and >= n + item_cost - half: one compare
             * per unit (a few beat two 64-bit divisions: a row has at most `heads` units) */
            const int64_t need = max64(1, n + c->item_cost - half), kmax = heads - h;
            int64_t cap = w.cap - uc;
            k = 1;
            while (k < kmax && cap >= need) {
              cap -= uc;
              k++;
            }
          }
          if (k > 0) {
            /* one item for the run (joining the previous item when it ends at head h - 1) */
            if (!try_extend(&w, row, h, lo, hi)) TRY(emit(&w, row, h, lo, hi, qp, page_base));
            w.items[w.n_items - 1].piece += (int32_t)(k - 1);
            const int64_t more = (k - 1) * uc;
            w.cap -= more;
            w.cta_cost += more;
            w.consumed += more;
            if (w.cap <= 0) close_cta(&w);
            h += (int32_t)(k - 1); /* and the loop's h++ */
            continue;
          }
        }
        if (!split_free) {
          /* whole pieces (one, or the fixed chunks), next-fit: a CTA closes once it is full */
          const int whole = fixed_tokens == 0 || hi <= lo || (hi - 1) / fixed_tokens == lo / fixed_tokens;
          if (whole && try_extend(&w, row, h, lo, hi)) {
            if (w.cap <= 0) close_cta(&w);
            continue;
          }
          do {
            int64_t end = hi;
            if (fixed_tokens > 0 && hi > lo) end = min64(hi, (pos / fixed_tokens + 1) * fixed_tokens);
            TRY(emit(&w, row, h, pos, end, qp, page_base));
            pos = end;
            if (w.cap <= 0) close_cta(&w);
          } while (pos < hi);
        } else {
          for (;;) {
            const int64_t rem = hi - pos;
            int64_t avail = w.cap - c->item_cost, take;
            /* a fresh CTA always takes a piece, of at least min_chunk (when L is small) */
            if (w.cta_cost == 0 && avail < mc) avail = mc;
            if (w.b >= c->grid - 1 || tok_cost(w.round, rem) <= avail + overfill) {
              take = rem; /* the rest fits (overfilling by at most min_chunk/2; tile mode: not at all) */
            } else if (avail < cut_min) {
              close_cta(&w); /* too little room left here for a worthwhile piece */
              continue;
            } else {
              take = avail; /* cut at the stretch boundary, leaving no sliver behind */
              if (rem - take < cut_min) take = rem - cut_min;
              /* tile mode: whole tiles (the kernel runs a piece from its start in tiles) */
              if (w.tile && take >= w.tile) take &= ~w.round;
            }
            if (pos == lo && take == rem && try_extend(&w, row, h, lo, hi)) {
              pos = hi;
              if (w.cap <= 0) close_cta(&w);
              break;
            }
            TRY(emit(&w, row, h, pos, pos + take, qp, page_base));
            pos += take;
            if (pos < hi || w.cap <= 0) close_cta(&w);
            if (pos >= hi) break;
          }
        }
        TRY(finish_unit(&w, first));
      }
    }
  }
  w.max_cta_cost = max64(w.max_cta_cost, w.cta_cost);
  for (int64_t b = w.b + 1; b <= c->grid; b++) w.cta_indptr[b] = (int32_t)w.n_items;
  memset(base + l->counters, 0, (size_t)l->max_splits * sizeof(int32_t));

  if (stats) {
    stats->items = w.n_items;
    stats->splits = w.n_splits;
    stats->slots = w.n_slots;
    stats->units = units;
    stats->upload_bytes = l->items + (size_t)w.n_items * sizeof(decode_item);
    stats->max_cta_cost = w.max_cta_cost;
    stats->total_cost = total;
  }
  return KVATTN_SUCCESS;
}
