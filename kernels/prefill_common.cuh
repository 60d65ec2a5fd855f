/*
 * prefill_common.cuh - what every prefill kernel shares (kernels/prefill.cu, FA2-class, and the
 * Hopper kernels to come): the work item and merge entry the planner (src/plan_prefill.c) writes,
 * the launch parameters, the walk from a request's KV token to its page, and the split-KV merge.
 * Needs HEAD_DIM, GROUP_SIZE and O_DTYPE defined, and common.cuh included, before it.
 */
#ifndef KVATTN_PREFILL_COMMON_CUH
#define KVATTN_PREFILL_COMMON_CUH

/* One work item: 16 int32 (64 bytes; the kernel copies the first 48 into shared memory). Keep in
 * sync with src/plan_prefill.h (prefill_item). */
struct prefill_item {
  int q_start;    /* first query token of the request (global row of q/out) */
  int qo_len;     /* query tokens of the request */
  int kv_len;     /* KV tokens of the request */
  int kv_entry;   /* kv_indptr[request]: first entry of the request in `indices` */
  int kv_head;
  int row_start;  /* first packed row of the tile */
  int kv_begin;   /* token chunk [kv_begin, kv_end) of the request's KV */
  int kv_end;
  int part;       /* -1: write out; else first row of this item's partial-state rows */
  int q_pos_base; /* q_pos of token r = q_pos_base + r */
  int mask_lo;    /* custom mask: first bit of the request (int64, low and high words) */
  int mask_hi;
  int pad[4];
};

/* A merge entry: the chunks of one split tile, rows [part, part + chunks * CTA_Q) of the partial
 * states (chunk c of local row x at part + c * CTA_Q + x). 8 int32. */
struct prefill_merge_entry {
  int part;
  int chunks;
  int q_start;
  int qo_len;
  int kv_head;
  int row_start;
  int rows;       /* CTA_Q of the tile */
  int pad;
};

struct prefill_params {
  const u16 *q;
  i64 q_stride_tok, q_stride_head;
  const u16 *k, *v;   /* 4-d views (page, slot, kv_head, dim) */
  i64 k_stride_page, k_stride_slot, k_stride_head;
  i64 v_stride_page, v_stride_slot, v_stride_head;
  const int *indices; /* [kv_entries] page ids; NULL: identity (ragged) */
  const u8 *mask;     /* custom mask bits */
  u16 *out;
  i64 o_stride_tok, o_stride_head;
  float *lse;         /* float32 [tokens, qo_heads] or NULL */
  i64 lse_stride_tok, lse_stride_head;
  const int *lists;   /* the plan's list region (int32 words) */
  int cta_indptr_off; /* words: [grid + 1] for this tile size */
  int items_off_word; /* lists[items_off_word] = the word where this tile size's items start (set by
                         the plan, so a captured graph's fixed parameters stay valid) */
  int merge_off;      /* words: merge entries; merge count at lists[merge_count_word] */
  int merge_count_word;
  const float *rope_freq;    /* [HEAD_DIM / 2] inverse frequencies / rope_scale */
  const float *alibi_slopes; /* [qo_heads] */
  float *part_o;      /* [rows, HEAD_DIM] */
  float *part_lse;    /* [rows] natural log */
  float sm_scale;
  float soft_cap;
  int window_left;
  int page_size;
  int page_shift;     /* log2(page_size) when a power of two, else -1 */
  int bsr;            /* 1: block-sparse positions */
  long long kv_token_limit;
  int kv_same_offsets; /* 1: K and V share their strides, so one row table column serves both */
  int contig;          /* 1: ragged KV whose row stride fits 31 bits: rows addressed directly, no tables */
  int k_row_bytes, v_row_bytes; /* contig: bytes between consecutive KV tokens */
};

/* Token j of a request -> (its page's entry offset, slot); a shift for power-of-two page sizes. */
static __device__ __forceinline__ void page_split(const struct prefill_params &p, int j, int *entry, int *slot) {
  if (p.page_shift >= 0) {
    *entry = j >> p.page_shift;
    *slot = j & (p.page_size - 1);
  } else {
    *entry = j / p.page_size;
    *slot = j - *entry * p.page_size;
  }
}

/* Merge the KV chunks of split tiles: one warp per (entry, local row), grid-stride over the
 * entries the plan wrote (their count is read from the list region, so the grid is fixed). */
extern "C" __global__ void __launch_bounds__(128) prefill_merge(const struct prefill_params p) {
  pdl_launch_dependents();
  const int count = p.lists[p.merge_count_word];
  const struct prefill_merge_entry *entries = (const struct prefill_merge_entry *)(p.lists + p.merge_off);
  pdl_wait(); /* the partial states are the prefill kernels' (PDL: common.cuh) */
  const int lane = threadIdx.x & 31;
  const i64 warps = (i64)gridDim.x * (blockDim.x / 32);
  /* every entry claims 128 rows of the index space (the largest tile); rows past its tile skip */
  for (i64 w = (i64)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5); w < (i64)count * 128; w += warps) {
    const struct prefill_merge_entry en = entries[w / 128];
    const int local = (int)(w % 128);
    if (local >= en.rows) continue;
    const int pr = en.row_start + local;
    const int tok = pr / GROUP_SIZE, g = pr - tok * GROUP_SIZE;
    if (tok >= en.qo_len) continue;
    float mx = KV_NEG_INF;
    for (int c = 0; c < en.chunks; c++) mx = fmaxf(mx, p.part_lse[en.part + c * en.rows + local]);
    float acc[HEAD_DIM / 32];
#pragma unroll
    for (int x = 0; x < HEAD_DIM / 32; x++) acc[x] = 0.f;
    float sum = 0.f;
    if (mx != KV_NEG_INF) {
      for (int c = 0; c < en.chunks; c++) {
        const i64 row = en.part + c * en.rows + local;
        const float w_c = __expf(p.part_lse[row] - mx);
        sum += w_c;
        const float *src = p.part_o + row * HEAD_DIM;
#pragma unroll
        for (int x = 0; x < HEAD_DIM / 32; x++) acc[x] += w_c * src[lane + 32 * x];
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int head = en.kv_head * GROUP_SIZE + g;
    u16 *dst = p.out + (i64)(en.q_start + tok) * p.o_stride_tok + (i64)head * p.o_stride_head;
#pragma unroll
    for (int x = 0; x < HEAD_DIM / 32; x++) {
#if O_DTYPE == KV_BF16
      dst[lane + 32 * x] = f32_to_bf16(acc[x] * inv);
#else
      dst[lane + 32 * x] = f32_to_f16(acc[x] * inv);
#endif
    }
    if (p.lse && lane == 0)
      p.lse[(i64)(en.q_start + tok) * p.lse_stride_tok + (i64)head * p.lse_stride_head] =
          sum > 0.f ? mx + __logf(sum) : KV_NEG_INF;
  }
}

#endif /* KVATTN_PREFILL_COMMON_CUH */
