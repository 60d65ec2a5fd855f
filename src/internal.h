/*
 * internal.h - what the library's C files share. Not installed.
 *
 * Vocabulary (used everywhere, never aliased): tokens, qo_heads, kv_heads, head_dim, page_size,
 * batch (requests, or block rows for BSR), kv_entries (kv_indptr[batch]: pages, tokens or blocks).
 */
#ifndef KVATTN_INTERNAL_H
#define KVATTN_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "kvattn.h"

#define KVATTN_HIDDEN __attribute__((visibility("hidden")))

/* ---------------------------------------------------------------- errors */

/* Record the detail of a failure for kvattn_last_error() and return `s`. printf-style. */
kvattn_status set_error(kvattn_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error(void);

/* A function's first lines read as its preconditions. */
#define RETURN_IF(cond, status, ...)              \
  do {                                            \
    if (cond) return set_error(status, __VA_ARGS__); \
  } while (0)
#define TRY(expr)                                 \
  do {                                            \
    kvattn_status try_s_ = (expr);                \
    if (try_s_ != KVATTN_SUCCESS) return try_s_;  \
  } while (0)
#define TRY_GOTO(expr, st, label)                 \
  do {                                            \
    (st) = (expr);                                \
    if ((st) != KVATTN_SUCCESS) goto label;       \
  } while (0)

/* ---------------------------------------------------------------- dtypes, tensors */

extern const DLDataType DT_F16, DT_BF16, DT_F32, DT_F64, DT_I32, DT_U8, DT_E4M3, DT_E5M2;
int dtype_eq(DLDataType a, DLDataType b);
int dtype_is_unset(DLDataType a);
size_t dtype_size(DLDataType a); /* bytes per element, 0 if unknown */
const char *dtype_name(DLDataType a); /* "float16", "bfloat16", ... or "code=%d,bits=%d,lanes=%d" */

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);   /* round to nearest even */
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);   /* round to nearest even */

#define TVIEW_MAX_DIMS 6
/* A tensor as the kernels address it: data already offset by byte_offset, strides in elements
 * (never NULL: compact strides are filled in). */
typedef struct tview {
  char *data;
  DLDataType dtype;
  int ndim;
  int64_t shape[TVIEW_MAX_DIMS];
  int64_t stride[TVIEW_MAX_DIMS];
  int device_type; /* DLDeviceType */
  int device_id;
} tview;

/* What a tensor argument must be. shape[i] < 0 means "any"; ndim must match exactly. */
typedef struct tensor_spec {
  const char *fn;   /* "kvattn_run" */
  const char *name; /* "q" */
  int ndim;
  int64_t shape[TVIEW_MAX_DIMS];
  DLDataType dtype;
  int device_type;  /* kDLCPU or kDLCUDA: kDLCUDAHost/Managed accepted where noted */
  int device_id;
  int inner_contiguous; /* 1: the last dimension must have stride 1 (vector loads) */
  int align_bytes;      /* data must be aligned to this (0 = element size) */
} tensor_spec;

/* Validate `t` against `spec` and fill `out`. Statuses: INVALID_ARGUMENT (NULL), INVALID_DTYPE,
 * INVALID_SHAPE, INVALID_STRIDE (negative or overlapping-impossible strides, alignment, inner
 * stride), DEVICE_MISMATCH. Never dereferences t->data. */
kvattn_status tensor_check(const DLTensor *t, const tensor_spec *spec, tview *out);

/* Element access for the CPU backends (any supported float dtype). */
double tview_get(const tview *t, int64_t offset);
void tview_set(const tview *t, int64_t offset, double value);

/* True if the byte ranges spanned by the two views overlap (conservative: by min/max address). */
int tview_overlap(const tview *a, const tview *b);

/* ---------------------------------------------------------------- the one KV view */

/* Every format lowers to this: per work row i (a request, or a BSR block row), query rows
 * [qo_indptr[i], qo_indptr[i+1]) and KV entries [kv_indptr[i], kv_indptr[i+1]) of `indices`, each
 * entry a page of page_size tokens (the last one last_page_len[i] tokens). */
typedef struct batch_view {
  int32_t format;               /* kvattn_format */
  int32_t batch;                /* work rows */
  int32_t page_size;            /* paged: page_size; ragged: 1; BSR: Bc */
  const int32_t *qo_indptr;     /* [batch+1] always set (decode and BSR are synthesized) */
  const int32_t *kv_indptr;     /* [batch+1] */
  const int32_t *indices;       /* host [kv_entries] page ids, or NULL (ragged: identity; or
                                   paged/BSR when the caller gave no host copy) */
  const int32_t *last_page_len; /* [batch] or NULL: all pages full */
  int64_t kv_token_limit;       /* BSR: tokens at page * page_size + offset >= limit are masked
                                   (a partial last block column); else INT64_MAX */
  int32_t bsr_positions;        /* 1: q_pos = global row, kv_pos = global column */
  int64_t qo_tokens;            /* qo_indptr[batch] */
  int64_t kv_entries;           /* kv_indptr[batch] */
  int64_t num_pages;            /* pages the indices may address (0 = unknown) */
  int32_t qo_rows_max;          /* max qo rows of one work row */
  int64_t kv_len_max;           /* max kv tokens of one work row */
} batch_view;

/* Validate (unless skip) and lower a batch. `qo_scratch` must hold max(batch, block rows) + 1
 * int32 values; it receives qo_indptr for decode and BSR. The view points into the caller's
 * arrays and `qo_scratch`: valid while they are. */
kvattn_status batch_lower(const kvattn_attention_desc *desc, const kvattn_batch *b, int skip_validation,
                          int32_t *qo_scratch, int64_t qo_scratch_len, batch_view *out);
/* How many work rows a batch has (requests, or BSR block rows), without validating it further. */
kvattn_status batch_rows(const kvattn_batch *b, int64_t *rows);

static inline int64_t bv_kv_len(const batch_view *bv, int64_t i) {
  int64_t pages = bv->kv_indptr[i + 1] - bv->kv_indptr[i];
  if (pages <= 0) return 0;
  int64_t last = bv->last_page_len ? bv->last_page_len[i] : bv->page_size;
  return (pages - 1) * (int64_t)bv->page_size + last;
}
static inline int64_t bv_qo_len(const batch_view *bv, int64_t i) {
  return bv->qo_indptr[i + 1] - bv->qo_indptr[i];
}

/* ---------------------------------------------------------------- descriptions */

/* Fill a desc's defaults (sm_scale, dtypes, rope constants) and check its values. The result has
 * no "unset" fields. Statuses: INVALID_ARGUMENT, INVALID_DTYPE, INVALID_SHAPE. */
kvattn_status desc_resolve(const kvattn_attention_desc *in, kvattn_attention_desc *out);
/* The standard ALiBi slope of head h of n. */
float alibi_standard_slope(int h, int n);
/* RoPE inverse frequency of pair d (0 <= d < head_dim/2) under the desc's settings (llama-3.1
 * scaling included); the rotation angle of position p is (p / rope_scale) * freq. */
double rope_frequency(const kvattn_attention_desc *d, int pair);

/* ---------------------------------------------------------------- context, attention */

struct gpu_context;
struct gpu_attention;
struct gpu_prefill;

struct kvattn_context {
  kvattn_backend backend;      /* never AUTO */
  int device_id;
  int num_threads;
  int skip_validation;
  char cache_dir[1024];
  char info[2048];             /* what kvattn_context_info() prints */
  struct gpu_context *gpu;     /* NULL on the CPU */
  /* A workspace holds one plan: which plan was written last into each workspace (by its base
   * address), so that a run whose plan was overwritten by another attention's is refused rather
   * than reading foreign work lists. A small table; an evicted entry is simply not checked. */
  void *ws_lock;               /* pthread_mutex_t* */
  uint64_t plan_serial;        /* the last plan id handed out */
  struct { const void *ws; uint64_t plan_id; } ws_owner[64];
  int ws_owner_next;           /* round-robin eviction */
};

/* Record that plan `plan_id` now occupies the workspace at `ws`; and whether it still does. */
uint64_t ctx_ws_claim(kvattn_context *ctx, const void *ws);
int ctx_ws_holds(kvattn_context *ctx, const void *ws, uint64_t plan_id);

struct kvattn_attention {
  kvattn_context *ctx;
  kvattn_attention_desc desc;  /* resolved */
  kvattn_bounds bounds;
  size_t ws_need_dev, ws_need_host; /* kvattn_workspace_size for desc and bounds, computed at create */
  float *alibi_slopes;         /* [num_qo_heads] resolved slopes (host), when desc.alibi */
  /* the current plan */
  int planned;
  kvattn_workspace ws;
  batch_view bv;               /* arrays live in the workspace (CPU) / pinned host part (GPU) */
  int32_t *qo_scratch;         /* [max_batch+1] host: qo_indptr synthesized while lowering */
  int64_t *mask_scratch;       /* [max_batch+1] host: mask offsets computed by plan (custom mask) */
  const int64_t *mask_offset;  /* [batch] first bit of request i's custom mask (host), or NULL */
  int64_t mask_bits;           /* total bits the custom mask must hold */
  struct gpu_attention *gpu;   /* NULL on the CPU */
  struct gpu_prefill *gpu_prefill; /* the prefill family's state (GPU), or NULL */
  uint64_t plan_id;            /* from ctx_ws_claim() at the last successful plan */
  uint64_t plan_fingerprint;   /* CPU: hash of the plan's arrays in the workspace, checked by run */
};

/* ---------------------------------------------------------------- run arguments */

/* The tensors of one run, validated against the plan: K and V as 4-d views (page,
 * token_in_page, kv_head, dim) whatever the format and layout (ragged/BSR: page_size tokens per
 * page with the page stride; HND: permuted strides). */
typedef struct run_tensors {
  tview q;        /* [qo_tokens, qo_heads, head_dim] */
  tview k, v;     /* [pages, page_size, kv_heads, head_dim] */
  tview indices;  /* int32 [kv_entries]; data NULL for ragged (identity) */
  tview mask;     /* uint8 [bytes]; data NULL when no custom mask */
  tview out;      /* [qo_tokens, qo_heads, head_dim] */
  tview lse;      /* float32 [qo_tokens, qo_heads]; data NULL when not wanted */
} run_tensors;

/* Check the run's tensors against the attention and its plan (shared by all backends). */
kvattn_status run_tensors_check(const kvattn_attention *a, const DLTensor *q, const kvattn_kv *kv,
                                const DLTensor *custom_mask, DLTensor *out, DLTensor *lse,
                                run_tensors *rt);

/* ---------------------------------------------------------------- CPU backend (src/cpu/) */

/* Everything a CPU kernel reads, all host memory. */
typedef struct cpu_problem {
  const kvattn_attention_desc *desc; /* resolved */
  const batch_view *bv;
  const int64_t *mask_offset;        /* [batch] or NULL */
  const float *alibi_slopes;         /* [qo_heads] or NULL */
  const run_tensors *t;
} cpu_problem;

/* The float64 reference: plain loops, every option; the oracle of every test. */
kvattn_status cpu_attention_reference(const cpu_problem *p);
/* The fast path: fp32 accumulation, blocked online softmax, `num_threads` threads. */
kvattn_status cpu_attention_fast(const cpu_problem *p, int num_threads);
/* merge_states on host tensors: v [tokens, states, heads, dim], s [tokens, states, heads] ->
 * v_out [tokens, heads, dim], s_out [tokens, heads] (s_out.data may be NULL). float64 math. */
kvattn_status cpu_merge_states(const tview *v, const tview *s, const tview *v_out, const tview *s_out,
                               int num_threads);

/* Is KV position (kv_pos) visible from query position (q_pos) under the desc's causal/window? */
static inline int visible(const kvattn_attention_desc *d, int64_t q_pos, int64_t kv_pos) {
  if (d->causal && kv_pos > q_pos) return 0;
  if (d->window_left >= 0 && kv_pos < q_pos - d->window_left) return 0;
  return 1;
}

/* ---------------------------------------------------------------- GPU backend (src/gpu*.c) */

/* Fill ctx->gpu, or return BACKEND_UNAVAILABLE with the reason in the error text. */
kvattn_status gpu_context_init(kvattn_context *ctx);
void gpu_context_release(kvattn_context *ctx);
kvattn_status gpu_attention_init(kvattn_attention *a);
void gpu_attention_release(kvattn_attention *a);
kvattn_status gpu_workspace_size(kvattn_context *ctx, const kvattn_attention_desc *desc,
                                 const kvattn_bounds *bounds, size_t *device_bytes, size_t *host_bytes);
kvattn_status gpu_alloc(kvattn_context *ctx, size_t device_bytes, size_t host_bytes, kvattn_workspace *ws);
kvattn_status gpu_free(kvattn_context *ctx, kvattn_workspace *ws);
/* Called by kvattn_plan after the batch is validated and lowered (bv's arrays are the caller's,
 * valid only during the call): builds and uploads the work lists. Must set a->bv to arrays it owns
 * (host copies) if later checks need them. */
kvattn_status gpu_plan(kvattn_attention *a, const batch_view *bv, const kvattn_workspace *ws,
                       kvattn_stream stream);
kvattn_status gpu_run(kvattn_attention *a, const run_tensors *t, kvattn_stream stream);
kvattn_status gpu_merge_states(kvattn_context *ctx, const tview *v, const tview *s, const tview *v_out,
                               const tview *s_out, kvattn_stream stream);

/* Append new K/V (see kvattn_append_paged_kv). kv_indptr is a device tensor. */
kvattn_status gpu_append_paged_kv(kvattn_context *ctx, const tview *k_new, const tview *v_new,
                                  const tview *batch_indices, const tview *positions, const tview *k,
                                  const tview *v, const tview *indices, const tview *kv_indptr,
                                  kvattn_stream stream);

/* CPU append: the same arguments on host memory; checks every position against its pages. */
kvattn_status cpu_append_paged_kv(const tview *k_new, const tview *v_new, const tview *batch_indices,
                                  const tview *positions, const tview *k, const tview *v,
                                  const tview *indices, const tview *kv_indptr);

/* ---------------------------------------------------------------- small helpers */

static inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

#endif /* KVATTN_INTERNAL_H */
