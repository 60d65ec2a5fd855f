/*
 * gpu_attention.c - the GPU backend's attention: kernel choice and compilation, workspace sizing,
 * plan (the decode scheduler + one host-to-device copy) and run (one launch of a fixed grid);
 * also merge_states, append_paged_kv and kvattn_warmup.
 *
 * Decode (every work row has at most one query row, paged KV, no custom mask) runs here;
 * everything else is routed to the prefill family (gpu_prefill_*, see gpu_internal.h), whose
 * workspace region follows decode's.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_internal.h"
#include "gpu_decode.h"
#include "plan_decode.h"

#define DECODE_WARPS 4
#define DECODE_THREADS (DECODE_WARPS * 32)

/* Driver enum values (cuda.h; fixed ABI). */
enum { CU_ATTR_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81, CU_FUNC_ATTR_NUM_REGS = 4 };

/* Host mirror of kernels/decode_paged.cu's decode_params (same order, natural alignment). */
typedef struct decode_params {
  const void *q;
  int64_t q_stride_tok, q_stride_head;
  const void *k, *v;
  int64_t k_stride_page, k_stride_tok, k_stride_head;
  int64_t v_stride_page, v_stride_tok, v_stride_head;
  const int32_t *indices;
  int64_t indices_stride;
  void *out;
  int64_t o_stride_tok, o_stride_head;
  float *lse;
  int64_t lse_stride_tok, lse_stride_head;
  const int32_t *cta_indptr;
  const void *items;
  const void *splits;
  int32_t *counters;
  float *partial_o;
  float *partial_lse;
  const float *rope_freq;
  const float *alibi_slopes;
  float sm_scale;
  float soft_cap;
  int32_t page_size;
  int32_t page_shift;
  int32_t kv_same_strides;
  int32_t narrow;
  int32_t k_page_bytes, k_tok_bytes, v_page_bytes, v_tok_bytes;
  int32_t tg_pages, tg_slots;
  unsigned long long *trace;
  int64_t num_pages;
} decode_params;

enum { MODE_NONE = 0, MODE_DECODE = 1, MODE_PREFILL = 2 };

struct gpu_attention {
  decode_config cfg;
  decode_layout lay;
  int tensor_core;  /* 1: the mma.sync kernel (DECODE_TC) */
  int pdl;          /* 1: ask gpu_launch for programmatic stream serialization (see decode_pdl) */
  int narrow;       /* 1: the narrow loader where the strides allow it (see decode_narrow) */
  int stages;
  char defines[512];
  int smem_bytes;
  CUfunction fn;
  int prefill_ready;
  /* the current plan */
  int mode;
  CUdeviceptr ws_device;
  decode_plan_stats stats;
  int32_t page_size;
  /* KVATTN_DECODE_TRACE=file: per-CTA phase timestamps of the latest launch (DECODE_TRACE in
   * kernels/decode_paged.cu), written to the file when the attention is destroyed */
  CUdeviceptr trace;
  char *trace_path;
};

enum { DECODE_TRACE_WORDS = 12 }; /* kernels/decode_paged.cu's TRACE_WORDS */

/* ---------------------------------------------------------------- configuration */

static int env_int(const char *name, int def, int lo, int hi) {
  const char *s = getenv(name);
  if (!s || !*s) return def;
  char *end;
  long v = strtol(s, &end, 10);
  if (*end || v < lo || v > hi) return def;
  return (int)v;
}

/* Tuning knobs, read when an attention is created (the environment serves benchmark sweeps). */
static int decode_stages(int tc) {
  return tc ? env_int("KVATTN_DECODE_TC_STAGES", 2, 2, 8) : env_int("KVATTN_DECODE_STAGES", 4, 2, 8);
}
static int decode_ctas_per_sm(void) { return env_int("KVATTN_DECODE_CTAS_PER_SM", 2, 1, 8); }
/* The tensor-core path's loader: 1 = page ids staged in shared memory STAGES tiles ahead and STAGES
 * tiles in flight (kernels/decode_paged.cu, DECODE_PIPE); 0 = the earlier one (A/B runs). */
static int decode_pipe(int tc) { return tc ? env_int("KVATTN_DECODE_PIPE", 1, 0, 1) : 0; }
/* ... and where it refills at an item's end: 1 = before the item's partial state is written and merged */
static int decode_early_refill(void) { return env_int("KVATTN_DECODE_EARLY_REFILL", 1, 0, 1); }
/* The L2 prefetch size hint (bytes: 0, 128 or 256) on the tensor-core loader's K/V copies. */
static int decode_l2_prefetch(void) {
  const int v = env_int("KVATTN_DECODE_L2_PREFETCH", 128, 0, 256);
  return v >= 256 ? 256 : v >= 128 ? 128 : 0;
}
/* Programmatic dependent launch (gpu_launch takes it where the device is sm_90+ and the driver has
 * cuLaunchKernelEx): the decode kernel may start while the kernel before it in the stream finishes; it
 * reads only its work lists (written by plan's copy, which no kernel writes) before `griddepcontrol.wait`,
 * and everything else after it, so the launch and the CTAs' first dependent loads overlap the previous
 * kernel's tail. 0 = plain launch. */
static int decode_pdl(void) { return env_int("KVATTN_DECODE_PDL", 1, 0, 1); }
/* The early prefetch (kernels/decode_paged.cu prefetch_early): the K/V tiles a CTA asks L2 for before
 * griddepcontrol.wait, overlapping the kernel before it; 0 = none. */
static int decode_early_prefetch(void) { return env_int("KVATTN_DECODE_EARLY_PREFETCH", 2, 0, 8); }
/* The tensor-core loader's 32-bit row offsets (kernels/decode_paged.cu, issue_tile_narrow) where the
 * strides allow them (gpu_run checks); 0 = the 64-bit loader everywhere (A/B runs). */
static int decode_narrow(void) { return env_int("KVATTN_DECODE_NARROW", 1, 0, 1); }

static int dtype_code(DLDataType t) {
  if (dtype_eq(t, DT_F16)) return 1;
  if (dtype_eq(t, DT_BF16)) return 2;
  if (dtype_eq(t, DT_F32)) return 3;
  return 0;
}

/* Mirrors the kernel's SMEM_BYTES. */
static int decode_smem_bytes(int tc, int head_dim, int group_heads, int stages, int pipe) {
  int tx = head_dim / 8, tg = DECODE_THREADS / tx, row = head_dim + 8;
  int tile = tc ? 64 : tg * (group_heads <= 4 ? 4 : 2);
  int qrows = tc ? 16 : group_heads, groups = tc ? DECODE_WARPS : tg;
  int ring = stages * (2 * tile * row + qrows * row) * 2;
  int red = (groups * group_heads * head_dim + 2 * groups * group_heads) * 4;
  int ids = tc && pipe ? 2 * stages * tile * 4 : 0; /* ID_SLOTS x ID_SLOT int32 */
  return ring + red + ids;
}

/* The tensor-core path where it applies: head_dim <= 128, no RoPE (K would have to be rotated between
 * shared memory and the MMA), q and KV of one dtype (both MMA operands). AUTO takes it there: it
 * measured faster than the CUDA-core path on every decode workload of docs/perf.md (the FMA path's
 * shuffles and exps stall its few warps). desc.kernel = CUDA_CORE, or KVATTN_DECODE_PATH=cc|tc,
 * forces a path; a TENSOR_CORE hint where it does not apply is refined to the CUDA-core path. */
static int decode_use_tc(const kvattn_attention_desc *d) {
  const int applies = d->head_dim <= 128 && !d->rope && dtype_eq(d->q_dtype, d->kv_dtype);
  const char *env = getenv("KVATTN_DECODE_PATH");
  if (env && !strcmp(env, "cc")) return 0;
  if (env && !strcmp(env, "tc")) return applies;
  return applies && d->kernel != KVATTN_KERNEL_CUDA_CORE;
}

/* The planner's view of the attention, for the path it runs on. */
static void decode_config_for(decode_config *c, const kvattn_attention_desc *d, const kvattn_bounds *b, int grid) {
  decode_config_init(c, d, b, grid);
  const int tc = decode_use_tc(d);
  if (tc) decode_config_group_heads(c, 16);
  /* the planner counts pieces in the kernel's tiles (kernels/decode_paged.cu TILE: 64 tokens on the
   * tensor-core path, TG * TPG on the CUDA-core path); KVATTN_DECODE_TILE_PLAN=0: in tokens (A/B runs) */
  if (env_int("KVATTN_DECODE_TILE_PLAN", 1, 0, 1))
    c->tile = tc ? 64 : (DECODE_THREADS / (c->head_dim / 8)) * (c->group_heads <= 4 ? 4 : 2);
}

static kvattn_status decode_supported(const kvattn_attention_desc *d) {
  RETURN_IF(d->head_dim != 64 && d->head_dim != 128 && d->head_dim != 256, KVATTN_ERROR_UNSUPPORTED,
            "GPU attention: head_dim=%d; the GPU kernels support 64, 128 and 256", d->head_dim);
  int q = dtype_code(d->q_dtype), kv = dtype_code(d->kv_dtype), o = dtype_code(d->o_dtype);
  RETURN_IF(q != 1 && q != 2, KVATTN_ERROR_UNSUPPORTED, "GPU attention: q_dtype %s; the GPU takes float16 or bfloat16",
            dtype_name(d->q_dtype));
  RETURN_IF(kv != 1 && kv != 2, KVATTN_ERROR_UNSUPPORTED,
            "GPU attention: kv_dtype %s; the GPU takes float16 or bfloat16", dtype_name(d->kv_dtype));
  RETURN_IF(o != 1 && o != 2, KVATTN_ERROR_UNSUPPORTED, "GPU attention: o_dtype %s; the GPU writes float16 or bfloat16",
            dtype_name(d->o_dtype));
  return KVATTN_SUCCESS;
}

/* A diagnostic build of the decode kernel that records each CTA's phase times (bench/decode_trace.py
 * reads the file); never on unless asked. */
static const char *decode_trace_path(void) {
  const char *s = getenv("KVATTN_DECODE_TRACE");
  return s && *s ? s : NULL;
}

static void decode_defines(const decode_config *c, const kvattn_attention_desc *d, int stages, char *out, size_t size) {
  snprintf(out, size,
           "-DHEAD_DIM=%d -DGROUP_SIZE=%d -DGROUP_HEADS=%d -DHEAD_BLOCKS=%d -DQ_DTYPE=%d -DKV_DTYPE=%d -DO_DTYPE=%d "
           "-DSTAGES=%d -DNUM_WARPS=%d -DSOFT_CAP=%d -DALIBI=%d -DROPE=%d -DDECODE_TC=%d -DDECODE_PIPE=%d "
           "-DDECODE_EARLY_REFILL=%d -DDECODE_L2_PREFETCH=%d -DDECODE_EARLY_PREFETCH=%d%s",
           c->head_dim, c->group_size, c->group_heads, c->head_blocks, dtype_code(d->q_dtype), dtype_code(d->kv_dtype),
           dtype_code(d->o_dtype), stages, DECODE_WARPS, d->logits_soft_cap > 0.0f, d->alibi != 0, d->rope != 0,
           decode_use_tc(d), decode_pipe(decode_use_tc(d)), decode_early_refill(), decode_l2_prefetch(),
           decode_early_prefetch(),
           decode_trace_path() ? " -DDECODE_TRACE=1" : "");
}

static int decode_grid(const struct gpu_context *g) { return g->sm_count * decode_ctas_per_sm(); }

/* ---------------------------------------------------------------- attention */

kvattn_status gpu_workspace_size(kvattn_context *ctx, const kvattn_attention_desc *desc, const kvattn_bounds *bounds,
                                 size_t *device_bytes, size_t *host_bytes) {
  RETURN_IF(!ctx || !ctx->gpu, KVATTN_ERROR_INTERNAL, "gpu_workspace_size: no GPU context");
  decode_config c;
  decode_layout l;
  decode_config_for(&c, desc, bounds, decode_grid(ctx->gpu));
  decode_layout_init(&l, &c);
  size_t pd = 0, ph = 0;
  TRY(gpu_prefill_workspace_size(ctx, desc, bounds, &pd, &ph));
  *device_bytes = l.device_bytes + pd;
  *host_bytes = l.worklist_bytes + ph;
  return KVATTN_SUCCESS;
}

kvattn_status gpu_attention_init(kvattn_attention *a) {
  struct gpu_context *g = a->ctx->gpu;
  RETURN_IF(!g, KVATTN_ERROR_INTERNAL, "gpu_attention_init: no GPU context");
  TRY(decode_supported(&a->desc));
  struct gpu_attention *ga = calloc(1, sizeof *ga);
  RETURN_IF(!ga, KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_attention_create: out of host memory");
  ga->tensor_core = decode_use_tc(&a->desc);
  ga->pdl = decode_pdl();
  ga->narrow = decode_narrow();
  decode_config_for(&ga->cfg, &a->desc, &a->bounds, decode_grid(g));
  decode_layout_init(&ga->lay, &ga->cfg);
  /* scheduler knobs (benchmark sweeps); the layout's bounds do not depend on them */
  ga->cfg.min_chunk = env_int("KVATTN_DECODE_MIN_CHUNK", ga->cfg.min_chunk, 1, 1 << 24);
  ga->cfg.min_chunk_small = env_int("KVATTN_DECODE_MIN_CHUNK_SMALL", ga->cfg.min_chunk_small, 0, 1 << 24);
  ga->cfg.item_cost = env_int("KVATTN_DECODE_ITEM_COST", ga->cfg.item_cost, 0, 1 << 24);
  ga->stages = decode_stages(ga->tensor_core);
  decode_defines(&ga->cfg, &a->desc, ga->stages, ga->defines, sizeof ga->defines);
  ga->smem_bytes =
      decode_smem_bytes(ga->tensor_core, ga->cfg.head_dim, ga->cfg.group_heads, ga->stages, decode_pipe(ga->tensor_core));
  kvattn_status s = gpu_get_kernel(g, "decode_paged.cu", ga->defines, "decode_paged_kernel", ga->smem_bytes, &ga->fn);
  if (s != KVATTN_SUCCESS) {
    free(ga);
    return s;
  }
  if (decode_trace_path()) {
    const size_t bytes = (size_t)ga->cfg.grid * DECODE_TRACE_WORDS * 8;
    ga->trace_path = strdup(decode_trace_path());
    if (!ga->trace_path || g->api->cuMemAlloc(&ga->trace, bytes) || g->api->cuMemsetD8(ga->trace, 0, bytes)) {
      if (ga->trace) g->api->cuMemFree(ga->trace);
      free(ga->trace_path);
      free(ga);
      return set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_attention_create: KVATTN_DECODE_TRACE: no room for %zu bytes",
                       bytes);
    }
  }
  a->gpu = ga;
  /* Bounds that allow several query rows per request promise prefill-shaped batches: compile that
   * family now rather than on the first such plan. */
  if (a->bounds.max_qo_tokens > a->bounds.max_batch) {
    /* a failure here is not the attention's: decode batches still run, and a prefill-shaped plan
     * retries and reports it */
    if (gpu_prefill_init(a) == KVATTN_SUCCESS)
      ga->prefill_ready = 1;
    else
      clear_error();
  }
  return KVATTN_SUCCESS;
}

/* KVATTN_DECODE_TRACE: the latest launch's per-CTA words as text, one line per CTA (a header says
 * what the words are). Diagnostic output: a failure is reported on stderr, not as a status. */
static void decode_trace_write(kvattn_attention *a) {
  struct gpu_attention *ga = a->gpu;
  struct gpu_context *g = a->ctx->gpu;
  const size_t n = (size_t)ga->cfg.grid * DECODE_TRACE_WORDS;
  unsigned long long *h = malloc(n * 8);
  FILE *f = h ? fopen(ga->trace_path, "w") : NULL;
  if (!f || gpu_make_current(g) || g->api->cuCtxSynchronize() || g->api->cuMemcpyDtoHAsync(h, ga->trace, n * 8, NULL) ||
      g->api->cuStreamSynchronize(NULL)) {
    fprintf(stderr, "kvattn: KVATTN_DECODE_TRACE=%s: the trace could not be written\n", ga->trace_path);
  } else {
    fprintf(f, "# kvattn decode trace, the latest launch: grid %d, tensor-core %d; per CTA: gt_entry_ns gt_exit_ns "
               "clk_entry clk_waited clk_first_tile clk_last_item_end clk_published clk_merged clk_exit smid tiles items\n",
            ga->cfg.grid, ga->tensor_core);
    for (int b = 0; b < ga->cfg.grid; b++) {
      for (int w = 0; w < DECODE_TRACE_WORDS; w++) fprintf(f, "%llu%c", h[(size_t)b * DECODE_TRACE_WORDS + w], w + 1 < DECODE_TRACE_WORDS ? ' ' : '\n');
    }
  }
  if (f) fclose(f);
  free(h);
  g->api->cuMemFree(ga->trace);
  free(ga->trace_path);
}

void gpu_attention_release(kvattn_attention *a) {
  if (!a || !a->gpu) return;
  if (a->gpu->trace) decode_trace_write(a);
  if (a->gpu->prefill_ready) gpu_prefill_release(a);
  free(a->gpu);
  a->gpu = NULL;
}

/* Decode takes paged batches of single-row requests without a custom mask. */
static int is_decode_batch(const kvattn_attention *a, const batch_view *bv) {
  return bv->format == KVATTN_FORMAT_PAGED && bv->qo_rows_max <= 1 && !a->desc.custom_mask && !bv->bsr_positions;
}

kvattn_status gpu_plan(kvattn_attention *a, const batch_view *bv, const kvattn_workspace *ws, kvattn_stream stream) {
  struct gpu_attention *ga = a->gpu;
  RETURN_IF(!ga, KVATTN_ERROR_INTERNAL, "gpu_plan: attention has no GPU state");
  const struct gpu_context *g = a->ctx->gpu;
  ga->mode = MODE_NONE;
  if (!is_decode_batch(a, bv)) {
    if (!ga->prefill_ready) {
      TRY(gpu_prefill_init(a));
      ga->prefill_ready = 1;
    }
    TRY(gpu_prefill_plan(a, bv, ws, ga->lay.device_bytes, ga->lay.worklist_bytes, stream));
    ga->mode = MODE_PREFILL;
    return KVATTN_SUCCESS;
  }
  RETURN_IF(bv->page_size < 1, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_plan: page_size=%d", bv->page_size);
  /* the workspace holds this layout: kvattn_plan checked it against the size computed with it at
   * kvattn_attention_create (decode's work lists plus prefill's) */

  char *host = ws->host;
  float *freq = (float *)(host + ga->lay.rope_freq);
  if (a->desc.rope)
    for (int i = 0; i < a->desc.head_dim / 2; i++)
      freq[i] = (float)(rope_frequency(&a->desc, i) / (a->desc.rope_scale > 0.0f ? a->desc.rope_scale : 1.0f));
  float *slopes = (float *)(host + ga->lay.alibi);
  if (a->desc.alibi && a->alibi_slopes) memcpy(slopes, a->alibi_slopes, (size_t)a->desc.num_qo_heads * sizeof(float));

  TRY(plan_decode(&ga->cfg, &ga->lay, bv, host, &ga->stats));
  TRY(gpu_make_current(a->ctx->gpu));
  CU_TRY(g->api, cuMemcpyHtoDAsync((CUdeviceptr)(uintptr_t)ws->device, host, ga->stats.upload_bytes, (CUstream)stream));

  ga->ws_device = (CUdeviceptr)(uintptr_t)ws->device;
  ga->page_size = bv->page_size;
  ga->mode = MODE_DECODE;
  /* run's checks read only the view's scalars; its arrays were the caller's */
  a->bv = *bv;
  a->bv.qo_indptr = a->bv.kv_indptr = a->bv.indices = a->bv.last_page_len = NULL;
  return KVATTN_SUCCESS;
}

kvattn_status gpu_run(kvattn_attention *a, const run_tensors *t, kvattn_stream stream) {
  struct gpu_attention *ga = a->gpu;
  RETURN_IF(!ga || ga->mode == MODE_NONE, KVATTN_ERROR_INVALID_USAGE, "kvattn_run: no GPU plan: call kvattn_plan() first");
  if (ga->mode == MODE_PREFILL) return gpu_prefill_run(a, t, stream);
  const struct gpu_context *g = a->ctx->gpu;
  RETURN_IF(!t->indices.data && a->bv.kv_entries > 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: kv.indices is needed for a paged cache");

  decode_params p;
  memset(&p, 0, sizeof p);
  p.q = t->q.data;
  p.q_stride_tok = t->q.stride[0];
  p.q_stride_head = t->q.stride[1];
  p.k = t->k.data;
  p.v = t->v.data;
  p.k_stride_page = t->k.stride[0];
  p.k_stride_tok = t->k.stride[1];
  p.k_stride_head = t->k.stride[2];
  p.v_stride_page = t->v.stride[0];
  p.v_stride_tok = t->v.stride[1];
  p.v_stride_head = t->v.stride[2];
  p.indices = (const int32_t *)t->indices.data;
  p.indices_stride = t->indices.data ? t->indices.stride[0] : 1;
  p.out = t->out.data;
  p.o_stride_tok = t->out.stride[0];
  p.o_stride_head = t->out.stride[1];
  p.lse = (float *)t->lse.data;
  if (p.lse) {
    p.lse_stride_tok = t->lse.stride[0];
    p.lse_stride_head = t->lse.stride[1];
  }
  const CUdeviceptr w = ga->ws_device;
  const decode_layout *l = &ga->lay;
  p.cta_indptr = (const int32_t *)(uintptr_t)(w + l->cta_indptr);
  p.items = (const void *)(uintptr_t)(w + l->items);
  p.splits = (const void *)(uintptr_t)(w + l->splits);
  p.counters = (int32_t *)(uintptr_t)(w + l->counters);
  p.partial_o = (float *)(uintptr_t)(w + l->partial_o);
  p.partial_lse = (float *)(uintptr_t)(w + l->partial_lse);
  p.rope_freq = (const float *)(uintptr_t)(w + l->rope_freq);
  p.alibi_slopes = (const float *)(uintptr_t)(w + l->alibi);
  p.sm_scale = a->desc.sm_scale;
  p.soft_cap = a->desc.logits_soft_cap;
  p.page_size = ga->page_size;
  p.kv_same_strides = p.k_stride_page == p.v_stride_page && p.k_stride_tok == p.v_stride_tok &&
                      p.k_stride_head == p.v_stride_head;
  p.page_shift = -1;
  if ((ga->page_size & (ga->page_size - 1)) == 0) {
    int s = 0;
    while ((1 << s) < ga->page_size) s++;
    p.page_shift = s;
  }

  /* the narrow loader: byte strides of pages and tokens that are >= 0 and fit 31 bits (a row's offset is
   * then page * page_bytes + slot * tok_bytes in one 32 x 32 -> 64-bit multiply-add), and page ids */
  {
    const int64_t s4[4] = {p.k_stride_page, p.k_stride_tok, p.v_stride_page, p.v_stride_tok};
    int fits = ga->narrow && p.indices != NULL;
    for (int i = 0; i < 4; i++) fits = fits && s4[i] >= 0 && s4[i] * 2 < ((int64_t)1 << 31);
    fits = fits && (int64_t)ga->page_size * 2 * (s4[1] > s4[3] ? s4[1] : s4[3]) < ((int64_t)1 << 31);
    if (fits) {
      const int tg = DECODE_THREADS / (ga->cfg.head_dim / 8); /* the kernel's TG: token rows per tile pass */
      p.narrow = 1;
      p.k_page_bytes = (int32_t)(s4[0] * 2);
      p.k_tok_bytes = (int32_t)(s4[1] * 2);
      p.v_page_bytes = (int32_t)(s4[2] * 2);
      p.v_tok_bytes = (int32_t)(s4[3] * 2);
      p.tg_pages = tg / ga->page_size;
      p.tg_slots = tg % ga->page_size;
    }
  }

  p.trace = (unsigned long long *)(uintptr_t)ga->trace;
  p.num_pages = t->k.shape[0];

  TRY(gpu_make_current(a->ctx->gpu));
  void *args[] = {&p};
  return gpu_launch(g, ga->fn, ga->cfg.grid, DECODE_THREADS, ga->smem_bytes, stream, args, ga->pdl);
}

/* ---------------------------------------------------------------- merge_states */

typedef struct merge_params {
  const void *v;
  int64_t v_stride[4];
  const float *s;
  int64_t s_stride[3];
  void *v_out;
  int64_t vo_stride[3];
  float *s_out;
  int64_t so_stride[2];
  int64_t tokens;
  int32_t states, heads, dim;
} merge_params;

kvattn_status gpu_merge_states(kvattn_context *ctx, const tview *v, const tview *s, const tview *v_out,
                               const tview *s_out, kvattn_stream stream) {
  struct gpu_context *g = ctx->gpu;
  RETURN_IF(!g, KVATTN_ERROR_INTERNAL, "gpu_merge_states: no GPU context");
  int vd = dtype_code(v->dtype), od = dtype_code(v_out->dtype);
  RETURN_IF(!vd, KVATTN_ERROR_UNSUPPORTED, "kvattn_merge_states: v dtype %s is not supported on the GPU", dtype_name(v->dtype));
  RETURN_IF(!od, KVATTN_ERROR_UNSUPPORTED, "kvattn_merge_states: v_out dtype %s is not supported on the GPU",
            dtype_name(v_out->dtype));
  merge_params p;
  memset(&p, 0, sizeof p);
  p.v = v->data;
  for (int i = 0; i < 4; i++) p.v_stride[i] = v->stride[i];
  p.s = (const float *)s->data;
  for (int i = 0; i < 3; i++) p.s_stride[i] = s->stride[i];
  p.v_out = v_out->data;
  for (int i = 0; i < 3; i++) p.vo_stride[i] = v_out->stride[i];
  p.s_out = s_out && s_out->data ? (float *)s_out->data : NULL;
  if (p.s_out)
    for (int i = 0; i < 2; i++) p.so_stride[i] = s_out->stride[i];
  p.tokens = v->shape[0];
  p.states = (int32_t)v->shape[1];
  p.heads = (int32_t)v->shape[2];
  p.dim = (int32_t)v->shape[3];
  int64_t rows = p.tokens * p.heads;
  if (rows == 0 || p.dim == 0) return KVATTN_SUCCESS;
  char defines[64];
  snprintf(defines, sizeof defines, "-DV_DTYPE=%d -DO_DTYPE=%d", vd, od);
  CUfunction fn;
  TRY(gpu_get_kernel(g, "merge_state.cu", defines, "merge_states_kernel", 0, &fn));
  int64_t blocks = (rows + 7) / 8; /* 8 warps per block, a row per warp */
  int64_t cap = (int64_t)g->sm_count * 16;
  if (blocks > cap) blocks = cap;
  TRY(gpu_make_current(g));
  void *args[] = {&p};
  CU_TRY(g->api, cuLaunchKernel(fn, (unsigned)blocks, 1, 1, 256, 1, 1, 0, (CUstream)stream, args, NULL));
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- append_paged_kv */

typedef struct append_params {
  const void *k_new, *v_new;
  int64_t kn_stride[2], vn_stride[2];
  const int32_t *batch_indices;
  const int32_t *positions;
  void *k, *v;
  int64_t k_stride[3], v_stride[3];
  const int32_t *indices;
  const int32_t *kv_indptr;
  int64_t tokens;
  int32_t batch, kv_heads, head_dim, page_size;
} append_params;

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

kvattn_status gpu_append_paged_kv(kvattn_context *ctx, const tview *k_new, const tview *v_new, const tview *batch_indices,
                                  const tview *positions, const tview *k, const tview *v, const tview *indices,
                                  const tview *kv_indptr, kvattn_stream stream) {
  struct gpu_context *g = ctx->gpu;
  RETURN_IF(!g, KVATTN_ERROR_INTERNAL, "gpu_append_paged_kv: no GPU context");
  RETURN_IF(batch_indices->stride[0] != 1 || positions->stride[0] != 1 || indices->stride[0] != 1 ||
                kv_indptr->stride[0] != 1,
            KVATTN_ERROR_INVALID_STRIDE,
            "kvattn_append_paged_kv: batch_indices, positions, kv.indices and kv_indptr must be contiguous on the GPU");
  const int es = (int)dtype_size(k->dtype);
  RETURN_IF(es != 1 && es != 2 && es != 4, KVATTN_ERROR_UNSUPPORTED, "kvattn_append_paged_kv: dtype %s",
            dtype_name(k->dtype));
  append_params p;
  memset(&p, 0, sizeof p);
  p.k_new = k_new->data;
  p.v_new = v_new->data;
  p.kn_stride[0] = k_new->stride[0];
  p.kn_stride[1] = k_new->stride[1];
  p.vn_stride[0] = v_new->stride[0];
  p.vn_stride[1] = v_new->stride[1];
  p.batch_indices = (const int32_t *)batch_indices->data;
  p.positions = (const int32_t *)positions->data;
  p.k = k->data;
  p.v = v->data;
  for (int i = 0; i < 3; i++) {
    p.k_stride[i] = k->stride[i];
    p.v_stride[i] = v->stride[i];
  }
  p.indices = (const int32_t *)indices->data;
  p.kv_indptr = (const int32_t *)kv_indptr->data;
  p.tokens = k_new->shape[0];
  p.batch = (int32_t)(kv_indptr->shape[0] - 1);
  p.kv_heads = (int32_t)k->shape[2];
  p.head_dim = (int32_t)k->shape[3];
  p.page_size = (int32_t)k->shape[1];
  if (p.tokens == 0 || p.batch <= 0) return KVATTN_SUCCESS;

  /* 16-byte moves when every row starts 16-byte aligned */
  int vec = 16;
  const int64_t *strides[] = {p.kn_stride, p.vn_stride, p.k_stride, p.v_stride};
  const int nstr[] = {2, 2, 3, 3};
  for (int i = 0; i < 4; i++)
    for (int j = 0; j < nstr[i]; j++)
      if ((strides[i][j] * es) % 16) vec = es;
  if (((int64_t)p.head_dim * es) % 16 || !aligned16(p.k_new) || !aligned16(p.v_new) || !aligned16(p.k) ||
      !aligned16(p.v))
    vec = es;
  char defines[64];
  snprintf(defines, sizeof defines, "-DELEM_BYTES=%d -DVEC_BYTES=%d", es, vec);
  CUfunction fn;
  TRY(gpu_get_kernel(g, "append_paged_kv.cu", defines, "append_paged_kv_kernel", 0, &fn));
  int64_t total = p.tokens * p.kv_heads * (p.head_dim / (vec / es));
  int64_t blocks = (total + 255) / 256, cap = (int64_t)g->sm_count * 16;
  if (blocks > cap) blocks = cap;
  TRY(gpu_make_current(g));
  void *args[] = {&p};
  CU_TRY(g->api, cuLaunchKernel(fn, (unsigned)blocks, 1, 1, 256, 1, 1, 0, (CUstream)stream, args, NULL));
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- warmup */

kvattn_status gpu_decode_warmup(const kvattn_attention_desc *desc, const char *arch, const char *cache_dir,
                                int *kernels, double *seconds) {
  RETURN_IF(!desc, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_warmup: desc is NULL");
  RETURN_IF(!arch, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_warmup: arch is NULL (e.g. \"sm_90a\")");
  kvattn_attention_desc d;
  TRY(desc_resolve(desc, &d));
  TRY(decode_supported(&d));
  /* the grid does not enter the kernels' definitions: any value gives the same specialization */
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_batch = b.max_qo_tokens = b.max_kv_entries = 1;
  decode_config c;
  decode_config_for(&c, &d, &b, 1);
  char defines[512];
  decode_defines(&c, &d, decode_stages(decode_use_tc(&d)), defines, sizeof defines);
  char merge_defines[64], append_defines[64];
  snprintf(merge_defines, sizeof merge_defines, "-DV_DTYPE=%d -DO_DTYPE=%d", dtype_code(d.o_dtype), dtype_code(d.o_dtype));
  snprintf(append_defines, sizeof append_defines, "-DELEM_BYTES=%d -DVEC_BYTES=16", (int)dtype_size(d.kv_dtype));
  const jit_spec specs[] = {
      {"decode_paged.cu", defines, arch},
      {"merge_state.cu", merge_defines, arch},
      {"append_paged_kv.cu", append_defines, arch},
  };
  double total = 0;
  int n = 0;
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
    void *cubin = NULL;
    size_t size = 0;
    double sec = 0;
    TRY(jit_compile(&specs[i], cache_dir, &cubin, &size, &sec, NULL));
    free(cubin);
    total += sec;
    n++;
  }
  if (kernels) *kernels = n;
  if (seconds) *seconds = total;
  return KVATTN_SUCCESS;
}

KVATTN_API kvattn_status kvattn_warmup(const kvattn_attention_desc *desc, const char *arch, const char *cache_dir,
                                       int *kernels, double *seconds) {
  clear_error();
  RETURN_IF(!arch, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_warmup: arch is NULL (e.g. \"sm_90a\")");
  /* the architecture is judged before NVRTC is loaded, so a bad name gets its own status */
  int major = 0, minor = 0, used = 0;
  RETURN_IF(sscanf(arch, "sm_%1d%1d%n", &major, &minor, &used) != 2 ||
                (arch[used] != 0 && !(arch[used] == 'a' && arch[used + 1] == 0)),
            KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_warmup: arch=\"%s\": expected sm_NN or sm_NNa (e.g. sm_80, sm_90a)",
            arch);
  RETURN_IF(major < 8, KVATTN_ERROR_UNSUPPORTED, "kvattn_warmup: arch=%s: kvattn's GPU kernels need sm_80 or newer",
            arch);
  int n = 0;
  double total = 0;
  TRY(gpu_decode_warmup(desc, arch, cache_dir, &n, &total));
  kvattn_attention_desc d;
  TRY(desc_resolve(desc, &d));
  /* the prefill family's tile kinds (batches with several query rows, ragged and block-sparse) */
  TRY(gpu_prefill_warmup(&d, arch, cache_dir, &n, &total));
  if (kernels) *kernels = n;
  if (seconds) *seconds = total;
  return KVATTN_SUCCESS;
}
