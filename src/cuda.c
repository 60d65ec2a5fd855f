/*
 * cuda.c - the CUDA driver API, loaded at run time.
 *
 * kvattn has no link-time dependency on CUDA: libcuda.so.1 is opened with dlopen the first time a
 * GPU context is asked for, and the few entry points in `cuda_api` are resolved with dlsym. On a
 * machine without a driver this fails cleanly with BACKEND_UNAVAILABLE and the dlerror() text, and
 * the CPU backend serves.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "gpu_internal.h"

static cuda_api g_api;
static kvattn_status g_load_status = KVATTN_SUCCESS;
static char g_load_error[512];
static pthread_once_t g_load_once = PTHREAD_ONCE_INIT;

/* Resolve `name` into *slot; returns 0 and records the missing symbol when it is absent. */
static int resolve(void *lib, void **slot, const char *name) {
  *slot = dlsym(lib, name);
  if (!*slot) {
    snprintf(g_load_error, sizeof g_load_error, "libcuda.so.1 has no symbol %s (driver too old?)", name);
    return 0;
  }
  return 1;
}

static void load_once(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char *why = dlerror();
    snprintf(g_load_error, sizeof g_load_error, "cannot load the CUDA driver: dlopen(\"libcuda.so.1\"): %s",
             why ? why : "unknown error");
    g_load_status = KVATTN_ERROR_BACKEND_UNAVAILABLE;
    return;
  }
  cuda_api a;
  memset(&a, 0, sizeof a);
  a.lib = lib;
  /* The _v2 names are the ABI the driver's headers have mapped these calls to since CUDA 4/11. */
#define R(field, name) \
  if (!resolve(lib, (void **)&a.field, name)) goto fail
  R(cuInit, "cuInit");
  R(cuDriverGetVersion, "cuDriverGetVersion");
  R(cuDeviceGetCount, "cuDeviceGetCount");
  R(cuDeviceGet, "cuDeviceGet");
  R(cuDeviceGetName, "cuDeviceGetName");
  R(cuDeviceGetAttribute, "cuDeviceGetAttribute");
  R(cuDeviceTotalMem, "cuDeviceTotalMem_v2");
  R(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
  R(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2");
  R(cuCtxSetCurrent, "cuCtxSetCurrent");
  R(cuCtxGetCurrent, "cuCtxGetCurrent");
  R(cuCtxSynchronize, "cuCtxSynchronize");
  R(cuModuleLoadData, "cuModuleLoadData");
  R(cuModuleUnload, "cuModuleUnload");
  R(cuModuleGetFunction, "cuModuleGetFunction");
  R(cuFuncSetAttribute, "cuFuncSetAttribute");
  R(cuFuncGetAttribute, "cuFuncGetAttribute");
  R(cuLaunchKernel, "cuLaunchKernel");
  R(cuMemAlloc, "cuMemAlloc_v2");
  R(cuMemFree, "cuMemFree_v2");
  R(cuMemAllocHost, "cuMemAllocHost_v2");
  R(cuMemFreeHost, "cuMemFreeHost");
  R(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2");
  R(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2");
  R(cuMemsetD8Async, "cuMemsetD8Async");
  R(cuMemsetD8, "cuMemsetD8_v2");
  R(cuPointerGetAttribute, "cuPointerGetAttribute");
  R(cuStreamSynchronize, "cuStreamSynchronize");
  R(cuGetErrorName, "cuGetErrorName");
  R(cuGetErrorString, "cuGetErrorString");
#undef R
  /* optional: programmatic dependent launch (decode); absent on drivers older than CUDA 12 */
  *(void **)&a.cuLaunchKernelEx = dlsym(lib, "cuLaunchKernelEx");
  g_api = a;
  return;
fail:
  dlclose(lib);
  g_load_status = KVATTN_ERROR_BACKEND_UNAVAILABLE;
}

kvattn_status cuda_api_load(const cuda_api **api) {
  pthread_once(&g_load_once, load_once);
  if (g_load_status != KVATTN_SUCCESS) {
    if (api) *api = NULL;
    return set_error(g_load_status, "%s", g_load_error);
  }
  if (api) *api = &g_api;
  return KVATTN_SUCCESS;
}

/* CUresult values the mapping below treats specially (driver ABI, cuda.h). */
enum {
  CU_ERR_OUT_OF_MEMORY = 2,
  CU_ERR_NO_DEVICE = 100,
};

kvattn_status cuda_error(const cuda_api *api, CUresult r, const char *what) {
  const char *name = NULL, *desc = NULL;
  if (api && api->cuGetErrorName) api->cuGetErrorName(r, &name);
  if (api && api->cuGetErrorString) api->cuGetErrorString(r, &desc);
  kvattn_status s = r == CU_ERR_OUT_OF_MEMORY ? KVATTN_ERROR_OUT_OF_MEMORY : KVATTN_ERROR_CUDA;
  return set_error(s, "%s: %s (%d): %s", what ? what : "CUDA driver call", name ? name : "CUDA_ERROR_?", (int)r,
                   desc ? desc : "no description");
}
