/*
 * append.c - write new K/V tokens into a paged cache, on the CPU.
 *
 * Token t of request r = batch_indices[t] at position pos = positions[t] lands in page
 * indices[kv_indptr[r] + pos / page_size], slot pos % page_size. Every token is checked before any
 * byte is written, so a bad batch leaves the cache exactly as it was.
 */
#include <string.h>

#include "internal.h"

static int32_t read_i32(const tview *t, int64_t i) { return ((const int32_t *)t->data)[i * t->stride[0]]; }

/* Copy one head vector of head_dim elements between views of the same dtype (bytes as they are:
 * appending never rounds). */
static void copy_vec(char *dst, int64_t dst_stride, const char *src, int64_t src_stride, int64_t n,
                     size_t elem) {
  if (dst_stride == 1 && src_stride == 1) {
    memcpy(dst, src, (size_t)n * elem);
    return;
  }
  for (int64_t x = 0; x < n; x++) memcpy(dst + x * dst_stride * elem, src + x * src_stride * elem, elem);
}

kvattn_status cpu_append_paged_kv(const tview *k_new, const tview *v_new, const tview *batch_indices,
                                  const tview *positions, const tview *k, const tview *v,
                                  const tview *indices, const tview *kv_indptr) {
  static const char *fn = "kvattn_append_paged_kv";
  const int64_t tokens = k_new->shape[0], kv_heads = k_new->shape[1], head_dim = k_new->shape[2];
  const int64_t num_pages = k->shape[0], page_size = k->shape[1];
  const int64_t batch = kv_indptr->shape[0] - 1, entries = indices->shape[0];
  RETURN_IF(page_size < 1, KVATTN_ERROR_INVALID_SHAPE, "%s: the cache's page_size is 0", fn);

  /* Pass 1: every token's destination must exist. */
  for (int64_t t = 0; t < tokens; t++) {
    int64_t r = read_i32(batch_indices, t), pos = read_i32(positions, t);
    RETURN_IF(r < 0 || r >= batch, KVATTN_ERROR_INVALID_INDEX,
              "%s: batch_indices[%lld]=%lld is outside the batch of %lld requests", fn, (long long)t,
              (long long)r, (long long)batch);
    RETURN_IF(pos < 0, KVATTN_ERROR_INVALID_INDEX, "%s: positions[%lld]=%lld is negative", fn, (long long)t,
              (long long)pos);
    int64_t first = read_i32(kv_indptr, r), end = read_i32(kv_indptr, r + 1);
    RETURN_IF(end < first, KVATTN_ERROR_INVALID_INDEX,
              "%s: kv_indptr[%lld]=%lld < kv_indptr[%lld]=%lld: indptr must be non-decreasing", fn,
              (long long)r + 1, (long long)end, (long long)r, (long long)first);
    RETURN_IF(first < 0 || end > entries, KVATTN_ERROR_INVALID_INDEX,
              "%s: kv_indptr[%lld..%lld] = %lld..%lld lies outside kv.indices' %lld entries", fn,
              (long long)r, (long long)r + 1, (long long)first, (long long)end, (long long)entries);
    int64_t entry = first + pos / page_size;
    RETURN_IF(entry >= end, KVATTN_ERROR_INVALID_INDEX,
              "%s: positions[%lld]=%lld needs page %lld of request %lld, which has %lld pages", fn,
              (long long)t, (long long)pos, (long long)(pos / page_size), (long long)r,
              (long long)(end - first));
    int64_t page = read_i32(indices, entry);
    RETURN_IF(page < 0 || page >= num_pages, KVATTN_ERROR_INVALID_INDEX,
              "%s: indices[%lld]=%lld is outside the cache's %lld pages", fn, (long long)entry,
              (long long)page, (long long)num_pages);
  }

  /* Pass 2: copy. A later token at the same slot overwrites an earlier one (the order given). */
  const size_t elem = dtype_size(k->dtype);
  for (int64_t t = 0; t < tokens; t++) {
    int64_t r = read_i32(batch_indices, t), pos = read_i32(positions, t);
    int64_t page = read_i32(indices, read_i32(kv_indptr, r) + pos / page_size), slot = pos % page_size;
    for (int64_t h = 0; h < kv_heads; h++) {
      const tview *src[2] = {k_new, v_new}, *dst[2] = {k, v};
      for (int c = 0; c < 2; c++) {
        const char *s = src[c]->data + (t * src[c]->stride[0] + h * src[c]->stride[1]) * (int64_t)elem;
        char *d = dst[c]->data +
                  (page * dst[c]->stride[0] + slot * dst[c]->stride[1] + h * dst[c]->stride[2]) * (int64_t)elem;
        copy_vec(d, dst[c]->stride[3], s, src[c]->stride[2], head_dim, elem);
      }
    }
  }
  return KVATTN_SUCCESS;
}
