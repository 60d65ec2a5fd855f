/*
 * gpu_prefill.c - the prefill family on the GPU (kernels/prefill.cu, planner src/plan_prefill.c):
 * batch prefill, append and multi-token decode over paged, ragged and block-sparse KV.
 *
 * Routed here by gpu_plan/gpu_run (src/gpu_attention.c) for every batch that is not single-row
 * paged decode. Its workspace region follows decode's: [list region | partial o | partial lse] on
 * the device, the list region's pinned mirror on the host. The plan writes the mirror and sends
 * its used prefix with one async copy; run launches one kernel per query-tile kind the bounds
 * allow (whether or not this batch uses it: an empty list costs a few microseconds, and the
 * launch sequence, grids and parameters never change between plans, so a captured graph replays
 * any batch within the bounds), then the merge kernel when split-KV is possible.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_internal.h"
#include "plan_prefill.h"

enum { CU_FUNC_ATTR_NUM_REGS_ = 4 };


struct gpu_prefill {
  prefill_config cfg;
  prefill_layout lay;
  int reachable[PREFILL_TILE_KINDS]; /* kinds the bounds allow: compiled and launched */
  int threads[PREFILL_TILE_KINDS];
  int smem[PREFILL_TILE_KINDS];
  CUfunction fn[PREFILL_TILE_KINDS];
  CUfunction merge_fn;
  int merge_grid;
  char defines[PREFILL_TILE_KINDS][512];
  float rope_freq[128];
  void *scratch;
  int32_t *qo_indptr, *kv_indptr, *last_page_len; /* host copies of the planned batch */
  /* the current plan */
  int planned;
  prefill_plan_out out;
  CUdeviceptr lists, part_o, part_lse;
  int32_t page_size;
  int contig_ok; /* KVATTN_PREFILL_CONTIG (read once, at create): ragged rows may be addressed directly */
  int pdl;       /* KVATTN_PREFILL_PDL (at create): programmatic dependent launch where the device has it */
};

static int dtype_code(DLDataType t) {
  if (dtype_eq(t, DT_F16)) return 1;
  if (dtype_eq(t, DT_BF16)) return 2;
  return 0;
}

static int env_int(const char *name, int def, int lo, int hi) {
  const char *s = getenv(name);
  if (!s || !*s) return def;
  char *end;
  long v = strtol(s, &end, 10);
  return (*end || v < lo || v > hi) ? def : (int)v;
}

/* Kernel shape of a tile kind; mirrors prefill.cu (NUM_WARPS, KV_TILE, shared memory). Two tuning
 * knobs, read when an attention is created (benchmark sweeps): KVATTN_PREFILL_KV_TILE (16, 32,
 * 64) and KVATTN_PREFILL_WARPS128 (4: two 16-row fragments per warp; 8: one). */
static int kv_tile_for(int head_dim) {
  int t = env_int("KVATTN_PREFILL_KV_TILE", head_dim > 128 ? 32 : 64, 16, 128);
  return t == 16 || t == 32 || t == 64 || t == 128 ? t : 64;
}
static int warps128_for(int head_dim) {
  return env_int("KVATTN_PREFILL_WARPS128", head_dim > 128 ? 8 : 4, 4, 8) == 8 || head_dim > 128 ? 8 : 4;
}
/* Sweep knobs, read when an attention is created (docs/perf.md has what each measured): the scale
 * folded into the exponent (KVATTN_PREFILL_FOLD, on), the next item staged before an item's
 * epilogue (KVATTN_PREFILL_STAGE, off: it spills on sm_90a and measured -3% to +3%). */
static int fold_scale_on(void) { return env_int("KVATTN_PREFILL_FOLD", 1, 0, 1); }
static int stage_next_on(void) { return env_int("KVATTN_PREFILL_STAGE", 0, 0, 1); }
/* An item's O staged through shared memory into 16-byte stores (KVATTN_PREFILL_O_STAGE, on; 0: the
 * MMA fragments' 4-byte stores). H200 A/Bs, docs/perf.md 2026-12-03: +0.4 to +3% on 10 of 11 rows,
 * then +5% on 16x1024 causal and paged, -1.3% to +0.5% on the others. */
static int o_stage_on(void) { return env_int("KVATTN_PREFILL_O_STAGE", 1, 0, 1); }
static int threads_for(int kind, int head_dim) {
  if (kind == 2) return warps128_for(head_dim) * 32;
  return 128;
}
static int smem_with_tile(int kind, int head_dim, int rope, int kt) {
  int q = prefill_tile_rows[kind];
  /* Q, two (K, V) buffers, three row-table slots of (K offset, V offset, position) */
  int bytes = (q + 4 * kt) * head_dim * 2 + 3 * kt * (8 + 8 + 4) + (rope ? q * 4 : 0);
  if (kind == 0) { /* the cross-warp merge reuses K/V: 4 warps x (o, m, d) of 16 rows */
    int merge = q * head_dim * 2 + 4 * q * (head_dim + 2) * 4;
    if (merge > bytes) bytes = merge;
  }
  return bytes;
}
/* CTAs per SM the registers allow (~128-255 per thread) */
static int ctas_by_regs(int kind, int head_dim) {
  return kind == 0 ? 4 : kind == 1 ? (head_dim > 128 ? 2 : 3) : (warps128_for(head_dim) == 8 ? 1 : 2);
}
/* A block's static shared memory beside the dynamic part (the item descriptor), with slack. */
enum { PREFILL_STATIC_SMEM = 256 };
/* The KV tile of a tile kind on a device whose blocks may use `optin` bytes of shared memory. The
 * 16-row kind splits every KV tile over its 4 warps (16 columns each): its tile is 64. Otherwise the
 * configured tile, halved (down to 16) while the double-buffered tiles do not fit a block (sm_86 and
 * sm_89 allow 99 KB: the 128-row head_dim-128 tile takes 32 there) and, for the 128-row kind, while
 * they would leave fewer CTAs per SM than the registers allow (an A100's 164 KB holds two 128-row
 * CTAs with tile 32, one with 64; an H100/H200 holds two with 64). */
static int kind_kv_tile(int kind, int head_dim, int rope, int optin) {
  if (kind == 0) return 64;
  int t = kv_tile_for(head_dim);
  /* two row fragments per warp hold 2 x (head_dim + KV tile) / 2 accumulators: 64 at most */
  if (kind == 2 && warps128_for(head_dim) == 4 && t > 64) t = 64;
  while (t > 16 && smem_with_tile(kind, head_dim, rope, t) + PREFILL_STATIC_SMEM > optin) t /= 2;
  const int per_sm = optin + 1024, want = ctas_by_regs(kind, head_dim);
  if (kind == 2)
    while (t > 32 && per_sm / (smem_with_tile(kind, head_dim, rope, t) + 1024) < want &&
           per_sm / (smem_with_tile(kind, head_dim, rope, t / 2) + 1024) >= want)
      t /= 2;
  return t;
}
static int smem_for(int kind, int head_dim, int rope, int optin) {
  return smem_with_tile(kind, head_dim, rope, kind_kv_tile(kind, head_dim, rope, optin));
}
/* Resident CTAs per SM the grid assumes (registers; shared memory). A wrong guess only costs
 * balance: the CTAs of a persistent grid beyond residency wait. */
static int ctas_per_sm(int kind, int head_dim, int rope, int optin) {
  int by_regs = ctas_by_regs(kind, head_dim);
  int by_smem = (optin + 1024) / (smem_for(kind, head_dim, rope, optin) + 1024);
  int n = by_regs < by_smem ? by_regs : by_smem;
  return n < 1 ? 1 : n;
}

static kvattn_status prefill_supported(const kvattn_attention_desc *d) {
  RETURN_IF(d->head_dim != 64 && d->head_dim != 128 && d->head_dim != 256, KVATTN_ERROR_UNSUPPORTED,
            "GPU prefill: head_dim=%d; the GPU kernels support 64, 128 and 256", d->head_dim);
  int q = dtype_code(d->q_dtype), kv = dtype_code(d->kv_dtype), o = dtype_code(d->o_dtype);
  RETURN_IF(!q || !kv || !o, KVATTN_ERROR_UNSUPPORTED,
            "GPU prefill: dtypes q=%s kv=%s o=%s; the tensor-core kernels take float16 or bfloat16",
            dtype_name(d->q_dtype), dtype_name(d->kv_dtype), dtype_name(d->o_dtype));
  RETURN_IF(q != kv, KVATTN_ERROR_UNSUPPORTED,
            "GPU prefill: q_dtype %s differs from kv_dtype %s; the MMA needs one input type", dtype_name(d->q_dtype),
            dtype_name(d->kv_dtype));
  return KVATTN_SUCCESS;
}

static void config_init(prefill_config *c, int reachable[PREFILL_TILE_KINDS], const struct gpu_context *g,
                        const kvattn_attention_desc *d, const kvattn_bounds *b) {
  memset(c, 0, sizeof *c);
  c->group_size = d->num_qo_heads / d->num_kv_heads;
  c->num_kv_heads = d->num_kv_heads;
  c->num_qo_heads = d->num_qo_heads;
  c->head_dim = d->head_dim;
  c->kv_tile = kind_kv_tile(2, d->head_dim, d->rope, g->max_smem_per_block_optin);
  c->causal = d->causal;
  c->window_left = d->window_left;
  /* batch invariance (fixed_split_size > 0): whether and where a tile's KV is cut here depends on the
   * batch (splits fill an idle grid; the tail balance cuts what does not divide evenly), and pieces of
   * a fixed size for every tile would need partial states of (query rows x KV / size) the bounds cannot
   * size; so under it no tile's KV is cut at all: a query tile's result then depends only on its own
   * rows and KV, the same bits in any batch (tests/gpu: fixed_split_size_gives_a_request_...) */
  c->disable_split = d->disable_split_kv || d->fixed_split_size > 0;
  /* tokens; 1024 measured best of 256/1024/4096 on the append rows (H100, 2026-11-24); a sweep knob */
  c->min_chunk = env_int("KVATTN_PREFILL_MIN_CHUNK", 1024, 16, 1 << 30);
  /* the tail balance (src/plan_prefill.c); 0 = whole items only (A/B runs) */
  c->balance_tail = env_int("KVATTN_PREFILL_BALANCE", 1, 0, 1);
  c->tail_min_tiles = env_int("KVATTN_PREFILL_TAIL_MIN", PREFILL_TAIL_MIN_TILES, 1, 1 << 20);
  c->tail_first = env_int("KVATTN_PREFILL_TAIL_FIRST", 1, 0, 1);
  c->max_batch = b->max_batch;
  c->max_qo_tokens = b->max_qo_tokens;
  c->max_kv_entries = b->max_kv_entries;
  int64_t packed_max = b->max_qo_tokens * c->group_size;
  for (int k = 0; k < PREFILL_TILE_KINDS; k++) {
    reachable[k] = k == 0 || packed_max > (k == 1 ? 16 : 64);
    c->grid[k] = g->sm_count * ctas_per_sm(k, d->head_dim, d->rope, g->max_smem_per_block_optin);
    /* tests: a tiny grid puts many items on each CTA (long CTA lists through one pipeline) */
    c->grid[k] = env_int("KVATTN_PREFILL_GRID", c->grid[k], 1, 1 << 20);
  }
}

/* Partial-state rows only for the kinds the bounds can reach. */
static int64_t part_rows_reachable(const prefill_layout *l, const prefill_config *c, const int reachable[]) {
  int64_t rows = 0;
  for (int k = 0; k < PREFILL_TILE_KINDS; k++)
    if (reachable[k]) rows = l->part_base[k] + l->part_budget[k];
  return rows;
}

typedef struct dev_layout {
  size_t lists, part_o, part_lse, total;
} dev_layout;

static dev_layout dev_layout_of(const prefill_layout *l, const prefill_config *c, const int reachable[]) {
  dev_layout d;
  int64_t rows = part_rows_reachable(l, c, reachable);
  d.lists = 0;
  d.part_o = align_up((size_t)l->list_words * 4, 256);
  d.part_lse = align_up(d.part_o + (size_t)rows * c->head_dim * 4, 256);
  d.total = align_up(d.part_lse + (size_t)rows * 4, 256) + 256; /* + slack: the region start is aligned up */
  return d;
}

/* The host part: the work lists, 16-byte aligned at any offset. */
static size_t host_bytes_of(const prefill_layout *l) { return align_up((size_t)l->list_words * 4, 256) + 16; }

kvattn_status gpu_prefill_workspace_size(kvattn_context *ctx, const kvattn_attention_desc *desc,
                                         const kvattn_bounds *bounds, size_t *device_bytes, size_t *host_bytes) {
  RETURN_IF(!ctx || !ctx->gpu, KVATTN_ERROR_INTERNAL, "gpu_prefill_workspace_size: no GPU context");
  *device_bytes = *host_bytes = 0;
  /* An attention this family cannot serve needs none of its workspace (init says why). */
  if (prefill_supported(desc) != KVATTN_SUCCESS) {
    clear_error();
    return KVATTN_SUCCESS;
  }
  prefill_config c;
  prefill_layout l;
  int reachable[PREFILL_TILE_KINDS];
  config_init(&c, reachable, ctx->gpu, desc, bounds);
  TRY(prefill_layout_compute(&c, &l));
  dev_layout d = dev_layout_of(&l, &c, reachable);
  *device_bytes = d.total;
  *host_bytes = host_bytes_of(&l);
  return KVATTN_SUCCESS;
}

/* One tile kind's kernels, compiled (or loaded from the cache) on its own thread. */
typedef struct compile_job {
  struct gpu_context *g;
  const char *defines;
  int smem;
  CUfunction *merge_fn; /* also fetch prefill_merge (same module) when set */
  CUfunction *fn;
  kvattn_status status;
  char error[1024];
} compile_job;

static void *compile_thread(void *arg) {
  compile_job *j = arg;
  j->status = gpu_get_kernel(j->g, "prefill.cu", j->defines, "prefill_kernel", j->smem, j->fn);
  if (j->status == KVATTN_SUCCESS && j->merge_fn)
    j->status = gpu_get_kernel(j->g, "prefill.cu", j->defines, "prefill_merge", 0, j->merge_fn);
  if (j->status != KVATTN_SUCCESS) snprintf(j->error, sizeof j->error, "%s", kvattn_last_error());
  return NULL;
}

static void make_defines(const kvattn_attention_desc *d, int group, int kind, int optin, char *out, size_t size) {
  int cta_q = prefill_tile_rows[kind];
  snprintf(out, size,
           "-DHEAD_DIM=%d -DGROUP_SIZE=%d -DCTA_Q=%d -DKV_TILE=%d -DWARPS_128=%d -DFOLD_SCALE=%d -DSTAGE_NEXT=%d "
           "-DDTYPE=%d -DO_DTYPE=%d -DCAUSAL=%d -DWINDOW=%d -DCUSTOM_MASK=%d -DSOFT_CAP=%d -DALIBI=%d "
           "-DROPE=%d -DO_STAGE=%d",
           d->head_dim, group, cta_q, kind_kv_tile(kind, d->head_dim, d->rope, optin), warps128_for(d->head_dim),
           fold_scale_on(), stage_next_on(), dtype_code(d->q_dtype),
           dtype_code(d->o_dtype), d->causal != 0,
           d->window_left >= 0, d->custom_mask != 0, d->logits_soft_cap > 0.0f, d->alibi != 0, d->rope != 0, o_stage_on());
}

void gpu_prefill_release(kvattn_attention *a) {
  if (!a || !a->gpu_prefill) return;
  struct gpu_prefill *p = a->gpu_prefill;
  free(p->scratch);
  free(p->qo_indptr);
  free(p->kv_indptr);
  free(p->last_page_len);
  free(p);
  a->gpu_prefill = NULL;
}

kvattn_status gpu_prefill_init(kvattn_attention *a) {
  RETURN_IF(!a || !a->ctx || !a->ctx->gpu, KVATTN_ERROR_INTERNAL, "gpu_prefill_init: no GPU context");
  if (a->gpu_prefill) return KVATTN_SUCCESS;
  struct gpu_context *g = a->ctx->gpu;
  const kvattn_attention_desc *d = &a->desc;
  TRY(prefill_supported(d));
  RETURN_IF(g->cc_major < 8, KVATTN_ERROR_UNSUPPORTED, "GPU prefill: %s is sm_%d%d; the kernels need sm_80 or newer",
            g->name, g->cc_major, g->cc_minor);
  struct gpu_prefill *p = calloc(1, sizeof *p);
  RETURN_IF(!p, KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_attention_create: out of host memory");
  kvattn_status s = KVATTN_SUCCESS;
  config_init(&p->cfg, p->reachable, g, d, &a->bounds);
  TRY_GOTO(prefill_layout_compute(&p->cfg, &p->lay), s, fail);
  size_t nb = (size_t)a->bounds.max_batch + 1;
  p->scratch = malloc(p->lay.scratch_bytes ? p->lay.scratch_bytes : 1);
  p->qo_indptr = malloc(nb * sizeof(int32_t));
  p->kv_indptr = malloc(nb * sizeof(int32_t));
  p->last_page_len = malloc(nb * sizeof(int32_t));
  if (!p->scratch || !p->qo_indptr || !p->kv_indptr || !p->last_page_len) {
    s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_attention_create: %zu bytes of host memory for the prefill planner",
                  p->lay.scratch_bytes);
    goto fail;
  }
  if (d->rope)
    for (int i = 0; i < d->head_dim / 2; i++)
      p->rope_freq[i] = (float)(rope_frequency(d, i) / (d->rope_scale > 0.0f ? d->rope_scale : 1.0f));
  /* The tile kinds compile in parallel (NVRTC is single-threaded per program): on 2 cores the three
   * specializations cost about the time of two. */
  compile_job jobs[PREFILL_TILE_KINDS];
  pthread_t tid[PREFILL_TILE_KINDS];
  int started[PREFILL_TILE_KINDS] = {0};
  for (int k = 0; k < PREFILL_TILE_KINDS; k++) {
    if (!p->reachable[k]) continue;
    make_defines(d, p->cfg.group_size, k, g->max_smem_per_block_optin, p->defines[k], sizeof p->defines[k]);
    p->threads[k] = threads_for(k, d->head_dim);
    p->smem[k] = smem_for(k, d->head_dim, d->rope, g->max_smem_per_block_optin);
    jobs[k] = (compile_job){g, p->defines[k], p->smem[k], k == 0 ? &p->merge_fn : NULL, NULL, KVATTN_SUCCESS, ""};
    jobs[k].fn = &p->fn[k];
    if (k > 0 && pthread_create(&tid[k], NULL, compile_thread, &jobs[k]) == 0)
      started[k] = 1;
    else
      compile_thread(&jobs[k]);
  }
  for (int k = 0; k < PREFILL_TILE_KINDS; k++)
    if (started[k]) pthread_join(tid[k], NULL);
  for (int k = 0; k < PREFILL_TILE_KINDS; k++)
    if (p->reachable[k] && jobs[k].status != KVATTN_SUCCESS) {
      s = set_error(jobs[k].status, "%s", jobs[k].error);
      goto fail;
    }
  p->merge_grid = g->sm_count * 4;
  p->contig_ok = env_int("KVATTN_PREFILL_CONTIG", 1, 0, 1);
  /* Programmatic dependent launch (sm_90+): a launch may start while the kernel before it in the
   * stream finishes (the kernels read only their work lists before pdl_wait()), so back-to-back calls
   * lose the launch gap, and the merge kernel's launch overlaps the prefill kernel's last CTAs. */
  p->pdl = env_int("KVATTN_PREFILL_PDL", 1, 0, 1);
  a->gpu_prefill = p;
  return KVATTN_SUCCESS;
fail:
  a->gpu_prefill = p;
  gpu_prefill_release(a);
  return s;
}

kvattn_status gpu_prefill_plan(kvattn_attention *a, const batch_view *bv, const kvattn_workspace *ws,
                               size_t ws_device_offset, size_t ws_host_offset, kvattn_stream stream) {
  struct gpu_prefill *p = a->gpu_prefill;
  RETURN_IF(!p, KVATTN_ERROR_INTERNAL, "gpu_prefill_plan: prefill not initialised");
  struct gpu_context *g = a->ctx->gpu;
  p->planned = 0;
  RETURN_IF(bv->batch > a->bounds.max_batch, KVATTN_ERROR_BOUNDS_EXCEEDED,
            "kvattn_plan: %d work rows, more than bounds.max_batch=%lld", bv->batch, (long long)a->bounds.max_batch);
  for (int64_t i = 0; i < bv->batch; i++) {
    int64_t q = bv_qo_len(bv, i);
    int k = prefill_tile_kind(q * p->cfg.group_size);
    RETURN_IF(q > 0 && !p->reachable[k], KVATTN_ERROR_BOUNDS_EXCEEDED,
              "kvattn_plan: request %lld has %lld query rows; the bounds (max_qo_tokens=%lld) promised fewer",
              (long long)i, (long long)q, (long long)a->bounds.max_qo_tokens);
    RETURN_IF(bv_kv_len(bv, i) > INT32_MAX - 1024, KVATTN_ERROR_UNSUPPORTED,
              "kvattn_plan: request %lld has %lld KV tokens; the GPU prefill takes < 2^31", (long long)i,
              (long long)bv_kv_len(bv, i));
  }
  const dev_layout dl = dev_layout_of(&p->lay, &p->cfg, p->reachable);
  const size_t need_dev = dl.total, need_host = host_bytes_of(&p->lay);
  RETURN_IF(ws->device_bytes < ws_device_offset + need_dev || ws->host_bytes < ws_host_offset + need_host,
            KVATTN_ERROR_WORKSPACE_TOO_SMALL,
            "kvattn_plan: the prefill region needs %zu device + %zu host bytes after offsets %zu / %zu; the workspace "
            "has %zu / %zu",
            need_dev, need_host, ws_device_offset, ws_host_offset, ws->device_bytes, ws->host_bytes);

  int32_t *host = (int32_t *)(((uintptr_t)ws->host + ws_host_offset + 15) / 16 * 16);
  TRY(prefill_plan_build(&p->cfg, &p->lay, bv, a->mask_offset, a->desc.rope ? p->rope_freq : NULL,
                         a->desc.alibi ? a->alibi_slopes : NULL, host, p->scratch, &p->out));
  CUdeviceptr base = ((CUdeviceptr)(uintptr_t)ws->device + ws_device_offset + 255) / 256 * 256;
  TRY(gpu_make_current(g));
  CU_TRY(g->api, cuMemcpyHtoDAsync(base + dl.lists, host, (size_t)p->out.copy_words * 4, (CUstream)stream));
  p->lists = base + dl.lists;
  p->part_o = base + dl.part_o;
  p->part_lse = base + dl.part_lse;
  p->page_size = bv->page_size;

  /* run's checks read the view; keep host copies of its arrays (the caller's are not kept) */
  a->bv = *bv;
  memcpy(p->qo_indptr, bv->qo_indptr, ((size_t)bv->batch + 1) * sizeof(int32_t));
  memcpy(p->kv_indptr, bv->kv_indptr, ((size_t)bv->batch + 1) * sizeof(int32_t));
  a->bv.qo_indptr = p->qo_indptr;
  a->bv.kv_indptr = p->kv_indptr;
  if (bv->last_page_len) {
    memcpy(p->last_page_len, bv->last_page_len, (size_t)bv->batch * sizeof(int32_t));
    a->bv.last_page_len = p->last_page_len;
  }
  a->bv.indices = NULL;
  p->planned = 1;
  return KVATTN_SUCCESS;
}

/* Is `stream` being captured into a CUDA graph? Unknown (no entry point) counts as yes: then every
 * launch is made, which is always correct. */
typedef CUresult (*stream_is_capturing_fn)(CUstream, int *);
static int stream_capturing(const cuda_api *api, CUstream stream) {
  static stream_is_capturing_fn fn;
  static int looked;
  if (!__atomic_load_n(&looked, __ATOMIC_ACQUIRE)) {
    stream_is_capturing_fn f = api->lib ? (stream_is_capturing_fn)dlsym(api->lib, "cuStreamIsCapturing") : NULL;
    __atomic_store_n(&fn, f, __ATOMIC_RELAXED);
    __atomic_store_n(&looked, 1, __ATOMIC_RELEASE);
  }
  stream_is_capturing_fn f = __atomic_load_n(&fn, __ATOMIC_RELAXED);
  int status = 1;
  if (!f || f(stream, &status) != 0) return 1;
  return status != 0; /* CU_STREAM_CAPTURE_STATUS_NONE = 0 */
}

kvattn_status gpu_prefill_run(kvattn_attention *a, const run_tensors *t, kvattn_stream stream) {
  struct gpu_prefill *p = a->gpu_prefill;
  RETURN_IF(!p || !p->planned, KVATTN_ERROR_INVALID_USAGE, "kvattn_run: no prefill plan: call kvattn_plan() first");
  struct gpu_context *g = a->ctx->gpu;
  const batch_view *bv = &a->bv;
  RETURN_IF(bv->format != KVATTN_FORMAT_RAGGED && bv->kv_entries > 0 && !t->indices.data, KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: kv.indices is needed for a paged or block-sparse cache");
  RETURN_IF(t->indices.data && bv->kv_entries > 1 && t->indices.stride[0] != 1, KVATTN_ERROR_INVALID_STRIDE,
            "kvattn_run: kv.indices.strides[0]=%lld; the GPU prefill reads a contiguous index array",
            (long long)t->indices.stride[0]);

  prefill_params pp;
  memset(&pp, 0, sizeof pp);
  pp.q = t->q.data;
  pp.q_stride_tok = t->q.stride[0];
  pp.q_stride_head = t->q.stride[1];
  pp.k = t->k.data;
  pp.v = t->v.data;
  pp.k_stride_page = t->k.stride[0];
  pp.k_stride_slot = t->k.stride[1];
  pp.k_stride_head = t->k.stride[2];
  pp.v_stride_page = t->v.stride[0];
  pp.v_stride_slot = t->v.stride[1];
  pp.v_stride_head = t->v.stride[2];
  pp.indices = bv->format == KVATTN_FORMAT_RAGGED ? NULL : (const int32_t *)t->indices.data;
  pp.mask = (const uint8_t *)t->mask.data;
  pp.out = t->out.data;
  pp.o_stride_tok = t->out.stride[0];
  pp.o_stride_head = t->out.stride[1];
  pp.lse = (float *)t->lse.data;
  if (pp.lse) {
    pp.lse_stride_tok = t->lse.stride[0];
    pp.lse_stride_head = t->lse.stride[1];
  }
  pp.lists = (const int32_t *)(uintptr_t)p->lists;
  pp.merge_off = (int32_t)p->lay.merge_off;
  pp.merge_count_word = PREFILL_META_MERGE_COUNT;
  pp.rope_freq = (const float *)(uintptr_t)(p->lists + (size_t)p->lay.rope_off * 4);
  pp.alibi_slopes = (const float *)(uintptr_t)(p->lists + (size_t)p->lay.alibi_off * 4);
  pp.part_o = (float *)(uintptr_t)p->part_o;
  pp.part_lse = (float *)(uintptr_t)p->part_lse;
  pp.sm_scale = a->desc.sm_scale;
  pp.soft_cap = a->desc.logits_soft_cap;
  pp.window_left = a->desc.window_left;
  pp.page_size = p->page_size;
  pp.page_shift = -1;
  if (p->page_size > 0 && (p->page_size & (p->page_size - 1)) == 0)
    for (pp.page_shift = 0; (1 << pp.page_shift) < p->page_size; pp.page_shift++) {
    }
  pp.bsr = bv->bsr_positions;
  pp.kv_token_limit = bv->kv_token_limit;
  pp.kv_same_offsets = pp.k_stride_page == pp.v_stride_page && pp.k_stride_slot == pp.v_stride_slot &&
                       pp.k_stride_head == pp.v_stride_head;
  /* Ragged rows are addressed directly (no row tables) when the loader's step (up to 32 rows, see
   * load_kv_rows) fits the kernel's int: |stride| < 2^22 elements, 8 MiB a row at 16 bits. */
  if (bv->format == KVATTN_FORMAT_RAGGED && !pp.bsr && bv->page_size == 1 && pp.k_stride_page > -(1 << 22) &&
      pp.k_stride_page < (1 << 22) && pp.v_stride_page > -(1 << 22) && pp.v_stride_page < (1 << 22) &&
      p->contig_ok) {
    pp.contig = 1;
    pp.k_row_bytes = (int32_t)(2 * pp.k_stride_page);
    pp.v_row_bytes = (int32_t)(2 * pp.v_stride_page);
  }

  TRY(gpu_make_current(g));
  /* Eagerly, launches with nothing to do are skipped (a few microseconds each); a graph being
   * captured gets every launch the bounds allow, so any later plan within them replays correctly. */
  const int all = stream_capturing(g->api, (CUstream)stream);
  for (int k = 0; k < PREFILL_TILE_KINDS; k++) {
    if (!p->reachable[k] || (!all && p->out.items[k] == 0)) continue;
    pp.cta_indptr_off = (int32_t)p->lay.cta_off[k];
    pp.items_off_word = PREFILL_META_ITEMS_OFF + k;
    void *args[] = {&pp};
    TRY(gpu_launch(g, p->fn[k], p->cfg.grid[k], p->threads[k], p->smem[k], stream, args, p->pdl));
  }
  if (!p->cfg.disable_split && (all || p->out.merges > 0)) {
    void *args[] = {&pp};
    TRY(gpu_launch(g, p->merge_fn, p->merge_grid, 128, 0, stream, args, p->pdl));
  }
  return KVATTN_SUCCESS;
}

/* Compile (or find in the cache) the prefill specializations an attention with `desc` (resolved)
 * uses, on `arch`, with no GPU: the three tile kinds, whose modules also hold the merge kernel.
 * For kvattn_warmup. `kernels` and `seconds` are added to. An attention this family cannot serve
 * (say, q and KV dtypes that differ) compiles nothing. */
kvattn_status gpu_prefill_warmup(const kvattn_attention_desc *d, const char *arch, const char *cache_dir, int *kernels,
                                 double *seconds) {
  if (prefill_supported(d) != KVATTN_SUCCESS) {
    clear_error();
    return KVATTN_SUCCESS;
  }
  /* the shared memory per block the architecture allows decides the KV tiles, as on the device */
  const int sm = atoi(arch + 3); /* "sm_NN[a]", checked by the caller */
  const int optin = sm >= 90 ? 232448 : sm == 80 || sm == 87 ? 166912 : 101376;
  for (int k = 0; k < PREFILL_TILE_KINDS; k++) {
    char defines[512];
    make_defines(d, d->num_qo_heads / d->num_kv_heads, k, optin, defines, sizeof defines);
    jit_spec spec = {"prefill.cu", defines, arch};
    void *cubin = NULL;
    size_t size = 0;
    double sec = 0;
    TRY(jit_compile(&spec, cache_dir, &cubin, &size, &sec, NULL));
    free(cubin);
    if (kernels) *kernels += 1;
    if (seconds) *seconds += sec;
  }
  return KVATTN_SUCCESS;
}
