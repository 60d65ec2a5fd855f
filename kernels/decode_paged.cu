/*
 * decode_paged.cu - batch decode over a paged KV cache: the CUDA-core path, and (DECODE_TC=1) the
 * tensor-core path that packs a GQA group's query heads into the rows of mma.sync m16n8k16.
 *
 * One launch, a fixed grid (a multiple of the SM count, chosen at attention creation): CTA b runs
 * the work items [cta_indptr[b], cta_indptr[b+1]) that the host planner (src/plan_decode.c) wrote.
 * An item is (query row, KV head, head block, KV token range [tok_start, tok_end)); the group's
 * query heads of that block are computed together so each K/V byte is read once per group.
 *
 * The CTA streams its items as one sequence of KV tiles through a STAGES-deep cp.async ring, so the
 * loads of the next item are in flight while the current one finishes (no pipeline drain between
 * items). The thread that loads a 16-byte chunk of K or V is the thread that consumes it, so the
 * ring needs no barrier for K/V; barriers appear only at item boundaries (the query and the
 * cross-group reduction pass through shared memory). The tensor-core path reads tiles across warps
 * (ldmatrix), so it takes one barrier per tile.
 *
 * A request whose KV is split over several items (split-KV) writes each piece's (o, lse) to the
 * workspace; the CTA that finishes the last piece (an atomic counter per split) merges them exactly
 * and resets the counter, so one launch does everything and a captured graph can replay it.
 *
 * Specialization (-D):
 *   DECODE_EARLY_PREFETCH (tiles prefetched into L2 before the wait: prefetch_early),
 *   HEAD_DIM 64|128|256, GROUP_SIZE (query heads per KV head), GROUP_HEADS (query heads per item,
 *   <= 8), HEAD_BLOCKS (ceil(GROUP_SIZE / GROUP_HEADS)), Q_DTYPE, KV_DTYPE, O_DTYPE (KV_F16|KV_BF16),
 *   STAGES (>= 2), NUM_WARPS, variant hooks SOFT_CAP, ALIBI, ROPE (0|1).
 *
 * Math: scores in the log2 domain (s * log2 e) so exp is one ex2; lse is written in natural log.
 * Positions past a range's end are zero-filled by cp.async (never read), so NaN garbage in a page's
 * unused tail can not reach the accumulators, and their scores are -inf.
 */
#include "common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 1
#endif
#ifndef GROUP_HEADS
#define GROUP_HEADS GROUP_SIZE
#endif
#ifndef HEAD_BLOCKS
#define HEAD_BLOCKS 1
#endif
#ifndef Q_DTYPE
#define Q_DTYPE KV_BF16
#endif
#ifndef KV_DTYPE
#define KV_DTYPE Q_DTYPE
#endif
#ifndef O_DTYPE
#define O_DTYPE Q_DTYPE
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef NUM_WARPS
#define NUM_WARPS 4
#endif
#ifndef SOFT_CAP
#define SOFT_CAP 0
#endif
#ifndef ALIBI
#define ALIBI 0
#endif
#ifndef ROPE
#define ROPE 0
#endif

#define NUM_THREADS (NUM_WARPS * 32)
#define VEC 8                        /* 16-bit elements per 16-byte chunk */
#define TX (HEAD_DIM / VEC)          /* lanes that share one K/V row */
#define TG (NUM_THREADS / TX)        /* token groups in the CTA (the loader's row mapping) */
#ifndef DECODE_TC
#define DECODE_TC 0
#endif
#if DECODE_TC
/* tensor-core path: each warp takes 16 tokens of a 64-token tile; the group's query heads are the
 * rows of one m16n8k16 A operand (padded to 16 rows) */
#if NUM_WARPS != 4 || HEAD_DIM > 128 || ROPE || GROUP_HEADS > 16
#error "the tensor-core decode path takes 4 warps, head_dim <= 128, no RoPE, <= 16 heads per item"
#endif
#define TPG (64 / TG)
#define NGROUPS NUM_WARPS            /* partial states merged at an item's end */
#define QROWS 16
#else
#ifndef TPG
#define TPG (GROUP_HEADS <= 4 ? 4 : 2) /* tokens per group per tile: bounded by registers */
#endif
#define NGROUPS TG
#define QROWS GROUP_HEADS
#endif
#define TILE (TG * TPG)              /* tokens per pipeline stage */
#define GH GROUP_HEADS
/* DECODE_PIPE=1 (tensor-core path): the page ids of a tile are staged in shared memory by cp.async,
 * STAGES tiles ahead of that tile's K/V copies, and a stage is refilled right after its tile is
 * consumed, so STAGES tiles (not STAGES-1) are in flight while the CTA waits. 0: the loader of the
 * CUDA-core path (ids in registers, one tile ahead), kept for A/B runs. */
#ifndef DECODE_PIPE
#define DECODE_PIPE 1
#endif
#define PIPE_IDS (DECODE_TC && DECODE_PIPE)
/* PIPE_IDS: at an item's end, refill the stage before the item's partial state is written and merged
 * (1), or after (0; A/B runs) */
#ifndef DECODE_EARLY_REFILL
#define DECODE_EARLY_REFILL 1
#endif
/* DECODE_L2_PREFETCH 0|128|256: the L2 prefetch size hint on the tensor-core loader's K/V copies (an L2
 * miss fetches that much around the sector; a thread's copy is 16 bytes of a 256-byte row). H200:
 * 128 measured 0.4-2.5% faster than none on every decode row, 256 up to 3.5% slower (docs/perf.md). */
/* DECODE_EARLY_PREFETCH n: before griddepcontrol.wait, while the kernel before it in the stream still runs,
 * the CTA asks L2 for the K/V rows of its first n tiles (prefetch_early), so its first loads after the wait
 * find them in L2 instead of DRAM. 0: no prefetch. */
#ifndef DECODE_EARLY_PREFETCH
#define DECODE_EARLY_PREFETCH 0
#endif
#ifndef DECODE_L2_PREFETCH
#define DECODE_L2_PREFETCH 128
#endif
#if DECODE_L2_PREFETCH == 256
#define DECODE_L2_HINT ".L2::256B"
#elif DECODE_L2_PREFETCH == 128
#define DECODE_L2_HINT ".L2::128B"
#else
#define DECODE_L2_HINT ""
#endif
#define ID_SLOTS (2 * STAGES)        /* id ring: a slot is rewritten only after every thread read it */
#define ID_SLOT TILE                 /* ids one tile spans: TILE for page_size 1, <= TILE/2 + 1 above */
/* split pieces whose partial states the merging CTA loads at once (registers: 5 per piece); the
 * tensor-core path has the registers for 16 (b1 x 4096 cuts each head into 32 pieces: 2 round trips) */
#ifndef MERGE_BATCH
#define MERGE_BATCH (DECODE_TC ? 16 : 8)
#endif

/* One work item: 8 int32 (32 bytes), written by the host planner. Keep in sync with
 * src/plan_decode.h (decode_item). */
struct decode_item {
  int row;        /* query row (token) index in q/out */
  int unit_head;  /* kv_head * HEAD_BLOCKS + head block */
  int tok_start;  /* KV token range inside the request's sequence */
  int tok_end;
  int q_pos;      /* position of the query (RoPE, ALiBi) */
  int page_base;  /* kv_indptr[request]: first entry of the request in `indices` */
  int split;      /* -1: the item covers whole units; else index into splits/counters */
  int piece;      /* split >= 0: this item's piece number inside its split; split < 0: the number of
                     consecutive units (unit_head, unit_head+1, ...) of the row it covers whole */
};

struct decode_params {
  const u16 *q;             /* [tokens, qo_heads, head_dim] */
  i64 q_stride_tok, q_stride_head;
  const u16 *k, *v;         /* [pages, page_size, kv_heads, head_dim] as strides (NHD or HND) */
  i64 k_stride_page, k_stride_tok, k_stride_head;
  i64 v_stride_page, v_stride_tok, v_stride_head;
  const int *indices;       /* [kv_entries] page ids; NULL: identity (ragged) */
  i64 indices_stride;
  u16 *out;                 /* [tokens, qo_heads, head_dim] */
  i64 o_stride_tok, o_stride_head;
  float *lse;               /* [tokens, qo_heads] float32, or NULL */
  i64 lse_stride_tok, lse_stride_head;
  const int *cta_indptr;    /* [grid + 1] */
  const struct decode_item *items;
  const int2 *splits;       /* [splits] (pieces, first partial slot) */
  int *counters;            /* [splits] zero between launches */
  float *partial_o;         /* [slots, GROUP_HEADS, head_dim] */
  float *partial_lse;       /* [slots, GROUP_HEADS] */
  const float *rope_freq;   /* [head_dim / 2] inverse frequencies / rope_scale */
  const float *alibi_slopes;/* [qo_heads] */
  float sm_scale;
  float soft_cap;
  int page_size;
  int page_shift;           /* log2(page_size) when a power of two, else -1 */
  int kv_same_strides;      /* 1: V's (page, token, head) strides equal K's: one offset serves both */
  /* the narrow loader (PIPE_IDS): narrow = 1 when the host found K's and V's page and token strides,
   * in bytes, >= 0 and < 2^31 (and page_size * token stride < 2^31) and there are page ids: a row's
   * byte offset is then one 32 x 32 -> 64-bit multiply-add. tg_pages, tg_slots: TG / page_size and TG % page_size, the step
   * from one of a thread's rows to its next (TG tokens on). */
  int narrow;
  int k_page_bytes, k_tok_bytes, v_page_bytes, v_tok_bytes;
  int tg_pages, tg_slots;
  unsigned long long *trace; /* DECODE_TRACE: [grid][TRACE_WORDS] (see trace_mark); else unused */
  i64 num_pages;            /* pages of the cache (K's first dimension): DECODE_EARLY_PREFETCH clamps ids to it */
};

/* DECODE_TRACE=1 (the host's KVATTN_DECODE_TRACE=file; a diagnostic specialization, never the
 * default): thread 0 of every CTA records when it passes each phase of the launch, so a launch's
 * latency chain can be read from the device (bench/decode_trace.py): words 0/1 %globaltimer (ns) at
 * entry and exit, 2..8 clock64 at the marks below, 9 the SM, 10 tiles, 11 items. */
#ifndef DECODE_TRACE
#define DECODE_TRACE 0
#endif
#define TRACE_WORDS 12
enum { TR_GT_ENTRY = 0, TR_GT_EXIT = 1, TR_ENTRY = 2, TR_WAITED = 3, TR_FIRST_TILE = 4, TR_LAST_ITEM_END = 5,
       TR_PUBLISHED = 6, TR_MERGED = 7, TR_EXIT = 8, TR_SMID = 9, TR_TILES = 10, TR_ITEMS = 11 };
#if DECODE_TRACE
static __device__ __forceinline__ unsigned smid() {
  unsigned r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return r;
}
static __device__ __forceinline__ void trace_put(const struct decode_params &p, int word, unsigned long long v) {
  if (threadIdx.x == 0) p.trace[(size_t)blockIdx.x * TRACE_WORDS + word] = v;
}
#endif
static __device__ __forceinline__ void trace_mark(const struct decode_params &p, int word) {
#if DECODE_TRACE
  trace_put(p, word, (unsigned long long)clock64());
#endif
}
static __device__ __forceinline__ void trace_gt(const struct decode_params &p, int word) {
#if DECODE_TRACE
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  trace_put(p, word, t);
#endif
}

/* The tile sequence of one CTA: every item contributes max(1, ceil(len / TILE)) tiles, so an
 * empty range still gets one (fully masked) tile that writes o = 0, lse = -inf. */
struct tile_iter {
  int item, item_end;
  int tok;          /* first token of the current tile */
  int first;        /* 1 if the tile is its item's first */
  struct decode_item it;
};

static __device__ __forceinline__ struct decode_item load_item(const struct decode_item *items, int i) {
  const int4 *p = (const int4 *)(items + i);
  int4 a = __ldg(p), b = __ldg(p + 1);
  struct decode_item r;
  r.row = a.x; r.unit_head = a.y; r.tok_start = a.z; r.tok_end = a.w;
  r.q_pos = b.x; r.page_base = b.y; r.split = b.z; r.piece = b.w;
  return r;
}

static __device__ __forceinline__ void iter_begin(struct tile_iter *ti, const struct decode_params &p) {
  ti->item = p.cta_indptr[blockIdx.x];
  ti->item_end = p.cta_indptr[blockIdx.x + 1];
  ti->first = 1;
  if (ti->item < ti->item_end) {
    ti->it = load_item(p.items, ti->item);
    ti->tok = ti->it.tok_start;
  }
}
static __device__ __forceinline__ int iter_valid(const struct tile_iter *ti) { return ti->item < ti->item_end; }
static __device__ __forceinline__ int iter_last(const struct tile_iter *ti) { return ti->tok + TILE >= ti->it.tok_end; }
static __device__ __forceinline__ void iter_next(struct tile_iter *ti, const struct decode_params &p) {
  if (!iter_last(ti)) {
    ti->tok += TILE;
    ti->first = 0;
    return;
  }
  ti->first = 1;
  if (ti->it.split < 0 && ti->it.piece > 1) { /* the item's next unit: the next head block / KV head */
    ti->it.unit_head++;
    ti->it.piece--;
    ti->tok = ti->it.tok_start;
    return;
  }
  ti->item++;
  if (ti->item < ti->item_end) {
    ti->it = load_item(p.items, ti->item);
    ti->tok = ti->it.tok_start;
  }
}

/* Shared memory: the K/V ring, a query slot per stage, and the cross-group reduction area.
 * Rows padded by 16 bytes: the 8 rows an ldmatrix reads fall in distinct banks. (Unpadded rows with
 * chunk c of row r at c ^ (r & 7), the prefill kernel's layout, measured 7-8% slower here on the
 * H200: docs/perf.md, 2026-12-03.) */
#define ROW_ELEMS (HEAD_DIM + 8)
#define STAGE_ELEMS (2 * TILE * ROW_ELEMS)              /* K tile then V tile */
#define QSLOT_ELEMS (QROWS * ROW_ELEMS)
#define SMEM_RING_BYTES (STAGES * (STAGE_ELEMS + QSLOT_ELEMS) * 2)
#define SMEM_RED_BYTES ((NGROUPS * GH * HEAD_DIM + 2 * NGROUPS * GH) * 4)
#if PIPE_IDS
#define SMEM_ID_BYTES (ID_SLOTS * ID_SLOT * 4)
#else
#define SMEM_ID_BYTES 0
#endif
#define SMEM_BYTES (SMEM_RING_BYTES + SMEM_RED_BYTES + SMEM_ID_BYTES)

/* Token position `pos` of an item -> (its page's index from the item's first page, slot in the page);
 * a shift for power-of-two page sizes. */
static __device__ __forceinline__ int split_pos(const struct decode_params &p, int pos, int *slot) {
  if (p.page_shift >= 0) {
    *slot = pos & (p.page_size - 1);
    return pos >> p.page_shift;
  }
  const int page_idx = pos / p.page_size;
  *slot = pos - page_idx * p.page_size;
  return page_idx;
}

#if DECODE_EARLY_PREFETCH
/* The early prefetch (DECODE_EARLY_PREFETCH): L2 prefetches of the K/V rows of the CTA's first tiles, issued
 * before pdl_wait(). The kernel before this one may still be writing the page ids or the cache (an append of
 * the new tokens, a page table update): a prefetch is only a hint and L2 is coherent, so a line it brings in
 * is updated by those writes, and after the wait every load reads the written data. A page id read here may
 * be stale, which only costs a useless prefetch: it is read through L2 (ld_cg_s32, no L1 line that a later
 * load could hit) and clamped to the cache, so no address leaves it. One thread per row of a tile. */
static __device__ void prefetch_early(const struct decode_params &p, struct tile_iter ti) {
  for (int n = 0; n < DECODE_EARLY_PREFETCH && iter_valid(&ti); n++) {
    const int kv_head = ti.it.unit_head / HEAD_BLOCKS;
    for (int r = threadIdx.x; r < TILE; r += NUM_THREADS) {
      const int pos = ti.tok + r;
      if (pos >= ti.it.tok_end) break;
      int off;
      const int page_idx = split_pos(p, pos, &off);
      i64 page = ti.it.page_base + page_idx;
      if (p.indices) page = ld_cg_s32(p.indices + page * p.indices_stride);
      if (page < 0 || page >= p.num_pages) continue;
      const u16 *k = p.k + page * p.k_stride_page + (i64)off * p.k_stride_tok + (i64)kv_head * p.k_stride_head;
      const u16 *v = p.v + page * p.v_stride_page + (i64)off * p.v_stride_tok + (i64)kv_head * p.v_stride_head;
#pragma unroll
      for (int l = 0; l < (HEAD_DIM * 2 + 127) / 128; l++) {
        prefetch_l2(k + l * 64);
        prefetch_l2(v + l * 64);
      }
    }
    iter_next(&ti, p);
  }
}
#endif

/* Issue the query rows of an item's head block into a stage's query slot (padding rows: zeros). */
static __device__ __forceinline__ void issue_q(const struct decode_params &p, const struct tile_iter *ti, u16 *sq,
                                               int kv_head) {
  const int hb = ti->it.unit_head % HEAD_BLOCKS;
  for (int i = threadIdx.x; i < QROWS * TX; i += NUM_THREADS) {
    const int g = i / TX, c = i % TX;
    const int gi = hb * GH + g; /* head inside the group */
    const int valid = g < GH && gi < GROUP_SIZE; /* padding rows are zeros */
    const u16 *src = p.q;
    if (valid)
      src = p.q + (i64)ti->it.row * p.q_stride_tok + (i64)(kv_head * GROUP_SIZE + gi) * p.q_stride_head + c * VEC;
    cp_async16(sq + g * ROW_ELEMS + c * VEC, src, valid ? 16 : 0);
  }
}

/* The page ids of this thread's rows (tg + TG * j) of a tile. Loaded one tile ahead of their use
 * (the kernel calls this right after issuing a tile, for the next one), so the dependent id -> data
 * load never stalls the pipeline; all ids of a tile are in flight together. */
static __device__ __forceinline__ void load_ids(const struct decode_params &p, const struct tile_iter *ti, i64 *page,
                                                int *off) {
  const int tg = threadIdx.x / TX;
  /* and warm L2 with the ids of the tiles after it (4 lines of 32 ids, starting 2 tiles ahead): with
   * page_size 1 every tile needs new id lines, and a miss to DRAM under full load outlasts the one
   * tile of lookahead above */
  if (threadIdx.x < 4 && p.indices) {
    const int pos = ti->tok + 2 * TILE;
    if (pos < ti->it.tok_end) {
      const int first = p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size;
      const int last = p.page_shift >= 0 ? (ti->it.tok_end - 1) >> p.page_shift : (ti->it.tok_end - 1) / p.page_size;
      const int e = first + (int)threadIdx.x * 32;
      if (e <= last) prefetch_l2(p.indices + ((i64)ti->it.page_base + e) * p.indices_stride);
    }
  }
#pragma unroll
  for (int j = 0; j < TPG; j++) {
    const int pos = ti->tok + tg + TG * j;
    const int page_idx = split_pos(p, pos, &off[j]);
    const i64 entry = (i64)ti->it.page_base + page_idx;
    page[j] = 0;
    if (pos < ti->it.tok_end) page[j] = p.indices ? (i64)__ldg(p.indices + entry * p.indices_stride) : entry;
  }
}

/* Issue the cp.async loads of one tile into ring stage `stage` (and the query, on an item's first
 * tile). Every thread loads the rows it will consume: rows tg + TG * j, chunk tx. */
static __device__ __forceinline__ void issue_tile(const struct decode_params &p, const struct tile_iter *ti,
                                                  const i64 *page, const int *off, u16 *ring, int stage) {
  const int tid = threadIdx.x, tx = tid % TX, tg = tid / TX;
  u16 *sk = ring + stage * (STAGE_ELEMS + QSLOT_ELEMS);
  u16 *sv = sk + TILE * ROW_ELEMS;
  u16 *sq = sv + TILE * ROW_ELEMS;
  const int kv_head = ti->it.unit_head / HEAD_BLOCKS;
  /* the loader's address math is most of the tile loop's instructions: hoist the head's offset and
   * share one offset between K and V when their strides agree (the usual case) */
  const i64 k_head = (i64)kv_head * p.k_stride_head + tx * VEC, v_head = (i64)kv_head * p.v_stride_head + tx * VEC;
#pragma unroll
  for (int j = 0; j < TPG; j++) {
    const int t = tg + TG * j;
    const int valid = ti->tok + t < ti->it.tok_end;
    const u16 *ksrc = p.k, *vsrc = p.v;
    if (valid) {
      const i64 ko = page[j] * p.k_stride_page + (i64)off[j] * p.k_stride_tok;
      ksrc = p.k + ko + k_head;
      vsrc = p.v + (p.kv_same_strides ? ko : page[j] * p.v_stride_page + (i64)off[j] * p.v_stride_tok) + v_head;
    }
    cp_async16(sk + t * ROW_ELEMS + tx * VEC, ksrc, valid ? 16 : 0);
    cp_async16(sv + t * ROW_ELEMS + tx * VEC, vsrc, valid ? 16 : 0);
  }
  if (ti->first) issue_q(p, ti, sq, kv_head);
}

#if PIPE_IDS
static __device__ __forceinline__ int page_of(const struct decode_params &p, int pos) {
  return p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size;
}

/* Stage the page ids one tile spans into an id slot: one 4-byte cp.async per id, consecutive lanes
 * on consecutive entries (one coalesced request per 32 ids), in the commit group of a tile STAGES
 * tiles before it, so no copy ever waits on a dependent id load. */
static __device__ __forceinline__ void issue_ids(const struct decode_params &p, const struct tile_iter *ti, int *slot) {
  if (!p.indices) return; /* identity: the loader computes the entry */
  const int end = min(ti->tok + TILE, ti->it.tok_end);
  const int first = page_of(p, ti->tok);
  const int n = end > ti->tok ? page_of(p, end - 1) - first + 1 : 0; /* <= ID_SLOT */
  const int i = threadIdx.x;
  if (i < n) cp_async4(slot + i, p.indices + ((i64)ti->it.page_base + first + i) * p.indices_stride);
}

/* issue_tile with the tile's page ids read from its id slot (shared memory, landed and made visible
 * by the barrier that follows the wait for an earlier tile). Each row's byte offset is computed once
 * and serves K and V when their strides agree. */
static __device__ __forceinline__ void issue_tile_ids(const struct decode_params &p, const struct tile_iter *ti,
                                                      const int *slot, u16 *ring, int stage) {
  const int tid = threadIdx.x, tx = tid % TX, tg = tid / TX;
  u16 *sk = ring + stage * (STAGE_ELEMS + QSLOT_ELEMS);
  u16 *sv = sk + TILE * ROW_ELEMS;
  u16 *sq = sv + TILE * ROW_ELEMS;
  const int kv_head = ti->it.unit_head / HEAD_BLOCKS;
  const char *kb = (const char *)(p.k + (i64)kv_head * p.k_stride_head + tx * VEC);
  const char *vb = (const char *)(p.v + (i64)kv_head * p.v_stride_head + tx * VEC);
  const i64 ksp = 2 * p.k_stride_page, kst = 2 * p.k_stride_tok, vsp = 2 * p.v_stride_page, vst = 2 * p.v_stride_tok;
  const int first = page_of(p, ti->tok);
#pragma unroll
  for (int j = 0; j < TPG; j++) {
    const int t = tg + TG * j;
    const int pos = ti->tok + t;
    const int valid = pos < ti->it.tok_end;
    int off;
    const int page_idx = split_pos(p, pos, &off);
    const void *ksrc = p.k, *vsrc = p.v;
    if (valid) {
      const int page = p.indices ? slot[page_idx - first] : ti->it.page_base + page_idx;
      const i64 ko = (i64)page * ksp + (i64)off * kst;
      ksrc = kb + ko;
      vsrc = vb + (p.kv_same_strides ? ko : (i64)page * vsp + (i64)off * vst);
    }
    cp_async16(sk + t * ROW_ELEMS + tx * VEC, ksrc, valid ? 16 : 0);
    cp_async16(sv + t * ROW_ELEMS + tx * VEC, vsrc, valid ? 16 : 0);
  }
  if (ti->first) issue_q(p, ti, sq, kv_head);
}

/* issue_tile_ids with fewer instructions per 16-byte copy (p.narrow): (page, slot) of a thread's first
 * row from one split, then stepped by (tg_pages, tg_slots) per row instead of a shift or a division
 * per row; each row's K and V byte offsets are one 32 x 32 -> 64-bit multiply-add each, on 32-bit
 * strides, instead of 64 x 64-bit products for both and a select. */
/* A 16-byte copy whose zero fill is a predicate (PTX ignore-src) rather than a source size: the
 * predicate goes to LDGSTS as it is. */
static __device__ __forceinline__ void decode_cp16_zfill(u32 smem_dst, const void *gmem_src, int valid) {
  asm volatile("{\n .reg .pred ig;\n setp.eq.u32 ig, %2, 0;\n cp.async.cg.shared.global" DECODE_L2_HINT
               " [%0], [%1], 16, ig;\n}\n" ::"r"(smem_dst),
               "l"(gmem_src), "r"((u32)valid)
               : "memory");
}

static __device__ __forceinline__ void issue_tile_narrow(const struct decode_params &p, const struct tile_iter *ti,
                                                         const int *slot, u16 *ring, int stage) {
  const int tid = threadIdx.x, tx = tid % TX, tg = tid / TX;
  const u32 sk = smem_addr(ring + stage * (STAGE_ELEMS + QSLOT_ELEMS) + tg * ROW_ELEMS + tx * VEC);
  const u32 sv = sk + TILE * ROW_ELEMS * 2;
  const int kv_head = ti->it.unit_head / HEAD_BLOCKS;
  const char *kb = (const char *)(p.k + (i64)kv_head * p.k_stride_head + tx * VEC);
  const char *vb = (const char *)(p.v + (i64)kv_head * p.v_stride_head + tx * VEC);
  const int left = ti->it.tok_end - ti->tok - tg; /* row j is valid while TG * j < left */
  int off;
  int page_idx = split_pos(p, ti->tok + tg, &off);
  const int first = page_of(p, ti->tok); /* p.narrow implies p.indices */
#pragma unroll
  for (int j = 0; j < TPG; j++) {
    const int valid = TG * j < left;
    /* a row past the range's end copies 0 bytes: its address (page 0) is never read */
    const unsigned page = valid ? (unsigned)slot[page_idx - first] : 0u;
    const char *ksrc = kb + ((unsigned long long)page * (unsigned)p.k_page_bytes + (unsigned)(off * p.k_tok_bytes));
    const char *vsrc = vb + ((unsigned long long)page * (unsigned)p.v_page_bytes + (unsigned)(off * p.v_tok_bytes));
    decode_cp16_zfill(sk + TG * j * ROW_ELEMS * 2, ksrc, valid);
    decode_cp16_zfill(sv + TG * j * ROW_ELEMS * 2, vsrc, valid);
    off += p.tg_slots;
    page_idx += p.tg_pages;
    if (off >= p.page_size) {
      off -= p.page_size;
      page_idx++;
    }
  }
  if (ti->first) issue_q(p, ti, ring + stage * (STAGE_ELEMS + QSLOT_ELEMS) + 2 * TILE * ROW_ELEMS, kv_head);
}

/* Refill ring stage `stage` with the K/V loader's next tile, stage the ids of the tile STAGES further
 * on, and close the commit group (one per consumed tile). */
static __device__ __forceinline__ void refill(const struct decode_params &p, struct tile_iter *ld, struct tile_iter *idl,
                                              int *ld_slot, int *id_slot, int *ids, u16 *ring, int stage) {
  if (iter_valid(ld)) {
    if (p.narrow)
      issue_tile_narrow(p, ld, ids + *ld_slot * ID_SLOT, ring, stage);
    else
      issue_tile_ids(p, ld, ids + *ld_slot * ID_SLOT, ring, stage);
    iter_next(ld, p);
  }
  *ld_slot = *ld_slot + 1 == ID_SLOTS ? 0 : *ld_slot + 1;
  if (iter_valid(idl)) {
    issue_ids(p, idl, ids + *id_slot * ID_SLOT);
    iter_next(idl, p);
  }
  *id_slot = *id_slot + 1 == ID_SLOTS ? 0 : *id_slot + 1;
  cp_async_commit();
}
#endif

#if ROPE
/* Rotate-half RoPE on this thread's 8 dims; the partner dims (d +- head_dim/2) live in lane
 * tx ^ (TX/2) of the same token group. */
static __device__ __forceinline__ void rope8(float *x, int tx, float pos, const float *freq_reg) {
  const float sign = tx < TX / 2 ? -1.0f : 1.0f;
#pragma unroll
  for (int e = 0; e < VEC; e++) {
    const float other = __shfl_xor_sync(0xffffffffu, x[e], TX / 2);
    float sn, cs;
    sincosf(pos * freq_reg[e], &sn, &cs);
    x[e] = x[e] * cs + sign * other * sn;
  }
}
#endif

/* Four outputs of dtype O_DTYPE (dims d..d+3; the output's last dimension is contiguous, but a view's
 * alignment is not known: four 2-byte stores). */
static __device__ __forceinline__ void store4(u16 *dst, float4 o) {
  if (O_DTYPE == KV_BF16) {
    dst[0] = f32_to_bf16(o.x);
    dst[1] = f32_to_bf16(o.y);
    dst[2] = f32_to_bf16(o.z);
    dst[3] = f32_to_bf16(o.w);
  } else {
    dst[0] = f32_to_f16(o.x);
    dst[1] = f32_to_f16(o.y);
    dst[2] = f32_to_f16(o.z);
    dst[3] = f32_to_f16(o.w);
  }
}

/* Programmatic dependent launch (common.cuh; the host asks for it with KVATTN_DECODE_PDL): before
 * pdl_wait() the kernel reads only its work lists (cta_indptr, items) and writes nothing; q, K/V, the
 * page ids, the outputs, the partial states and the split counters are touched only after it (except the
 * early prefetch's hints, prefetch_early, which change no result). */
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
decode_paged_kernel(const struct decode_params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  u16 *ring = (u16 *)smem;
  float *red_acc = (float *)(smem + SMEM_RING_BYTES); /* [NGROUPS][GH][HEAD_DIM] */
  float *red_m = red_acc + NGROUPS * GH * HEAD_DIM;   /* [NGROUPS][GH] */
  float *red_l = red_m + NGROUPS * GH;                /* [NGROUPS][GH] */
  __shared__ int sh_last;

  const int tid = threadIdx.x, tx = tid % TX, tg = tid / TX;
#if DECODE_TRACE
  for (int w = 0; w < TRACE_WORDS; w++) trace_put(p, w, 0); /* nothing left from an earlier launch */
#endif
  trace_gt(p, TR_GT_ENTRY);
  trace_mark(p, TR_ENTRY);

  pdl_launch_dependents();
  struct tile_iter ld, cs; /* the loader runs STAGES-1 (PIPE_IDS: STAGES) tiles ahead of the consumer */
  iter_begin(&ld, p); /* the work lists only: safe before pdl_wait() */
  cs = ld;
  if (!iter_valid(&cs)) {
    trace_gt(p, TR_GT_EXIT);
    return;
  }
#if DECODE_EARLY_PREFETCH
  prefetch_early(p, ld);
#endif
  pdl_wait(); /* from here on, the earlier kernel's writes (q, K/V, page ids, outputs, counters) are visible */
  trace_mark(p, TR_WAITED);
#if DECODE_TRACE
  int tr_tiles = 0, tr_items = 0;
  trace_put(p, TR_SMID, (unsigned long long)smid());
#endif

#if PIPE_IDS
  /* the id loader runs STAGES tiles ahead of the K/V loader; tile m's ids live in slot m % ID_SLOTS */
  int *ids = (int *)(smem + SMEM_RING_BYTES + SMEM_RED_BYTES);
  struct tile_iter idl = ld;
  int ld_slot = 0, id_slot = 0;
#pragma unroll
  for (int s = 0; s < STAGES; s++) {
    if (iter_valid(&idl)) {
      issue_ids(p, &idl, ids + id_slot * ID_SLOT);
      iter_next(&idl, p);
    }
    id_slot++;
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads(); /* the first tiles' ids, from every thread's copies */
#pragma unroll
  for (int s = 0; s < STAGES; s++) refill(p, &ld, &idl, &ld_slot, &id_slot, ids, ring, s);
#else
  i64 page[TPG]; /* the ids of the loader's next tile */
  int off[TPG];
  load_ids(p, &ld, page, off);
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (iter_valid(&ld)) {
      issue_tile(p, &ld, page, off, ring, s);
      iter_next(&ld, p);
      if (iter_valid(&ld)) load_ids(p, &ld, page, off);
    }
    cp_async_commit();
  }
#endif

#if ROPE
  float freq_reg[VEC];
#pragma unroll
  for (int e = 0; e < VEC; e++) freq_reg[e] = p.rope_freq[(tx * VEC + e) % (HEAD_DIM / 2)];
#endif

#if DECODE_TC
  const int lane = tid % 32, warp = tid / 32;
  u32 qa[HEAD_DIM / 16][4];         /* Q as the A operand, per 16-dim k-step */
  float oacc[HEAD_DIM / 8][4];      /* O: rows lane/4 and lane/4+8, columns 2*(lane%4)+{0,1} */
  float m2[2], l2[2];               /* per row (lane/4, lane/4+8): max (log2 domain), partial sum */
#if ALIBI
  float slope2[2];
#endif
#else
  float q[GH][VEC], acc[GH][VEC], m[GH], l[GH];
#if ALIBI
  float slope[GH];
#endif
#endif
  int stage = 0;
#if !PIPE_IDS
  int ld_stage = STAGES - 1;
#endif

  while (iter_valid(&cs)) {
#if PIPE_IDS
    cp_async_wait<STAGES - 1>();
#else
    cp_async_wait<STAGES - 2>();
#endif
    const u16 *sk = ring + stage * (STAGE_ELEMS + QSLOT_ELEMS);
    const u16 *sv = sk + TILE * ROW_ELEMS;
    const u16 *sq = sv + TILE * ROW_ELEMS;
    const int kv_head = cs.it.unit_head / HEAD_BLOCKS;
    const int hb = cs.it.unit_head % HEAD_BLOCKS;

#if DECODE_TC
    /* K/V tiles are read across warps: every thread's copies must have landed, and everyone must be
     * done with the stage that the refill below overwrites */
    __syncthreads();
#if DECODE_TRACE
    if (tr_tiles == 0) trace_mark(p, TR_FIRST_TILE);
#endif
    if (cs.first) {
#pragma unroll
      for (int ks = 0; ks < HEAD_DIM / 16; ks++) ldmatrix_x4(qa[ks], sq + (lane % 16) * ROW_ELEMS + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nd = 0; nd < HEAD_DIM / 8; nd++) oacc[nd][0] = oacc[nd][1] = oacc[nd][2] = oacc[nd][3] = 0.0f;
      m2[0] = m2[1] = KV_NEG_INF;
      l2[0] = l2[1] = 0.0f;
#if ALIBI
#pragma unroll
      for (int r = 0; r < 2; r++) {
        const int g = lane / 4 + 8 * r, gi = hb * GH + g;
        slope2[r] = g < GH && gi < GROUP_SIZE ? p.alibi_slopes[kv_head * GROUP_SIZE + gi] : 0.0f;
      }
#endif
    }
#else
    if (cs.first) {
      __syncthreads(); /* the query slot was filled by other threads */
#if DECODE_TRACE
      if (tr_tiles == 0) trace_mark(p, TR_FIRST_TILE);
#endif
#pragma unroll
      for (int g = 0; g < GH; g++) {
        uint4 raw = lds128(sq + g * ROW_ELEMS + tx * VEC);
        KV_UNPACK8(Q_DTYPE, raw, q[g]);
#if ROPE
        rope8(q[g], tx, (float)cs.it.q_pos, freq_reg);
#endif
#pragma unroll
        for (int e = 0; e < VEC; e++) {
          q[g][e] *= p.sm_scale;
          acc[g][e] = 0.0f;
        }
        m[g] = KV_NEG_INF;
        l[g] = 0.0f;
#if ALIBI
        {
          const int gi = hb * GH + g;
          slope[g] = gi < GROUP_SIZE ? p.alibi_slopes[kv_head * GROUP_SIZE + gi] : 0.0f;
        }
#endif
      }
      __syncthreads(); /* everyone has read the slot before it is refilled */
    }
#endif

#if !PIPE_IDS
    /* refill the stage consumed last iteration (each thread rewrites only its own K/V chunks) */
    if (iter_valid(&ld)) {
      issue_tile(p, &ld, page, off, ring, ld_stage);
      iter_next(&ld, p);
      if (iter_valid(&ld)) load_ids(p, &ld, page, off);
    }
    cp_async_commit();
#endif

#if DECODE_TC
    {
      /* S = Q K^T over this warp's 16 tokens: two n8 tiles, head_dim/16 k-steps */
      const u16 *kw = sk + (warp * 16) * ROW_ELEMS;
      const u16 *vw = sv + (warp * 16) * ROW_ELEMS;
      float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
      for (int ks = 0; ks < HEAD_DIM / 16; ks++) {
        u32 b[4]; /* {b0,b1} tokens 0-7, {b2,b3} tokens 8-15 */
        ldmatrix_x4(b, kw + ((lane / 16) * 8 + lane % 8) * ROW_ELEMS + ks * 16 + ((lane / 8) % 2) * 8);
        if (KV_DTYPE == KV_BF16) {
          mma_bf16_16816(sc[0], qa[ks], b);
          mma_bf16_16816(sc[1], qa[ks], b + 2);
        } else {
          mma_f16_16816(sc[0], qa[ks], b);
          mma_f16_16816(sc[1], qa[ks], b + 2);
        }
      }
      /* transforms and masking; element e of tile nt: row lane/4 + 8*(e/2), token nt*8 + 2*(lane%4) + e%2 */
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int pos = cs.tok + warp * 16 + nt * 8 + 2 * (lane % 4) + (e % 2);
          float x = sc[nt][e] * p.sm_scale;
#if SOFT_CAP
          x = p.soft_cap * tanhf(x / p.soft_cap);
#endif
#if ALIBI
          x += slope2[e / 2] * (float)(pos - cs.it.q_pos);
#endif
          sc[nt][e] = pos < cs.it.tok_end ? x * KV_LOG2E : KV_NEG_INF;
        }
      /* online softmax per row; a row's 16 scores live in the 4 lanes of a quad */
#pragma unroll
      for (int r = 0; r < 2; r++) {
        float mx = fmaxf(fmaxf(sc[0][2 * r], sc[0][2 * r + 1]), fmaxf(sc[1][2 * r], sc[1][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(mx, m2[r]);
        const float base = mx == KV_NEG_INF ? 0.0f : mx;
        const float scale = fast_exp2(m2[r] - base);
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
          for (int e = 0; e < 2; e++) {
            sc[nt][2 * r + e] = fast_exp2(sc[nt][2 * r + e] - base);
            sum += sc[nt][2 * r + e];
          }
        l2[r] = l2[r] * scale + sum; /* this lane's part; the quad is summed at the item's end */
        m2[r] = mx;
#pragma unroll
        for (int nd = 0; nd < HEAD_DIM / 8; nd++) {
          oacc[nd][2 * r] *= scale;
          oacc[nd][2 * r + 1] *= scale;
        }
      }
      /* P (16 rows x 16 tokens) as the A operand, straight from the S accumulators */
      u32 pa[4];
      pa[0] = pack2(KV_DTYPE, sc[0][0], sc[0][1]);
      pa[1] = pack2(KV_DTYPE, sc[0][2], sc[0][3]);
      pa[2] = pack2(KV_DTYPE, sc[1][0], sc[1][1]);
      pa[3] = pack2(KV_DTYPE, sc[1][2], sc[1][3]);
      /* O += P V: V rows are tokens (k), columns dims (n): ldmatrix.trans gives the B operand */
#pragma unroll
      for (int nd2 = 0; nd2 < HEAD_DIM / 16; nd2++) {
        u32 b[4]; /* {b0,b1} dims nd2*16+0..7, {b2,b3} dims +8..15 */
        ldmatrix_x4_trans(b, vw + (((lane / 8) % 2) * 8 + lane % 8) * ROW_ELEMS + nd2 * 16 + (lane / 16) * 8);
        if (KV_DTYPE == KV_BF16) {
          mma_bf16_16816(oacc[2 * nd2], pa, b);
          mma_bf16_16816(oacc[2 * nd2 + 1], pa, b + 2);
        } else {
          mma_f16_16816(oacc[2 * nd2], pa, b);
          mma_f16_16816(oacc[2 * nd2 + 1], pa, b + 2);
        }
      }
    }
#else
    /* scores of this group's TPG tokens for every head of the block */
    float s[TPG][GH];
#pragma unroll
    for (int j = 0; j < TPG; j++) {
      const int t = tg + TG * j;
      uint4 raw = lds128(sk + t * ROW_ELEMS + tx * VEC);
      float kf[VEC];
      KV_UNPACK8(KV_DTYPE, raw, kf);
#if ROPE
      rope8(kf, tx, (float)(cs.tok + t), freq_reg);
#endif
#pragma unroll
      for (int g = 0; g < GH; g++) {
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; e++) d = fmaf(q[g][e], kf[e], d);
        s[j][g] = d;
      }
    }
#pragma unroll
    for (int j = 0; j < TPG; j++)
#pragma unroll
      for (int g = 0; g < GH; g++) s[j][g] = warp_sum(s[j][g], TX);

    /* logits transforms and masking, then the online softmax update */
#pragma unroll
    for (int j = 0; j < TPG; j++) {
      const int pos = cs.tok + tg + TG * j;
      const int valid = pos < cs.it.tok_end;
#pragma unroll
      for (int g = 0; g < GH; g++) {
        float x = s[j][g];
#if SOFT_CAP
        x = p.soft_cap * tanhf(x / p.soft_cap);
#endif
#if ALIBI
        x += slope[g] * (float)(pos - cs.it.q_pos);
#endif
        s[j][g] = valid ? x * KV_LOG2E : KV_NEG_INF;
      }
    }
#pragma unroll
    for (int g = 0; g < GH; g++) {
      float mx = m[g];
#pragma unroll
      for (int j = 0; j < TPG; j++) mx = fmaxf(mx, s[j][g]);
      /* all scores so far masked: keep the state empty (no -inf - -inf) */
      const float base = mx == KV_NEG_INF ? 0.0f : mx;
      const float scale = fast_exp2(m[g] - base);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < TPG; j++) {
        s[j][g] = fast_exp2(s[j][g] - base);
        sum += s[j][g];
      }
      l[g] = l[g] * scale + sum;
      m[g] = mx;
#pragma unroll
      for (int e = 0; e < VEC; e++) acc[g][e] *= scale;
    }
#pragma unroll
    for (int j = 0; j < TPG; j++) {
      const int t = tg + TG * j;
      uint4 raw = lds128(sv + t * ROW_ELEMS + tx * VEC);
      float vf[VEC];
      KV_UNPACK8(KV_DTYPE, raw, vf);
#pragma unroll
      for (int g = 0; g < GH; g++)
#pragma unroll
        for (int e = 0; e < VEC; e++) acc[g][e] = fmaf(s[j][g], vf[e], acc[g][e]);
    }

#endif /* DECODE_TC */

    if (iter_last(&cs)) {
      /* reduce the NGROUPS partial states; one thread per (head, dim) writes the result */
#if DECODE_TC
#pragma unroll
      for (int r = 0; r < 2; r++) {
        l2[r] += __shfl_xor_sync(0xffffffffu, l2[r], 1);
        l2[r] += __shfl_xor_sync(0xffffffffu, l2[r], 2);
        const int g = lane / 4 + 8 * r;
        if (g < GH) {
#pragma unroll
          for (int nd = 0; nd < HEAD_DIM / 8; nd++)
            *(float2 *)(red_acc + (warp * GH + g) * HEAD_DIM + nd * 8 + 2 * (lane % 4)) =
                make_float2(oacc[nd][2 * r], oacc[nd][2 * r + 1]);
          if (lane % 4 == 0) {
            red_m[warp * GH + g] = m2[r];
            red_l[warp * GH + g] = l2[r];
          }
        }
      }
#else
#pragma unroll
      for (int g = 0; g < GH; g++) {
        float4 *dst = (float4 *)(red_acc + (tg * GH + g) * HEAD_DIM + tx * VEC);
        dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        if (tx == 0) {
          red_m[tg * GH + g] = m[g];
          red_l[tg * GH + g] = l[g];
        }
      }
#endif
      __syncthreads();
#if PIPE_IDS && DECODE_EARLY_REFILL
      /* every warp is past its last read of this stage: refill it before this item's partial state
       * is written and merged (a fence, an atomic, the merge's loads), so the next tiles' loads are in
       * flight meanwhile rather than after */
      refill(p, &ld, &idl, &ld_slot, &id_slot, ids, ring, stage);
#endif
      trace_mark(p, TR_LAST_ITEM_END);
#if DECODE_TRACE
      tr_items++;
      trace_put(p, TR_PUBLISHED, 0); /* the marks after an item's end describe the CTA's last item */
      trace_put(p, TR_MERGED, 0);
#endif
      const struct decode_item it = cs.it;
      const int split = it.split;
      int2 sp = make_int2(1, 0);
      if (split >= 0) sp = __ldg(p.splits + split);
      /* one thread per (head, 4 dims): float4 traffic, the head's weights computed once per 4 dims */
      for (int i = tid; i < GH * (HEAD_DIM / 4); i += NUM_THREADS) {
        const int g = i / (HEAD_DIM / 4), d = (i % (HEAD_DIM / 4)) * 4;
        float mm = KV_NEG_INF;
        for (int k = 0; k < NGROUPS; k++) mm = fmaxf(mm, red_m[k * GH + g]);
        const float base = mm == KV_NEG_INF ? 0.0f : mm;
        float ll = 0.0f;
        float4 oo = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int k = 0; k < NGROUPS; k++) {
          const float w = fast_exp2(red_m[k * GH + g] - base);
          const float4 a = *(const float4 *)(red_acc + (k * GH + g) * HEAD_DIM + d);
          ll += red_l[k * GH + g] * w;
          oo.x += a.x * w;
          oo.y += a.y * w;
          oo.z += a.z * w;
          oo.w += a.w * w;
        }
        const float inv = ll > 0.0f ? 1.0f / ll : 0.0f;
        oo.x *= inv;
        oo.y *= inv;
        oo.z *= inv;
        oo.w *= inv;
        const float lse = ll > 0.0f ? (mm + __log2f(ll)) * KV_LN2 : KV_NEG_INF;
        const int gi = hb * GH + g;
        if (split < 0) {
          if (gi < GROUP_SIZE) {
            const int head = kv_head * GROUP_SIZE + gi;
            u16 *dst = p.out + (i64)it.row * p.o_stride_tok + (i64)head * p.o_stride_head + d;
            store4(dst, oo);
            if (d == 0 && p.lse) p.lse[(i64)it.row * p.lse_stride_tok + (i64)head * p.lse_stride_head] = lse;
          }
        } else {
          const i64 slot = (i64)sp.y + it.piece;
          *(float4 *)(p.partial_o + (slot * GH + g) * HEAD_DIM + d) = oo;
          if (d == 0) p.partial_lse[slot * GH + g] = lse;
        }
      }
      if (split >= 0) {
        /* publish this piece; the CTA that completes the split merges all pieces */
        __threadfence();
        __syncthreads();
        if (tid == 0) sh_last = atomicAdd(p.counters + split, 1) == sp.x - 1;
        __syncthreads();
        trace_mark(p, TR_PUBLISHED);
        if (sh_last) {
          __threadfence();
          for (int i = tid; i < GH * (HEAD_DIM / 4); i += NUM_THREADS) {
            const int g = i / (HEAD_DIM / 4), d = (i % (HEAD_DIM / 4)) * 4;
            const int gi = hb * GH + g;
            if (gi >= GROUP_SIZE) continue;
            /* one pass, online over the pieces, MERGE_BATCH pieces' (lse, 4 dims) in flight at a time:
             * the merge is on the critical path of a long request (its latency is the launch's tail),
             * so each thread takes a single (head, 4 dims) and waits one round trip per batch */
            float mm = KV_NEG_INF, ww = 0.0f;
            float4 oo = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int k0 = 0; k0 < sp.x; k0 += MERGE_BATCH) {
              float lk[MERGE_BATCH];
              float4 ok[MERGE_BATCH];
#pragma unroll
              for (int u = 0; u < MERGE_BATCH; u++) {
                const i64 slot = (i64)sp.y + k0 + u;
                const int in = k0 + u < sp.x;
                lk[u] = in ? ld_cg_f32(p.partial_lse + slot * GH + g) : KV_NEG_INF;
                ok[u] = in ? ld_cg_f32x4(p.partial_o + (slot * GH + g) * HEAD_DIM + d) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
              }
              float mx = mm;
#pragma unroll
              for (int u = 0; u < MERGE_BATCH; u++) mx = fmaxf(mx, lk[u]);
              if (mx == KV_NEG_INF) continue; /* every piece so far empty */
              const float r = __expf(mm - mx);
              ww *= r;
              oo.x *= r;
              oo.y *= r;
              oo.z *= r;
              oo.w *= r;
#pragma unroll
              for (int u = 0; u < MERGE_BATCH; u++) {
                const float w = __expf(lk[u] - mx); /* an empty piece has o = 0 and w = 0 */
                ww += w;
                oo.x += w * ok[u].x;
                oo.y += w * ok[u].y;
                oo.z += w * ok[u].z;
                oo.w += w * ok[u].w;
              }
              mm = mx;
            }
            const float inv = ww > 0.0f ? 1.0f / ww : 0.0f;
            oo.x *= inv;
            oo.y *= inv;
            oo.z *= inv;
            oo.w *= inv;
            const float lse = ww > 0.0f ? mm + __logf(ww) : KV_NEG_INF;
            const int head = kv_head * GROUP_SIZE + gi;
            u16 *dst = p.out + (i64)it.row * p.o_stride_tok + (i64)head * p.o_stride_head + d;
            store4(dst, oo);
            if (d == 0 && p.lse) p.lse[(i64)it.row * p.lse_stride_tok + (i64)head * p.lse_stride_head] = lse;
          }
          if (tid == 0) p.counters[split] = 0; /* ready for the next launch (graph replay) */
          trace_mark(p, TR_MERGED);
        }
      }
      __syncthreads(); /* the reduction area is reused by the next item */
#if PIPE_IDS && !DECODE_EARLY_REFILL
      refill(p, &ld, &idl, &ld_slot, &id_slot, ids, ring, stage);
#endif
    }
#if PIPE_IDS
    else {
      __syncthreads(); /* every warp is done with this stage: refill it */
      refill(p, &ld, &idl, &ld_slot, &id_slot, ids, ring, stage);
    }
#endif
    iter_next(&cs, p);
    stage = stage + 1 == STAGES ? 0 : stage + 1;
#if DECODE_TRACE
    tr_tiles++;
#endif
#if !PIPE_IDS
    ld_stage = ld_stage + 1 == STAGES ? 0 : ld_stage + 1;
#endif
  }
  cp_async_wait<0>();
  trace_mark(p, TR_EXIT);
  trace_gt(p, TR_GT_EXIT);
#if DECODE_TRACE
  trace_put(p, TR_TILES, (unsigned long long)tr_tiles);
  trace_put(p, TR_ITEMS, (unsigned long long)tr_items);
#endif
}
