/*
 * kvattn.h - an attention engine for LLM inference serving.
 *
 * This header is the whole public API and its manual. C11, usable from C++.
 *
 * Tiers
 *   1. Context    kvattn_context_create(): a GPU (CUDA) device or the CPU, chosen by options.
 *   2. Attention  kvattn_attention_create(): one attention configuration (heads, head_dim, dtypes,
 *                 masks, positional encoding) plus the upper bounds of the batches it will see.
 *   3. Plan/run   kvattn_plan() reads the batch's host index arrays, balances the work and writes the
 *                 work lists into the caller's workspace; kvattn_run() only executes. One pair covers
 *                 decode, prefill and append over paged, ragged and block-sparse KV.
 *   4. Utilities  kvattn_merge_state(s): exact merge of attention states (o, lse).
 *
 * Conventions
 *   - Every function returns kvattn_status. KVATTN_SUCCESS is 0. On failure,
 *     kvattn_last_error() (thread-local) names the function, the argument and the bad value.
 *   - Tensors are DLPack DLTensor. `strides == NULL` means compact row-major; `byte_offset` is
 *     honoured; strides are in elements; size-1 dimensions may carry any stride.
 *   - GPU calls are asynchronous on the given stream (the last argument, a CUstream/cudaStream_t;
 *     NULL is the legacy default stream). kvattn_run() never allocates and never synchronizes,
 *     so it may be captured in a CUDA graph. The CPU backend ignores the stream and runs to
 *     completion before returning.
 *   - The caller owns all memory: tensors and the workspace are passed in.
 *   - LSE is the natural logarithm (base e) of the sum of exp(logits) over the unmasked KV
 *     positions of a row, where logits are the final, transformed scores (see "Scores" below).
 *     A row with no unmasked position has output 0 and lse = -inf.
 *
 * Scores (the math every backend computes, per query row r of request i, head h, KV position j)
 *   q' = RoPE(q, q_pos) and k' = RoPE(k, kv_pos) if rope is on, else q, k
 *   s  = sm_scale * <q', k'>
 *   s  = cap * tanh(s / cap)                 if logits_soft_cap = cap > 0
 *   s  = s + slope[h] * (kv_pos - q_pos)     if alibi is on
 *   masked if: causal and kv_pos > q_pos; window_left >= 0 and kv_pos < q_pos - window_left;
 *              a custom mask bit is 0; the KV position lies past the end of the data.
 *   o  = sum_j softmax(s)_j * v_j
 *   Positions (paged, ragged): kv_pos = j, the index inside the request's KV sequence;
 *     q_pos = kv_len - qo_len + r (the queries are the last qo_len positions: bottom-right aligned).
 *   Positions (block-sparse): q_pos = the global row, kv_pos = the global column.
 */
#ifndef KVATTN_H
#define KVATTN_H

#include <stddef.h>
#include <stdint.h>

#include "kvattn_dlpack.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define KVATTN_API __declspec(dllexport)
#elif defined(__GNUC__)
#define KVATTN_API __attribute__((visibility("default")))
#else
#define KVATTN_API
#endif

/* ======================================================================== */
/* Version                                                                  */
/* ======================================================================== */

#define KVATTN_VERSION_MAJOR 0
#define KVATTN_VERSION_MINOR 1
#define KVATTN_VERSION_PATCH 0
#define KVATTN_VERSION_NUMBER \
  (KVATTN_VERSION_MAJOR * 10000 + KVATTN_VERSION_MINOR * 100 + KVATTN_VERSION_PATCH)
#define KVATTN_VERSION_STRING "0.1.0"

/* The library's version at run time, as KVATTN_VERSION_NUMBER and as a string. */
KVATTN_API unsigned kvattn_version_number(void);
KVATTN_API const char *kvattn_version(void);

/* ======================================================================== */
/* Status                                                                   */
/* ======================================================================== */

/* Values are fixed forever; new ones are appended. Grouped by who is at fault. */
typedef enum kvattn_status {
  KVATTN_SUCCESS = 0,
  /* the caller passed a bad value */
  KVATTN_ERROR_INVALID_ARGUMENT = 1, /* NULL where a value is needed, an option out of range */
  KVATTN_ERROR_INVALID_DTYPE = 2,    /* a tensor's dtype code/bits/lanes is not the one expected */
  KVATTN_ERROR_INVALID_SHAPE = 3,    /* ndim or a dimension does not match */
  KVATTN_ERROR_INVALID_STRIDE = 4,   /* a stride or alignment the op cannot read */
  KVATTN_ERROR_INVALID_INDEX = 5,    /* indptr/indices/last_page_len inconsistent or out of range */
  KVATTN_ERROR_DEVICE_MISMATCH = 6,  /* a tensor lives on another device than the context's */
  /* the caller used the API in a wrong order or with mismatched objects */
  KVATTN_ERROR_INVALID_USAGE = 7,    /* run before plan, tensors that do not match the plan */
  KVATTN_ERROR_WORKSPACE_TOO_SMALL = 8, /* the message gives the bytes needed and the bytes had */
  KVATTN_ERROR_BOUNDS_EXCEEDED = 9,  /* the batch exceeds the bounds the attention was created with */
  /* the library cannot do it */
  KVATTN_ERROR_UNSUPPORTED = 10,     /* a valid combination this backend does not implement */
  KVATTN_ERROR_BACKEND_UNAVAILABLE = 11, /* no GPU, no driver, no NVRTC: the message says why */
  KVATTN_ERROR_OUT_OF_MEMORY = 12,
  KVATTN_ERROR_CUDA = 13,            /* a CUDA driver call failed: the message has its name and code */
  KVATTN_ERROR_COMPILE = 14,         /* NVRTC failed: the message has the log's first lines */
  KVATTN_ERROR_INTERNAL = 15,        /* a bug in kvattn: please report it with the message */
} kvattn_status;

/* A static name for a status, e.g. "KVATTN_ERROR_INVALID_INDEX". Never NULL. */
KVATTN_API const char *kvattn_status_string(kvattn_status s);
/* The detail of the last failure on this thread ("" after a success). Valid until the next
 * kvattn call on this thread. */
KVATTN_API const char *kvattn_last_error(void);

/* ======================================================================== */
/* Context                                                                  */
/* ======================================================================== */

typedef void *kvattn_stream; /* a CUstream / cudaStream_t; ignored on the CPU */

typedef enum kvattn_backend {
  KVATTN_BACKEND_AUTO = 0,      /* CUDA when a usable GPU, driver and NVRTC are found, else CPU */
  KVATTN_BACKEND_CPU = 1,       /* the threaded CPU fast path (fp32 accumulation) */
  KVATTN_BACKEND_CUDA = 2,      /* a GPU; fails with BACKEND_UNAVAILABLE if there is none */
  KVATTN_BACKEND_REFERENCE = 3, /* the CPU float64 reference: slow, plain, the oracle of tests */
} kvattn_backend;

typedef struct kvattn_options {
  uint32_t struct_size;     /* sizeof(kvattn_options): lets old binaries work with new libraries */
  uint32_t version;         /* KVATTN_VERSION_NUMBER the caller was built with */
  int32_t backend;          /* a kvattn_backend */
  int32_t device_id;        /* CUDA device ordinal */
  int32_t num_threads;      /* CPU: worker threads; 0 = the number of online cores */
  int32_t skip_validation;  /* 1: plan skips its O(index arrays) host checks (hot loops only) */
  const char *cache_dir;    /* JIT cubin cache; NULL = $KVATTN_CACHE_DIR, else $XDG_CACHE_HOME/kvattn,
                               else ~/.cache/kvattn */
} kvattn_options;

#define KVATTN_OPTIONS_INIT \
  { sizeof(kvattn_options), KVATTN_VERSION_NUMBER, KVATTN_BACKEND_AUTO, 0, 0, 0, NULL }

typedef struct kvattn_context kvattn_context;

/* Create a context. `opt` may be NULL (all defaults). With AUTO, a missing GPU is not an error:
 * the CPU backend serves and kvattn_context_info() says why. */
KVATTN_API kvattn_status kvattn_context_create(const kvattn_options *opt, kvattn_context **ctx);
KVATTN_API kvattn_status kvattn_context_destroy(kvattn_context *ctx); /* NULL is a no-op */
/* The backend the context runs on (never AUTO). */
KVATTN_API kvattn_status kvattn_context_backend(const kvattn_context *ctx, kvattn_backend *backend);
/* A human-readable description of the context: backend, device, threads, and for AUTO/CPU why
 * the GPU backend is not in use. Writes at most `size` bytes including the terminating 0. */
KVATTN_API kvattn_status kvattn_context_info(const kvattn_context *ctx, char *buf, size_t size);

/* ======================================================================== */
/* The attention description                                                */
/* ======================================================================== */

typedef enum kvattn_kernel_choice {
  KVATTN_KERNEL_AUTO = 0,
  KVATTN_KERNEL_CUDA_CORE = 1,   /* decode: FMA path */
  KVATTN_KERNEL_TENSOR_CORE = 2, /* decode: grouped query heads packed into MMA rows */
} kvattn_kernel_choice;

typedef struct kvattn_attention_desc {
  uint32_t struct_size;       /* sizeof(kvattn_attention_desc) */
  uint32_t version;           /* KVATTN_VERSION_NUMBER */
  int32_t num_qo_heads;       /* a multiple of num_kv_heads (group size = qo / kv heads) */
  int32_t num_kv_heads;
  int32_t head_dim;           /* 64, 128 or 256 on the GPU; any of 1..512 on the CPU */
  DLDataType q_dtype;         /* {0,0,0} = float16. CPU: f16, bf16, f32, f64. GPU: f16, bf16 */
  DLDataType kv_dtype;        /* {0,0,0} = q_dtype */
  DLDataType o_dtype;         /* {0,0,0} = q_dtype */
  float sm_scale;             /* 0 = 1/sqrt(head_dim) */
  int32_t causal;             /* 0 or 1 */
  int32_t window_left;        /* sliding window: keep kv_pos >= q_pos - window_left; -1 = off */
  float logits_soft_cap;      /* 0 = off; else s = cap * tanh(s / cap) */
  int32_t rope;               /* 1: apply RoPE (rotate-half, "llama" style) to q and k on the fly */
  float rope_theta;           /* 0 = 10000 */
  float rope_scale;           /* positions are divided by this (linear interpolation); 0 = 1 */
  float rope_llama31_factor;  /* > 0: llama-3.1 frequency scaling with this factor; 0 = off */
  float rope_llama31_low_freq_factor;  /* 0 = 1 */
  float rope_llama31_high_freq_factor; /* 0 = 4 */
  int32_t rope_llama31_original_max_pos; /* 0 = 8192 */
  int32_t alibi;              /* 1: add slope[h] * (kv_pos - q_pos) */
  const float *alibi_slopes;  /* host [num_qo_heads], copied at plan; NULL = the standard slopes
                                 (2^(-8(h+1)/n) for n = the largest power of 2 <= heads, then the
                                 odd multiples of the half step for the remaining heads) */
  int32_t custom_mask;        /* 1: kvattn_run() takes a bit-packed mask (see kvattn_run) */
  int32_t kernel;             /* a kvattn_kernel_choice; a hint the planner may refine */
  int32_t disable_split_kv;   /* 1: never split a request's KV over several workers */
  int32_t fixed_split_size;   /* > 0: batch invariance, a request gets the same bits in any batch:
                                 decode (and the CPU backend) split KV in chunks of exactly this many
                                 pages, whatever the batch; GPU prefill never cuts a query tile's KV */
} kvattn_attention_desc;

#define KVATTN_ATTENTION_DESC_INIT                                                              \
  { sizeof(kvattn_attention_desc), KVATTN_VERSION_NUMBER, 0, 0, 0, {0, 0, 0}, {0, 0, 0},      \
    {0, 0, 0}, 0.0f, 0, -1, 0.0f, 0, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0, 0, NULL, 0,              \
    KVATTN_KERNEL_AUTO, 0, 0 }

/* Upper bounds of every batch this attention will be planned for. They size the workspace and
 * fix the GPU grid, so that one captured CUDA graph replays correctly for any batch within them. */
typedef struct kvattn_bounds {
  uint32_t struct_size;
  int64_t max_batch;         /* requests (block-sparse: block rows) */
  int64_t max_qo_tokens;     /* qo_indptr[batch] (decode: the batch size) */
  int64_t max_kv_entries;    /* kv_indptr[batch]: pages (paged), tokens (ragged), blocks (BSR) */
} kvattn_bounds;

#define KVATTN_BOUNDS_INIT { sizeof(kvattn_bounds), 0, 0, 0 }

/* ======================================================================== */
/* Batches: the KV formats                                                  */
/* ======================================================================== */

typedef enum kvattn_format {
  KVATTN_FORMAT_PAGED = 0,        /* page tables: kv_indptr over pages, kv_indices, last_page_len */
  KVATTN_FORMAT_RAGGED = 1,       /* packed KV: kv_indptr over tokens of [tokens, kv_heads, dim] */
  KVATTN_FORMAT_BLOCK_SPARSE = 2, /* BSR over (num_rows x num_cols) with blocks (Br, Bc) */
} kvattn_format;

typedef enum kvattn_layout {
  KVATTN_LAYOUT_NHD = 0, /* paged: [pages, page_size, kv_heads, dim]; ragged/BSR: [tokens, kv_heads, dim] */
  KVATTN_LAYOUT_HND = 1, /* paged: [pages, kv_heads, page_size, dim]; ragged/BSR: [kv_heads, tokens, dim] */
} kvattn_layout;

/* The host-side description of one batch, read by kvattn_plan() and not kept after it returns.
 * All arrays are host memory (int32). */
typedef struct kvattn_batch {
  uint32_t struct_size;
  int32_t format;                  /* a kvattn_format */
  int32_t batch_size;              /* requests (paged, ragged); ignored for BSR */
  const int32_t *qo_indptr;        /* [batch_size+1] query rows per request; NULL = one each (decode).
                                      BSR: ignored (rows come from num_rows and block_rows) */
  const int32_t *kv_indptr;        /* [batch_size+1] paged: pages; ragged: tokens;
                                      BSR: [ceil(num_rows/block_rows)+1] blocks per block row */
  const int32_t *kv_indices;       /* [kv_indptr[end]] page ids / block-column ids. Optional here
                                      (the run takes the device copy); when given, each is checked
                                      against num_pages. */
  const int32_t *kv_last_page_len; /* [batch_size] paged: tokens in each last page, 1..page_size for
                                      a non-empty request (ignored for an empty one) */
  int32_t page_size;               /* paged: tokens per page, >= 1 */
  int64_t num_pages;               /* paged: pages in the cache tensor (bounds the indices);
                                      0 = not checked at plan time */
  int32_t block_rows, block_cols;  /* BSR: Br, Bc >= 1 */
  int64_t num_rows, num_cols;      /* BSR: M query rows, N KV tokens */
} kvattn_batch;

#define KVATTN_BATCH_INIT { sizeof(kvattn_batch), KVATTN_FORMAT_PAGED, 0, NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0, 0 }

/* The KV tensors of one run. K and V have the same shape and dtype; strides may differ and may be
 * any (non-contiguous views are fine) except that the last (head_dim) stride must be 1 on the GPU. */
typedef struct kvattn_kv {
  uint32_t struct_size;
  int32_t layout;            /* a kvattn_layout */
  const DLTensor *k;         /* see kvattn_layout for the shapes */
  const DLTensor *v;
  const DLTensor *kv;        /* alternative to k and v for paged KV: [pages, 2, ...] (index 0 = K);
                                leave NULL when k and v are given */
  const DLTensor *indices;   /* int32 [kv_indptr[end]] on the context's device (paged, BSR) */
} kvattn_kv;

#define KVATTN_KV_INIT { sizeof(kvattn_kv), KVATTN_LAYOUT_NHD, NULL, NULL, NULL, NULL }

/* ======================================================================== */
/* Workspace                                                                */
/* ======================================================================== */

/* Memory the plan writes its work lists into and split-KV partial states use.
 * GPU: `device` is device memory, `host` pinned host memory (cuMemHostAlloc / cudaMallocHost).
 * CPU: `device` is ordinary host memory; `host` is unused and may be NULL.
 * Both bases must be 16-byte aligned (allocators give at least that). A workspace holds one plan
 * at a time: planning another attention into it invalidates the first one's plan (its next run
 * returns INVALID_USAGE on the CPU; on the GPU it would read the other plan's work lists). */
typedef struct kvattn_workspace {
  void *device;
  size_t device_bytes;
  void *host;
  size_t host_bytes;
} kvattn_workspace;

/* The workspace bytes an attention with these bounds needs, on this context. */
KVATTN_API kvattn_status kvattn_workspace_size(kvattn_context *ctx, const kvattn_attention_desc *desc,
                                               const kvattn_bounds *bounds, size_t *device_bytes,
                                               size_t *host_bytes);
/* Convenience: allocate (zeroed) and free a workspace of the given sizes on the context's device. */
KVATTN_API kvattn_status kvattn_workspace_alloc(kvattn_context *ctx, size_t device_bytes,
                                                size_t host_bytes, kvattn_workspace *ws);
KVATTN_API kvattn_status kvattn_workspace_free(kvattn_context *ctx, kvattn_workspace *ws);

/* ======================================================================== */
/* Attention: plan and run                                                  */
/* ======================================================================== */

typedef struct kvattn_attention kvattn_attention;

/* Create an attention for `desc` and `bounds` on `ctx`. Compiles (or loads from the disk cache) the
 * GPU kernels it needs, so the first plan/run pay no compile time. */
KVATTN_API kvattn_status kvattn_attention_create(kvattn_context *ctx, const kvattn_attention_desc *desc,
                                                 const kvattn_bounds *bounds, kvattn_attention **attn);
KVATTN_API kvattn_status kvattn_attention_destroy(kvattn_attention *attn); /* NULL is a no-op */

/* Plan a batch: validate its index arrays (unless skip_validation), balance the work over a fixed
 * grid, write the work lists into `ws` (GPU: one async host-to-device copy on `stream`; the pinned
 * host part must not be rewritten until that copy is done, i.e. plan again only after the stream
 * has passed the previous plan's copy, as serving loops naturally do). `ws` must stay valid until
 * the last run of this plan. A batch beyond the bounds fails with BOUNDS_EXCEEDED, a workspace
 * smaller than kvattn_workspace_size() with WORKSPACE_TOO_SMALL; neither touches memory. */
KVATTN_API kvattn_status kvattn_plan(kvattn_attention *attn, const kvattn_batch *batch,
                                     const kvattn_workspace *ws, kvattn_stream stream);

/* Run the planned attention.
 *   q:           [qo_tokens, num_qo_heads, head_dim]   (qo_tokens = qo_indptr[end], or batch_size)
 *   kv:          the cache, in the planned format, with page_size / token counts as planned
 *   custom_mask: uint8, bit-packed, little bit order (bit b is (byte b/8 >> b%8) & 1), 1 = keep.
 *                Paged/ragged: request i's mask is a qo_len x kv_len row-major bit matrix starting
 *                at byte sum_{k<i} ceil(qo_len_k * kv_len_k / 8). BSR: one num_rows x num_cols
 *                matrix. NULL unless desc.custom_mask.
 *   out:         [qo_tokens, num_qo_heads, head_dim] in o_dtype; may not alias q or kv
 *   lse:         float32 [qo_tokens, num_qo_heads] or NULL
 * Asynchronous on `stream` (GPU). Returns INVALID_USAGE when no plan exists or the tensors do not
 * match it. */
KVATTN_API kvattn_status kvattn_run(kvattn_attention *attn, const DLTensor *q, const kvattn_kv *kv,
                                    const DLTensor *custom_mask, DLTensor *out, DLTensor *lse,
                                    kvattn_stream stream);

/* ======================================================================== */
/* Attention states                                                         */
/* ======================================================================== */

/* Merge two attention states over disjoint KV sets, exactly:
 *   s = log(e^s_a + e^s_b), v = v_a e^(s_a - s) + v_b e^(s_b - s).
 * v_*: [tokens, heads, head_dim] (any float dtype the backend supports), s_*: float32
 * [tokens, heads] natural-log LSE. An empty state (s = -inf) contributes nothing; two empty states
 * give v = 0, s = -inf. v_out / s_out may alias v_a / s_a. */
KVATTN_API kvattn_status kvattn_merge_state(kvattn_context *ctx, const DLTensor *v_a, const DLTensor *s_a,
                                            const DLTensor *v_b, const DLTensor *s_b, DLTensor *v_out,
                                            DLTensor *s_out, kvattn_stream stream);

/* Merge N states per row: v [tokens, num_states, heads, head_dim], s float32
 * [tokens, num_states, heads] -> v_out [tokens, heads, head_dim], s_out [tokens, heads] (may be NULL). */
KVATTN_API kvattn_status kvattn_merge_states(kvattn_context *ctx, const DLTensor *v, const DLTensor *s,
                                             DLTensor *v_out, DLTensor *s_out, kvattn_stream stream);

/* ======================================================================== */
/* KV cache maintenance                                                     */
/* ======================================================================== */

/* Write new K/V tokens into a paged cache (after the page tables were extended to hold them).
 *   k_new, v_new:   [tokens, kv_heads, head_dim] in the cache's dtype
 *   batch_indices:  int32 [tokens]: the request of each token
 *   positions:      int32 [tokens]: the token's position in its request's KV sequence; it lands in
 *                   page kv->indices[kv_indptr[r] + pos / page_size], slot pos % page_size
 *   kv:             the paged cache (layout, k/v or kv, indices), on the context's device
 *   kv_indptr:      int32 [batch+1] on the context's device (pages per request)
 * A position whose page lies outside the request's pages is INVALID_INDEX (checked on the CPU
 * backend; on the GPU such a token is skipped, as a kernel cannot fail). Asynchronous on `stream`. */
KVATTN_API kvattn_status kvattn_append_paged_kv(kvattn_context *ctx, const DLTensor *k_new, const DLTensor *v_new,
                                                const DLTensor *batch_indices, const DLTensor *positions,
                                                const kvattn_kv *kv, const DLTensor *kv_indptr,
                                                kvattn_stream stream);

/* ======================================================================== */
/* JIT: ahead-of-time compilation and the cubin cache                       */
/* ======================================================================== */

/* Compile, or find in the disk cache, every GPU kernel an attention with `desc` needs on `arch`
 * ("sm_80", "sm_86", "sm_89", "sm_90a"). Works on a machine with no GPU (NVRTC only), so a cache
 * filled here can travel to a GPU machine. cache_dir NULL = the default location. `kernels` and
 * `seconds` (may be NULL) receive the number of specializations and the compile time spent. */
KVATTN_API kvattn_status kvattn_warmup(const kvattn_attention_desc *desc, const char *arch,
                                       const char *cache_dir, int *kernels, double *seconds);

/* Describe the cubin cache (its directory, entries, bytes, NVRTC found or why not). */
KVATTN_API kvattn_status kvattn_cache_info(const char *cache_dir, char *buf, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* KVATTN_H */
