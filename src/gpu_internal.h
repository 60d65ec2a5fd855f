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

/* cuLaunchKernelEx's configuration (cuda.h, CUDA 12+): an attribute is a 4-byte id, 4 bytes of
 * padding and a 64-byte value union (8-byte aligned). Only the attribute kvattn sets is named. */
enum { CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6 };
typedef struct CUlaunchAttribute {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int programmaticStreamSerializationAllowed;
    unsigned long long align_;
  } value;
} CUlaunchAttribute;
typedef struct CUlaunchConfig {
  unsigned gridDimX, gridDimY, gridDimZ;
  unsigned blockDimX, blockDimY, blockDimZ;
  unsigned sharedMemBytes;
  CUstream hStream;
  CUlaunchAttribute *attrs;
  unsigned numAttrs;
} CUlaunchConfig;
_Static_assert(sizeof(CUlaunchAttribute) == 72, "CUlaunchAttribute must match the driver's layout");
_Static_assert(sizeof(CUlaunchConfig) == 56, "CUlaunchConfig must match the driver's layout");

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
  /* Optional (drivers of CUDA 12+): NULL when the driver lacks it; callers fall back to cuLaunchKernel. */
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig *config, CUfunction f, void **params, void **extra);
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

/* (added by gpurt) Load NVRTC once per process: KVATTN_NVRTC (a library file or a folder), then
 * $CUDA_HOME / $CUDA_PATH / /usr/local/cuda lib64 and lib, then the sonames libnvrtc.so.13, .12.
 * BACKEND_UNAVAILABLE with every place tried when none loads. `desc` (may be NULL) receives e.g.
 * "NVRTC 13.0 (/usr/local/cuda-13.0/lib/libnvrtc.so.13), headers -I/usr/local/cuda-13.0/include". */
kvattn_status jit_nvrtc_load(char *desc, size_t desc_size);

/* (added by gpurt) A 128-bit non-cryptographic hash (cache keys and entry checksums). */
typedef struct hash128 {
  uint64_t a, b;      /* the two lanes */
  uint64_t tail;      /* bytes not yet absorbed (< 8) */
  unsigned tail_len;
  uint64_t total_len;
} hash128;
typedef struct jit_key { uint64_t lo, hi; } jit_key;
void hash128_init(hash128 *h, uint64_t seed);
void hash128_update(hash128 *h, const void *data, size_t n);
jit_key hash128_final(const hash128 *h);

/* (added by gpurt) The cubin disk cache (src/jit_cache.c). The directory: `explicit_dir` when set,
 * else $KVATTN_CACHE_DIR, else $XDG_CACHE_HOME/kvattn, else ~/.cache/kvattn; created if missing
 * (failure to create is not an error: the cache is then skipped). Returns 0 if no location. */
int jit_cache_dir(const char *explicit_dir, char *out, size_t size);
/* 1 and a malloc'ed cubin on a valid entry; 0 on a miss or a corrupt/truncated entry. */
int jit_cache_load(const char *dir, jit_key key, void **cubin, size_t *size);
/* Best effort, atomic (temp file in `dir` + fsync + rename): 1 stored, 0 not (read-only dir...). */
int jit_cache_store(const char *dir, jit_key key, const void *cubin, size_t size);
/* Serialize the compilers of one key across threads and processes (an OFD byte-range lock on
 * dir/.lock). Returns a handle >= 0, or -1 when no lock could be taken (compile anyway). */
int jit_cache_lock(const char *dir, jit_key key);
void jit_cache_unlock(int handle);

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
/* Launch a 1-D grid on `stream`; pdl: with programmatic stream serialization where the device
 * (sm_90+) and the driver (cuLaunchKernelEx) have it, so the kernel may start while the one before it
 * finishes (it must call pdl_wait(), kernels/common.cuh, before touching what that one may write). */
kvattn_status gpu_launch(const struct gpu_context *g, CUfunction fn, int grid, int threads, int smem_bytes,
                         void *stream, void **args, int pdl);


/* ---------------------------------------------------------------- kernel families

 * Decode (src/gpu_attention.c, src/plan_decode.c, kernels/decode*.cu) owns gpu_plan / gpu_run and
 * routes every batch in which some work row has more than one query row (bv->qo_rows_max > 1), and
 * every ragged or block-sparse batch, to the prefill family below. The prefill family's state hangs
 * off kvattn_attention.gpu_prefill; its workspace needs are added to the decode family's in
 * gpu_workspace_size (the two regions do not overlap: prefill uses the bytes after decode's). */
struct gpu_prefill;
kvattn_status gpu_prefill_workspace_size(kvattn_context *ctx, const kvattn_attention_desc *desc,
                                         const kvattn_bounds *bounds, size_t *device_bytes,
                                         size_t *host_bytes);
kvattn_status gpu_prefill_init(kvattn_attention *a);   /* compiles its kernels */
void gpu_prefill_release(kvattn_attention *a);
/* ws_device_offset / ws_host_offset: where the prefill region starts inside the workspace. */
kvattn_status gpu_prefill_plan(kvattn_attention *a, const batch_view *bv, const kvattn_workspace *ws,
                               size_t ws_device_offset, size_t ws_host_offset, kvattn_stream stream);
kvattn_status gpu_prefill_run(kvattn_attention *a, const run_tensors *t, kvattn_stream stream);
/* (added by prefill) For kvattn_warmup: compile the prefill specializations of a resolved desc on
 * `arch` without a GPU; `kernels` / `seconds` (may be NULL) are added to. */
kvattn_status gpu_prefill_warmup(const kvattn_attention_desc *desc, const char *arch, const char *cache_dir,
                                 int *kernels, double *seconds);

#endif /* KVATTN_GPU_INTERNAL_H */
