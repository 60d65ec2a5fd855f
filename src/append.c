/*
 * append.c - kvattn_append_paged_kv: write new K/V tokens into a paged cache.
 *
 * This file checks the arguments, turns the cache (K and V, or one [pages, 2, ...] tensor; NHD or
 * HND) into two 4-d views (page, slot, kv_head, dim), and hands them to the backend. The per-token
 * destination checks need the index arrays' contents, so they live in the backends: the CPU checks
 * all of them before writing anything; a GPU kernel cannot fail and skips a bad token instead.
 */
#include <string.h>

#include "internal.h"

#define FN "kvattn_append_paged_kv"

static int is_cache_dtype(DLDataType t) {
  return dtype_eq(t, DT_F16) || dtype_eq(t, DT_BF16) || dtype_eq(t, DT_F32) || dtype_eq(t, DT_F64) ||
         dtype_eq(t, DT_E4M3) || dtype_eq(t, DT_E5M2);
}

/* A view of `full` with dimension `dim` fixed at `index` and removed. */
static tview view_select(const tview *full, int dim, int64_t index) {
  tview out = *full;
  out.data = full->data ? full->data + index * full->stride[dim] * (int64_t)dtype_size(full->dtype) : NULL;
  for (int i = dim; i + 1 < full->ndim; i++) {
    out.shape[i] = full->shape[i + 1];
    out.stride[i] = full->stride[i + 1];
  }
  out.ndim = full->ndim - 1;
  return out;
}

/* HND stores (page, kv_head, slot, dim): swapping dims 1 and 2 gives (page, slot, kv_head, dim). */
static void to_page_slot_head_dim(tview *t, int layout) {
  if (layout != KVATTN_LAYOUT_HND) return;
  int64_t s = t->shape[1], st = t->stride[1];
  t->shape[1] = t->shape[2], t->stride[1] = t->stride[2];
  t->shape[2] = s, t->stride[2] = st;
}

KVATTN_API kvattn_status kvattn_append_paged_kv(kvattn_context *ctx, const DLTensor *k_new, const DLTensor *v_new,
                                                const DLTensor *batch_indices, const DLTensor *positions,
                                                const kvattn_kv *kv, const DLTensor *kv_indptr,
                                                kvattn_stream stream) {
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, FN ": ctx is NULL");
  RETURN_IF(!kv, KVATTN_ERROR_INVALID_ARGUMENT, FN ": kv is NULL");
  RETURN_IF(kv->struct_size < offsetof(kvattn_kv, indices) + sizeof(kv->indices), KVATTN_ERROR_INVALID_ARGUMENT,
            FN ": kv.struct_size=%u is too small: initialise it with KVATTN_KV_INIT", kv->struct_size);
  RETURN_IF(kv->layout != KVATTN_LAYOUT_NHD && kv->layout != KVATTN_LAYOUT_HND, KVATTN_ERROR_INVALID_ARGUMENT,
            FN ": kv.layout=%d is neither NHD (0) nor HND (1)", kv->layout);
  RETURN_IF(kv->kv && (kv->k || kv->v), KVATTN_ERROR_INVALID_ARGUMENT,
            FN ": kv gives both kv.kv and kv.k/kv.v: pass one combined tensor or two");
  RETURN_IF(!kv->kv && (!kv->k || !kv->v), KVATTN_ERROR_INVALID_ARGUMENT,
            FN ": kv.%s is NULL (and no combined kv.kv is given)", kv->k ? "v" : "k");
  RETURN_IF(!k_new, KVATTN_ERROR_INVALID_ARGUMENT, FN ": k_new is NULL");

  const int gpu = ctx->backend == KVATTN_BACKEND_CUDA;
  const int dev_type = gpu ? kDLCUDA : kDLCPU;
  const DLTensor *cache0 = kv->kv ? kv->kv : kv->k;
  const char *cache_name = kv->kv ? "kv.kv" : "kv.k";
  RETURN_IF(!is_cache_dtype(cache0->dtype), KVATTN_ERROR_INVALID_DTYPE,
            FN ": %s has dtype %s; a cache holds float16, bfloat16, float32, float64 or float8", cache_name,
            dtype_name(cache0->dtype));
  const DLDataType dt = cache0->dtype;
  /* The GPU kernel copies whole rows with vector loads: the head_dim stride must be 1 there. */
  tensor_spec spec = {FN, "", 4, {-1, -1, -1, -1}, dt, dev_type, ctx->device_id, gpu, 0};

  /* The cache, as (page, slot, kv_head, dim) views of K and V. */
  tview k, v;
  if (kv->kv) {
    spec.name = "kv.kv";
    spec.ndim = 5;
    spec.shape[1] = 2;
    spec.shape[4] = -1;
    tview both;
    TRY(tensor_check(kv->kv, &spec, &both));
    k = view_select(&both, 1, 0);
    v = view_select(&both, 1, 1);
  } else {
    spec.name = "kv.k";
    TRY(tensor_check(kv->k, &spec, &k));
    spec.name = "kv.v";
    for (int i = 0; i < 4; i++) spec.shape[i] = k.shape[i];
    TRY(tensor_check(kv->v, &spec, &v));
  }
  to_page_slot_head_dim(&k, kv->layout);
  to_page_slot_head_dim(&v, kv->layout);
  const int64_t page_size = k.shape[1], kv_heads = k.shape[2], head_dim = k.shape[3];
  RETURN_IF(page_size < 1, KVATTN_ERROR_INVALID_SHAPE, FN ": %s has page_size 0 (layout %s)", cache_name,
            kv->layout == KVATTN_LAYOUT_HND ? "HND" : "NHD");

  /* The new tokens: [tokens, kv_heads, head_dim] in the cache's dtype. */
  tview kn, vn;
  tensor_spec tok = {FN, "k_new", 3, {-1, kv_heads, head_dim}, dt, dev_type, ctx->device_id, gpu, 0};
  TRY(tensor_check(k_new, &tok, &kn));
  const int64_t tokens = kn.shape[0];
  tok.name = "v_new";
  tok.shape[0] = tokens;
  TRY(tensor_check(v_new, &tok, &vn));

  tview bi, pos, ix, indptr;
  tensor_spec idx = {FN, "batch_indices", 1, {tokens}, DT_I32, dev_type, ctx->device_id, 0, 0};
  TRY(tensor_check(batch_indices, &idx, &bi));
  idx.name = "positions";
  TRY(tensor_check(positions, &idx, &pos));
  idx.name = "kv.indices";
  idx.shape[0] = -1;
  RETURN_IF(!kv->indices, KVATTN_ERROR_INVALID_ARGUMENT, FN ": kv.indices (the page ids) is NULL");
  TRY(tensor_check(kv->indices, &idx, &ix));
  idx.name = "kv_indptr";
  TRY(tensor_check(kv_indptr, &idx, &indptr));
  RETURN_IF(indptr.shape[0] < 1, KVATTN_ERROR_INVALID_SHAPE,
            FN ": kv_indptr has 0 elements; it needs batch + 1 >= 1");

  /* The cache is the output: it must not share bytes with what is read. */
  const tview *inputs[6] = {&kn, &vn, &bi, &pos, &ix, &indptr};
  const char *input_names[6] = {"k_new", "v_new", "batch_indices", "positions", "kv.indices", "kv_indptr"};
  for (int i = 0; i < 6; i++)
    RETURN_IF(tview_overlap(inputs[i], &k) || tview_overlap(inputs[i], &v), KVATTN_ERROR_INVALID_ARGUMENT,
              FN ": %s overlaps the cache it is written into", input_names[i]);

  if (tokens == 0) return KVATTN_SUCCESS;
  if (gpu) return gpu_append_paged_kv(ctx, &kn, &vn, &bi, &pos, &k, &v, &ix, &indptr, stream);
  return cpu_append_paged_kv(&kn, &vn, &bi, &pos, &k, &v, &ix, &indptr);
}
