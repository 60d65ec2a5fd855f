/*
 * gpu_internal.h - the GPU backend's shared declarations: the CUDA driver API loaded at run time
 * (src/cuda.c), NVRTC and the cubin disk cache (src/jit.c, src/jit_cache.c), and what the kernel
 * families' host code (src/gpu_*.c) uses to get and launch kernels.
 *
 * No CUDA header is included: the few driver types and entry points kvattn uses are declared here
 * with the driver's ABI, and resolved with dlsym from libcuda.so.1.
 */
#ifndef KVATTN_GPU_INTERNAL_H
#define KVATTN_GPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* ---------------------------------------------------------------- driver ABI (subset) */
typedef int CUresult;                 /* 0 = CUDA_SUCCESS */
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef unsigned long long CUdeviceptr;

/* Entry points resolved from libcuda.so.1 (the _v2 names where the driver has them). */
typedef struct cuda_api {
  void *lib;
  CUresult (*cuInit)(unsigned flags);
  CUresult (*cuDriverGetVersion)(int *v);
  CUresult (*cuDeviceGetCount)(int *n);
  CUresult (*cuDeviceGet)(CUdevice *d, int ordinal);
  CUresult (*cuDeviceGetName)(char *name, int len, CUdevice d);
  CUresult (*cuDeviceGetAttribute)(int *v, int attrib, CUdevice d);
  CUresult (*cuDeviceTotalMem)(size_t *bytes, CUdevice d);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *c, CUdevice d);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice d);
  CUresult (*cuCtxSetCurrent)(CUcontext c);
  CUresult (*cuCtxGetCurrent)(CUcontext *c);
  CUresult (*cuCtxSynchronize)(void);
  CUresult (*cuModuleLoadData)(CUmodule *m, const void *image);
  CUresult (*cuModuleUnload)(CUmodule m);
  CUresult (*cuModuleGetFunction)(CUfunction *f, CUmodule m, const char *name);
  CUresult (*cuFuncSetAttribute)(CUfunction f, int attrib, int value);
  CUresult (*cuFuncGetAttribute)(int *v, int attrib, CUfunction f);
  CUresult (*cuLaunchKernel)(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                             unsigned by, unsigned bz, unsigned smem, CUstream s, void **params,
                             void **extra);
  CUresult (*cuMemAlloc)(CUdeviceptr *p, size_t bytes);
  CUresult (*cuMemFree)(CUdeviceptr p);
  CUresult (*cuMemAllocHost)(void **p, size_t bytes);
  CUresult (*cuMemFreeHost)(void *p);
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr dst, const void *src, size_t bytes, CUstream s);
  CUresult (*cuMemcpyDtoHAsync)(void *dst, CUdeviceptr src, size_t bytes, CUstream s);
  CUresult (*cuMemsetD8Async)(CUdeviceptr dst, unsigned char v, size_t n, CUstream s);
  CUresult (*cuMemsetD8)(CUdeviceptr dst, unsigned char v, size_t n);
  CUresult (*cuPointerGetAttribute)(void *data, int attribute, CUdeviceptr p);
  CUresult (*cuStreamSynchronize)(CUstream s);
  CUresult (*cuGetErrorName)(CUresult e, const char **s);
  CUresult (*cuGetErrorString)(CUresult e, const char **s);
} cuda_api;

/* Load libcuda.so.1 once per process (thread-safe). On failure returns BACKEND_UNAVAILABLE with
 * the reason (dlerror text, or the missing symbol) in the error text. */
kvattn_status cuda_api_load(const cuda_api **api);
/* Map a failed CUresult to KVATTN_ERROR_CUDA with "what: NAME (code): description". */
kvattn_status cuda_error(const cuda_api *api, CUresult r, const char *what);
#define CU_TRY(api, call)                                               \
  do {                                                                  \
    CUresult cu_r_ = (api)->call;                                       \
    if (cu_r_ != 0) return cuda_error((api), cu_r_, #call);             \
  } while (0)

/* ---------------------------------------------------------------- NVRTC + cache */

/* A kernel specialization: a file of kernels/ (which may #include other kernels/ files by name),
 * the preprocessor definitions that specialize it, and the architecture ("sm_80", "sm_90a"). */
typedef struct jit_spec {
  const char *source;   /* "decode_paged.cu" */
  const char *defines;  /* "-DHEAD_DIM=128 -DPAGE_SIZE=16 ..." (space-separated -D options) */
  const char *arch;     /* "sm_90a" */
} jit_spec;

/* Compile `spec` to a cubin (or load it from the disk cache under cache_dir; NULL = default
 * location), key = hash(source text incl. included files, defines, options, arch, NVRTC version).
 * *cubin is malloc'ed; the caller frees it. `seconds` (may be NULL) receives the compile time,
 * 0 on a cache hit; `cache_hit` (may be NULL) is set to 1 on a hit. Works without a GPU. */
kvattn_status jit_compile(const jit_spec *spec, const char *cache_dir, void **cubin, size_t *cubin_size,
                          double *seconds, int *cache_hit);

/* ---------------------------------------------------------------- the GPU context */

#define GPU_MAX_KERNELS 128
typedef struct gpu_kernel {
  char key[512];       /* source + defines + entry */
  CUmodule module;
  CUfunction fn;
} gpu_kernel;

struct gpu_context {
  const cuda_api *api;
  CUdevice dev;
  CUcontext cu_ctx;            /* the device's primary context (shared with the runtime/PyTorch) */
  char name[256];
  char arch[16];               /* "sm_90a", "sm_80", ... */
  int cc_major, cc_minor;
  int sm_count;
  int max_smem_per_block_optin;
  char cache_dir[1024];
  gpu_kernel kernels[GPU_MAX_KERNELS]; /* memoized, loaded modules */
  int num_kernels;
  void *lock;                  /* a pthread_mutex_t* guarding `kernels` */
};

/* Make the context's device current on this thread (primary context). */
kvattn_status gpu_make_current(struct gpu_context *g);
/* The function `entry` of the specialization (source, defines) for this device: memoized per
 * context, else compiled (or read from the cache) and loaded. Sets the max dynamic shared memory
 * attribute to `smem_bytes` when > 48 KiB. */
kvattn_status gpu_get_kernel(struct gpu_context *g, const char *source, const char *defines,
                             const char *entry, int smem_bytes, CUfunction *fn);

#endif /* KVATTN_GPU_INTERNAL_H */
