/*
 * plan_prefill.h - the prefill family's host planner (src/plan_prefill.c): pure C, no GPU, so the
 * CPU tests can fuzz it (tests/test_plan_prefill.c).
 *
 * The plan turns a batch_view into work lists for three kernels, one per query-tile size
 * (16, 64, 128 packed rows; a request's size is chosen from its packed query length), each run on
 * a fixed grid. The lists live in one int32 "list region" whose layout depends only on the
 * attention's bounds (prefill_layout), so device addresses never change between plans and a
 * captured graph stays valid; the host fills the region's pinned mirror and one async copy sends
 * its used prefix.
 */
#ifndef KVATTN_PLAN_PREFILL_H
#define KVATTN_PLAN_PREFILL_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#define PREFILL_TILE_KINDS 3
static const int prefill_tile_rows[PREFILL_TILE_KINDS] = {16, 64, 128};

/* One work item, 64 bytes; the kernel's struct prefill_item (kernels/prefill.cu) mirrors it. */
typedef struct prefill_item {
  int32_t q_start;    /* first query token of the request (global row of q/out) */
  int32_t qo_len;
  int32_t kv_len;
  int32_t kv_entry;   /* kv_indptr[request] */
  int32_t kv_head;
  int32_t row_start;  /* first packed row (token * group + head in group) of the tile */
  int32_t kv_begin;   /* the KV token chunk [kv_begin, kv_end) */
  int32_t kv_end;
  int32_t part;       /* -1: writes out; else its first partial-state row */
  int32_t q_pos_base; /* q_pos of token r = q_pos_base + r */
  int32_t mask_lo;    /* custom mask: first bit of the request, int64 split in two words */
  int32_t mask_hi;
  int32_t pad[4];
} prefill_item;

/* The chunks of one split tile: partial rows [part, part + chunks * rows), chunk c of local row
 * x at part + c * rows + x. 32 bytes; mirrors struct prefill_merge_entry. */
typedef struct prefill_merge_entry {
  int32_t part;
  int32_t chunks;
  int32_t q_start;
  int32_t qo_len;
  int32_t kv_head;
  int32_t row_start;
  int32_t rows;
  int32_t pad;
} prefill_merge_entry;

/* The tail balance cuts only tails whose items average this many KV tiles or more: on the H200, pieces
 * of ~8 tiles (16 x 1024) cost more in partial states and the merge than they balanced (docs/perf.md). */
#define PREFILL_TAIL_MIN_TILES 32

/* What the planner needs to know about the attention (fixed at creation). */
typedef struct prefill_config {
  int32_t group_size;     /* qo_heads / kv_heads */
  int32_t num_kv_heads;
  int32_t num_qo_heads;
  int32_t head_dim;
  int32_t kv_tile;        /* KV tokens per kernel iteration (chunks are multiples of it) */
  int32_t grid[PREFILL_TILE_KINDS]; /* CTAs of each tile kernel (fixed) */
  int32_t causal;
  int32_t window_left;    /* -1: off */
  int32_t disable_split;
  int32_t min_chunk;      /* smallest split chunk in tokens */
  int32_t balance_tail;   /* 1: cut the items that do not fit evenly into the grid into KV pieces (see plan_prefill.c) */
  int32_t tail_min_tiles; /* ... when the tail's items average >= this many KV tiles (0: PREFILL_TAIL_MIN_TILES) */
  int32_t tail_first;     /* 1: a CTA runs its tail pieces before its whole items */
  /* bounds */
  int64_t max_batch, max_qo_tokens, max_kv_entries;
} prefill_config;

/* Word offsets (int32 units) of the list region, and the bytes of the partial states. */
enum { PREFILL_META_WORDS = 64 };
/* meta words: merge entries of the current plan; word offset of each tile kind's items */
enum { PREFILL_META_MERGE_COUNT = 0, PREFILL_META_ITEMS_OFF = 1 };
typedef struct prefill_layout {
  int64_t rope_off;        /* float [128] */
  int64_t alibi_off;       /* float [num_qo_heads] */
  int64_t cta_off[PREFILL_TILE_KINDS]; /* int32 [grid + 1] */
  int64_t merge_off;       /* prefill_merge_entry [max_merges] */
  int64_t items_off;       /* prefill_item [max_items], the kinds one after another */
  int64_t list_words;      /* the whole region */
  int64_t max_items, max_merges;
  int64_t part_base[PREFILL_TILE_KINDS]; /* first partial row of each kind's budget */
  int64_t part_budget[PREFILL_TILE_KINDS]; /* its rows: 2 x grid x tile rows */
  int64_t part_rows;       /* rows of partial states */
  size_t scratch_bytes;    /* host scratch the planner needs */
} prefill_layout;

/* The layout for these bounds. INVALID_ARGUMENT / BOUNDS_EXCEEDED when they cannot be planned
 * (counts past int32). */
kvattn_status prefill_layout_compute(const prefill_config *c, prefill_layout *l);

/* What one plan produced. */
typedef struct prefill_plan_out {
  int64_t items[PREFILL_TILE_KINDS];     /* items of each kind */
  int64_t items_off[PREFILL_TILE_KINDS]; /* word offset of each kind's first item */
  int64_t merges;
  int64_t split_tiles;
  int64_t balanced_tiles;                /* of those, split by the tail balance */
  int64_t part_rows_used;
  int64_t copy_words;                    /* the used prefix of the list region */
} prefill_plan_out;

/* Build the work lists of `bv` into `lists` (host, l->list_words words) using `scratch`
 * (l->scratch_bytes). mask_offset: [batch] first bit of each request's custom mask, or NULL.
 * rope_freq [head_dim/2] and alibi_slopes [num_qo_heads] (either may be NULL) are copied in. */
kvattn_status prefill_plan_build(const prefill_config *c, const prefill_layout *l, const batch_view *bv,
                                 const int64_t *mask_offset, const float *rope_freq, const float *alibi_slopes,
                                 int32_t *lists, void *scratch, prefill_plan_out *out);

/* The tile kind (0, 1, 2) of a request with `packed` = qo_len * group rows. */
static inline int prefill_tile_kind(int64_t packed) { return packed <= 16 ? 0 : packed <= 64 ? 1 : 2; }

/* The kernels' launch parameters: host mirror of kernels/prefill_common.cuh's struct prefill_params
 * (same order, natural alignment). Filled by gpu_prefill_run. */
typedef struct prefill_params {
  const void *q;
  int64_t q_stride_tok, q_stride_head;
  const void *k, *v;
  int64_t k_stride_page, k_stride_slot, k_stride_head;
  int64_t v_stride_page, v_stride_slot, v_stride_head;
  const int32_t *indices;
  const uint8_t *mask;
  void *out;
  int64_t o_stride_tok, o_stride_head;
  float *lse;
  int64_t lse_stride_tok, lse_stride_head;
  const int32_t *lists;
  int32_t cta_indptr_off;
  int32_t items_off_word;
  int32_t merge_off;
  int32_t merge_count_word;
  const float *rope_freq;
  const float *alibi_slopes;
  float *part_o;
  float *part_lse;
  float sm_scale;
  float soft_cap;
  int32_t window_left;
  int32_t page_size;
  int32_t page_shift;
  int32_t bsr;
  long long kv_token_limit;
  int32_t kv_same_offsets;
  int32_t contig;
  int32_t k_row_bytes, v_row_bytes;
} prefill_params;

#endif /* KVATTN_PLAN_PREFILL_H */
