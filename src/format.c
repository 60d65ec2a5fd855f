/* format.c - the attention description's defaults, and the KV formats: validation and lowering
 * of paged, ragged and block-sparse batches to the one batch_view the kernels read. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define FN_PLAN "kvattn_plan"

/* ---------------------------------------------------------------- the description */

static int supported_float(DLDataType t) {
  return dtype_eq(t, DT_F16) || dtype_eq(t, DT_BF16) || dtype_eq(t, DT_F32) || dtype_eq(t, DT_F64);
}

kvattn_status desc_resolve(const kvattn_attention_desc *in, kvattn_attention_desc *d) {
  RETURN_IF(!in, KVATTN_ERROR_INVALID_ARGUMENT, "desc is NULL");
  /* Fields a caller's (older, smaller) struct lacks keep their zero default. */
  RETURN_IF(in->struct_size < offsetof(kvattn_attention_desc, fixed_split_size) + sizeof(int32_t),
            KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.struct_size=%u is smaller than any kvattn_attention_desc: initialise it with "
            "KVATTN_ATTENTION_DESC_INIT", in->struct_size);
  memset(d, 0, sizeof *d);
  memcpy(d, in, in->struct_size < sizeof *d ? in->struct_size : sizeof *d);
  d->struct_size = sizeof *d;
  RETURN_IF(d->num_qo_heads <= 0, KVATTN_ERROR_INVALID_SHAPE, "desc.num_qo_heads=%d must be > 0", d->num_qo_heads);
  RETURN_IF(d->num_kv_heads <= 0, KVATTN_ERROR_INVALID_SHAPE, "desc.num_kv_heads=%d must be > 0", d->num_kv_heads);
  RETURN_IF(d->num_qo_heads % d->num_kv_heads, KVATTN_ERROR_INVALID_SHAPE,
            "desc.num_qo_heads=%d is not a multiple of desc.num_kv_heads=%d", d->num_qo_heads, d->num_kv_heads);
  RETURN_IF(d->head_dim <= 0 || d->head_dim > 512, KVATTN_ERROR_INVALID_SHAPE,
            "desc.head_dim=%d must be in 1..512", d->head_dim);
  if (dtype_is_unset(d->q_dtype)) d->q_dtype = DT_F16;
  if (dtype_is_unset(d->kv_dtype)) d->kv_dtype = d->q_dtype;
  if (dtype_is_unset(d->o_dtype)) d->o_dtype = d->q_dtype;
  RETURN_IF(!supported_float(d->q_dtype), KVATTN_ERROR_INVALID_DTYPE,
            "desc.q_dtype=%s: expected float16, bfloat16, float32 or float64", dtype_name(d->q_dtype));
  RETURN_IF(!supported_float(d->kv_dtype), KVATTN_ERROR_INVALID_DTYPE,
            "desc.kv_dtype=%s: expected float16, bfloat16, float32 or float64", dtype_name(d->kv_dtype));
  RETURN_IF(!supported_float(d->o_dtype), KVATTN_ERROR_INVALID_DTYPE,
            "desc.o_dtype=%s: expected float16, bfloat16, float32 or float64", dtype_name(d->o_dtype));
  RETURN_IF(!isfinite(d->sm_scale) || d->sm_scale < 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.sm_scale=%g must be finite and >= 0 (0 = 1/sqrt(head_dim))", d->sm_scale);
  if (d->sm_scale == 0) d->sm_scale = (float)(1.0 / sqrt((double)d->head_dim));
  RETURN_IF(d->causal != 0 && d->causal != 1, KVATTN_ERROR_INVALID_ARGUMENT, "desc.causal=%d must be 0 or 1", d->causal);
  RETURN_IF(d->window_left < -1, KVATTN_ERROR_INVALID_ARGUMENT, "desc.window_left=%d must be >= 0, or -1 (off)",
            d->window_left);
  RETURN_IF(!isfinite(d->logits_soft_cap) || d->logits_soft_cap < 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.logits_soft_cap=%g must be finite and >= 0 (0 = off)", d->logits_soft_cap);
  RETURN_IF(d->rope != 0 && d->rope != 1, KVATTN_ERROR_INVALID_ARGUMENT, "desc.rope=%d must be 0 or 1", d->rope);
  RETURN_IF(d->rope && d->head_dim % 2, KVATTN_ERROR_INVALID_SHAPE, "desc.head_dim=%d must be even with rope",
            d->head_dim);
  RETURN_IF(!isfinite(d->rope_theta) || d->rope_theta < 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.rope_theta=%g must be finite and > 0 (0 = 10000)", d->rope_theta);
  RETURN_IF(!isfinite(d->rope_scale) || d->rope_scale < 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.rope_scale=%g must be finite and > 0 (0 = 1)", d->rope_scale);
  RETURN_IF(!isfinite(d->rope_llama31_factor) || d->rope_llama31_factor < 0, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.rope_llama31_factor=%g must be finite and >= 0", d->rope_llama31_factor);
  if (d->rope_theta == 0) d->rope_theta = 10000.0f;
  if (d->rope_scale == 0) d->rope_scale = 1.0f;
  if (d->rope_llama31_low_freq_factor == 0) d->rope_llama31_low_freq_factor = 1.0f;
  if (d->rope_llama31_high_freq_factor == 0) d->rope_llama31_high_freq_factor = 4.0f;
  if (d->rope_llama31_original_max_pos == 0) d->rope_llama31_original_max_pos = 8192;
  RETURN_IF(d->rope_llama31_factor > 0 &&
                !(d->rope_llama31_high_freq_factor > d->rope_llama31_low_freq_factor &&
                  d->rope_llama31_low_freq_factor > 0 && d->rope_llama31_original_max_pos > 0),
            KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.rope_llama31_*: need high_freq_factor=%g > low_freq_factor=%g > 0 and original_max_pos=%d > 0",
            d->rope_llama31_high_freq_factor, d->rope_llama31_low_freq_factor, d->rope_llama31_original_max_pos);
  RETURN_IF(d->alibi != 0 && d->alibi != 1, KVATTN_ERROR_INVALID_ARGUMENT, "desc.alibi=%d must be 0 or 1", d->alibi);
  if (d->alibi && d->alibi_slopes)
    for (int h = 0; h < d->num_qo_heads; h++)
      RETURN_IF(!isfinite(d->alibi_slopes[h]), KVATTN_ERROR_INVALID_ARGUMENT, "desc.alibi_slopes[%d]=%g is not finite",
                h, d->alibi_slopes[h]);
  RETURN_IF(d->custom_mask != 0 && d->custom_mask != 1, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.custom_mask=%d must be 0 or 1", d->custom_mask);
  RETURN_IF(d->kernel < 0 || d->kernel > KVATTN_KERNEL_TENSOR_CORE, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.kernel=%d is not a kvattn_kernel_choice", d->kernel);
  RETURN_IF(d->disable_split_kv != 0 && d->disable_split_kv != 1, KVATTN_ERROR_INVALID_ARGUMENT,
            "desc.disable_split_kv=%d must be 0 or 1", d->disable_split_kv);
  RETURN_IF(d->fixed_split_size < 0, KVATTN_ERROR_INVALID_ARGUMENT, "desc.fixed_split_size=%d must be >= 0",
            d->fixed_split_size);
  return KVATTN_SUCCESS;
}

float alibi_standard_slope(int h, int n) {
  int p = 1;
  while (p * 2 <= n) p *= 2;
  if (h < p) return (float)pow(2.0, -8.0 * (h + 1) / p);
  /* heads past the largest power of two take the odd steps of the doubled sequence */
  return (float)pow(2.0, -4.0 * (2 * (h - p) + 1) / p);
}

double rope_frequency(const kvattn_attention_desc *d, int pair) {
  double freq = pow((double)d->rope_theta, -2.0 * pair / d->head_dim);
  if (d->rope_llama31_factor > 0) {
    /* llama-3.1: keep high frequencies, divide low ones by the factor, blend in between */
    double factor = d->rope_llama31_factor, lo = d->rope_llama31_low_freq_factor,
           hi = d->rope_llama31_high_freq_factor, orig = d->rope_llama31_original_max_pos;
    double wavelen = 2.0 * M_PI / freq;
    if (wavelen > orig / lo) {
      freq = freq / factor;
    } else if (wavelen >= orig / hi) {
      double smooth = (orig / wavelen - lo) / (hi - lo);
      freq = (1.0 - smooth) * freq / factor + smooth * freq;
    }
  }
  return freq;
}

/* ---------------------------------------------------------------- batches */

kvattn_status batch_rows(const kvattn_batch *b, int64_t *rows) {
  RETURN_IF(!b, KVATTN_ERROR_INVALID_ARGUMENT, FN_PLAN ": batch is NULL");
  RETURN_IF(b->struct_size < sizeof(kvattn_batch), KVATTN_ERROR_INVALID_ARGUMENT,
            FN_PLAN ": batch.struct_size=%u: initialise it with KVATTN_BATCH_INIT", b->struct_size);
  if (b->format == KVATTN_FORMAT_BLOCK_SPARSE) {
    RETURN_IF(b->block_rows < 1, KVATTN_ERROR_INVALID_ARGUMENT, FN_PLAN ": batch.block_rows=%d must be >= 1",
              b->block_rows);
    RETURN_IF(b->block_cols < 1, KVATTN_ERROR_INVALID_ARGUMENT, FN_PLAN ": batch.block_cols=%d must be >= 1",
              b->block_cols);
    RETURN_IF(b->num_rows < 0 || b->num_rows > INT32_MAX, KVATTN_ERROR_INVALID_SHAPE,
              FN_PLAN ": batch.num_rows=%lld must be in 0..2^31-1", (long long)b->num_rows);
    RETURN_IF(b->num_cols < 0 || b->num_cols > INT32_MAX, KVATTN_ERROR_INVALID_SHAPE,
              FN_PLAN ": batch.num_cols=%lld must be in 0..2^31-1", (long long)b->num_cols);
    *rows = ceil_div64(b->num_rows, b->block_rows);
    return KVATTN_SUCCESS;
  }
  RETURN_IF(b->format != KVATTN_FORMAT_PAGED && b->format != KVATTN_FORMAT_RAGGED, KVATTN_ERROR_INVALID_ARGUMENT,
            FN_PLAN ": batch.format=%d is not a kvattn_format", b->format);
  RETURN_IF(b->batch_size < 0, KVATTN_ERROR_INVALID_SHAPE, FN_PLAN ": batch.batch_size=%d is negative", b->batch_size);
  *rows = b->batch_size;
  return KVATTN_SUCCESS;
}

/* indptr[0] == 0 and non-decreasing. */
static kvattn_status check_indptr(const char *name, const int32_t *p, int64_t n) {
  RETURN_IF(p[0] != 0, KVATTN_ERROR_INVALID_INDEX, FN_PLAN ": %s[0]=%d: indptr must start at 0", name, p[0]);
  for (int64_t i = 1; i <= n; i++)
    RETURN_IF(p[i] < p[i - 1], KVATTN_ERROR_INVALID_INDEX,
              FN_PLAN ": %s[%lld]=%d < %s[%lld]=%d: indptr must be non-decreasing", name, (long long)i, p[i], name,
              (long long)(i - 1), p[i - 1]);
  return KVATTN_SUCCESS;
}

kvattn_status batch_lower(const kvattn_attention_desc *desc, const kvattn_batch *b, int skip,
                          int32_t *qo_scratch, int64_t qo_scratch_len, batch_view *v) {
  int64_t rows;
  TRY(batch_rows(b, &rows));
  memset(v, 0, sizeof *v);
  v->format = b->format;
  v->batch = (int32_t)rows;
  v->kv_token_limit = INT64_MAX;
  RETURN_IF(rows + 1 > qo_scratch_len, KVATTN_ERROR_INTERNAL, FN_PLAN ": qo scratch too small");
  RETURN_IF(!b->kv_indptr, KVATTN_ERROR_INVALID_ARGUMENT, FN_PLAN ": batch.kv_indptr is NULL");
  v->kv_indptr = b->kv_indptr;

  if (b->format == KVATTN_FORMAT_BLOCK_SPARSE) {
    /* block row r holds query rows [r*Br, min((r+1)*Br, M)); a block column is a "page" of Bc
     * tokens of the [N, kv_heads, dim] KV; the partial last column is masked by the limit */
    for (int64_t r = 0; r <= rows; r++) {
      int64_t x = r * b->block_rows;
      qo_scratch[r] = (int32_t)(x < b->num_rows ? x : b->num_rows);
    }
    v->qo_indptr = qo_scratch;
    v->page_size = b->block_cols;
    v->indices = b->kv_indices;
    v->kv_token_limit = b->num_cols;
    v->bsr_positions = 1;
    v->num_pages = ceil_div64(b->num_cols, b->block_cols);
  } else if (b->format == KVATTN_FORMAT_RAGGED) {
    v->page_size = 1;
    v->indices = NULL; /* identity: token t of the packed KV */
    if (b->qo_indptr) v->qo_indptr = b->qo_indptr;
  } else {
    RETURN_IF(b->page_size < 1, KVATTN_ERROR_INVALID_ARGUMENT, FN_PLAN ": batch.page_size=%d must be >= 1",
              b->page_size);
    RETURN_IF(rows > 0 && !b->kv_last_page_len, KVATTN_ERROR_INVALID_ARGUMENT,
              FN_PLAN ": batch.kv_last_page_len is NULL for a paged batch");
    RETURN_IF(b->num_pages < 0, KVATTN_ERROR_INVALID_SHAPE, FN_PLAN ": batch.num_pages=%lld is negative",
              (long long)b->num_pages);
    v->page_size = b->page_size;
    v->indices = b->kv_indices;
    v->last_page_len = b->kv_last_page_len;
    v->num_pages = b->num_pages;
    if (b->qo_indptr) v->qo_indptr = b->qo_indptr;
  }
  if (!v->qo_indptr) { /* decode: one query row per request */
    for (int64_t r = 0; r <= rows; r++) qo_scratch[r] = (int32_t)r;
    v->qo_indptr = qo_scratch;
  }

  if (!skip) {
    if (v->qo_indptr != qo_scratch) TRY(check_indptr("qo_indptr", v->qo_indptr, rows));
    TRY(check_indptr("kv_indptr", v->kv_indptr, rows));
    if (v->last_page_len)
      for (int64_t i = 0; i < rows; i++) {
        if (v->kv_indptr[i + 1] == v->kv_indptr[i]) continue; /* empty: ignored */
        RETURN_IF(v->last_page_len[i] < 1 || v->last_page_len[i] > v->page_size, KVATTN_ERROR_INVALID_INDEX,
                  FN_PLAN ": kv_last_page_len[%lld]=%d must be in 1..page_size=%d for a non-empty request",
                  (long long)i, v->last_page_len[i], v->page_size);
      }
    if (v->indices) {
      int64_t n = v->kv_indptr[rows];
      for (int64_t k = 0; k < n; k++) {
        int32_t p = v->indices[k];
        RETURN_IF(p < 0 || (v->num_pages > 0 && p >= v->num_pages), KVATTN_ERROR_INVALID_INDEX,
                  FN_PLAN ": kv_indices[%lld]=%d is outside the cache's %lld %s", (long long)k, p,
                  (long long)v->num_pages, b->format == KVATTN_FORMAT_BLOCK_SPARSE ? "block columns" : "pages");
      }
    }
  }
  v->qo_tokens = v->qo_indptr[rows];
  v->kv_entries = v->kv_indptr[rows];
  for (int64_t i = 0; i < rows; i++) {
    int64_t q = bv_qo_len(v, i), k = bv_kv_len(v, i);
    if (q > v->qo_rows_max) v->qo_rows_max = (int32_t)q;
    if (k > v->kv_len_max) v->kv_len_max = k;
  }
  return KVATTN_SUCCESS;
}
