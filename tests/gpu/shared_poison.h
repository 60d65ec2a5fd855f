/*
 * shared_poison.h - fill every SM's shared memory with a pattern before a kernel under test.
 *
 * A kernel that reads shared memory it did not write in this launch (a row a loader skipped, a
 * reduction slot no warp filled) finds there what the last block on that SM left. Alone on the GPU
 * that is its own earlier launches' finite data, and the bug hides; beside other processes it is
 * theirs, and the output changes (the chained-decode test failed that way only when it ran beside the
 * sanitizers). With 0xFFFFFFFF (NaN as fp16, bf16 and fp32 alike) such a read shows up in the output.
 *
 * The fill kernel takes the most shared memory a block may have, so one block fills one SM; twice as
 * many blocks as SMs reach every SM in practice (the scheduler spreads them). On the stream given,
 * before the launches under test.
 */
#ifndef KVATTN_TEST_SHARED_POISON_H
#define KVATTN_TEST_SHARED_POISON_H

#include <stdio.h>
#include <stdlib.h>

#include "gpu_internal.h"
#include "internal.h"

#define SHARED_NAN 0xFFFFFFFFu

static void poison_shared_memory(kvattn_context *ctx, unsigned pattern, void *stream) {
  struct gpu_context *g = ctx->gpu;
  const int bytes = g->max_smem_per_block_optin;
  int words = bytes / 4;
  void *args[] = {&pattern, &words};
  CUfunction fn = NULL;
  if (gpu_get_kernel(g, "jit_selftest.cu", "", "jit_fill_shared", bytes, &fn) != KVATTN_SUCCESS ||
      gpu_launch(g, fn, 2 * g->sm_count, 1024, bytes, stream, args, 0) != KVATTN_SUCCESS) {
    fprintf(stderr, "poison_shared_memory: %s\n", kvattn_last_error());
    exit(2);
  }
}

#endif
