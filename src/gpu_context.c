/*
 * gpu_context.c - a CUDA device for a kvattn context: the driver and NVRTC loaded, the device's
 * primary context retained, its properties read, kernels compiled/loaded on demand and memoized,
 * and workspace memory.
 *
 * The primary context is the one the CUDA runtime (and so PyTorch, CuPy, JAX) uses for the device:
 * pointers and streams the caller made with them work with kvattn as they are.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_internal.h"

/* Driver enum values used here (cuda.h; fixed ABI). */
enum {
  CU_ERR_NO_DEVICE = 100,
  CU_ATTR_MULTIPROCESSOR_COUNT = 16,
  CU_ATTR_COMPUTE_CAPABILITY_MAJOR = 75,
  CU_ATTR_COMPUTE_CAPABILITY_MINOR = 76,
  CU_ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
  CU_FUNC_ATTR_SHARED_SIZE_BYTES = 1,
  CU_FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
};

#define DEFAULT_SMEM_LIMIT (48 * 1024) /* dynamic shared memory allowed without opting in */

/* The architecture kvattn compiles for: sm_90a on Hopper, so kernels may use wgmma/setmaxnreg
 * (the 'a' target runs only on 9.0 exactly, which is what we have); the plain sm_XY elsewhere. */
static void arch_name(int major, int minor, char *out, size_t size) {
  if (major == 9 && minor == 0)
    snprintf(out, size, "sm_90a");
  else
    snprintf(out, size, "sm_%d%d", major, minor);
}

/* Re-issue the current error message with status `s` and a prefix (copied first: set_error must
 * not read the buffer it writes). */
static kvattn_status with_prefix(kvattn_status s, const char *prefix) {
  char detail[900];
  snprintf(detail, sizeof detail, "%s", kvattn_last_error());
  return set_error(s, "%s%s", prefix, detail);
}

/* A failed driver call while setting up: the GPU backend is not usable, say why. */
static kvattn_status unavailable(const cuda_api *api, CUresult r, const char *what) {
  cuda_error(api, r, what);
  return with_prefix(KVATTN_ERROR_BACKEND_UNAVAILABLE, "");
}

kvattn_status gpu_context_init(kvattn_context *ctx) {
  RETURN_IF(!ctx, KVATTN_ERROR_INVALID_ARGUMENT, "gpu_context_init: ctx is NULL");
  ctx->gpu = NULL;
  const cuda_api *api;
  TRY(cuda_api_load(&api));
  CUresult r = api->cuInit(0);
  if (r == CU_ERR_NO_DEVICE) return set_error(KVATTN_ERROR_BACKEND_UNAVAILABLE, "no CUDA device: cuInit reports CUDA_ERROR_NO_DEVICE");
  if (r != 0) return unavailable(api, r, "cuInit");
  int count = 0;
  if ((r = api->cuDeviceGetCount(&count)) != 0) return unavailable(api, r, "cuDeviceGetCount");
  if (count == 0) return set_error(KVATTN_ERROR_BACKEND_UNAVAILABLE, "no CUDA device (cuDeviceGetCount = 0)");
  RETURN_IF(ctx->device_id < 0 || ctx->device_id >= count, KVATTN_ERROR_INVALID_ARGUMENT,
            "kvattn_context_create: device_id=%d but this machine has %d CUDA device(s) (0..%d)", ctx->device_id,
            count, count - 1);

  CUdevice dev;
  if ((r = api->cuDeviceGet(&dev, ctx->device_id)) != 0) return unavailable(api, r, "cuDeviceGet");
  int major = 0, minor = 0, sms = 0, smem_optin = 0;
  char name[256] = "";
  if ((r = api->cuDeviceGetName(name, (int)sizeof name, dev)) != 0) return unavailable(api, r, "cuDeviceGetName");
  if ((r = api->cuDeviceGetAttribute(&major, CU_ATTR_COMPUTE_CAPABILITY_MAJOR, dev)) != 0 ||
      (r = api->cuDeviceGetAttribute(&minor, CU_ATTR_COMPUTE_CAPABILITY_MINOR, dev)) != 0 ||
      (r = api->cuDeviceGetAttribute(&sms, CU_ATTR_MULTIPROCESSOR_COUNT, dev)) != 0 ||
      (r = api->cuDeviceGetAttribute(&smem_optin, CU_ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)) != 0)
    return unavailable(api, r, "cuDeviceGetAttribute");
  if (major < 8)
    return set_error(KVATTN_ERROR_BACKEND_UNAVAILABLE,
                     "GPU too old: device %d (%s) has compute capability %d.%d; kvattn's kernels need 8.0 (Ampere) "
                     "or newer",
                     ctx->device_id, name, major, minor);

  /* NVRTC is part of the backend: without it no kernel exists. */
  TRY(jit_nvrtc_load(NULL, 0));

  struct gpu_context *g = calloc(1, sizeof *g);
  pthread_mutex_t *lock = malloc(sizeof *lock);
  if (!g || !lock || pthread_mutex_init(lock, NULL) != 0) {
    free(g);
    free(lock);
    return set_error(KVATTN_ERROR_OUT_OF_MEMORY, "gpu_context_init: out of host memory");
  }
  g->api = api;
  g->dev = dev;
  g->cc_major = major;
  g->cc_minor = minor;
  g->sm_count = sms;
  g->max_smem_per_block_optin = smem_optin;
  g->lock = lock;
  snprintf(g->name, sizeof g->name, "%s", name);
  arch_name(major, minor, g->arch, sizeof g->arch);
  snprintf(g->cache_dir, sizeof g->cache_dir, "%s", ctx->cache_dir);
  if ((r = api->cuDevicePrimaryCtxRetain(&g->cu_ctx, dev)) != 0) {
    pthread_mutex_destroy(lock);
    free(lock);
    free(g);
    return unavailable(api, r, "cuDevicePrimaryCtxRetain");
  }
  ctx->gpu = g;
  return KVATTN_SUCCESS;
}

void gpu_context_release(kvattn_context *ctx) {
  if (!ctx || !ctx->gpu) return;
  struct gpu_context *g = ctx->gpu;
  const cuda_api *api = g->api;
  /* Modules belong to the primary context; unload them with it current. If the process is
   * exiting and the driver is already torn down, these calls fail harmlessly. */
  if (api->cuCtxSetCurrent(g->cu_ctx) == 0)
    for (int i = 0; i < g->num_kernels; i++) api->cuModuleUnload(g->kernels[i].module);
  api->cuDevicePrimaryCtxRelease(g->dev);
  pthread_mutex_destroy((pthread_mutex_t *)g->lock);
  free(g->lock);
  free(g);
  ctx->gpu = NULL;
}

kvattn_status gpu_make_current(struct gpu_context *g) {
  RETURN_IF(!g, KVATTN_ERROR_INTERNAL, "gpu_make_current: no GPU context");
  CUcontext cur = NULL;
  if (g->api->cuCtxGetCurrent(&cur) == 0 && cur == g->cu_ctx) return KVATTN_SUCCESS;
  CU_TRY(g->api, cuCtxSetCurrent(g->cu_ctx));
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- kernels */

/* "source|entry|defines", or with a hash in place of long definitions (the key must fit). */
static void kernel_key(const char *source, const char *defines, const char *entry, char *out, size_t size) {
  int n = snprintf(out, size, "%s|%s|%s", source, entry, defines ? defines : "");
  if (n < 0 || (size_t)n >= size) {
    hash128 h;
    hash128_init(&h, 0);
    hash128_update(&h, defines, strlen(defines));
    jit_key k = hash128_final(&h);
    snprintf(out, size, "%s|%s|#%016llx%016llx", source, entry, (unsigned long long)k.hi, (unsigned long long)k.lo);
  }
}

static gpu_kernel *find_kernel(struct gpu_context *g, const char *key) {
  for (int i = 0; i < g->num_kernels; i++)
    if (strcmp(g->kernels[i].key, key) == 0) return &g->kernels[i];
  return NULL;
}

/* Raise the function's dynamic shared memory limit to smem_bytes if it is lower (never lower it:
 * another thread may be launching with the larger size). */
static kvattn_status ensure_smem(struct gpu_context *g, CUfunction fn, int smem_bytes, const char *entry) {
  if (smem_bytes <= DEFAULT_SMEM_LIMIT) return KVATTN_SUCCESS;
  int static_smem = 0, cur = 0;
  CU_TRY(g->api, cuFuncGetAttribute(&static_smem, CU_FUNC_ATTR_SHARED_SIZE_BYTES, fn));
  RETURN_IF(smem_bytes + static_smem > g->max_smem_per_block_optin, KVATTN_ERROR_UNSUPPORTED,
            "%s needs %d bytes of dynamic + %d of static shared memory; %s allows %d per block", entry, smem_bytes,
            static_smem, g->name, g->max_smem_per_block_optin);
  CU_TRY(g->api, cuFuncGetAttribute(&cur, CU_FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, fn));
  if (cur < smem_bytes) CU_TRY(g->api, cuFuncSetAttribute(fn, CU_FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes));
  return KVATTN_SUCCESS;
}

kvattn_status gpu_get_kernel(struct gpu_context *g, const char *source, const char *defines, const char *entry,
                             int smem_bytes, CUfunction *fn) {
  RETURN_IF(!g || !source || !entry || !fn, KVATTN_ERROR_INTERNAL, "gpu_get_kernel: NULL argument");
  RETURN_IF(smem_bytes < 0, KVATTN_ERROR_INTERNAL, "gpu_get_kernel: smem_bytes=%d", smem_bytes);
  if (!defines) defines = "";
  char key[sizeof g->kernels[0].key];
  kernel_key(source, defines, entry, key, sizeof key);
  pthread_mutex_t *lock = g->lock;

  pthread_mutex_lock(lock);
  gpu_kernel *k = find_kernel(g, key);
  CUfunction found = k ? k->fn : NULL;
  pthread_mutex_unlock(lock);
  if (found) {
    if (smem_bytes > DEFAULT_SMEM_LIMIT) {
      TRY(gpu_make_current(g));
      TRY(ensure_smem(g, found, smem_bytes, entry));
    }
    *fn = found;
    return KVATTN_SUCCESS;
  }

  /* Compile (or read from the disk cache) outside the mutex: a compile takes long, and other
   * threads should meanwhile get the kernels already loaded. jit_compile itself serializes
   * compilers of the same key. */
  jit_spec spec = {source, defines, g->arch};
  void *cubin = NULL;
  size_t cubin_size = 0;
  TRY(jit_compile(&spec, g->cache_dir[0] ? g->cache_dir : NULL, &cubin, &cubin_size, NULL, NULL));
  kvattn_status st = gpu_make_current(g);
  if (st != KVATTN_SUCCESS) {
    free(cubin);
    return st;
  }

  pthread_mutex_lock(lock);
  k = find_kernel(g, key); /* another thread may have loaded it meanwhile */
  if (k) {
    found = k->fn;
  } else if (g->num_kernels >= GPU_MAX_KERNELS) {
    st = set_error(KVATTN_ERROR_UNSUPPORTED, "gpu_get_kernel: more than %d kernel specializations in one context",
                   GPU_MAX_KERNELS);
  } else {
    CUmodule module = NULL;
    CUresult r = g->api->cuModuleLoadData(&module, cubin);
    if (r != 0) {
      st = cuda_error(g->api, r, "cuModuleLoadData (a kernel compiled by NVRTC)");
    } else if ((r = g->api->cuModuleGetFunction(&found, module, entry)) != 0) {
      char prefix[400];
      snprintf(prefix, sizeof prefix, "gpu_get_kernel: %s has no kernel named \"%s\" (extern \"C\"?): ", source,
               entry);
      st = with_prefix(cuda_error(g->api, r, "cuModuleGetFunction"), prefix);
      g->api->cuModuleUnload(module);
    } else {
      gpu_kernel *slot = &g->kernels[g->num_kernels++];
      snprintf(slot->key, sizeof slot->key, "%s", key);
      slot->module = module;
      slot->fn = found;
    }
  }
  pthread_mutex_unlock(lock);
  free(cubin);
  TRY(st);
  TRY(ensure_smem(g, found, smem_bytes, entry));
  *fn = found;
  return KVATTN_SUCCESS;
}

kvattn_status gpu_launch(const struct gpu_context *g, CUfunction fn, int grid, int threads, int smem_bytes,
                         void *stream, void **args, int pdl) {
  if (pdl && g->cc_major >= 9 && g->api->cuLaunchKernelEx) {
    CUlaunchAttribute attr;
    memset(&attr, 0, sizeof attr);
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    CUlaunchConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDimX = (unsigned)grid;
    cfg.gridDimY = cfg.gridDimZ = 1;
    cfg.blockDimX = (unsigned)threads;
    cfg.blockDimY = cfg.blockDimZ = 1;
    cfg.sharedMemBytes = (unsigned)smem_bytes;
    cfg.hStream = (CUstream)stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    CU_TRY(g->api, cuLaunchKernelEx(&cfg, fn, args, NULL));
    return KVATTN_SUCCESS;
  }
  CU_TRY(g->api, cuLaunchKernel(fn, (unsigned)grid, 1, 1, (unsigned)threads, 1, 1, (unsigned)smem_bytes,
                                (CUstream)stream, args, NULL));
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- memory */

kvattn_status gpu_alloc(kvattn_context *ctx, size_t device_bytes, size_t host_bytes, kvattn_workspace *ws) {
  RETURN_IF(!ctx || !ctx->gpu || !ws, KVATTN_ERROR_INTERNAL, "gpu_alloc: no GPU context or workspace");
  struct gpu_context *g = ctx->gpu;
  const cuda_api *api = g->api;
  memset(ws, 0, sizeof *ws);
  TRY(gpu_make_current(g));
  CUdeviceptr d = 0;
  void *h = NULL;
  CUresult r;
  if (device_bytes) {
    if ((r = api->cuMemAlloc(&d, device_bytes)) != 0) {
      char prefix[160];
      snprintf(prefix, sizeof prefix, "kvattn_workspace_alloc: %zu bytes of device memory: ", device_bytes);
      return with_prefix(cuda_error(api, r, "cuMemAlloc"), prefix);
    }
    /* A fresh workspace is zero before any stream can touch it. cuMemsetD8 on device memory returns
     * before the fill is done: it is queued on the legacy stream, which a non-blocking stream (the
     * usual serving stream) does not wait for, so a plan's copy there could land first and then be
     * zeroed. Wait for it here (the chained-decode test lost its first launch's work lists that way
     * when the GPU was busy). */
    if ((r = api->cuMemsetD8(d, 0, device_bytes)) != 0 || (r = api->cuStreamSynchronize(NULL)) != 0) {
      api->cuMemFree(d);
      return cuda_error(api, r, "cuMemsetD8 (zeroing the workspace)");
    }
  }
  if (host_bytes) {
    if ((r = api->cuMemAllocHost(&h, host_bytes)) != 0) {
      if (d) api->cuMemFree(d);
      char prefix[160];
      snprintf(prefix, sizeof prefix, "kvattn_workspace_alloc: %zu bytes of pinned host memory: ", host_bytes);
      return with_prefix(cuda_error(api, r, "cuMemAllocHost"), prefix);
    }
    memset(h, 0, host_bytes);
  }
  ws->device = (void *)(uintptr_t)d;
  ws->device_bytes = device_bytes;
  ws->host = h;
  ws->host_bytes = host_bytes;
  return KVATTN_SUCCESS;
}

kvattn_status gpu_free(kvattn_context *ctx, kvattn_workspace *ws) {
  RETURN_IF(!ctx || !ctx->gpu || !ws, KVATTN_ERROR_INTERNAL, "gpu_free: no GPU context or workspace");
  struct gpu_context *g = ctx->gpu;
  TRY(gpu_make_current(g));
  kvattn_status st = KVATTN_SUCCESS;
  CUresult r;
  if (ws->device && (r = g->api->cuMemFree((CUdeviceptr)(uintptr_t)ws->device)) != 0)
    st = cuda_error(g->api, r, "cuMemFree (the workspace's device part)");
  if (ws->host && (r = g->api->cuMemFreeHost(ws->host)) != 0 && st == KVATTN_SUCCESS)
    st = cuda_error(g->api, r, "cuMemFreeHost (the workspace's host part)");
  memset(ws, 0, sizeof *ws);
  return st;
}
