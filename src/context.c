/* context.c - contexts: the backend choice, threads, the JIT cache location. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu_internal.h"
#include "internal.h"

#define FN "kvattn_context_create"

static void default_cache_dir(const char *explicit_dir, char *out, size_t size) {
  const char *e;
  if (explicit_dir && explicit_dir[0]) snprintf(out, size, "%s", explicit_dir);
  else if ((e = getenv("KVATTN_CACHE_DIR")) && e[0]) snprintf(out, size, "%s", e);
  else if ((e = getenv("XDG_CACHE_HOME")) && e[0]) snprintf(out, size, "%s/kvattn", e);
  else if ((e = getenv("HOME")) && e[0]) snprintf(out, size, "%s/.cache/kvattn", e);
  else snprintf(out, size, "/tmp/kvattn-cache");
}

KVATTN_API kvattn_status kvattn_context_create(const kvattn_options *opt_in, kvattn_context **out) {
  clear_error();
  RETURN_IF(!out, KVATTN_ERROR_INVALID_ARGUMENT, FN ": ctx (the output pointer) is NULL");
  *out = NULL;
  kvattn_options opt = KVATTN_OPTIONS_INIT;
  if (opt_in) {
    RETURN_IF(opt_in->struct_size < offsetof(kvattn_options, cache_dir) + sizeof(char *),
              KVATTN_ERROR_INVALID_ARGUMENT,
              FN ": options.struct_size=%u is too small: initialise it with KVATTN_OPTIONS_INIT", opt_in->struct_size);
    memcpy(&opt, opt_in, opt_in->struct_size < sizeof opt ? opt_in->struct_size : sizeof opt);
  }
  RETURN_IF(opt.backend < KVATTN_BACKEND_AUTO || opt.backend > KVATTN_BACKEND_REFERENCE,
            KVATTN_ERROR_INVALID_ARGUMENT, FN ": options.backend=%d is not a kvattn_backend", opt.backend);
  RETURN_IF(opt.device_id < 0, KVATTN_ERROR_INVALID_ARGUMENT, FN ": options.device_id=%d is negative", opt.device_id);
  RETURN_IF(opt.num_threads < 0 || opt.num_threads > 4096, KVATTN_ERROR_INVALID_ARGUMENT,
            FN ": options.num_threads=%d must be in 0..4096", opt.num_threads);
  RETURN_IF(opt.skip_validation != 0 && opt.skip_validation != 1, KVATTN_ERROR_INVALID_ARGUMENT,
            FN ": options.skip_validation=%d must be 0 or 1", opt.skip_validation);

  kvattn_context *ctx = calloc(1, sizeof *ctx);
  RETURN_IF(!ctx, KVATTN_ERROR_OUT_OF_MEMORY, FN ": out of host memory");
  pthread_mutex_t *lock = malloc(sizeof *lock);
  if (!lock || pthread_mutex_init(lock, NULL) != 0) {
    free(lock);
    free(ctx);
    return set_error(KVATTN_ERROR_OUT_OF_MEMORY, FN ": out of host memory");
  }
  ctx->ws_lock = lock;
  ctx->device_id = opt.device_id;
  ctx->skip_validation = opt.skip_validation;
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  ctx->num_threads = opt.num_threads ? opt.num_threads : (int)(cores > 0 ? cores : 1);
  default_cache_dir(opt.cache_dir, ctx->cache_dir, sizeof ctx->cache_dir);

  char gpu_why[600] = "";
  if (opt.backend == KVATTN_BACKEND_CUDA || opt.backend == KVATTN_BACKEND_AUTO) {
    ctx->backend = KVATTN_BACKEND_CUDA;
    kvattn_status s = gpu_context_init(ctx);
    if (s == KVATTN_SUCCESS) {
      if (!ctx->info[0] && ctx->gpu)
        snprintf(ctx->info, sizeof ctx->info, "backend: cuda (device %d: %s, %s, %d SMs)", ctx->device_id,
                 ctx->gpu->name, ctx->gpu->arch, ctx->gpu->sm_count);
      *out = ctx;
      clear_error();
      return KVATTN_SUCCESS;
    }
    if (opt.backend == KVATTN_BACKEND_CUDA) {
      pthread_mutex_destroy(lock);
      free(lock);
      free(ctx);
      char why[900]; /* the error text says why; name the function in front of it */
      snprintf(why, sizeof why, "%s", kvattn_last_error());
      return set_error(s, FN ": options.backend=CUDA (device %d): %s", opt.device_id, why);
    }
    snprintf(gpu_why, sizeof gpu_why, "%s", kvattn_last_error());
    ctx->gpu = NULL;
  }
  ctx->backend = opt.backend == KVATTN_BACKEND_REFERENCE ? KVATTN_BACKEND_REFERENCE : KVATTN_BACKEND_CPU;
  if (ctx->backend == KVATTN_BACKEND_REFERENCE)
    snprintf(ctx->info, sizeof ctx->info, "backend: reference (CPU, float64, single thread)");
  else
    snprintf(ctx->info, sizeof ctx->info, "backend: cpu (%d threads)%s%s", ctx->num_threads,
             gpu_why[0] ? "; GPU backend not used: " : "", gpu_why);
  clear_error();
  *out = ctx;
  return KVATTN_SUCCESS;
}

KVATTN_API kvattn_status kvattn_context_destroy(kvattn_context *ctx) {
  clear_error();
  if (!ctx) return KVATTN_SUCCESS;
  if (ctx->gpu) gpu_context_release(ctx);
  pthread_mutex_destroy((pthread_mutex_t *)ctx->ws_lock);
  free(ctx->ws_lock);
  free(ctx);
  return KVATTN_SUCCESS;
}

KVATTN_API kvattn_status kvattn_context_backend(const kvattn_context *ctx, kvattn_backend *backend) {
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_context_backend: ctx is NULL");
  RETURN_IF(!backend, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_context_backend: backend is NULL");
  *backend = ctx->backend;
  return KVATTN_SUCCESS;
}

KVATTN_API kvattn_status kvattn_context_info(const kvattn_context *ctx, char *buf, size_t size) {
  clear_error();
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_context_info: ctx is NULL");
  RETURN_IF(!buf || size == 0, KVATTN_ERROR_INVALID_ARGUMENT, "kvattn_context_info: buf is NULL or size is 0");
  snprintf(buf, size, "%s; jit cache: %s", ctx->info, ctx->cache_dir);
  return KVATTN_SUCCESS;
}

uint64_t ctx_ws_claim(kvattn_context *ctx, const void *ws) {
  if (!ws) return 0; /* an empty workspace holds nothing to overwrite */
  pthread_mutex_lock((pthread_mutex_t *)ctx->ws_lock);
  uint64_t id = ++ctx->plan_serial;
  int slot = -1;
  for (int i = 0; i < 64; i++)
    if (ctx->ws_owner[i].ws == ws) slot = i;
  if (slot < 0) {
    slot = ctx->ws_owner_next;
    ctx->ws_owner_next = (ctx->ws_owner_next + 1) % 64;
  }
  ctx->ws_owner[slot].ws = ws;
  ctx->ws_owner[slot].plan_id = id;
  pthread_mutex_unlock((pthread_mutex_t *)ctx->ws_lock);
  return id;
}

int ctx_ws_holds(kvattn_context *ctx, const void *ws, uint64_t plan_id) {
  int holds = 1; /* unknown (evicted): not checked */
  if (!ws) return 1;
  pthread_mutex_lock((pthread_mutex_t *)ctx->ws_lock);
  for (int i = 0; i < 64; i++)
    if (ctx->ws_owner[i].ws == ws) holds = ctx->ws_owner[i].plan_id == plan_id;
  pthread_mutex_unlock((pthread_mutex_t *)ctx->ws_lock);
  return holds;
}
