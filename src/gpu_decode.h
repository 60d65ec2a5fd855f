/*
 * gpu_decode.h - what the decode family (src/gpu_attention.c) offers besides the gpu_* backend hooks
 * of internal.h.
 */
#ifndef KVATTN_GPU_DECODE_H
#define KVATTN_GPU_DECODE_H

#include "internal.h"

/* Compile (or find in the cache) the decode family's kernels for `desc` on `arch` only: the decode
 * kernel of the path AUTO takes, merge_states and append_paged_kv. kvattn_warmup adds the prefill
 * family's. `kernels` and `seconds` (may be NULL) receive the count and the compile time. */
kvattn_status gpu_decode_warmup(const kvattn_attention_desc *desc, const char *arch, const char *cache_dir,
                                int *kernels, double *seconds);

#endif /* KVATTN_GPU_DECODE_H */
