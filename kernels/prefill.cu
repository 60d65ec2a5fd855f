/*
 * prefill.cu - batch prefill / append attention on tensor cores (FA2-class, sm_80 and newer).
 *
 * One launch per query-tile size, a fixed grid (a multiple of the SM count, chosen when the
 * attention is created): CTA b runs the work items [cta_indptr[b], cta_indptr[b+1]) that the host
 * planner (src/plan_prefill.c) wrote. An item is (request, KV head, query tile, KV token chunk).
 * The grid never depends on the batch, so a captured CUDA graph replays any batch within bounds.
 *
 * GQA packing: a request's query rows and the GROUP_SIZE query heads of one KV head form
 * qo_len * GROUP_SIZE "packed rows" (packed row = token * GROUP_SIZE + head in group), so each
 * K/V byte loaded serves the whole group and short queries still fill the 16-row MMA tiles.
 *
 * Per item: the Q tile goes to shared memory once; K and V tiles of KV_TILE tokens are gathered
 * through the page index with cp.async (16 bytes per thread per copy; rows past the chunk are
 * zero-filled, never read, so NaN garbage in unused page slots cannot reach an accumulator).
 * K and V are double-buffered: tile t+1 is issued right after the one barrier of iteration t and
 * lands while all of tile t computes (one block barrier per KV tile). Row addresses come from a
 * per-tile table built two tiles ahead (see the loader below), so the copies are cheap.
 * Each warp owns 16*MF packed rows: S = Q K^T with mma.sync m16n8k16 (fp32 accumulation,
 * fragments from ldmatrix), the online softmax in registers (log2 domain: one ex2 per score),
 * then O += P V with P re-packed from the S accumulators as the A operand (no shared memory trip).
 *
 * Shared memory rows are HEAD_DIM 16-bit values; 16-byte chunk c of row r is stored at chunk
 * c ^ (r % 8), so the 8 row addresses of one ldmatrix phase hit 8 different bank groups (no
 * conflicts) and cp.async writes stay 16-byte aligned.
 *
 * Split KV: an item with part >= 0 writes its normalized o (fp32) and lse to the workspace and
 * prefill_merge combines the chunks of a tile exactly (the (o, lse) merge); else it writes out.
 *
 * Specialization (-D): HEAD_DIM 64|128|256, GROUP_SIZE, CTA_Q 16|64|128, KV_TILE (16..64),
 * WARPS_128 (4|8: warps of the 128-row tile), FOLD_SCALE, STAGE_NEXT, O_STAGE, DTYPE
 * (KV_F16|KV_BF16: q and KV), O_DTYPE, CAUSAL, WINDOW, CUSTOM_MASK, SOFT_CAP, ALIBI, ROPE (0|1).
 * Positions: q_pos = q_pos_base + token; kv_pos = the token index in the request (paged, ragged)
 * or page * page_size + slot (block-sparse, params.bsr), masked at kv_token_limit.
 */
#include "common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 1
#endif
#ifndef CTA_Q
#define CTA_Q 128
#endif
#ifndef DTYPE
#define DTYPE KV_BF16
#endif
#ifndef O_DTYPE
#define O_DTYPE DTYPE
#endif
#ifndef KV_TILE
#define KV_TILE (CTA_Q == 16 || HEAD_DIM <= 128 ? 64 : 32) /* the 16-row tile splits 64 over 4 warps */
#endif
#ifndef CAUSAL
#define CAUSAL 0
#endif
#ifndef WINDOW
#define WINDOW 0
#endif
#ifndef CUSTOM_MASK
#define CUSTOM_MASK 0
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

#ifndef WARPS_128
#define WARPS_128 (HEAD_DIM > 128 ? 8 : 4) /* two fragments per warp would spill at head_dim 256 */
#endif
#if CTA_Q == 16
#define NUM_WARPS 4 /* the 16 rows are shared: each warp takes a quarter of every KV tile (WKV) */
#define MF 1
#elif CTA_Q == 64
#define NUM_WARPS 4
#define MF 1
#elif CTA_Q == 128 && WARPS_128 == 8
#define NUM_WARPS 8
#define MF 1
#elif CTA_Q == 128
#define NUM_WARPS 4 /* two 16-row fragments per warp: each K/V fragment feeds two MMAs */
#define MF 2
#else
#error "CTA_Q must be 16, 64 or 128"
#endif
#define NUM_THREADS (NUM_WARPS * 32)
/* FOLD_SCALE 1 (the host's default): the scores stay unscaled until the exponent, where the scale
 * and the running max fold into one FFMA (sm_scale > 0, so the max commutes with the scale): one
 * FMUL less per score (H200: causal 4x4096 294 -> 311 TFLOP/s). Soft-cap and ALiBi need the
 * scaled score before the exponent and turn it off. */
#ifndef FOLD_SCALE
#define FOLD_SCALE 0
#endif
/* How far (log2 units) a row's max may grow past the running max before O is rescaled: scores
 * then reach 2^8 at most, far inside fp16's and bf16's range for P. */
#define RESCALE_SLACK 8.0f
#if SOFT_CAP || ALIBI
#undef FOLD_SCALE
#define FOLD_SCALE 0
#endif
#if CTA_Q == 16
#define WKV 4 /* warps along the KV tile; their (m, d, o) are merged through shared memory at the end */
#else
#define WKV 1
#endif
#define KVW (KV_TILE / WKV) /* KV columns of a tile per warp */
/* STAGE_NEXT 1 (host knob KVATTN_PREFILL_STAGE, off: the extra live state spills on sm_90a): an
 * item's successor is staged before its epilogue (see the item loop). Never with the 16-row tile,
 * whose end-of-item merge reuses the K/V buffers. */
#ifndef STAGE_NEXT
#define STAGE_NEXT 0
#endif
/* O_STAGE 1 (host knob KVATTN_PREFILL_O_STAGE, on by default): a finished item's O goes
 * through the warp's own rows of the Q tile into whole 16-byte row chunks (half the L2 write requests
 * of the fragments' 4-byte stores, every sector whole); tiles of 64 and 128 rows (the 16-row tile's
 * end-of-item merge uses that memory). */
#ifndef O_STAGE
#define O_STAGE 1
#endif
#if WKV > 1
#undef STAGE_NEXT
#define STAGE_NEXT 0
#endif
#if WKV > 1 || STAGE_NEXT
#undef O_STAGE
#define O_STAGE 0
#endif
#define CH (HEAD_DIM / 8)   /* 16-byte chunks per row */
#define NF (KVW / 8)        /* n-fragments of S per warp */
#if NF % 2
#error "KV_TILE / WKV must be a multiple of 16"
#endif
#define DF (HEAD_DIM / 8)   /* n-fragments of O per warp */

#include "prefill_common.cuh"

/* Element (row, d) of a swizzled tile. */
static __device__ __forceinline__ int swz(int row, int chunk) { return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3); }

static __device__ __forceinline__ void mma16816(float *d, const u32 *a, const u32 *b) {
#if DTYPE == KV_BF16
  mma_bf16_16816(d, a, b);
#else
  mma_f16_16816(d, a, b);
#endif
}

/* Swizzled fragment addresses. Chunk c of row r sits at chunk c ^ (r % 8). Every fragment a lane
 * addresses has r % 8 = lane % 8 and chunk 2k + h (h: 0 or 1 by lane), so the byte offset of step
 * k is 128 * (k / 4) + 16 * ((h ^ lane % 8) ^ 2 * (k % 4)): four per-thread bases (k % 4), the rest
 * a constant. */
static __device__ __forceinline__ void frag_bases(u32 *base, u32 row_addr, int h, int lane) {
#pragma unroll
  for (int k = 0; k < 4; k++) base[k] = row_addr + ((((u32)h ^ (u32)(lane & 7)) ^ (u32)(2 * k)) << 4);
}
#define FRAG(base, k) ((base)[(k) & 3] + ((k) >> 2) * 128)

static __device__ __forceinline__ float to_f32(u16 h) {
#if DTYPE == KV_BF16
  return bf16_to_f32(h);
#else
  return f16_to_f32(h);
#endif
}
static __device__ __forceinline__ u16 from_f32(float f) {
#if DTYPE == KV_BF16
  return f32_to_bf16(f);
#else
  return f32_to_f16(f);
#endif
}

#if ROPE
/* Rotate-half RoPE of the rows of a swizzled tile in place: pair (d, d + HEAD_DIM/2) of row r is
 * rotated by pos(r) * freq[d]. Each thread takes whole 8-element chunks of the low half. */
static __device__ __forceinline__ void rope_tile(u16 *tile, int rows, const int *pos, const float *freq) {
  for (int idx = threadIdx.x; idx < rows * (CH / 2); idx += NUM_THREADS) {
    int row = idx / (CH / 2), c = idx % (CH / 2);
    u16 *lo = tile + swz(row, c), *hi = tile + swz(row, c + CH / 2);
    float ps = (float)pos[row];
#pragma unroll
    for (int e = 0; e < 8; e++) {
      float s, co;
      sincosf(ps * __ldg(freq + c * 8 + e), &s, &co);
      float a = to_f32(lo[e]), b = to_f32(hi[e]);
      lo[e] = from_f32(a * co - b * s);
      hi[e] = from_f32(b * co + a * s);
    }
  }
}
#endif

/* Shared memory: Q | two (K, V) tile buffers | three row-table slots | positions | (RoPE) q positions.
 * gpu_prefill.c's smem_for mirrors this. */
#define SMEM_Q (CTA_Q * HEAD_DIM)
#define SMEM_KV (KV_TILE * HEAD_DIM)

/* ---- The K/V loader.
 * Paged and block-sparse KV: every KV tile has a row table in shared memory, written one
 * iteration before its copies are issued: the byte offsets of each row's K and V and the row's
 * position (BSR, RoPE, masks; INT_MAX for a row past the data: zero-filled, nothing read). The
 * threads tid < KV_TILE write a row's K offset and position, the next KV_TILE threads its V
 * offset (so all four warps of a 128-thread block share the work), and nobody writes V offsets
 * when K and V have the same strides (params.kv_same_offsets: the K column serves both). A copy
 * then costs two table reads and a 64-bit add per 16 bytes: each thread owns chunk tid % CH of the
 * rows tid / CH + k * LD_RSTEP, so its swizzled destinations are constants. The page id of the
 * row two tiles ahead is loaded into a register one iteration before its table entry is written,
 * so the index walk (page_size 1: one id per row) stays off the critical path. Tables rotate over
 * three slots: tile t's is read by its copies (iteration t-1) and its masks (iteration t) while
 * tile t+2's is written (iteration t).
 * Ragged KV (params.contig): row r of the chunk sits at a fixed stride from its first row, so
 * the loader computes its addresses directly and no table is written or read. */
#define LD_RSTEP (NUM_THREADS / CH)
#define LD_ROWS (KV_TILE / LD_RSTEP)
#if KV_TILE % LD_RSTEP || KV_TILE > NUM_THREADS
#error "the loader needs KV_TILE a multiple of NUM_THREADS / CH and at most NUM_THREADS"
#endif
#define TAB_SLOT_WORDS (2 * KV_TILE) /* long long: K byte offsets then V byte offsets */
#define TAB_WRITERS (2 * KV_TILE <= NUM_THREADS ? 2 * KV_TILE : KV_TILE) /* threads writing a table */
#define NO_ROW 0x7fffffff /* the position of a row past the data */

/* The page (or, unpaged, the entry) of row `row` of tile `tile` of the item; -1 past the chunk. */
static __device__ __forceinline__ int row_page(const struct prefill_params &p, const struct prefill_item &it, int tile,
                                               int row) {
  const int j = it.kv_begin + tile * KV_TILE + row;
  if (j >= it.kv_end) return -1;
  int e, slot;
  page_split(p, j, &e, &slot);
  e += it.kv_entry;
  return p.indices ? __ldg(p.indices + e) : e;
}

/* Writer w (< TAB_WRITERS) of tile `tile`'s table: row w % KV_TILE; writers below KV_TILE take the K
 * offset and the position, the others the V offset (all of it when there are only KV_TILE). */
static __device__ __forceinline__ void write_row_table(const struct prefill_params &p, const struct prefill_item &it,
                                                       long long *tab, int *tpos, int tile, int w, int page) {
  const int row = w % KV_TILE;
  const bool kside = w < KV_TILE, vside = !p.kv_same_offsets && (!kside || TAB_WRITERS == KV_TILE);
  const int j = it.kv_begin + tile * KV_TILE + row;
  long long ko = 0, vo = 0; /* a row past the data: copied from the tensor's start, nothing read */
  int pos = NO_ROW;
  if (page >= 0) {
    int e, slot;
    page_split(p, j, &e, &slot);
    const long long gpos = p.bsr ? (long long)page * p.page_size + slot : (long long)j;
    /* block-sparse: the partial last block column holds no data past the limit (never read) */
    if (!p.bsr || gpos < p.kv_token_limit) {
      if (kside)
        ko = 2 * ((long long)page * p.k_stride_page + (long long)slot * p.k_stride_slot +
                  (long long)it.kv_head * p.k_stride_head);
      if (vside)
        vo = 2 * ((long long)page * p.v_stride_page + (long long)slot * p.v_stride_slot +
                  (long long)it.kv_head * p.v_stride_head);
      pos = (int)gpos;
    }
  }
  if (kside) {
    tab[row] = ko;
    tpos[row] = pos;
  }
  if (vside) tab[KV_TILE + row] = vo;
}

/* This thread's destination of copy k in a buffer (bytes): rows k * LD_RSTEP further on share the
 * swizzle of ld_dst when LD_RSTEP is a multiple of 8, else (LD_RSTEP 4) odd k use ld_dst_odd. */
static __device__ __forceinline__ u32 ld_dst_of(int k, u32 ld_dst, u32 ld_dst_odd) {
#if LD_RSTEP % 8 == 0
  return ld_dst + k * LD_RSTEP * HEAD_DIM * 2;
#else
  return ((k & 1) ? ld_dst_odd : ld_dst) + (k >> 1) * 2 * LD_RSTEP * HEAD_DIM * 2;
#endif
}

/* Issue the copies of one KV tile from its row table into the buffer
 * at shared address `kt` (V at kt + SMEM_KV * 2). kc / vc: K and V base pointers advanced by this
 * thread's chunk; v_col: KV_TILE, or 0 when V reads the K offsets. Every table read comes first: an
 * LDGSTS right after an LDS costs three filler instructions on sm_90. */
static __device__ __forceinline__ void load_kv_tile(u32 kt, const char *kc, const char *vc, const long long *tab_row,
                                                    const int *pos_row, int v_col, u32 ld_dst, u32 ld_dst_odd) {
  long long ko[LD_ROWS], vo[LD_ROWS];
  bool ok[LD_ROWS];
#pragma unroll
  for (int k = 0; k < LD_ROWS; k++) {
    ko[k] = tab_row[k * LD_RSTEP];
    vo[k] = tab_row[v_col + k * LD_RSTEP];
    ok[k] = pos_row[k * LD_RSTEP] != NO_ROW;
  }
#pragma unroll
  for (int k = 0; k < LD_ROWS; k++) {
    const u32 dst = kt + ld_dst_of(k, ld_dst, ld_dst_odd);
    cp_async16_if(dst, kc + ko[k], ok[k]);
    cp_async16_if(dst + SMEM_KV * 2, vc + vo[k], ok[k]);
  }
}

/* base + row * row_bytes as one PTX mad.wide.s32 (ptxas on sm_90a still emits it as a 32 x 32 -> 64-bit
 * multiply and a 64-bit add: three instructions) */
static __device__ __forceinline__ const char *row_ptr(const char *base, int row, int row_bytes) {
  const char *r;
  asm("mad.wide.s32 %0, %1, %2, %3;" : "=l"(r) : "r"(row), "r"(row_bytes), "l"(base));
  return r;
}

/* Ragged: where token j of the item's request starts in K (v 0) or V (v 1), from the chunk base c
 * (kc or vc: this thread's chunk); recomputed per tile, since registers are what the 128-row tile
 * lacks. (Kept per item in shared memory instead, the offsets made NVRTC's ptxas spill 24 bytes in
 * the timed kernel: docs/perf.md, kernel v5.) */
static __device__ __forceinline__ const char *ragged_row(const struct prefill_params &p, const struct prefill_item &it,
                                                         const char *c, int v, int j) {
  return row_ptr(c + 2 * (long long)it.kv_head * (v ? p.v_stride_head : p.k_stride_head), it.kv_entry + j,
                 v ? p.v_row_bytes : p.k_row_bytes);
}

/* Ragged: the copies of the tile whose first row is at kr / vr (this thread's chunk included);
 * rows from `lim` on are past the chunk (zero-filled; their address is row 0's, never read).
 * lim is the block's, so the branch is uniform: an interior tile (every row present) takes the
 * thread's first row once and steps LD_RSTEP rows per copy, a 32-bit add on a 64-bit pointer, with
 * no bound per row (the host keeps LD_RSTEP row steps, at most 32 rows, within an int). */
static __device__ __forceinline__ void load_kv_rows(u32 kt, const char *kr, const char *vr, int k_row_bytes,
                                                    int v_row_bytes, int ld_r0, int lim, u32 ld_dst, u32 ld_dst_odd) {
  if (lim >= KV_TILE) {
    const char *k = row_ptr(kr, ld_r0, k_row_bytes), *v = row_ptr(vr, ld_r0, v_row_bytes);
    const int ks = LD_RSTEP * k_row_bytes, vs = LD_RSTEP * v_row_bytes;
#pragma unroll
    for (int j = 0; j < LD_ROWS; j++) {
      const u32 dst = kt + ld_dst_of(j, ld_dst, ld_dst_odd);
      cp_async16_s(dst, k, 16);
      cp_async16_s(dst + SMEM_KV * 2, v, 16);
      k += ks;
      v += vs;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < LD_ROWS; k++) {
    const int r = ld_r0 + k * LD_RSTEP;
    const bool ok = r < lim;
    const int rr = ok ? r : 0;
    const u32 dst = kt + ld_dst_of(k, ld_dst, ld_dst_odd);
    cp_async16_if(dst, row_ptr(kr, rr, k_row_bytes), ok);
    cp_async16_if(dst + SMEM_KV * 2, row_ptr(vr, rr, v_row_bytes), ok);
  }
}

/* The copies of the item's tile whose first token is t1 into the buffer at `buf`: ragged
 * rows addressed directly (contig; rows from kv_end on are zero-filled), else through the tile's row table
 * (tab / tpos: its slot). */
static __device__ __forceinline__ void load_next_tile(const struct prefill_params &p, const struct prefill_item &it,
                                                      bool contig, u32 buf, const char *kc, const char *vc, int t1,
                                                      int kv_end, const long long *tab, const int *tpos, int v_col,
                                                      int ld_r0, u32 ld_dst, u32 ld_dst_odd) {
  if (contig)
    load_kv_rows(buf, ragged_row(p, it, kc, 0, t1), ragged_row(p, it, vc, 1, t1), p.k_row_bytes, p.v_row_bytes, ld_r0,
                 kv_end - t1, ld_dst, ld_dst_odd);
  else
    load_kv_tile(buf, kc, vc, tab + ld_r0, tpos + ld_r0, v_col, ld_dst, ld_dst_odd);
}

/* The item's Q tile, packed rows [row_start, row_start + CTA_Q), into a swizzled tile; rows past
 * the request's queries become zeros. When the group size divides LD_RSTEP (1, 2, 4, 8 with head_dim
 * 128), a thread copies chunk c of rows r0 + i * LD_RSTEP, so its head stays and its token steps by
 * LD_RSTEP / GROUP_SIZE: each copy is one pointer step and one compare instead of a division and two
 * 64-bit products (the general loop: ~3% of the stall samples of full ragged 16 x 1024 on the H200). */
static __device__ __forceinline__ void load_q_tile(u16 *sq, const struct prefill_params &p, const struct prefill_item &it) {
#if (CTA_Q * CH) % NUM_THREADS == 0 && LD_RSTEP % GROUP_SIZE == 0
  const int c = threadIdx.x % CH, r0 = threadIdx.x / CH;
  const int pr0 = it.row_start + r0, tok0 = pr0 / GROUP_SIZE, g = pr0 - tok0 * GROUP_SIZE;
  const int left = it.qo_len - tok0; /* copy i is a query row while i * (LD_RSTEP / GROUP_SIZE) < left */
  const u16 *src =
      p.q + (i64)(it.q_start + tok0) * p.q_stride_tok + (i64)(it.kv_head * GROUP_SIZE + g) * p.q_stride_head + c * 8;
  const i64 step = (i64)(LD_RSTEP / GROUP_SIZE) * p.q_stride_tok;
#pragma unroll 1 /* unrolled, the 128-row kernels spill (NVRTC, sm_90a) */
  for (int i = 0; i < CTA_Q * CH / NUM_THREADS; i++) {
    const bool ok = i * (LD_RSTEP / GROUP_SIZE) < left;
    cp_async16(sq + swz(r0 + i * LD_RSTEP, c), ok ? src : p.q, ok ? 16 : 0);
    src += step;
  }
#else
  for (int idx = threadIdx.x; idx < CTA_Q * CH; idx += NUM_THREADS) {
    int row = idx / CH, c = idx % CH;
    int pr = it.row_start + row;
    int tok = pr / GROUP_SIZE, g = pr - tok * GROUP_SIZE;
    const u16 *src = p.q;
    int bytes = 0;
    if (tok < it.qo_len) {
      src = p.q + (i64)(it.q_start + tok) * p.q_stride_tok + (i64)(it.kv_head * GROUP_SIZE + g) * p.q_stride_head + c * 8;
      bytes = 16;
    }
    cp_async16(sq + swz(row, c), src, bytes);
  }
#endif
}

/* Everything an item needs before its first tile, issued by the whole block: its Q tile, the row
 * tables of its tiles 0 and 1 (paged/BSR; then a barrier) and its tile 0 into the K/V buffer `buf`,
 * one commit group. Returns this thread's page id for tile 2's table (the loop's prefetch). */
static __device__ __forceinline__ int stage_item(const struct prefill_params &p, const struct prefill_item &it,
                                                 bool contig, int tab_writers, long long *tabs, int *tposs, u16 *sq,
                                                 int *sqpos, u32 buf, const char *kc, const char *vc, int v_col,
                                                 int ld_r0, u32 ld_dst, u32 ld_dst_odd) {
  const int tid = threadIdx.x;
  const int n_tiles = it.kv_end > it.kv_begin ? (it.kv_end - it.kv_begin + KV_TILE - 1) / KV_TILE : 0;
  int pf_page = -1;
  load_q_tile(sq, p, it); /* first: its copies fly while the tables wait for their page ids */
  if (!contig) {
    if (tid < tab_writers) {
      for (int x = 0; x < 2 && x < n_tiles; x++)
        write_row_table(p, it, tabs + x * TAB_SLOT_WORDS, tposs + x * KV_TILE, x, tid, row_page(p, it, x, tid % KV_TILE));
      if (n_tiles > 2) pf_page = row_page(p, it, 2, tid % KV_TILE);
    }
    __syncthreads();
  }
#if ROPE
  for (int row = tid; row < CTA_Q; row += NUM_THREADS) sqpos[row] = it.q_pos_base + (it.row_start + row) / GROUP_SIZE;
#endif
  if (n_tiles > 0) {
    if (contig)
      load_kv_rows(buf, ragged_row(p, it, kc, 0, it.kv_begin), ragged_row(p, it, vc, 1, it.kv_begin), p.k_row_bytes,
                   p.v_row_bytes, ld_r0, it.kv_end - it.kv_begin, ld_dst, ld_dst_odd);
    else
      load_kv_tile(buf, kc, vc, tabs + ld_r0, tposs + ld_r0, v_col, ld_dst, ld_dst_odd);
  }
  cp_async_commit();
  return pf_page;
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
prefill_kernel(const struct prefill_params p) {
  extern __shared__ __align__(16) u16 smem[];
  u16 *sq = smem, *skv = smem + SMEM_Q; /* buffer b: K at skv + 2b * SMEM_KV, V after it */
  long long *tabs = (long long *)(skv + 4 * SMEM_KV); /* [3][2][KV_TILE] */
  int *tposs = (int *)(tabs + 3 * TAB_SLOT_WORDS);    /* [3][KV_TILE] */
#if ROPE
  int *sqpos = tposs + 3 * KV_TILE;                    /* [CTA_Q] */
#else
  int *sqpos = NULL;
#endif
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = (tid >> 5) / WKV;    /* the warp's rows: [warp * 16 * MF, +16 * MF) */
  const int warp_kv = (tid >> 5) % WKV; /* the warp's columns of each KV tile */
  const int ld_c = tid % CH, ld_r0 = tid / CH;
  /* the loader's per-thread constants (see load_kv_tile) */
  const u32 s_kv = smem_addr(skv);
  const u32 ld_dst = (u32)swz(ld_r0, ld_c) * 2, ld_dst_odd = (u32)swz(ld_r0 + LD_RSTEP, ld_c) * 2;
  const char *kc = (const char *)(p.k + ld_c * 8), *vc = (const char *)(p.v + ld_c * 8);
  /* RoPE reads the positions from the tables, so its kernels always build them */
  const bool contig = !ROPE && p.contig;
  const int v_col = p.kv_same_offsets ? 0 : KV_TILE;
  const int tab_writers = p.kv_same_offsets ? KV_TILE : TAB_WRITERS;
  /* fragment bases: Q rows (A of S), K rows (B of S) and V rows (B of P V, transposed), the last
   * two relative to their tile buffer */
  u32 qa_base[4], kb_base[4], vb_base[4];
  frag_bases(qa_base, smem_addr(sq) + (u32)(warp * 16 * MF + (lane & 15)) * HEAD_DIM * 2, lane >> 4, lane);
  frag_bases(kb_base, (u32)(warp_kv * KVW + (lane & 7) + ((lane >> 4) << 3)) * HEAD_DIM * 2, (lane >> 3) & 1, lane);
  frag_bases(vb_base, (u32)(warp_kv * KVW + (lane & 7) + (((lane >> 3) & 1) << 3)) * HEAD_DIM * 2, lane >> 4, lane);
  const int *cta = p.lists + p.cta_indptr_off;
  const int item_begin = cta[blockIdx.x], item_end = cta[blockIdx.x + 1];
  const int items_off = p.lists[p.items_off_word];
  const float log2e = KV_LOG2E;
  const float scale_log2 = p.sm_scale * log2e;

  /* The item lives in shared memory and is read where used: the 128-row tile has no registers to
   * hold its twelve fields through the loop. Item i + 1's descriptor is copied into s_next (three
   * 16-byte cp.async) while item i runs, so an item starts with a shared-memory copy, not a
   * dependent global load. */
  __shared__ __align__(16) struct prefill_item s_item, s_next;
  const struct prefill_item &it = s_item;
  pdl_launch_dependents();
  if (tid < 3 && item_begin < item_end)
    cp_async16(&s_next.q_start + 4 * tid, p.lists + items_off + 16 * item_begin + 4 * tid, 16);
  cp_async_commit();
  /* Programmatic dependent launch (common.cuh; KVATTN_PREFILL_PDL): the work lists above are plan's
   * copy; q, K/V, the page ids, the outputs and the partial states are touched only after this. */
  pdl_wait();
  /* Cross-item staging (STAGE_NEXT): once an item's last tile is done, the next item is staged
   * (tables, Q, tile 0) before this item's epilogue, whose work then covers the copies' latency.
   * gpar: the K/V buffer of the item's tile 0 (tiles alternate buffers across items); staged: the
   * item was staged by the one before. */
#if STAGE_NEXT
  int gpar = 0, pf_page = -1;
  bool staged = false;
#else
  const int gpar = 0;
  const bool staged = false;
#endif
  for (int item_i = item_begin; item_i < item_end; item_i++) {
    /* Unstaged, every copy lands here: the descriptor, and an item without KV tiles leaves its Q
     * copies to no other wait (they must land before this item's copies target the same buffer).
     * Staged, the previous item waited for everything before staging this one. */
    if (!staged) cp_async_wait<0>();
    __syncthreads(); /* the previous item is done with s_item */
    if (tid < 3) ((int4 *)&s_item)[tid] = ((const int4 *)&s_next)[tid];
    __syncthreads();
    if (tid < 3 && item_i + 1 < item_end) /* lands by this item's first tile, or its end */
      cp_async16(&s_next.q_start + 4 * tid, p.lists + items_off + 16 * (item_i + 1) + 4 * tid, 16);
    cp_async_commit();
    const int qo_heads_base = it.kv_head * GROUP_SIZE;
    const int kv_end = it.kv_end;
    const int n_tiles = kv_end > it.kv_begin ? (kv_end - it.kv_begin + KV_TILE - 1) / KV_TILE : 0;

    /* ---- row tables of tiles 0 and 1, the page of tile 2's row in a register; then Q and tile 0 */
#if STAGE_NEXT
    if (!staged)
      pf_page = stage_item(p, it, contig, tab_writers, tabs, tposs, sq, sqpos, s_kv + gpar * 4 * SMEM_KV, kc, vc, v_col,
                           ld_r0, ld_dst, ld_dst_odd);
    staged = false;
#else
    int pf_page = stage_item(p, it, contig, tab_writers, tabs, tposs, sq, sqpos, s_kv, kc, vc, v_col, ld_r0, ld_dst,
                             ld_dst_odd);
#endif

    /* ---- per-thread row state: rows lane/4 (+8) of each of the warp's MF fragments */
    /* the token of packed row `local` and its position: recomputed where needed (cheap integer
     * math with a constant group size) rather than held in registers the 128-row tile lacks */
#define ROW_TOK(mf, h) ((it.row_start + warp * 16 * MF + (mf) * 16 + (lane >> 2) + 8 * (h)) / GROUP_SIZE)
#define ROW_QPOS(mf, h) (it.q_pos_base + ROW_TOK(mf, h))
#if ALIBI
    float slope[MF][2];
#endif
#if CUSTOM_MASK
    long long mask_row[MF][2];
    const long long mask_first = ((long long)(unsigned)it.mask_lo) | ((long long)it.mask_hi << 32);
#endif
#if ALIBI || CUSTOM_MASK
#pragma unroll
    for (int mf = 0; mf < MF; mf++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        int pr = it.row_start + warp * 16 * MF + mf * 16 + (lane >> 2) + 8 * h;
        int tok = pr / GROUP_SIZE;
#if ALIBI
        slope[mf][h] = p.alibi_slopes[qo_heads_base + (pr - tok * GROUP_SIZE)] * log2e;
#endif
#if CUSTOM_MASK
        mask_row[mf][h] = p.bsr ? (long long)(it.q_start + tok) * p.kv_token_limit
                                : mask_first + (long long)tok * it.kv_len;
#endif
      }
#endif
    /* first and last query position of the tile (causal/window tile classification) */
#if CAUSAL
    const int tile_qpos_lo = it.q_pos_base + it.row_start / GROUP_SIZE;
#endif
#if WINDOW
    const int tile_qpos_hi = it.q_pos_base + (it.row_start + CTA_Q - 1) / GROUP_SIZE;
#endif

    float o[MF][DF][4];
    /* The softmax denominators are summed by the tensor cores: one m16n8k16 per 16 KV columns, P (the
     * P V operand, already packed) times a ones matrix, instead of two FADDs per pair of scores. Every
     * lane then holds its two rows' whole sums (d[mf][0]: row lane/4, d[mf][2]: row lane/4 + 8; 1 and 3
     * are the same sums again, unused), and the sums are of the rounded P that multiplies V.
     * FlashInfer's fa2 kernel sums this way; H200, same run: +3-7% on every prefill row (docs/perf.md). */
    float m[MF][2], d[MF][4];
#pragma unroll
    for (int mf = 0; mf < MF; mf++) {
#pragma unroll
      for (int df = 0; df < DF; df++) o[mf][df][0] = o[mf][df][1] = o[mf][df][2] = o[mf][df][3] = 0.f;
      m[mf][0] = m[mf][1] = KV_NEG_INF;
      d[mf][0] = d[mf][1] = d[mf][2] = d[mf][3] = 0.f;
    }

    int slot = 0; /* tile t's table slot: t % 3 */
    for (int t = 0; t < n_tiles; t++) {
      const int t0 = it.kv_begin + t * KV_TILE, t1 = t0 + KV_TILE;
      const int par = (t + gpar) & 1;
      const u32 kbuf = s_kv + par * 4 * SMEM_KV, vbuf = kbuf + SMEM_KV * 2; /* bytes */
      const int slot1 = slot == 2 ? 0 : slot + 1, slot2 = slot1 == 2 ? 0 : slot1 + 1;
      const int *kpos = tposs + slot * KV_TILE;
      /* tile t (and, at t = 0, Q) landed for every thread's copies; every warp is done with tile t-1,
       * whose buffer tile t+1 now fills, and with the table slot tile t+2 now takes */
      cp_async_wait<0>();
      __syncthreads();
      if (t + 1 < n_tiles) {
        load_next_tile(p, it, contig, s_kv + (par ^ 1) * 4 * SMEM_KV, kc, vc, t1, kv_end,
                       tabs + slot1 * TAB_SLOT_WORDS, tposs + slot1 * KV_TILE, v_col, ld_r0, ld_dst, ld_dst_odd);
        cp_async_commit();
      }
      if (!contig && t + 2 < n_tiles && tid < tab_writers) {
        write_row_table(p, it, tabs + slot2 * TAB_SLOT_WORDS, tposs + slot2 * KV_TILE, t + 2, tid, pf_page);
        if (t + 3 < n_tiles) pf_page = row_page(p, it, t + 3, tid % KV_TILE);
      }
#if ROPE
      if (t == 0) rope_tile(sq, CTA_Q, sqpos, p.rope_freq);
      rope_tile(skv + par * 2 * SMEM_KV, KV_TILE, kpos, p.rope_freq);
      __syncthreads();
#endif

      /* ---- S = Q K^T */
      float s[MF][NF][4];
#pragma unroll
      for (int mf = 0; mf < MF; mf++)
#pragma unroll
        for (int nf = 0; nf < NF; nf++) s[mf][nf][0] = s[mf][nf][1] = s[mf][nf][2] = s[mf][nf][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HEAD_DIM / 16; kk++) {
        u32 a[MF][4];
#pragma unroll
        for (int mf = 0; mf < MF; mf++)
          ldsm_x4(a[mf], FRAG(qa_base, kk) + mf * 16 * HEAD_DIM * 2);
#pragma unroll
        for (int nb = 0; nb < NF / 2; nb++) {
          u32 b[4];
          ldsm_x4(b, kbuf + FRAG(kb_base, kk) + nb * 16 * HEAD_DIM * 2);
#pragma unroll
          for (int mf = 0; mf < MF; mf++) {
            mma16816(s[mf][2 * nb], a[mf], b);
            mma16816(s[mf][2 * nb + 1], a[mf], b + 2);
          }
        }
      }

      /* ---- scores: scale and variants (log2 domain); masks only on tiles that need them (the
       * chunk's last tile, the causal diagonal, the window edge, block-sparse, custom masks) */
      int need_mask = t1 > kv_end || p.bsr;
#if CAUSAL
      need_mask |= t1 - 1 > tile_qpos_lo;
#endif
#if WINDOW
      need_mask |= t0 < tile_qpos_hi - p.window_left;
#endif
#if CUSTOM_MASK
      need_mask = 1;
#endif
#pragma unroll
      for (int mf = 0; mf < MF; mf++)
#pragma unroll
        for (int nf = 0; nf < NF; nf++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            float x = s[mf][nf][e];
#if SOFT_CAP
            {
              float y = x * (p.sm_scale / p.soft_cap), th;
              asm("tanh.approx.f32 %0, %1;" : "=f"(th) : "f"(y));
              x = p.soft_cap * th * log2e;
            }
#elif !FOLD_SCALE
            x *= scale_log2;
#endif
#if ALIBI
            {
              const int col = warp_kv * KVW + nf * 8 + 2 * (lane & 3) + (e & 1);
              x += slope[mf][e >> 1] * (float)((p.bsr ? kpos[col] : t0 + col) - ROW_QPOS(mf, e >> 1));
            }
#endif
            s[mf][nf][e] = x;
          }
      if (need_mask && !p.bsr && !WINDOW && !CUSTOM_MASK) {
        /* chunk end and causal diagonal only: one bound per row, one compare per score */
#pragma unroll
        for (int mf = 0; mf < MF; mf++)
#pragma unroll
          for (int h = 0; h < 2; h++) {
            int last = kv_end - 1; /* the last visible KV position of the row */
#if CAUSAL
            last = min(last, ROW_QPOS(mf, h));
#endif
            const int lim = last - (t0 + warp_kv * KVW + 2 * (lane & 3));
#pragma unroll
            for (int nf = 0; nf < NF; nf++) {
              if (nf * 8 > lim) s[mf][nf][2 * h] = KV_NEG_INF;
              if (nf * 8 + 1 > lim) s[mf][nf][2 * h + 1] = KV_NEG_INF;
            }
          }
      } else if (need_mask) {
#pragma unroll
        for (int mf = 0; mf < MF; mf++)
#pragma unroll
          for (int nf = 0; nf < NF; nf++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
              const int h = e >> 1;
              const int col = warp_kv * KVW + nf * 8 + 2 * (lane & 3) + (e & 1);
              bool keep = t0 + col < kv_end;
              if (p.bsr) keep = keep && kpos[col] != NO_ROW;
#if CAUSAL || WINDOW || CUSTOM_MASK
              const int kp = p.bsr ? kpos[col] : t0 + col;
#endif
#if CAUSAL
              keep = keep && kp <= ROW_QPOS(mf, h);
#endif
#if WINDOW
              keep = keep && (long long)kp >= (long long)ROW_QPOS(mf, h) - p.window_left;
#endif
#if CUSTOM_MASK
              if (keep && ROW_TOK(mf, h) < it.qo_len) {
                long long bit = mask_row[mf][h] + (p.bsr ? kp : t0 + col);
                keep = (__ldg(p.mask + (bit >> 3)) >> (bit & 7)) & 1;
              }
#endif
              if (!keep) s[mf][nf][e] = KV_NEG_INF;
            }
      }

      /* ---- online softmax (rows are shared by the 4 lanes of a quad). The running max m is raised
       * only when some row of the warp has grown past it by more than RESCALE_SLACK (log2 units);
       * otherwise the stale max stays, the exponents stay below 2^RESCALE_SLACK and the rescale of
       * O is skipped. Exact either way: o, d and m always describe the same scaled sums. */
      float mx[MF][2];
      bool grow = false;
#pragma unroll
      for (int mf = 0; mf < MF; mf++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          float v = fmaxf(s[mf][0][2 * h], s[mf][0][2 * h + 1]);
#pragma unroll
          for (int nf = 1; nf < NF; nf++) v = fmaxf(v, fmaxf(s[mf][nf][2 * h], s[mf][nf][2 * h + 1]));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
#if FOLD_SCALE
          v *= scale_log2; /* sm_scale > 0: -inf stays -inf */
#endif
          mx[mf][h] = v;
          grow |= v > m[mf][h] + RESCALE_SLACK;
        }
      if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
        for (int mf = 0; mf < MF; mf++)
#pragma unroll
          for (int h = 0; h < 2; h++) {
            const float mn = fmaxf(m[mf][h], mx[mf][h]);
            const float corr = fast_exp2(m[mf][h] - (mn == KV_NEG_INF ? 0.f : mn)); /* m = -inf: 0 */
            m[mf][h] = mn;
            d[mf][2 * h] *= corr;
#pragma unroll
            for (int df = 0; df < DF; df++) {
              o[mf][df][2 * h] *= corr;
              o[mf][df][2 * h + 1] *= corr;
            }
          }
      }
#pragma unroll
      for (int mf = 0; mf < MF; mf++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const float m_use = m[mf][h] == KV_NEG_INF ? 0.f : m[mf][h]; /* a row masked so far stays exactly 0 */
#pragma unroll
          for (int nf = 0; nf < NF; nf++) {
#if FOLD_SCALE
            float p0 = fast_exp2(fmaf(s[mf][nf][2 * h], scale_log2, -m_use));
            float p1 = fast_exp2(fmaf(s[mf][nf][2 * h + 1], scale_log2, -m_use));
#else
            float p0 = fast_exp2(s[mf][nf][2 * h] - m_use), p1 = fast_exp2(s[mf][nf][2 * h + 1] - m_use);
#endif
            s[mf][nf][2 * h] = p0;
            s[mf][nf][2 * h + 1] = p1;
          }
        }

      /* ---- O += P V */
#pragma unroll
      for (int kb = 0; kb < KVW / 16; kb++) {
        u32 a[MF][4];
#pragma unroll
        for (int mf = 0; mf < MF; mf++) {
          a[mf][0] = pack2(DTYPE, s[mf][2 * kb][0], s[mf][2 * kb][1]);
          a[mf][1] = pack2(DTYPE, s[mf][2 * kb][2], s[mf][2 * kb][3]);
          a[mf][2] = pack2(DTYPE, s[mf][2 * kb + 1][0], s[mf][2 * kb + 1][1]);
          a[mf][3] = pack2(DTYPE, s[mf][2 * kb + 1][2], s[mf][2 * kb + 1][3]);
          const u32 one2 = DTYPE == KV_BF16 ? 0x3F803F80u : 0x3C003C00u, ones[2] = {one2, one2}; /* 1.0 pairs */
          mma16816(d[mf], a[mf], ones); /* row sums of P */
        }
#pragma unroll
        for (int db = 0; db < HEAD_DIM / 16; db++) {
          u32 b[4];
          ldsm_x4_t(b, vbuf + FRAG(vb_base, db) + kb * 16 * HEAD_DIM * 2);
#pragma unroll
          for (int mf = 0; mf < MF; mf++) {
            mma16816(o[mf][2 * db], a[mf], b);
            mma16816(o[mf][2 * db + 1], a[mf], b + 2);
          }
        }
      }
      slot = slot1;
    }
#if STAGE_NEXT
    gpar = (gpar + n_tiles) & 1;
    if (item_i + 1 < item_end) { /* stage the next item; this item's epilogue reads only registers and s_item */
      cp_async_wait<0>();
      __syncthreads(); /* every warp is done with Q, the K/V buffers and the tables; s_next landed */
      pf_page = stage_item(p, s_next, contig, tab_writers, tabs, tposs, sq, sqpos, s_kv + gpar * 4 * SMEM_KV, kc, vc,
                           v_col, ld_r0, ld_dst, ld_dst_odd);
      staged = true;
    }
#endif

#if WKV > 1
    /* ---- the WKV warps of a row group saw different KV columns: merge their (m, d, o) exactly
     * through the (now idle) K/V shared memory into warp_kv 0, which writes the result */
    {
      float *red_o = (float *)(smem + SMEM_Q);     /* [WKV][CTA_Q][HEAD_DIM], unnormalized */
      float *red_m = red_o + WKV * CTA_Q * HEAD_DIM; /* [WKV][CTA_Q] (log2 domain) */
      float *red_d = red_m + WKV * CTA_Q;            /* [WKV][CTA_Q] */
      __syncthreads();
#pragma unroll
      for (int mf = 0; mf < MF; mf++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int local = warp * 16 * MF + mf * 16 + (lane >> 2) + 8 * h;
          const float dd = d[mf][2 * h];
          float *ro = red_o + (warp_kv * CTA_Q + local) * HEAD_DIM + 2 * (lane & 3);
#pragma unroll
          for (int df = 0; df < DF; df++) *(float2 *)(ro + df * 8) = make_float2(o[mf][df][2 * h], o[mf][df][2 * h + 1]);
          if ((lane & 3) == 0) {
            red_m[warp_kv * CTA_Q + local] = m[mf][h];
            red_d[warp_kv * CTA_Q + local] = dd;
          }
        }
      __syncthreads();
      if (warp_kv == 0) {
#pragma unroll
        for (int mf = 0; mf < MF; mf++)
#pragma unroll
          for (int h = 0; h < 2; h++) {
            const int local = warp * 16 * MF + mf * 16 + (lane >> 2) + 8 * h;
            float mx = KV_NEG_INF;
#pragma unroll
            for (int w = 0; w < WKV; w++) mx = fmaxf(mx, red_m[w * CTA_Q + local]);
            float scale[WKV], dsum = 0.f;
#pragma unroll
            for (int w = 0; w < WKV; w++) {
              const float mw = red_m[w * CTA_Q + local];
              scale[w] = mw == KV_NEG_INF ? 0.f : fast_exp2(mw - mx);
              dsum += red_d[w * CTA_Q + local] * scale[w];
            }
#pragma unroll
            for (int df = 0; df < DF; df++) {
              float a0 = 0.f, a1 = 0.f;
#pragma unroll
              for (int w = 0; w < WKV; w++) {
                const float2 v = *(const float2 *)(red_o + (w * CTA_Q + local) * HEAD_DIM + df * 8 + 2 * (lane & 3));
                a0 += v.x * scale[w];
                a1 += v.y * scale[w];
              }
              o[mf][df][2 * h] = a0;
              o[mf][df][2 * h + 1] = a1;
            }
            m[mf][h] = mx;
            d[mf][2 * h] = dsum;
          }
      }
    }
    if (warp_kv != 0) continue;
#endif

    /* ---- epilogue: o / d, lse = (m + log2 d) * ln 2; a row with nothing visible: 0 and -inf */
#if O_STAGE
    /* Staged: the warp's rows of the Q tile are read by this warp alone (its S fragments), and every
     * Q copy landed before tile 0 (an item with no tile takes the direct path: its Q may be landing).
     * 16-byte stores: kvattn_run requires out 16-byte aligned with 16-byte strides in every dimension
     * longer than 1 (a dimension of length 1 is only ever indexed at 0). */
    if (n_tiles > 0 && it.part < 0) {
      __syncwarp(); /* the warp's lanes are past their last Q fragment loads */
#pragma unroll
      for (int mf = 0; mf < MF; mf++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const float dd = d[mf][2 * h];
          const float inv = dd > 0.f ? 1.f / dd : 0.f;
          const int local = warp * 16 * MF + mf * 16 + (lane >> 2) + 8 * h;
#pragma unroll
          for (int df = 0; df < DF; df++)
            *(u32 *)(sq + swz(local, df) + 2 * (lane & 3)) =
                pack2(O_DTYPE, o[mf][df][2 * h] * inv, o[mf][df][2 * h + 1] * inv);
          const int pr = it.row_start + local;
          const int tok = pr / GROUP_SIZE, g = pr - tok * GROUP_SIZE;
          if (p.lse && (lane & 3) == 0 && tok < it.qo_len)
            p.lse[(i64)(it.q_start + tok) * p.lse_stride_tok + (i64)(qo_heads_base + g) * p.lse_stride_head] =
                dd > 0.f ? (m[mf][h] + __log2f(dd)) * KV_LN2 : KV_NEG_INF;
        }
      __syncwarp();
      /* a lane keeps its 16-byte column; the warp writes 32 / CH rows per step */
      const int c = lane % CH, r0 = warp * 16 * MF + lane / CH;
      u16 *const ob = p.out + (i64)it.q_start * p.o_stride_tok + (i64)qo_heads_base * p.o_stride_head + c * 8;
#pragma unroll 4
      for (int i = 0; i < 16 * MF * CH / 32; i++) {
        const int r = r0 + i * (32 / CH);
        const int pr = it.row_start + r, tok = pr / GROUP_SIZE, g = pr - tok * GROUP_SIZE;
        if (tok < it.qo_len)
          *(uint4 *)(ob + (i64)tok * p.o_stride_tok + (i64)g * p.o_stride_head) = *(const uint4 *)(sq + swz(r, c));
      }
      continue; /* the next item's Q copies follow the loop top's barrier */
    }
#endif
#pragma unroll
    for (int mf = 0; mf < MF; mf++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const float dd = d[mf][2 * h];
        const float inv = dd > 0.f ? 1.f / dd : 0.f;
        const float lse = dd > 0.f ? (m[mf][h] + __log2f(dd)) * KV_LN2 : KV_NEG_INF;
        const int local = warp * 16 * MF + mf * 16 + (lane >> 2) + 8 * h;
        const int pr = it.row_start + local;
        const int tok = pr / GROUP_SIZE, g = pr - tok * GROUP_SIZE;
        if (tok >= it.qo_len) continue;
        if (it.part >= 0) {
          float *dst = p.part_o + (i64)(it.part + local) * HEAD_DIM + 2 * (lane & 3);
#pragma unroll
          for (int df = 0; df < DF; df++)
            *(float2 *)(dst + df * 8) = make_float2(o[mf][df][2 * h] * inv, o[mf][df][2 * h + 1] * inv);
          if ((lane & 3) == 0) p.part_lse[it.part + local] = lse;
        } else {
          u16 *dst = p.out + (i64)(it.q_start + tok) * p.o_stride_tok + (i64)(qo_heads_base + g) * p.o_stride_head +
                     2 * (lane & 3);
#pragma unroll
          for (int df = 0; df < DF; df++)
            *(u32 *)(dst + df * 8) = pack2(O_DTYPE, o[mf][df][2 * h] * inv, o[mf][df][2 * h + 1] * inv);
          if (p.lse && (lane & 3) == 0)
            p.lse[(i64)(it.q_start + tok) * p.lse_stride_tok + (i64)(qo_heads_base + g) * p.lse_stride_head] = lse;
        }
      }
  }
}
