/* attention.c - the public plan/run entry points, the workspace contract, the CPU plan, the checks
 * of a run's tensors against its plan, and merge_state. Backends are reached from here only. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---------------------------------------------------------------- bounds and the CPU workspace */

static kvattn_status bounds_check(const char *fn, const kvattn_bounds *b) {
  RETURN_IF(!b, KVATTN_ERROR_INVALID_ARGUMENT, "%s: bounds is NULL", fn);
  RETURN_IF(b->struct_size < sizeof(kvattn_bounds), KVATTN_ERROR_INVALID_ARGUMENT,
            "%s: bounds.struct_size=%u: initialise it with KVATTN_BOUNDS_INIT", fn, b->struct_size);
  RETURN_IF(b->max_batch < 0 || b->max_batch >= INT32_MAX, KVATTN_ERROR_INVALID_ARGUMENT,
            "%s: bounds.max_batch=%lld must be in 0..2^31-2", fn, (long long)b->max_batch);
  RETURN_IF(b->max_qo_tokens < 0 || b->max_qo_tokens > INT32_MAX, KVATTN_ERROR_INVALID_ARGUMENT,
            "%s: bounds.max_qo_tokens=%lld must be in 0..2^31-1", fn, (long long)b->max_qo_tokens);
  RETURN_IF(b->max_kv_entries < 0 || b->max_kv_entries > INT32_MAX, KVATTN_ERROR_INVALID_ARGUMENT,
            "%s: bounds.max_kv_entries=%lld must be in 0..2^31-1", fn, (long long)b->max_kv_entries);
  return KVATTN_SUCCESS;
}

/* The CPU plan in the workspace: the lowered index arrays and the per-request mask offsets. */
typedef struct cpu_layout {
  size_t qo_indptr, kv_indptr, last_page_len, mask_offset, total;
} cpu_layout;

static cpu_layout cpu_ws_layout(int64_t max_batch) {
  cpu_layout l;
  size_t n = (size_t)max_batch + 1, at = 0;
  l.qo_indptr = at;     at = align_up(at + n * sizeof(int32_t), 64);
  l.kv_indptr = at;     at = align_up(at + n * sizeof(int32_t), 64);
  l.last_page_len = at; at = align_up(at + n * sizeof(int32_t), 64);
  l.mask_offset = at;   at = align_up(at + n * sizeof(int64_t), 64);
  l.total = at;
  return l;
}

KVATTN_API kvattn_status kvattn_workspace_size(kvattn_context *ctx, const kvattn_attention_desc *desc_in,
                                               const kvattn_bounds *bounds, size_t *device_bytes,
                                               size_t *host_bytes) {
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_workspace_size: ctx is NULL");
  RETURN_IF(!device_bytes || !host_bytes, KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_workspace_size: device_bytes or host_bytes is NULL");
  kvattn_attention_desc desc;
  TRY(desc_resolve(desc_in, &desc));
  TRY(bounds_check("kvattn_workspace_size", bounds));
  if (ctx->backend == KVATTN_BACKEND_CUDA) return gpu_workspace_size(ctx, &desc, bounds, device_bytes, host_bytes);
  *device_bytes = cpu_ws_layout(bounds->max_batch).total;
  *host_bytes = 0;
  return KVATTN_SUCCESS;
}

KVATTN_API kvattn_status kvattn_workspace_alloc(kvattn_context *ctx, size_t device_bytes, size_t host_bytes,
                                                kvattn_workspace *ws) {
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_workspace_alloc: ctx is NULL");
  RETURN_IF(!ws, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_workspace_alloc: ws is NULL");
  memset(ws, 0, sizeof *ws);
  if (ctx->backend == KVATTN_BACKEND_CUDA) return gpu_alloc(ctx, device_bytes, host_bytes, ws);
  ws->device = device_bytes ? calloc(1, device_bytes) : NULL;
  ws->host = host_bytes ? calloc(1, host_bytes) : NULL;
  if ((device_bytes && !ws->device) || (host_bytes && !ws->host)) {
    free(ws->device);
    free(ws->host);
    memset(ws, 0, sizeof *ws);
    return set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_workspace_alloc: cannot allocate %zu + %zu host bytes",
                     device_bytes, host_bytes);
  }
  ws->device_bytes = device_bytes;
  ws->host_bytes = host_bytes;
  return KVATTN_SUCCESS;
}

KVATTN_API kvattn_status kvattn_workspace_free(kvattn_context *ctx, kvattn_workspace *ws) {
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_workspace_free: ctx is NULL");
  if (!ws) return KVATTN_SUCCESS;
  if (ctx->backend == KVATTN_BACKEND_CUDA) return gpu_free(ctx, ws);
  free(ws->device);
  free(ws->host);
  memset(ws, 0, sizeof *ws);
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- attention objects */

KVATTN_API kvattn_status kvattn_attention_create(kvattn_context *ctx, const kvattn_attention_desc *desc,
                                                 const kvattn_bounds *bounds, kvattn_attention **out) {
  clear_error();
  RETURN_IF(!out, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_attention_create: attn (the output pointer) is NULL");
  *out = NULL;
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_attention_create: ctx is NULL");
  kvattn_attention *a = calloc(1, sizeof *a);
  RETURN_IF(!a, KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_attention_create: out of host memory");
  kvattn_status s;
  TRY_GOTO(desc_resolve(desc, &a->desc), s, fail);
  TRY_GOTO(bounds_check("kvattn_attention_create", bounds), s, fail);
  a->ctx = ctx;
  a->bounds = *bounds;
  a->qo_scratch = malloc(((size_t)bounds->max_batch + 1) * sizeof(int32_t));
  a->mask_scratch = malloc(((size_t)bounds->max_batch + 1) * sizeof(int64_t));
  if (a->desc.alibi) a->alibi_slopes = malloc((size_t)a->desc.num_qo_heads * sizeof(float));
  if (!a->qo_scratch || !a->mask_scratch || (a->desc.alibi && !a->alibi_slopes)) {
    s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_attention_create: out of host memory");
    goto fail;
  }
  if (a->desc.alibi)
    for (int h = 0; h < a->desc.num_qo_heads; h++)
      a->alibi_slopes[h] = a->desc.alibi_slopes ? a->desc.alibi_slopes[h]
                                                : alibi_standard_slope(h, a->desc.num_qo_heads);
  a->desc.alibi_slopes = NULL; /* the caller's array is not kept */
  /* what every plan checks the workspace against: the desc and bounds are fixed from here on, so it
   * is computed once (3 us of kvattn_plan's host time at batch 256 on the H200's host, docs/perf.md) */
  TRY_GOTO(kvattn_workspace_size(ctx, &a->desc, &a->bounds, &a->ws_need_dev, &a->ws_need_host), s, fail);
  if (ctx->backend == KVATTN_BACKEND_CUDA) TRY_GOTO(gpu_attention_init(a), s, fail);
  *out = a;
  return KVATTN_SUCCESS;
fail:
  free(a->qo_scratch);
  free(a->mask_scratch);
  free(a->alibi_slopes);
  free(a);
  return s;
}

KVATTN_API kvattn_status kvattn_attention_destroy(kvattn_attention *a) {
  clear_error();
  if (!a) return KVATTN_SUCCESS;
  if (a->gpu) gpu_attention_release(a);
  free(a->qo_scratch);
  free(a->mask_scratch);
  free(a->alibi_slopes);
  free(a);
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- the plan's fingerprint (CPU) */

/* The CPU plan's arrays live in the caller's workspace and the kernels index tensors with them. A
 * run recomputes this hash and refuses a workspace rewritten since the plan (another attention
 * planned into the same workspace, say), which would otherwise send reads past the tensors. */
static uint64_t hash_words(uint64_t h, const void *p, size_t bytes) {
  const unsigned char *c = p;
  for (size_t i = 0; i < bytes; i += 8) {
    uint64_t w = 0;
    memcpy(&w, c + i, bytes - i < 8 ? bytes - i : 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h;
}

static uint64_t cpu_plan_fingerprint(const kvattn_attention *a) {
  const batch_view *bv = &a->bv;
  size_t n = (size_t)bv->batch + 1;
  uint64_t h = hash_words(0x9e3779b97f4a7c15ull, &n, sizeof n);
  h = hash_words(h, bv->qo_indptr, n * sizeof(int32_t));
  h = hash_words(h, bv->kv_indptr, n * sizeof(int32_t));
  if (bv->last_page_len) h = hash_words(h, bv->last_page_len, (n - 1) * sizeof(int32_t));
  if (a->mask_offset) h = hash_words(h, a->mask_offset, n * sizeof(int64_t));
  return h;
}

/* ---------------------------------------------------------------- plan */

KVATTN_API kvattn_status kvattn_plan(kvattn_attention *a, const kvattn_batch *batch, const kvattn_workspace *ws,
                                     kvattn_stream stream) {
  clear_error();
  RETURN_IF(!a, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_plan: attn is NULL");
  RETURN_IF(!ws, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_plan: ws is NULL");
  int64_t rows;
  TRY(batch_rows(batch, &rows));
  RETURN_IF(rows > a->bounds.max_batch, KVATTN_ERROR_BOUNDS_EXCEEDED,
            "kvattn_plan: the batch has %lld %s, more than bounds.max_batch=%lld", (long long)rows,
            batch->format == KVATTN_FORMAT_BLOCK_SPARSE ? "block rows" : "requests", (long long)a->bounds.max_batch);
  const size_t need_dev = a->ws_need_dev, need_host = a->ws_need_host;
  RETURN_IF(ws->device_bytes < need_dev || (need_dev && !ws->device), KVATTN_ERROR_WORKSPACE_TOO_SMALL,
            "kvattn_plan: ws.device_bytes=%zu (device=%p) but this attention's bounds need %zu bytes "
            "(kvattn_workspace_size)", ws->device_bytes, ws->device, need_dev);
  RETURN_IF(ws->host_bytes < need_host || (need_host && !ws->host), KVATTN_ERROR_WORKSPACE_TOO_SMALL,
            "kvattn_plan: ws.host_bytes=%zu (host=%p) but this attention's bounds need %zu bytes "
            "(kvattn_workspace_size)", ws->host_bytes, ws->host, need_host);
  /* The plan stores int32/int64 arrays there (and GPU kernels read them with 16-byte loads): a
   * misaligned base would make every one of those reads misaligned. */
  RETURN_IF((need_dev && (uintptr_t)ws->device % 16) || (need_host && (uintptr_t)ws->host % 16),
            KVATTN_ERROR_INVALID_STRIDE, "kvattn_plan: ws.device=%p and ws.host=%p must be 16-byte aligned",
            ws->device, ws->host);

  batch_view bv;
  int skip = a->ctx->skip_validation;
  TRY(batch_lower(&a->desc, batch, skip, a->qo_scratch, a->bounds.max_batch + 1, &bv));
  RETURN_IF(bv.qo_tokens > a->bounds.max_qo_tokens, KVATTN_ERROR_BOUNDS_EXCEEDED,
            "kvattn_plan: the batch has %lld query rows, more than bounds.max_qo_tokens=%lld",
            (long long)bv.qo_tokens, (long long)a->bounds.max_qo_tokens);
  RETURN_IF(bv.kv_entries > a->bounds.max_kv_entries, KVATTN_ERROR_BOUNDS_EXCEEDED,
            "kvattn_plan: kv_indptr[%d]=%lld is more than bounds.max_kv_entries=%lld", bv.batch,
            (long long)bv.kv_entries, (long long)a->bounds.max_kv_entries);

  /* Custom mask: where each request's bit matrix starts (each padded to a whole byte). */
  int64_t mask_bits = 0;
  if (a->desc.custom_mask) {
    if (bv.bsr_positions) {
      mask_bits = (int64_t)batch->num_rows * batch->num_cols;
      for (int64_t i = 0; i <= rows; i++) a->mask_scratch[i] = 0;
    } else {
      for (int64_t i = 0; i < rows; i++) {
        a->mask_scratch[i] = mask_bits;
        mask_bits += ceil_div64(bv_qo_len(&bv, i) * bv_kv_len(&bv, i), 8) * 8;
      }
      a->mask_scratch[rows] = mask_bits;
    }
  }

  if (a->ctx->backend == KVATTN_BACKEND_CUDA) {
    a->mask_offset = a->desc.custom_mask ? a->mask_scratch : NULL;
    a->mask_bits = mask_bits;
    kvattn_status s = gpu_plan(a, &bv, ws, stream);
    if (s != KVATTN_SUCCESS) {
      a->planned = 0;
      return s;
    }
  } else {
    cpu_layout l = cpu_ws_layout(a->bounds.max_batch);
    char *base = ws->device;
    int32_t *qo = (int32_t *)(base + l.qo_indptr), *kv = (int32_t *)(base + l.kv_indptr);
    memcpy(qo, bv.qo_indptr, ((size_t)rows + 1) * sizeof(int32_t));
    memcpy(kv, bv.kv_indptr, ((size_t)rows + 1) * sizeof(int32_t));
    bv.qo_indptr = qo;
    bv.kv_indptr = kv;
    if (bv.last_page_len) {
      int32_t *last = (int32_t *)(base + l.last_page_len);
      memcpy(last, bv.last_page_len, (size_t)rows * sizeof(int32_t));
      bv.last_page_len = last;
    }
    if (a->desc.custom_mask) {
      int64_t *mo = (int64_t *)(base + l.mask_offset);
      memcpy(mo, a->mask_scratch, ((size_t)rows + 1) * sizeof(int64_t));
      a->mask_offset = mo;
    } else {
      a->mask_offset = NULL;
    }
    bv.indices = NULL; /* the run's indices tensor is read instead */
    a->bv = bv;
    a->mask_bits = mask_bits;
    a->plan_fingerprint = cpu_plan_fingerprint(a);
  }
  a->ws = *ws;
  a->planned = 1;
  a->plan_id = ctx_ws_claim(a->ctx, ws->device ? ws->device : ws->host);
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- run: tensors against the plan */

static tensor_spec spec_for(const kvattn_attention *a, const char *name, int ndim, DLDataType dtype) {
  tensor_spec sp;
  memset(&sp, 0, sizeof sp);
  sp.fn = "kvattn_run";
  sp.name = name;
  sp.ndim = ndim;
  for (int i = 0; i < TVIEW_MAX_DIMS; i++) sp.shape[i] = -1;
  sp.dtype = dtype;
  int gpu = a->ctx->backend == KVATTN_BACKEND_CUDA;
  sp.device_type = gpu ? kDLCUDA : kDLCPU;
  sp.device_id = a->ctx->device_id;
  return sp;
}

/* The GPU kernels load 16 bytes at a time along head_dim: every row must start 16-byte aligned. */
static kvattn_status gpu_vector_layout(const kvattn_attention *a, const char *name, const tview *t) {
  if (a->ctx->backend != KVATTN_BACKEND_CUDA || !t->data) return KVATTN_SUCCESS;
  size_t es = dtype_size(t->dtype);
  RETURN_IF(t->stride[t->ndim - 1] != 1 && t->shape[t->ndim - 1] > 1, KVATTN_ERROR_INVALID_STRIDE,
            "kvattn_run: %s: the head_dim stride must be 1 on the GPU, got %lld", name,
            (long long)t->stride[t->ndim - 1]);
  RETURN_IF((uintptr_t)t->data % 16, KVATTN_ERROR_INVALID_STRIDE,
            "kvattn_run: %s data+byte_offset=%p is not 16-byte aligned (the GPU kernels use 16-byte loads)", name,
            (void *)t->data);
  for (int i = 0; i + 1 < t->ndim; i++)
    RETURN_IF(t->shape[i] > 1 && (t->stride[i] * (int64_t)es) % 16, KVATTN_ERROR_INVALID_STRIDE,
              "kvattn_run: %s.strides[%d]=%lld elements is not a multiple of 16 bytes (GPU vector loads)", name, i,
              (long long)t->stride[i]);
  return KVATTN_SUCCESS;
}

static kvattn_status check_kv(const kvattn_attention *a, const kvattn_kv *kv, run_tensors *rt) {
  const kvattn_attention_desc *d = &a->desc;
  const batch_view *bv = &a->bv;
  RETURN_IF(!kv, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_run: kv is NULL");
  RETURN_IF(kv->struct_size < sizeof(kvattn_kv), KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: kv.struct_size=%u: initialise it with KVATTN_KV_INIT", kv->struct_size);
  RETURN_IF(kv->layout != KVATTN_LAYOUT_NHD && kv->layout != KVATTN_LAYOUT_HND, KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: kv.layout=%d is not a kvattn_layout", kv->layout);
  int hnd = kv->layout == KVATTN_LAYOUT_HND;
  int P = bv->page_size;
  int64_t Hk = d->num_kv_heads, D = d->head_dim;
  tview k, v;
  tview k_span, v_span; /* the tensors as given, for the aliasing checks */

  if (bv->format == KVATTN_FORMAT_PAGED) {
    RETURN_IF(!((kv->k && kv->v && !kv->kv) || (!kv->k && !kv->v && kv->kv)), KVATTN_ERROR_INVALID_ARGUMENT,
              "kvattn_run: give either kv.k and kv.v, or kv.kv (got k=%p v=%p kv=%p)", (void *)kv->k, (void *)kv->v,
              (void *)kv->kv);
    if (kv->kv) {
      tensor_spec sp = spec_for(a, "kv.kv", 5, d->kv_dtype);
      sp.shape[1] = 2;
      sp.shape[2] = hnd ? Hk : P;
      sp.shape[3] = hnd ? P : Hk;
      sp.shape[4] = D;
      tview t;
      TRY(tensor_check(kv->kv, &sp, &t));
      k.data = t.data;
      v.data = t.data ? t.data + t.stride[1] * (int64_t)dtype_size(t.dtype) : NULL;
      k.dtype = v.dtype = t.dtype;
      k.ndim = v.ndim = 4;
      k.device_type = v.device_type = t.device_type;
      k.device_id = v.device_id = t.device_id;
      int64_t shp[4] = {t.shape[0], t.shape[2], t.shape[3], t.shape[4]};
      int64_t str[4] = {t.stride[0], t.stride[2], t.stride[3], t.stride[4]};
      memcpy(k.shape, shp, sizeof shp);
      memcpy(v.shape, shp, sizeof shp);
      memcpy(k.stride, str, sizeof str);
      memcpy(v.stride, str, sizeof str);
    } else {
      tensor_spec sp = spec_for(a, "kv.k", 4, d->kv_dtype);
      sp.shape[1] = hnd ? Hk : P;
      sp.shape[2] = hnd ? P : Hk;
      sp.shape[3] = D;
      TRY(tensor_check(kv->k, &sp, &k));
      sp.name = "kv.v";
      sp.shape[0] = k.shape[0];
      TRY(tensor_check(kv->v, &sp, &v));
    }
    if (hnd) { /* to (page, slot, head, dim) */
      for (int i = 0; i < 2; i++) {
        tview *t = i ? &v : &k;
        int64_t s1 = t->stride[1], n1 = t->shape[1];
        t->stride[1] = t->stride[2];
        t->shape[1] = t->shape[2];
        t->stride[2] = s1;
        t->shape[2] = n1;
      }
    }
    k_span = k;
    v_span = v;
    RETURN_IF(bv->num_pages > 0 && k.shape[0] < bv->num_pages, KVATTN_ERROR_INVALID_SHAPE,
              "kvattn_run: the cache has %lld pages but the plan's batch.num_pages=%lld", (long long)k.shape[0],
              (long long)bv->num_pages);
  } else {
    const char *fmt = bv->format == KVATTN_FORMAT_RAGGED ? "ragged" : "block-sparse";
    RETURN_IF(kv->kv, KVATTN_ERROR_UNSUPPORTED, "kvattn_run: kv.kv (a combined K/V tensor) is for paged KV only; "
              "give kv.k and kv.v for %s KV", fmt);
    RETURN_IF(!kv->k || !kv->v, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_run: kv.k and kv.v are needed (k=%p v=%p)",
              (void *)kv->k, (void *)kv->v);
    tensor_spec sp = spec_for(a, "kv.k", 3, d->kv_dtype);
    sp.shape[hnd ? 0 : 1] = Hk;
    sp.shape[2] = D;
    tview k3, v3;
    TRY(tensor_check(kv->k, &sp, &k3));
    sp.name = "kv.v";
    sp.shape[hnd ? 1 : 0] = k3.shape[hnd ? 1 : 0];
    TRY(tensor_check(kv->v, &sp, &v3));
    /* the 4-d view below rounds the tokens up to whole blocks of P: its span would reach past the
     * tensors, so aliasing is judged on the tensors themselves */
    k_span = k3;
    v_span = v3;
    int tok = hnd ? 1 : 0, head = hnd ? 0 : 1;
    int64_t tokens = k3.shape[tok];
    if (bv->format == KVATTN_FORMAT_RAGGED) {
      RETURN_IF(tokens < bv->kv_entries, KVATTN_ERROR_INVALID_SHAPE,
                "kvattn_run: kv.k has %lld tokens but kv_indptr[%d]=%lld", (long long)tokens, bv->batch,
                (long long)bv->kv_entries);
    } else {
      RETURN_IF(tokens != bv->kv_token_limit, KVATTN_ERROR_INVALID_SHAPE,
                "kvattn_run: kv.k has %lld tokens but the plan's batch.num_cols=%lld", (long long)tokens,
                (long long)bv->kv_token_limit);
    }
    for (int i = 0; i < 2; i++) {
      tview *src = i ? &v3 : &k3, *dst = i ? &v : &k;
      *dst = *src;
      dst->ndim = 4;
      dst->shape[0] = ceil_div64(tokens, P);
      dst->stride[0] = src->stride[tok] * P;
      dst->shape[1] = P;
      dst->stride[1] = src->stride[tok];
      dst->shape[2] = Hk;
      dst->stride[2] = src->stride[head];
      dst->shape[3] = D;
      dst->stride[3] = src->stride[2];
    }
  }
  /* Outputs may not alias the cache: the kernels read KV after writing earlier rows. */
  RETURN_IF(tview_overlap(&rt->out, &k_span) || tview_overlap(&rt->out, &v_span), KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: out overlaps the KV cache");
  RETURN_IF(tview_overlap(&rt->lse, &k_span) || tview_overlap(&rt->lse, &v_span), KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: lse overlaps the KV cache");
  TRY(gpu_vector_layout(a, "kv.k", &k));
  TRY(gpu_vector_layout(a, "kv.v", &v));
  rt->k = k;
  rt->v = v;

  memset(&rt->indices, 0, sizeof rt->indices);
  if (bv->format != KVATTN_FORMAT_RAGGED) {
    tensor_spec sp = spec_for(a, "kv.indices", 1, DT_I32);
    sp.shape[0] = bv->kv_entries;
    TRY(tensor_check(kv->indices, &sp, &rt->indices));
    /* On the host the indices can be checked here for the price of reading them once. */
    if (a->ctx->backend != KVATTN_BACKEND_CUDA && !a->ctx->skip_validation) {
      const int32_t *ix = (const int32_t *)rt->indices.data;
      int64_t pages = k.shape[0];
      for (int64_t e = 0; e < bv->kv_entries; e++) {
        int32_t p = ix[e * rt->indices.stride[0]];
        RETURN_IF(p < 0 || p >= pages, KVATTN_ERROR_INVALID_INDEX,
                  "kvattn_run: kv.indices[%lld]=%d is outside the cache's %lld %s", (long long)e, p, (long long)pages,
                  bv->format == KVATTN_FORMAT_PAGED ? "pages" : "block columns");
      }
    }
  }
  return KVATTN_SUCCESS;
}


kvattn_status run_tensors_check(const kvattn_attention *a, const DLTensor *q, const kvattn_kv *kv,
                                const DLTensor *mask, DLTensor *out, DLTensor *lse, run_tensors *rt) {
  const kvattn_attention_desc *d = &a->desc;
  memset(rt, 0, sizeof *rt);
  tensor_spec sp = spec_for(a, "q", 3, d->q_dtype);
  sp.shape[1] = d->num_qo_heads;
  sp.shape[2] = d->head_dim;
  TRY(tensor_check(q, &sp, &rt->q));
  RETURN_IF(rt->q.shape[0] != a->bv.qo_tokens, KVATTN_ERROR_INVALID_USAGE,
            "kvattn_run: q.shape[0]=%lld but the plan has %lld query rows (plan again for this batch)",
            (long long)rt->q.shape[0], (long long)a->bv.qo_tokens);
  TRY(gpu_vector_layout(a, "q", &rt->q));

  sp = spec_for(a, "out", 3, d->o_dtype);
  sp.shape[0] = a->bv.qo_tokens;
  sp.shape[1] = d->num_qo_heads;
  sp.shape[2] = d->head_dim;
  TRY(tensor_check(out, &sp, &rt->out));
  TRY(gpu_vector_layout(a, "out", &rt->out));

  if (lse) {
    sp = spec_for(a, "lse", 2, DT_F32);
    sp.shape[0] = a->bv.qo_tokens;
    sp.shape[1] = d->num_qo_heads;
    TRY(tensor_check(lse, &sp, &rt->lse));
  }

  TRY(check_kv(a, kv, rt));

  if (d->custom_mask) {
    RETURN_IF(!mask, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_run: custom_mask is NULL but desc.custom_mask=1");
    sp = spec_for(a, "custom_mask", 1, DT_U8);
    TRY(tensor_check(mask, &sp, &rt->mask));
    int64_t need = ceil_div64(a->mask_bits, 8);
    RETURN_IF(rt->mask.shape[0] < need, KVATTN_ERROR_INVALID_SHAPE,
              "kvattn_run: custom_mask has %lld bytes but the planned batch needs %lld", (long long)rt->mask.shape[0],
              (long long)need);
    RETURN_IF(rt->mask.shape[0] > 1 && rt->mask.stride[0] != 1, KVATTN_ERROR_INVALID_STRIDE,
              "kvattn_run: custom_mask.strides[0]=%lld must be 1", (long long)rt->mask.stride[0]);
  } else {
    RETURN_IF(mask, KVATTN_ERROR_INVALID_ARGUMENT,
              "kvattn_run: custom_mask is given but desc.custom_mask=0 (create the attention with custom_mask=1)");
  }

  /* Outputs may not alias inputs (the KV cache: see check_kv). */
  RETURN_IF(tview_overlap(&rt->out, &rt->q), KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_run: out overlaps q");
  RETURN_IF(tview_overlap(&rt->lse, &rt->out) || tview_overlap(&rt->lse, &rt->q), KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: lse overlaps out or q");
  /* The page table and the mask are read while rows are written: writing them would send later
   * reads anywhere. */
  RETURN_IF(tview_overlap(&rt->out, &rt->indices) || tview_overlap(&rt->lse, &rt->indices),
            KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_run: out or lse overlaps kv.indices");
  RETURN_IF(tview_overlap(&rt->out, &rt->mask) || tview_overlap(&rt->lse, &rt->mask), KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_run: out or lse overlaps custom_mask");
  return KVATTN_SUCCESS;
}

KVATTN_API kvattn_status kvattn_run(kvattn_attention *a, const DLTensor *q, const kvattn_kv *kv,
                                    const DLTensor *custom_mask, DLTensor *out, DLTensor *lse, kvattn_stream stream) {
  clear_error();
  RETURN_IF(!a, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_run: attn is NULL");
  RETURN_IF(!a->planned, KVATTN_ERROR_INVALID_USAGE, "kvattn_run: no plan: call kvattn_plan() first");
  RETURN_IF(!ctx_ws_holds(a->ctx, a->ws.device ? a->ws.device : a->ws.host, a->plan_id), KVATTN_ERROR_INVALID_USAGE,
            "kvattn_run: another attention has planned into this workspace since this one's plan: plan again "
            "(a workspace holds one plan at a time)");
  RETURN_IF(a->ctx->backend != KVATTN_BACKEND_CUDA && cpu_plan_fingerprint(a) != a->plan_fingerprint,
            KVATTN_ERROR_INVALID_USAGE,
            "kvattn_run: the workspace no longer holds this attention's plan (another kvattn_plan into the same "
            "workspace, or it was rewritten): plan again");
  run_tensors rt;
  TRY(run_tensors_check(a, q, kv, custom_mask, out, lse, &rt));
  if (a->ctx->backend == KVATTN_BACKEND_CUDA) return gpu_run(a, &rt, stream);
  cpu_problem p = {&a->desc, &a->bv, a->mask_offset, a->alibi_slopes, &rt};
  if (a->ctx->backend == KVATTN_BACKEND_REFERENCE) return cpu_attention_reference(&p);
  return cpu_attention_fast(&p, a->ctx->num_threads);
}

/* ---------------------------------------------------------------- merge_state */

static tensor_spec merge_spec(kvattn_context *ctx, const char *fn, const char *name, int ndim, DLDataType dt) {
  tensor_spec sp;
  memset(&sp, 0, sizeof sp);
  sp.fn = fn;
  sp.name = name;
  sp.ndim = ndim;
  for (int i = 0; i < TVIEW_MAX_DIMS; i++) sp.shape[i] = -1;
  sp.dtype = dt;
  sp.device_type = ctx->backend == KVATTN_BACKEND_CUDA ? kDLCUDA : kDLCPU;
  sp.device_id = ctx->device_id;
  return sp;
}

static kvattn_status merge_dispatch(kvattn_context *ctx, const tview *v, const tview *s, const tview *vo,
                                    const tview *so, kvattn_stream stream) {
  if (ctx->backend == KVATTN_BACKEND_CUDA) return gpu_merge_states(ctx, v, s, vo, so, stream);
  return cpu_merge_states(v, s, vo, so, ctx->backend == KVATTN_BACKEND_REFERENCE ? 1 : ctx->num_threads);
}

static int merge_float(DLDataType t) {
  return dtype_eq(t, DT_F16) || dtype_eq(t, DT_BF16) || dtype_eq(t, DT_F32) || dtype_eq(t, DT_F64);
}

KVATTN_API kvattn_status kvattn_merge_states(kvattn_context *ctx, const DLTensor *v, const DLTensor *s,
                                             DLTensor *v_out, DLTensor *s_out, kvattn_stream stream) {
  const char *fn = "kvattn_merge_states";
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "%s: ctx is NULL", fn);
  RETURN_IF(!v || !s || !v_out, KVATTN_ERROR_INVALID_ARGUMENT, "%s: v, s and v_out are required", fn);
  RETURN_IF(!merge_float(v->dtype), KVATTN_ERROR_INVALID_DTYPE, "%s: v has dtype %s: expected a float type", fn,
            dtype_name(v->dtype));
  tview tv, ts, tvo, tso;
  memset(&tso, 0, sizeof tso);
  tensor_spec sp = merge_spec(ctx, fn, "v", 4, v->dtype);
  TRY(tensor_check(v, &sp, &tv));
  sp = merge_spec(ctx, fn, "s", 3, DT_F32);
  sp.shape[0] = tv.shape[0];
  sp.shape[1] = tv.shape[1];
  sp.shape[2] = tv.shape[2];
  TRY(tensor_check(s, &sp, &ts));
  RETURN_IF(!merge_float(v_out->dtype), KVATTN_ERROR_INVALID_DTYPE, "%s: v_out has dtype %s: expected a float type",
            fn, dtype_name(v_out->dtype));
  sp = merge_spec(ctx, fn, "v_out", 3, v_out->dtype);
  sp.shape[0] = tv.shape[0];
  sp.shape[1] = tv.shape[2];
  sp.shape[2] = tv.shape[3];
  TRY(tensor_check(v_out, &sp, &tvo));
  if (s_out) {
    sp = merge_spec(ctx, fn, "s_out", 2, DT_F32);
    sp.shape[0] = tv.shape[0];
    sp.shape[1] = tv.shape[2];
    TRY(tensor_check(s_out, &sp, &tso));
  }
  return merge_dispatch(ctx, &tv, &ts, &tvo, &tso, stream);
}

/* Two states are merged as one [tokens, 2, heads, dim] view: state 1 sits at the address
 * difference between the tensors, so both paths share the N-state kernels. */
KVATTN_API kvattn_status kvattn_merge_state(kvattn_context *ctx, const DLTensor *v_a, const DLTensor *s_a,
                                            const DLTensor *v_b, const DLTensor *s_b, DLTensor *v_out,
                                            DLTensor *s_out, kvattn_stream stream) {
  const char *fn = "kvattn_merge_state";
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "%s: ctx is NULL", fn);
  RETURN_IF(!v_a || !s_a || !v_b || !s_b || !v_out, KVATTN_ERROR_INVALID_ARGUMENT,
            "%s: v_a, s_a, v_b, s_b and v_out are required", fn);
  RETURN_IF(!merge_float(v_a->dtype), KVATTN_ERROR_INVALID_DTYPE, "%s: v_a has dtype %s: expected a float type", fn,
            dtype_name(v_a->dtype));
  tview va, vb, sa, sb, vo, so;
  memset(&so, 0, sizeof so);
  tensor_spec sp = merge_spec(ctx, fn, "v_a", 3, v_a->dtype);
  TRY(tensor_check(v_a, &sp, &va));
  sp.name = "v_b";
  for (int i = 0; i < 3; i++) sp.shape[i] = va.shape[i];
  TRY(tensor_check(v_b, &sp, &vb));
  sp = merge_spec(ctx, fn, "s_a", 2, DT_F32);
  sp.shape[0] = va.shape[0];
  sp.shape[1] = va.shape[1];
  TRY(tensor_check(s_a, &sp, &sa));
  sp.name = "s_b";
  TRY(tensor_check(s_b, &sp, &sb));
  RETURN_IF(!merge_float(v_out->dtype), KVATTN_ERROR_INVALID_DTYPE, "%s: v_out has dtype %s: expected a float type",
            fn, dtype_name(v_out->dtype));
  sp = merge_spec(ctx, fn, "v_out", 3, v_out->dtype);
  for (int i = 0; i < 3; i++) sp.shape[i] = va.shape[i];
  TRY(tensor_check(v_out, &sp, &vo));
  if (s_out) {
    sp = merge_spec(ctx, fn, "s_out", 2, DT_F32);
    sp.shape[0] = va.shape[0];
    sp.shape[1] = va.shape[1];
    TRY(tensor_check(s_out, &sp, &so));
  }
  for (int i = 0; i < 3; i++)
    RETURN_IF(va.stride[i] != vb.stride[i], KVATTN_ERROR_INVALID_STRIDE,
              "%s: v_a.strides[%d]=%lld differs from v_b.strides[%d]=%lld: give both states the same layout", fn, i,
              (long long)va.stride[i], i, (long long)vb.stride[i]);
  for (int i = 0; i < 2; i++)
    RETURN_IF(sa.stride[i] != sb.stride[i], KVATTN_ERROR_INVALID_STRIDE,
              "%s: s_a.strides[%d]=%lld differs from s_b.strides[%d]=%lld", fn, i, (long long)sa.stride[i], i,
              (long long)sb.stride[i]);
  size_t es = dtype_size(va.dtype);
  tview v = va, s = sa;
  v.ndim = 4;
  v.shape[0] = va.shape[0]; v.stride[0] = va.stride[0];
  v.shape[1] = 2;           v.stride[1] = va.data && vb.data ? (int64_t)(vb.data - va.data) / (int64_t)es : 0;
  v.shape[2] = va.shape[1]; v.stride[2] = va.stride[1];
  v.shape[3] = va.shape[2]; v.stride[3] = va.stride[2];
  s.ndim = 3;
  s.shape[0] = sa.shape[0]; s.stride[0] = sa.stride[0];
  s.shape[1] = 2;           s.stride[1] = sa.data && sb.data ? (int64_t)(sb.data - sa.data) / 4 : 0;
  s.shape[2] = sa.shape[1]; s.stride[2] = sa.stride[1];
  return merge_dispatch(ctx, &v, &s, &vo, &so, stream);
}
