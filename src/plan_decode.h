/*
 * plan_decode.h - the host planner of batch decode (src/plan_decode.c), shared by the GPU backend
 * (src/gpu_attention.c) and its CPU-runnable tests (tests/test_plan_decode.c).
 *
 * The planner turns a lowered batch into work items for a fixed grid of CTAs. A "unit" is
 * (query row, KV head, head block): the KV range one group of query heads attends to. Units are
 * laid end to end on a line whose length is their cost (tokens + a fixed cost per item); CTA b
 * takes the stretch [b*L, (b+1)*L) of the line, where L = total / grid. A unit cut by a stretch
 * boundary becomes several pieces (split-KV), so every CTA gets the same work whatever the mix of
 * lengths: each request is chunked by its own length (a 32k request among 500-token ones is cut
 * in as many pieces as its share needs), not by one chunk size for the whole batch.
 */
#ifndef KVATTN_PLAN_DECODE_H
#define KVATTN_PLAN_DECODE_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* One work item, 32 bytes; the layout kernels/decode_paged.cu reads. */
typedef struct decode_item {
  int32_t row;        /* query row (token) in q / out */
  int32_t unit_head;  /* kv_head * head_blocks + head block */
  int32_t tok_start;  /* KV token range inside the request's sequence: [tok_start, tok_end) */
  int32_t tok_end;
  int32_t q_pos;      /* the query's position (RoPE, ALiBi) */
  int32_t page_base;  /* kv_indptr[request] */
  int32_t split;      /* -1: the item covers whole units; else the unit's split index */
  int32_t piece;      /* split >= 0: piece number inside the split (partial slot = splits[split].slot_base
                         + piece); split < 0: how many consecutive units of the row (unit_head,
                         unit_head + 1, ...) the item covers, each over [tok_start, tok_end) */
} decode_item;

typedef struct decode_split {
  int32_t pieces;     /* items the unit was cut into (>= 2) */
  int32_t slot_base;  /* first partial-state slot */
} decode_split;

/* What the planner needs to know about the attention (fixed at attention creation). */
typedef struct decode_config {
  int32_t num_qo_heads, num_kv_heads, head_dim;
  int32_t group_size;     /* qo heads per kv head */
  int32_t group_heads;    /* qo heads one item computes (<= 8) */
  int32_t head_blocks;    /* ceil(group_size / group_heads) */
  int32_t grid;           /* CTAs of the launch (fixed) */
  int32_t item_cost;      /* fixed cost of one item, in KV tokens (reduction, output, pipeline) */
  int32_t min_chunk;      /* smallest piece worth splitting off, in tokens */
  int32_t min_chunk_small;/* the same when the batch is too small to give every CTA min_chunk tokens: pieces of
                             this size spread a short batch over the whole grid (0: min_chunk throughout) */
  int32_t tile;           /* > 1: the kernel's KV tile in tokens; the planner then counts a piece as whole tiles
                             (a piece of n tokens runs ceil(n / tile) tiles), cuts pieces at whole tiles from
                             their start, and fills each CTA's stretch to within a tile rather than min_chunk
                             (pieces down to one tile). 0: the token-cost planner (min_chunk slivers). A power
                             of two (the kernels' tiles are); another value plans in tokens */
  int32_t causal, window_left;
  int32_t disable_split;  /* desc.disable_split_kv */
  int32_t fixed_split_pages; /* desc.fixed_split_size (> 0: chunks of this many pages) */
  /* bounds */
  int64_t max_batch, max_qo_tokens, max_kv_entries;
} decode_config;

/* Byte offsets of the work-list region (identical in the pinned host part and in device memory)
 * and of the partial states (device only). */
typedef struct decode_layout {
  size_t counters;      /* int32 [max_splits], zero at every upload */
  size_t splits;        /* decode_split [max_splits] */
  size_t cta_indptr;    /* int32 [grid + 1] */
  size_t rope_freq;     /* float [head_dim / 2] */
  size_t alibi;         /* float [num_qo_heads] */
  size_t items;         /* decode_item [max_items] */
  size_t worklist_bytes;/* end of the work-list region (host bytes needed) */
  size_t partial_o;     /* float [max_slots, group_heads, head_dim] */
  size_t partial_lse;   /* float [max_slots, group_heads] */
  size_t device_bytes;  /* end of the decode region in device memory */
  int64_t max_items, max_splits, max_slots;
} decode_layout;

/* The config's fields derived from a resolved desc, bounds and the launch grid. */
void decode_config_init(decode_config *c, const kvattn_attention_desc *desc, const kvattn_bounds *bounds, int grid);
void decode_layout_init(decode_layout *l, const decode_config *c);
/* Cut the group into head blocks of at most max_group_heads query heads (call before layout_init). */
void decode_config_group_heads(decode_config *c, int max_group_heads);

typedef struct decode_plan_stats {
  int64_t items, splits, slots, units;
  size_t upload_bytes;  /* bytes of the region to copy to the device (a prefix of it) */
  int64_t max_cta_cost, total_cost; /* balance: the heaviest CTA's cost and the sum */
} decode_plan_stats;

/* Write the work lists of the paged batch `bv` into `host` (layout `l`), leaving the rope/alibi
 * tables alone. Each query row is planned with its own causal/window range (the GPU backend sends
 * only single-row requests here; several rows work too, except with fixed_split_pages). Fails with
 * INTERNAL if a bound the layout promised is exceeded, UNSUPPORTED for a request over 2^31-1 tokens. */
kvattn_status plan_decode(const decode_config *c, const decode_layout *l, const batch_view *bv, void *host,
                          decode_plan_stats *stats);

#endif /* KVATTN_PLAN_DECODE_H */
