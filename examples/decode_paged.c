/* decode_paged.c - one decode step over a paged KV cache, on the CPU backend.
 *
 * Two requests of 5 and 3 tokens live in pages of 4 tokens (request 0: pages 2, 0; request 1:
 * page 1). Each request has one new query token. K is 0, so every cached position gets the same
 * weight: the output is the mean of V (V holds each token's position) and lse = ln(kv_len).
 *
 * Build: cc decode_paged.c $(pkg-config --cflags --libs kvattn) -lm
 */
#include <kvattn.h>
#include <math.h>
#include <stdio.h>

#define TRY(call)                                                                              \
  do {                                                                                         \
    kvattn_status s_ = (call);                                                                 \
    if (s_ != KVATTN_SUCCESS) {                                                                \
      fprintf(stderr, "%s: %s: %s\n", #call, kvattn_status_string(s_), kvattn_last_error());  \
      return 1;                                                                                \
    }                                                                                          \
  } while (0)

enum { PAGES = 3, PAGE_SIZE = 4, QO_HEADS = 4, KV_HEADS = 2, HEAD_DIM = 64, BATCH = 2 };

static float k[PAGES][PAGE_SIZE][KV_HEADS][HEAD_DIM], v[PAGES][PAGE_SIZE][KV_HEADS][HEAD_DIM];
static float q[BATCH][QO_HEADS][HEAD_DIM], out[BATCH][QO_HEADS][HEAD_DIM], lse[BATCH][QO_HEADS];

int main(void) {
  int32_t kv_indptr[] = {0, 2, 3}, kv_indices[] = {2, 0, 1}, last_page_len[] = {1, 3}, kv_len[] = {5, 3};
  for (int r = 0; r < BATCH; r++)
    for (int t = 0; t < kv_len[r]; t++) /* token t of request r: page t / PAGE_SIZE, slot t % PAGE_SIZE */
      for (int h = 0; h < KV_HEADS; h++)
        for (int d = 0; d < HEAD_DIM; d++) v[kv_indices[kv_indptr[r] + t / PAGE_SIZE]][t % PAGE_SIZE][h][d] = t;

  /* DLPack views of the host arrays (strides NULL = compact, row-major). */
  DLDataType f32 = {kDLFloat, 32, 1}, i32 = {kDLInt, 32, 1};
  int64_t kv_shape[] = {PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM}, q_shape[] = {BATCH, QO_HEADS, HEAD_DIM};
  int64_t lse_shape[] = {BATCH, QO_HEADS}, indices_shape[] = {3};
  DLTensor tk = {k, {kDLCPU, 0}, 4, f32, kv_shape, NULL, 0}, tv = {v, {kDLCPU, 0}, 4, f32, kv_shape, NULL, 0};
  DLTensor tq = {q, {kDLCPU, 0}, 3, f32, q_shape, NULL, 0}, to = {out, {kDLCPU, 0}, 3, f32, q_shape, NULL, 0};
  DLTensor tl = {lse, {kDLCPU, 0}, 2, f32, lse_shape, NULL, 0};
  DLTensor ti = {kv_indices, {kDLCPU, 0}, 1, i32, indices_shape, NULL, 0};

  kvattn_options opt = KVATTN_OPTIONS_INIT;
  opt.backend = KVATTN_BACKEND_CPU;
  kvattn_attention_desc desc = KVATTN_ATTENTION_DESC_INIT; /* f16 unless said: here f32 */
  desc.num_qo_heads = QO_HEADS, desc.num_kv_heads = KV_HEADS, desc.head_dim = HEAD_DIM, desc.q_dtype = f32;
  kvattn_bounds bounds = KVATTN_BOUNDS_INIT; /* the largest batch this attention will be planned for */
  bounds.max_batch = 16, bounds.max_qo_tokens = 16, bounds.max_kv_entries = 1024;
  kvattn_batch batch = KVATTN_BATCH_INIT; /* host index arrays, read by plan only */
  batch.format = KVATTN_FORMAT_PAGED, batch.batch_size = BATCH, batch.kv_indptr = kv_indptr;
  batch.kv_indices = kv_indices, batch.kv_last_page_len = last_page_len, batch.page_size = PAGE_SIZE;
  batch.num_pages = PAGES;
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.layout = KVATTN_LAYOUT_NHD, kv.k = &tk, kv.v = &tv, kv.indices = &ti;

  kvattn_context *ctx;
  kvattn_attention *attn;
  kvattn_workspace ws;
  size_t device_bytes, host_bytes;
  TRY(kvattn_context_create(&opt, &ctx));
  TRY(kvattn_attention_create(ctx, &desc, &bounds, &attn));
  TRY(kvattn_workspace_size(ctx, &desc, &bounds, &device_bytes, &host_bytes));
  TRY(kvattn_workspace_alloc(ctx, device_bytes, host_bytes, &ws));
  TRY(kvattn_plan(attn, &batch, &ws, NULL)); /* once per batch */
  TRY(kvattn_run(attn, &tq, &kv, NULL, &to, &tl, NULL)); /* once per layer */

  int wrong = 0;
  for (int r = 0; r < BATCH; r++) {
    printf("request %d: kv_len %d  out[0][0] = %.4f (want %.4f)  lse = %.4f (want ln %d = %.4f)\n", r,
           kv_len[r], out[r][0][0], (kv_len[r] - 1) / 2.0, lse[r][0], kv_len[r], log(kv_len[r]));
    for (int h = 0; h < QO_HEADS; h++) {
      wrong |= fabs(lse[r][h] - log(kv_len[r])) > 1e-5;
      for (int d = 0; d < HEAD_DIM; d++) wrong |= fabs(out[r][h][d] - (kv_len[r] - 1) / 2.0) > 1e-5;
    }
  }
  TRY(kvattn_workspace_free(ctx, &ws));
  TRY(kvattn_attention_destroy(attn));
  TRY(kvattn_context_destroy(ctx));
  printf(wrong ? "decode_paged: WRONG result\n" : "decode_paged: ok\n");
  return wrong;
}
