/*
 * test_gpu_decode.c - batch decode on the GPU against the float64 reference (a REFERENCE context
 * over host copies of the same tensors): randomized cases over page sizes 1/16/64, NHD and HND,
 * non-contiguous views, group sizes 1/4/8 (and 6, 16), head dims 64/128/256, fp16 and bf16,
 * batch 1..512, lengths 0..32k with heavy-tailed mixes, every option (window, soft-cap, ALiBi,
 * RoPE, LSE). Every case draws fresh inputs; unused page slots, unreferenced pages and padding hold
 * NaN; outputs are poisoned before the run and every element must be written; so is every SM's shared
 * memory (tests/gpu/shared_poison.h), so a read of shared memory the launch did not write shows.
 * Also: 1000 random batches replayed through one captured CUDA graph (each bitwise equal to an eager
 * run of the same plan, every 20th checked against the reference), a request's bits independent of its
 * batch under fixed_split_size (both paths), plan() host time at batch 256,
 * merge_states and append_paged_kv against the CPU backend.
 *
 * Skipped, with the reason, when there is no usable GPU. KVATTN_GPU_TEST_SCALE (default 1) scales
 * the number of random cases (the sanitizer pass runs a small scale).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu_decode.h"
#include "gpu_internal.h"
#include "internal.h"
#include "shared_poison.h"
#include "test.h"

/* ---------------------------------------------------------------- the driver, for the test's own memory */

typedef int CUres;
typedef unsigned long long CUdptr;
static struct {
  int loaded, ok;
  char why[256];
  CUres (*cuInit)(unsigned);
  CUres (*cuDeviceGet)(int *, int);
  CUres (*cuDevicePrimaryCtxRetain)(void **, int);
  CUres (*cuCtxSetCurrent)(void *);
  CUres (*cuMemAlloc)(CUdptr *, size_t);
  CUres (*cuMemFree)(CUdptr);
  CUres (*cuMemcpyHtoD)(CUdptr, const void *, size_t);
  CUres (*cuMemcpyDtoH)(void *, CUdptr, size_t);
  CUres (*cuMemsetD8)(CUdptr, unsigned char, size_t);
  CUres (*cuCtxSynchronize)(void);
  CUres (*cuStreamCreate)(void **, unsigned);
  CUres (*cuStreamDestroy)(void *);
  CUres (*cuStreamSynchronize)(void *);
  CUres (*cuStreamBeginCapture)(void *, int);
  CUres (*cuStreamEndCapture)(void *, void **);
  CUres (*cuGraphInstantiateWithFlags)(void **, void *, unsigned long long);
  CUres (*cuGraphLaunch)(void *, void *);
  CUres (*cuGraphExecDestroy)(void *);
  CUres (*cuGraphDestroy)(void *);
} cu;

static int load_driver(void) {
  if (cu.loaded) return cu.ok;
  cu.loaded = 1;
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(cu.why, sizeof cu.why, "dlopen(libcuda.so.1): %s", dlerror());
    return 0;
  }
#define SYM(field, name)                                                        \
  if (!(*(void **)&cu.field = dlsym(lib, name))) {                              \
    snprintf(cu.why, sizeof cu.why, "libcuda.so.1 has no %s", name);            \
    return 0;                                                                   \
  }
  SYM(cuInit, "cuInit");
  SYM(cuDeviceGet, "cuDeviceGet");
  SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
  SYM(cuCtxSetCurrent, "cuCtxSetCurrent");
  SYM(cuMemAlloc, "cuMemAlloc_v2");
  SYM(cuMemFree, "cuMemFree_v2");
  SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2");
  SYM(cuMemcpyDtoH, "cuMemcpyDtoH_v2");
  SYM(cuMemsetD8, "cuMemsetD8_v2");
  SYM(cuCtxSynchronize, "cuCtxSynchronize");
  SYM(cuStreamCreate, "cuStreamCreate");
  SYM(cuStreamDestroy, "cuStreamDestroy_v2");
  SYM(cuStreamSynchronize, "cuStreamSynchronize");
  SYM(cuStreamBeginCapture, "cuStreamBeginCapture_v2");
  SYM(cuStreamEndCapture, "cuStreamEndCapture");
  SYM(cuGraphInstantiateWithFlags, "cuGraphInstantiateWithFlags");
  SYM(cuGraphLaunch, "cuGraphLaunch");
  SYM(cuGraphExecDestroy, "cuGraphExecDestroy");
  SYM(cuGraphDestroy, "cuGraphDestroy");
#undef SYM
  cu.ok = 1;
  return 1;
}

/* Compile the decode specializations the cases can ask for (head dims x group sizes x dtypes x
 * variant hooks) on all cores at once, into the disk cache, so the cases (and the sanitizer runs,
 * other processes) load instead of compiling one by one. */
static kvattn_context *gpu_ctx, *ref_ctx;
static int prewarm_next;
static pthread_mutex_t prewarm_lock = PTHREAD_MUTEX_INITIALIZER;
static void *prewarm_worker(void *arg) {
  const char *arch = arg;
  const int hds[3] = {64, 128, 256}, groups[6] = {1, 2, 4, 6, 8, 16};
  for (;;) {
    pthread_mutex_lock(&prewarm_lock);
    int i = prewarm_next++;
    pthread_mutex_unlock(&prewarm_lock);
    if (i >= 2 * 3 * 6 * 8) return NULL;
    const int group = groups[(i / 8) % 6];
    if (group != 1 && group != 4 && group != 8 && (i & 7)) continue; /* the cases use hooks only there */
    kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
    d.num_kv_heads = 2;
    d.num_qo_heads = 2 * groups[(i / 8) % 6];
    d.head_dim = hds[(i / 48) % 3];
    d.q_dtype = (DLDataType){i / 144 ? kDLBfloat : kDLFloat, 16, 1};
    d.logits_soft_cap = i & 1 ? 30.0f : 0.0f;
    d.alibi = (i & 2) != 0;
    d.rope = (i & 4) != 0;
    gpu_decode_warmup(&d, arch, NULL, NULL, NULL); /* the decode family only */
  }
}
static void prewarm(void) {
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (cores < 8 || getenv("KVATTN_TEST_NO_PREWARM")) return; /* small machines compile on demand */
  static char arch[16];
  snprintf(arch, sizeof arch, "%s", gpu_ctx->gpu->arch);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pthread_t th[64];
  int n = cores > 64 ? 64 : (int)cores;
  for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, prewarm_worker, arch);
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  fprintf(stderr, "  prewarm: 162 decode specializations for %s on %d threads in %.1f s\n", arch, n,
          (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec));
}

/* The GPU context (shared by every case), or a skip reason. */
static char skip_why[600];
static int setup(void) {
  static int done = 0, ok = 0;
  if (done) return ok;
  done = 1;
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.backend = KVATTN_BACKEND_CUDA;
  kvattn_status s = kvattn_context_create(&o, &gpu_ctx);
  if (s != KVATTN_SUCCESS) {
    snprintf(skip_why, sizeof skip_why, "no usable GPU: %s: %s", kvattn_status_string(s), kvattn_last_error());
    return 0;
  }
  if (!load_driver()) {
    snprintf(skip_why, sizeof skip_why, "%s", cu.why);
    return 0;
  }
  int dev;
  void *pctx;
  if (cu.cuDeviceGet(&dev, 0) || cu.cuDevicePrimaryCtxRetain(&pctx, dev) || cu.cuCtxSetCurrent(pctx)) {
    snprintf(skip_why, sizeof skip_why, "could not make the primary context current");
    return 0;
  }
  prewarm();
  kvattn_options r = KVATTN_OPTIONS_INIT;
  r.backend = KVATTN_BACKEND_REFERENCE;
  if (kvattn_context_create(&r, &ref_ctx) != KVATTN_SUCCESS) {
    snprintf(skip_why, sizeof skip_why, "no reference context: %s", kvattn_last_error());
    return 0;
  }
  ok = 1;
  return 1;
}
#define NEED_GPU() \
  do {             \
    if (!setup()) SKIP("%s", skip_why); \
  } while (0)

static CUdptr dalloc(size_t bytes) {
  CUdptr p = 0;
  if (cu.cuMemAlloc(&p, bytes ? bytes : 16)) {
    fprintf(stderr, "cuMemAlloc(%zu) failed\n", bytes);
    exit(2);
  }
  return p;
}
/* cuMemcpyHtoD from pageable memory may return before the bytes land (and the legacy stream's
 * memsets before it too): wait, so work on a non-blocking stream sees them */
static void upload(CUdptr d, const void *h, size_t n) {
  if (n && (cu.cuMemcpyHtoD(d, h, n) || cu.cuCtxSynchronize())) {
    fprintf(stderr, "cuMemcpyHtoD failed\n");
    exit(2);
  }
}
static void download(void *h, CUdptr d, size_t n) {
  if (n && cu.cuMemcpyDtoH(h, d, n)) {
    fprintf(stderr, "cuMemcpyDtoH failed\n");
    exit(2);
  }
}

static int test_scale(void) {
  const char *s = getenv("KVATTN_GPU_TEST_SCALE");
  int v = s ? atoi(s) : 1;
  return v < 0 ? 0 : v;
}

/* ---------------------------------------------------------------- random numbers */

static uint64_t rng = 0x243F6A8885A308D3ull;
static uint64_t rnd(void) {
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return rng * 2685821657736338717ull;
}
static int64_t rnd_range(int64_t lo, int64_t hi) { return lo + (int64_t)(rnd() % (uint64_t)(hi - lo + 1)); }
static double rnd01(void) { return (double)(rnd() >> 11) / 9007199254740992.0; }
static float rnd_sym(void) { return (float)(2.0 * rnd01() - 1.0); }

static uint16_t to16(float x, int bf16) { return bf16 ? float_to_bf16(x) : float_to_half(x); }
static float from16(uint16_t x, int bf16) { return bf16 ? bf16_to_float(x) : half_to_float(x); }
#define NAN16(bf16) ((uint16_t)((bf16) ? 0x7FC0 : 0x7E00))

/* ---------------------------------------------------------------- one decode case */

typedef struct dcase {
  const char *name;
  int batch, kv_heads, group, head_dim, page_size, layout, bf16;
  int noncontig, combined_kv, want_lse;
  int window, rope, alibi;
  float soft_cap;
  const int64_t *kv_len; /* [batch] */
  int disable_split, fixed_split, kernel;
} dcase;

static DLTensor make_tensor(void *data, int gpu, int ndim, int64_t *shape, int64_t *strides, DLDataType dt) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.device.device_type = gpu ? kDLCUDA : kDLCPU;
  t.device.device_id = 0;
  t.ndim = ndim;
  t.dtype = dt;
  t.shape = shape;
  t.strides = strides;
  return t;
}

/* Runs the case; returns 0 when it matches, else prints why. `rel_out` receives ||o-ref||/||ref||. */
static int run_case(const dcase *c, double *rel_out, double *lse_err_out) {
  const int qo_heads = c->kv_heads * c->group, hd = c->head_dim, P = c->page_size, B = c->batch;
  const DLDataType dt16 = c->bf16 ? (DLDataType){kDLBfloat, 16, 1} : (DLDataType){kDLFloat, 16, 1};
  const DLDataType f32 = {kDLFloat, 32, 1}, i32 = {kDLInt, 32, 1};
  int rc = 1;

  /* page tables: pages shuffled over a cache with a few unreferenced pages */
  int32_t *kv_indptr = malloc(sizeof(int32_t) * (B + 1)), *last = malloc(sizeof(int32_t) * (B ? B : 1));
  kv_indptr[0] = 0;
  for (int i = 0; i < B; i++) {
    int64_t pages = (c->kv_len[i] + P - 1) / P;
    kv_indptr[i + 1] = (int32_t)(kv_indptr[i] + pages);
    last[i] = pages ? (int32_t)(c->kv_len[i] - (pages - 1) * P) : 1;
  }
  const int64_t entries = kv_indptr[B], num_pages = entries + 3;
  int32_t *perm = malloc(sizeof(int32_t) * num_pages);
  for (int64_t i = 0; i < num_pages; i++) perm[i] = (int32_t)i;
  for (int64_t i = num_pages - 1; i > 0; i--) {
    int64_t j = rnd() % (uint64_t)(i + 1);
    int32_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  int32_t *indices = perm; /* the first `entries` ids */

  /* strides (elements) of one cache: NHD [pages, P, kvh, hd] / HND [pages, kvh, P, hd] */
  const int64_t pad = c->noncontig ? 8 : 0;
  int64_t s_tok, s_head, s_page;
  if (c->layout == KVATTN_LAYOUT_NHD) {
    s_head = hd + pad;
    s_tok = c->kv_heads * s_head + pad;
    s_page = P * s_tok + pad;
  } else {
    s_tok = hd + pad;
    s_head = P * s_tok + pad;
    s_page = c->kv_heads * s_head + pad;
  }
  /* combined [pages, 2, ...]: K at +0, V at +half of the page stride */
  int64_t half = s_page;
  if (c->combined_kv) s_page = 2 * half;
  /* a separate, strided V gets its own page stride: K and V strides then differ */
  const int64_t s_page_v = !c->combined_kv && c->noncontig ? s_page + 8 : s_page;
  const int64_t cache_elems = num_pages * s_page, cache_elems_v = num_pages * s_page_v;
  uint16_t *kh = malloc(cache_elems * 2), *vh = c->combined_kv ? kh : malloc(cache_elems_v * 2);
  for (int64_t i = 0; i < cache_elems; i++) kh[i] = NAN16(c->bf16);
  if (!c->combined_kv)
    for (int64_t i = 0; i < cache_elems_v; i++) vh[i] = NAN16(c->bf16);
  const int64_t v_off = c->combined_kv ? half : 0;
  for (int i = 0; i < B; i++)
    for (int64_t t = 0; t < c->kv_len[i]; t++) {
      int64_t page = indices[kv_indptr[i] + t / P], slot = t % P;
      for (int h = 0; h < c->kv_heads; h++)
        for (int d = 0; d < hd; d++) {
          int64_t off = page * s_page + slot * s_tok + h * s_head + d;
          kh[off] = to16(rnd_sym(), c->bf16);
          vh[page * s_page_v + slot * s_tok + h * s_head + d + v_off] = to16(rnd_sym(), c->bf16);
        }
    }

  /* q with padded rows when non-contiguous */
  const int64_t q_sh = hd + pad, q_st = qo_heads * q_sh + pad;
  const int64_t q_elems = (int64_t)(B ? B : 1) * q_st;
  uint16_t *qh = malloc(q_elems * 2);
  for (int64_t i = 0; i < q_elems; i++) qh[i] = NAN16(c->bf16);
  for (int i = 0; i < B; i++)
    for (int h = 0; h < qo_heads; h++)
      for (int d = 0; d < hd; d++) qh[i * q_st + h * q_sh + d] = to16(2.0f * rnd_sym(), c->bf16);

  /* desc and bounds */
  kvattn_attention_desc desc = KVATTN_ATTENTION_DESC_INIT;
  desc.num_qo_heads = qo_heads;
  desc.num_kv_heads = c->kv_heads;
  desc.head_dim = hd;
  desc.q_dtype = dt16;
  desc.window_left = c->window;
  desc.logits_soft_cap = c->soft_cap;
  desc.rope = c->rope;
  desc.rope_theta = 10000.0f;
  if (c->rope && c->kv_heads % 2) desc.rope_llama31_factor = 8.0f; /* llama-3.1 scaling too */
  desc.alibi = c->alibi;
  desc.disable_split_kv = c->disable_split;
  desc.fixed_split_size = c->fixed_split;
  desc.kernel = c->kernel;
  kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
  bounds.max_batch = B + 1;
  bounds.max_qo_tokens = B + 1;
  bounds.max_kv_entries = entries + 7;
  kvattn_batch batch = KVATTN_BATCH_INIT;
  batch.format = KVATTN_FORMAT_PAGED;
  batch.batch_size = B;
  batch.kv_indptr = kv_indptr;
  batch.kv_last_page_len = last;
  batch.page_size = P;
  batch.num_pages = num_pages;

  /* GPU buffers */
  const size_t o_elems = (size_t)(B ? B : 1) * qo_heads * hd;
  CUdptr dk = dalloc(cache_elems * 2), dv = c->combined_kv ? dk : dalloc(cache_elems_v * 2);
  CUdptr dq = dalloc(q_elems * 2), dix = dalloc(num_pages * 4), dout = dalloc(o_elems * 2);
  CUdptr dlse = dalloc((size_t)(B ? B : 1) * qo_heads * 4);
  upload(dk, kh, cache_elems * 2);
  if (!c->combined_kv) upload(dv, vh, cache_elems_v * 2);
  upload(dq, qh, q_elems * 2);
  upload(dix, indices, num_pages * 4);
  cu.cuMemsetD8(dout, 0xFF, o_elems * 2); /* NaN in fp16 and bf16 */
  cu.cuMemsetD8(dlse, 0xFF, (size_t)(B ? B : 1) * qo_heads * 4);

  int64_t q_shape[3] = {B, qo_heads, hd}, q_str[3] = {q_st, q_sh, 1};
  int64_t kv_shape[4], kv_str[4];
  int64_t kv5_shape[5], kv5_str[5];
  if (c->layout == KVATTN_LAYOUT_NHD) {
    int64_t sh[4] = {num_pages, P, c->kv_heads, hd}, st[4] = {s_page, s_tok, s_head, 1};
    memcpy(kv_shape, sh, sizeof sh);
    memcpy(kv_str, st, sizeof st);
  } else {
    int64_t sh[4] = {num_pages, c->kv_heads, P, hd}, st[4] = {s_page, s_head, s_tok, 1};
    memcpy(kv_shape, sh, sizeof sh);
    memcpy(kv_str, st, sizeof st);
  }
  int64_t kv_str_v[4];
  memcpy(kv_str_v, kv_str, sizeof kv_str);
  kv_str_v[0] = s_page_v;
  kv5_shape[0] = num_pages;
  kv5_shape[1] = 2;
  kv5_str[0] = s_page;
  kv5_str[1] = half;
  for (int i = 1; i < 4; i++) {
    kv5_shape[i + 1] = kv_shape[i];
    kv5_str[i + 1] = kv_str[i];
  }
  int64_t ix_shape[1] = {entries};
  int64_t o_shape[3] = {B, qo_heads, hd}, lse_shape[2] = {B, qo_heads};

  kvattn_attention *ga = NULL, *ra = NULL;
  kvattn_workspace gws = {0}, rws = {0};
  float *ref_o = malloc(o_elems * 4), *ref_lse = malloc((size_t)(B ? B : 1) * qo_heads * 4);
  uint16_t *got_o = malloc(o_elems * 2);
  float *got_lse = malloc((size_t)(B ? B : 1) * qo_heads * 4);
  kvattn_status s;
#define STEP(call)                                                                                    \
  do {                                                                                                \
    s = (call);                                                                                       \
    if (s != KVATTN_SUCCESS) {                                                                        \
      fprintf(stderr, "  %s: %s -> %s: %s\n", c->name, #call, kvattn_status_string(s), kvattn_last_error()); \
      goto out;                                                                                       \
    }                                                                                                 \
  } while (0)

  /* GPU */
  size_t db, hb;
  STEP(kvattn_attention_create(gpu_ctx, &desc, &bounds, &ga));
  STEP(kvattn_workspace_size(gpu_ctx, &desc, &bounds, &db, &hb));
  STEP(kvattn_workspace_alloc(gpu_ctx, db, hb, &gws));
  STEP(kvattn_plan(ga, &batch, &gws, NULL));
  {
    DLTensor q = make_tensor((void *)(uintptr_t)dq, 1, 3, q_shape, q_str, dt16);
    DLTensor k = make_tensor((void *)(uintptr_t)dk, 1, 4, kv_shape, kv_str, dt16);
    DLTensor v = make_tensor((void *)(uintptr_t)dv, 1, 4, kv_shape, kv_str_v, dt16);
    DLTensor kv5 = make_tensor((void *)(uintptr_t)dk, 1, 5, kv5_shape, kv5_str, dt16);
    DLTensor ix = make_tensor((void *)(uintptr_t)dix, 1, 1, ix_shape, NULL, i32);
    DLTensor o = make_tensor((void *)(uintptr_t)dout, 1, 3, o_shape, NULL, dt16);
    DLTensor l = make_tensor((void *)(uintptr_t)dlse, 1, 2, lse_shape, NULL, f32);
    kvattn_kv kv = KVATTN_KV_INIT;
    kv.layout = c->layout;
    if (c->combined_kv) {
      kv.kv = &kv5;
    } else {
      kv.k = &k;
      kv.v = &v;
    }
    kv.indices = &ix;
    poison_shared_memory(gpu_ctx, SHARED_NAN, NULL); /* a read of shared memory not written here: NaN out */
    STEP(kvattn_run(ga, &q, &kv, NULL, &o, c->want_lse ? &l : NULL, NULL));
    if (cu.cuCtxSynchronize()) {
      fprintf(stderr, "  %s: the kernel failed (cuCtxSynchronize)\n", c->name);
      goto out;
    }
  }
  download(got_o, dout, o_elems * 2);
  download(got_lse, dlse, (size_t)(B ? B : 1) * qo_heads * 4);

  /* reference on the host copies */
  {
    kvattn_attention_desc rd = desc;
    rd.o_dtype = f32;
    STEP(kvattn_attention_create(ref_ctx, &rd, &bounds, &ra));
    STEP(kvattn_workspace_size(ref_ctx, &rd, &bounds, &db, &hb));
    STEP(kvattn_workspace_alloc(ref_ctx, db, hb, &rws));
    STEP(kvattn_plan(ra, &batch, &rws, NULL));
    DLTensor q = make_tensor(qh, 0, 3, q_shape, q_str, dt16);
    DLTensor k = make_tensor(kh, 0, 4, kv_shape, kv_str, dt16);
    DLTensor v = make_tensor(vh + v_off, 0, 4, kv_shape, kv_str_v, dt16);
    DLTensor ix = make_tensor(indices, 0, 1, ix_shape, NULL, i32);
    DLTensor o = make_tensor(ref_o, 0, 3, o_shape, NULL, f32);
    DLTensor l = make_tensor(ref_lse, 0, 2, lse_shape, NULL, f32);
    kvattn_kv kv = KVATTN_KV_INIT;
    kv.layout = c->layout;
    kv.k = &k;
    kv.v = &v;
    kv.indices = &ix;
    STEP(kvattn_run(ra, &q, &kv, NULL, &o, &l, NULL));
  }

  /* compare */
  double num = 0, den = 0, lse_err = 0;
  for (int i = 0; i < B; i++)
    for (int h = 0; h < qo_heads; h++) {
      const size_t r = (size_t)i * qo_heads + h;
      for (int d = 0; d < hd; d++) {
        float g = from16(got_o[r * hd + d], c->bf16), f = ref_o[r * hd + d];
        if (!(g == g) || g - g != 0) {
          fprintf(stderr, "  %s: out[%d][%d][%d] = %g is not finite (unwritten or NaN leaked; ref %g)\n", c->name, i, h,
                  d, g, f);
          goto out;
        }
        if (c->kv_len[i] == 0 && g != 0.0f) {
          fprintf(stderr, "  %s: request %d is empty but out[..][%d][%d] = %g\n", c->name, i, h, d, g);
          goto out;
        }
        num += (double)(g - f) * (g - f);
        den += (double)f * f;
      }
      if (c->want_lse) {
        float g = got_lse[r], f = ref_lse[r];
        if (c->kv_len[i] == 0) {
          if (!(g < 0 && g - g != 0)) {
            fprintf(stderr, "  %s: empty request %d head %d: lse %g, want -inf\n", c->name, i, h, g);
            goto out;
          }
        } else {
          double e = fabs((double)g - f) / (1.0 + fabs(f));
          if (!(e < 1e30)) e = 1e30;
          if (e > lse_err) lse_err = e;
        }
      }
    }
  double rel = den > 0 ? sqrt(num / den) : sqrt(num);
  *rel_out = rel;
  *lse_err_out = lse_err;
  if (rel > 1e-2 || lse_err > 1e-2) {
    fprintf(stderr, "  %s: relative error %.3e, lse error %.3e\n", c->name, rel, lse_err);
    goto out;
  }
  rc = 0;
out:
  kvattn_attention_destroy(ga);
  kvattn_attention_destroy(ra);
  kvattn_workspace_free(gpu_ctx, &gws);
  kvattn_workspace_free(ref_ctx, &rws);
  cu.cuMemFree(dk);
  if (!c->combined_kv) cu.cuMemFree(dv);
  cu.cuMemFree(dq);
  cu.cuMemFree(dix);
  cu.cuMemFree(dout);
  cu.cuMemFree(dlse);
  free(kv_indptr);
  free(last);
  free(perm);
  free(kh);
  if (!c->combined_kv) free(vh);
  free(qh);
  free(ref_o);
  free(ref_lse);
  free(got_o);
  free(got_lse);
  return rc;
#undef STEP
}

static int64_t pareto_len(double alpha, double scale, int64_t cap) {
  double x = scale / pow(1.0 - rnd01() * 0.999999, 1.0 / alpha);
  return x > cap ? cap : (int64_t)x;
}

/* Random lengths: uniform, heavy-tailed, some zero; total bounded so the reference stays quick. */
static void random_lengths(int64_t *len, int n, int64_t max_len, int64_t budget_tokens) {
  int style = (int)(rnd() % 3);
  int64_t total = 0;
  for (int i = 0; i < n; i++) {
    if (style == 0) len[i] = rnd_range(0, max_len);
    else if (style == 1) len[i] = pareto_len(1.2, 64, max_len);
    else len[i] = rnd_range(max_len / 2, max_len);
    if (rnd() % 12 == 0) len[i] = 0;
    if (rnd() % 12 == 0) len[i] = 1;
    total += len[i];
  }
  if (total > budget_tokens)
    for (int i = 0; i < n; i++) len[i] = len[i] * budget_tokens / total;
}

static void print_case(const dcase *c, double rel, double lse) {
  int64_t total = 0, mx = 0;
  for (int i = 0; i < c->batch; i++) {
    total += c->kv_len[i];
    if (c->kv_len[i] > mx) mx = c->kv_len[i];
  }
  fprintf(stderr,
          "  %-22s b%-4d kvh %d g%-2d hd%-3d p%-3d %s %s%s%s%s%s%s%s%s kv %lld (max %lld): err %.2e lse %.2e\n",
          c->name, c->batch, c->kv_heads, c->group, c->head_dim, c->page_size, c->layout ? "HND" : "NHD",
          c->bf16 ? "bf16" : "fp16", c->noncontig ? " strided" : "", c->combined_kv ? " kv5" : "",
          c->window >= 0 ? " window" : "", c->soft_cap > 0 ? " softcap" : "", c->alibi ? " alibi" : "",
          c->rope ? " rope" : "",
          c->kernel == KVATTN_KERNEL_CUDA_CORE || c->rope || c->head_dim > 128 ? " cuda-core" : " tensor-core",
          (long long)total, (long long)mx, rel, lse);
}

/* A random case of the given page size, group and head dim: batch, heads, layout, dtype, strides and
 * options drawn from the test's generator. every_option: also combined K/V, LSE on or off and RoPE
 * (else LSE on, separate K/V, no RoPE: the tensor-core path's shapes). */
static void random_case(dcase *c, int64_t *len, const char *name, int max_batch, int page_size, int group,
                        int head_dim, int every_option) {
  memset(c, 0, sizeof *c);
  c->name = name;
  c->batch = (int)rnd_range(1, max_batch);
  c->kv_heads = (int)rnd_range(1, 4);
  c->group = group;
  c->head_dim = head_dim;
  c->page_size = page_size;
  c->layout = (int)(rnd() % 2);
  c->bf16 = (int)(rnd() % 2);
  c->noncontig = rnd() % 2 == 0;
  c->want_lse = 1;
  if (every_option) {
    c->combined_kv = rnd() % 4 == 0;
    c->want_lse = rnd() % 2 == 0;
  }
  c->window = rnd() % 4 == 0 ? (int)rnd_range(0, 600) : -1;
  c->soft_cap = rnd() % 5 == 0 ? 30.0f : 0.0f;
  c->alibi = rnd() % 5 == 0;
  if (every_option) c->rope = rnd() % 5 == 0;
  c->kv_len = len;
}

TEST(decode_matches_the_reference_on_random_cases) {
  NEED_GPU();
  const int page_sizes[3] = {1, 16, 64}, groups[3] = {1, 4, 8}, dims[3] = {64, 128, 256};
  int n = 0, scale = test_scale();
  for (int rep = 0; rep < scale; rep++)
    for (int pi = 0; pi < 3; pi++)
      for (int gi = 0; gi < 3; gi++)
        for (int di = 0; di < 3; di++) {
          int64_t len[64];
          dcase c;
          random_case(&c, len, "random", 40, page_sizes[pi], groups[gi], dims[di], 1);
          random_lengths(len, c.batch, rnd() % 3 ? 2000 : 8000, 40000);
          double rel = 0, lse = 0;
          int bad = run_case(&c, &rel, &lse);
          print_case(&c, rel, lse);
          CHECK(bad == 0);
          n++;
        }
  printf("random decode cases: %d passed\n", n);
}

TEST(decode_edge_shapes) {
  NEED_GPU();
  struct {
    const char *name;
    int batch, kv_heads, group, hd, page, layout, bf16;
    int64_t fill; /* -1: custom */
  } shapes[] = {
      {"batch1_long_split", 1, 2, 4, 128, 16, 0, 1, 32768},
      {"all_empty", 5, 2, 4, 128, 16, 0, 1, 0},
      {"shorter_than_a_page", 7, 1, 8, 64, 64, 1, 0, 37},
      {"exact_page_multiple", 3, 2, 2, 128, 16, 0, 1, 64},
      {"last_page_of_one", 3, 2, 2, 128, 16, 1, 1, 65},
      {"group6_blocks", 9, 2, 6, 128, 16, 0, 1, 700},
      {"group16_two_blocks", 4, 1, 16, 128, 16, 0, 0, 900},
      {"mha_group1_hd256", 6, 4, 1, 256, 1, 1, 1, 500},
      {"page256", 3, 2, 4, 64, 256, 0, 1, 1000},
      {"odd_page5", 17, 2, 4, 128, 5, 1, 1, 97},
      {"batch512_short", 512, 1, 4, 64, 16, 0, 1, -1},
      {"heavy_tail_32k", 48, 1, 4, 128, 16, 0, 1, -2},
      /* page sizes that are not powers of two on the tensor-core path too (its loader stages a
       * tile's page ids in shared memory): tiles that start and end inside pages, long splits */
      {"odd_page5_tc", 17, 2, 4, 128, 5, 1, 1, 97},
      {"odd_page3_long_cc", 2, 2, 4, 64, 3, 0, 1, 5000},
      {"odd_page3_long_tc", 2, 2, 4, 64, 3, 0, 1, 5000},
      {"page2_batch1_cc", 1, 8, 4, 128, 2, 1, 0, 4096},
      {"page2_batch1_tc", 1, 8, 4, 128, 2, 1, 0, 4096},
  };
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
    int64_t *len = malloc(sizeof(int64_t) * shapes[si].batch);
    for (int i = 0; i < shapes[si].batch; i++) {
      if (shapes[si].fill >= 0) len[i] = shapes[si].fill;
      else if (shapes[si].fill == -1) len[i] = rnd_range(0, 300);
      else len[i] = pareto_len(1.1, 200, 32768);
    }
    if (shapes[si].fill == -2) len[3] = 32768;
    dcase c;
    memset(&c, 0, sizeof c);
    c.name = shapes[si].name;
    c.batch = shapes[si].batch;
    c.kv_heads = shapes[si].kv_heads;
    c.group = shapes[si].group;
    c.head_dim = shapes[si].hd;
    c.page_size = shapes[si].page;
    c.layout = shapes[si].layout;
    c.bf16 = shapes[si].bf16;
    c.want_lse = 1;
    c.window = -1;
    c.kernel = si % 2 ? KVATTN_KERNEL_CUDA_CORE : KVATTN_KERNEL_AUTO; /* both paths */
    c.kv_len = len;
    double rel = 0, lse = 0;
    int bad = run_case(&c, &rel, &lse);
    print_case(&c, rel, lse);
    free(len);
    CHECK(bad == 0);
  }
}

TEST(decode_options_and_split_modes) {
  NEED_GPU();
  for (int k = 0; k < 10; k++) {
    int64_t len[24];
    dcase c;
    memset(&c, 0, sizeof c);
    c.name = "options";
    c.batch = 24;
    c.kv_heads = 2;
    c.group = 4;
    c.head_dim = 128;
    c.page_size = 16;
    c.bf16 = k % 2;
    c.want_lse = 1;
    c.window = k & 1 ? 100 : -1;
    c.soft_cap = k & 2 ? 20.0f : 0.0f;
    c.alibi = (k & 4) != 0;
    c.rope = k >= 4;
    c.disable_split = k == 3;
    c.fixed_split = k == 5 ? 4 : 0;
    c.kernel = k >= 8 ? KVATTN_KERNEL_TENSOR_CORE : k % 2 ? KVATTN_KERNEL_CUDA_CORE : KVATTN_KERNEL_AUTO;
    if (k >= 8) c.rope = c.alibi = 0, c.soft_cap = k == 9 ? 20.0f : 0.0f, c.window = -1, c.group = 4 * (k - 7);
    c.noncontig = 1;
    random_lengths(len, c.batch, 3000, 30000);
    c.kv_len = len;
    double rel = 0, lse = 0;
    int bad = run_case(&c, &rel, &lse);
    print_case(&c, rel, lse);
    CHECK(bad == 0);
  }
}

/* Small cases that still take every path (split pieces and their merge, empty requests, each
 * option): the subset the sanitizer pass runs (compute-sanitizer slows kernels by 10-100x). */
TEST(decode_small_cases_for_the_sanitizers) {
  NEED_GPU();
  for (int k = 0; k < 6; k++) {
    int64_t len[6] = {1500, 0, 37, 2100, 1, 900};
    dcase c;
    memset(&c, 0, sizeof c);
    c.name = "small";
    c.batch = 6;
    c.kv_heads = 2;
    c.group = k % 3 == 0 ? 4 : k % 3 == 1 ? 1 : 8;
    c.head_dim = k % 3 == 0 ? 128 : k % 3 == 1 ? 64 : 256;
    c.page_size = k % 2 ? 16 : 1;
    c.layout = k % 2;
    c.bf16 = k % 2;
    c.want_lse = 1;
    c.window = k == 2 ? 300 : -1;
    c.soft_cap = k == 3 ? 25.0f : 0.0f;
    c.alibi = k == 4;
    c.rope = k == 5;
    c.noncontig = k % 2;
    c.kernel = k % 2 ? KVATTN_KERNEL_CUDA_CORE : KVATTN_KERNEL_AUTO;
    c.kv_len = len;
    double rel = 0, lse = 0;
    int bad = run_case(&c, &rel, &lse);
    print_case(&c, rel, lse);
    CHECK(bad == 0);
  }
}

/* ---------------------------------------------------------------- CUDA graph replay */

/* RELIABILITY.md tests 7, the graph soak: one graph captured with the largest batch, then 1000 random
 * batches within the bounds (padded slots of length 0 included), each planned again and replayed: every
 * replay bitwise equal to an eager run of the same plan, and every 20th against the float64 reference. */
TEST(one_captured_graph_replays_1000_random_batches) {
  NEED_GPU();
  const int kvh = 2, group = 4, hd = 128, P = 16, maxB = 64, maxlen = 1024;
  const int qo_heads = kvh * group;
  const int64_t max_pages = (int64_t)maxB * (maxlen / P), num_pages = max_pages + 1;
  const DLDataType bf = {kDLBfloat, 16, 1}, i32 = {kDLInt, 32, 1}, f32 = {kDLFloat, 32, 1};
  /* one fixed set of buffers at fixed addresses, sized for the bounds */
  const int64_t cache_elems = num_pages * P * kvh * hd;
  uint16_t *kh = malloc(cache_elems * 2), *vh = malloc(cache_elems * 2);
  for (int64_t i = 0; i < cache_elems; i++) {
    kh[i] = float_to_bf16(rnd_sym());
    vh[i] = float_to_bf16(rnd_sym());
  }
  CUdptr dk = dalloc(cache_elems * 2), dv = dalloc(cache_elems * 2), dix = dalloc(max_pages * 4);
  CUdptr dq = dalloc((size_t)maxB * qo_heads * hd * 2), dout = dalloc((size_t)maxB * qo_heads * hd * 2);
  CUdptr dout2 = dalloc((size_t)maxB * qo_heads * hd * 2), dlse = dalloc((size_t)maxB * qo_heads * 4);
  upload(dk, kh, cache_elems * 2);
  upload(dv, vh, cache_elems * 2);

  kvattn_attention_desc desc = KVATTN_ATTENTION_DESC_INIT;
  desc.num_qo_heads = qo_heads;
  desc.num_kv_heads = kvh;
  desc.head_dim = hd;
  desc.q_dtype = bf;
  kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
  bounds.max_batch = maxB;
  bounds.max_qo_tokens = maxB;
  bounds.max_kv_entries = max_pages;
  kvattn_attention *a = NULL, *ra = NULL;
  kvattn_workspace ws = {0}, rws = {0};
  size_t db, hb;
  CHECK_OK(kvattn_attention_create(gpu_ctx, &desc, &bounds, &a));
  CHECK_OK(kvattn_workspace_size(gpu_ctx, &desc, &bounds, &db, &hb));
  CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws));
  kvattn_attention_desc rd = desc;
  rd.o_dtype = f32;
  CHECK_OK(kvattn_attention_create(ref_ctx, &rd, &bounds, &ra));
  CHECK_OK(kvattn_workspace_size(ref_ctx, &rd, &bounds, &db, &hb));
  CHECK_OK(kvattn_workspace_alloc(ref_ctx, db, hb, &rws));
  void *stream = NULL;
  CHECK(cu.cuStreamCreate(&stream, 1 /* non-blocking */) == 0);

  int32_t kv_indptr[65], last[64], *indices = malloc(max_pages * 4);
  uint16_t *qh = malloc((size_t)maxB * qo_heads * hd * 2), *o1 = malloc((size_t)maxB * qo_heads * hd * 2);
  uint16_t *o2 = malloc((size_t)maxB * qo_heads * hd * 2);
  float *ref = malloc((size_t)maxB * qo_heads * hd * 4), *ref_lse = malloc((size_t)maxB * qo_heads * 4);
  void *graph = NULL, *exec = NULL;
  int failures = 0;
  double worst = 0;
  enum { STEPS = 1000, REF_EVERY = 20 };
  int checked = 0;
  for (int step = 0; step <= STEPS; step++) {
    /* a random batch within the bounds; padded slots (length 0) as serving systems pad */
    int B = step == 0 ? maxB : (int)rnd_range(0, maxB);
    int64_t len[64];
    random_lengths(len, B, maxlen, (int64_t)maxB * maxlen);
    kv_indptr[0] = 0;
    for (int i = 0; i < B; i++) {
      int64_t pages = (len[i] + P - 1) / P;
      kv_indptr[i + 1] = (int32_t)(kv_indptr[i] + pages);
      last[i] = pages ? (int32_t)(len[i] - (pages - 1) * P) : 1;
    }
    for (int64_t e = 0; e < kv_indptr[B]; e++) indices[e] = (int32_t)rnd_range(0, num_pages - 1);
    upload(dix, indices, (size_t)kv_indptr[B] * 4);
    for (int64_t i = 0; i < (int64_t)B * qo_heads * hd; i++) qh[i] = float_to_bf16(2 * rnd_sym());
    upload(dq, qh, (size_t)B * qo_heads * hd * 2);
    kvattn_batch batch = KVATTN_BATCH_INIT;
    batch.batch_size = B;
    batch.kv_indptr = kv_indptr;
    batch.kv_last_page_len = last;
    batch.page_size = P;
    batch.num_pages = num_pages;
    CHECK_OK(kvattn_plan(a, &batch, &ws, stream));

    int64_t q_shape[3] = {B, qo_heads, hd}, kv_shape[4] = {num_pages, P, kvh, hd}, ix_shape[1] = {kv_indptr[B]};
    DLTensor q = make_tensor((void *)(uintptr_t)dq, 1, 3, q_shape, NULL, bf);
    DLTensor k = make_tensor((void *)(uintptr_t)dk, 1, 4, kv_shape, NULL, bf);
    DLTensor v = make_tensor((void *)(uintptr_t)dv, 1, 4, kv_shape, NULL, bf);
    DLTensor ix = make_tensor((void *)(uintptr_t)dix, 1, 1, ix_shape, NULL, i32);
    DLTensor o = make_tensor((void *)(uintptr_t)dout, 1, 3, q_shape, NULL, bf);
    DLTensor oe = make_tensor((void *)(uintptr_t)dout2, 1, 3, q_shape, NULL, bf);
    kvattn_kv kv = KVATTN_KV_INIT;
    kv.k = &k;
    kv.v = &v;
    kv.indices = &ix;
    if (step == 0) {
      /* capture once, with the largest batch's tensors */
      CHECK(cu.cuStreamBeginCapture(stream, 2 /* relaxed */) == 0);
      kvattn_status s = kvattn_run(a, &q, &kv, NULL, &o, NULL, stream);
      CHECK(cu.cuStreamEndCapture(stream, &graph) == 0);
      CHECK_OK(s);
      CHECK(cu.cuGraphInstantiateWithFlags(&exec, graph, 0) == 0);
    }
    cu.cuMemsetD8(dout, 0xFF, (size_t)maxB * qo_heads * hd * 2);
    cu.cuMemsetD8(dout2, 0xFF, (size_t)maxB * qo_heads * hd * 2);
    /* The uploads above (pageable memory: the call may return before the DMA lands) and the memsets
     * ran on the legacy stream, which a non-blocking stream does not wait for: without this, the
     * replay can read the previous step's q or page ids (seen on an H200 with other GPU work beside:
     * step 37 read stale inputs, 1.8e-2 off, while the eager run after it was right). */
    CHECK(cu.cuCtxSynchronize() == 0);
    CHECK(cu.cuGraphLaunch(exec, stream) == 0);
    CHECK_OK(kvattn_run(a, &q, &kv, NULL, &oe, NULL, stream)); /* eager, same plan */
    CHECK(cu.cuStreamSynchronize(stream) == 0);
    download(o1, dout, (size_t)B * qo_heads * hd * 2);
    download(o2, dout2, (size_t)B * qo_heads * hd * 2);
    if (memcmp(o1, o2, (size_t)B * qo_heads * hd * 2)) {
      fprintf(stderr, "  step %d (batch %d): graph replay differs from the eager run\n", step, B);
      failures++;
    }
    if (step % REF_EVERY) continue;
    /* the reference */
    checked++;
    CHECK_OK(kvattn_plan(ra, &batch, &rws, NULL));
    {
      int64_t o_shape[3] = {B, qo_heads, hd}, l_shape[2] = {B, qo_heads};
      DLTensor rq = make_tensor(qh, 0, 3, q_shape, NULL, bf);
      DLTensor rk = make_tensor(kh, 0, 4, kv_shape, NULL, bf);
      DLTensor rv = make_tensor(vh, 0, 4, kv_shape, NULL, bf);
      DLTensor rix = make_tensor(indices, 0, 1, ix_shape, NULL, i32);
      DLTensor ro = make_tensor(ref, 0, 3, o_shape, NULL, f32);
      DLTensor rl = make_tensor(ref_lse, 0, 2, l_shape, NULL, f32);
      kvattn_kv rkv = KVATTN_KV_INIT;
      rkv.k = &rk;
      rkv.v = &rv;
      rkv.indices = &rix;
      CHECK_OK(kvattn_run(ra, &rq, &rkv, NULL, &ro, &rl, NULL));
    }
    double num = 0, den = 0;
    for (int64_t i = 0; i < (int64_t)B * qo_heads * hd; i++) {
      float g = bf16_to_float(o1[i]);
      if (!(g == g)) num += 1e30;
      num += (double)(g - ref[i]) * (g - ref[i]);
      den += (double)ref[i] * ref[i];
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (rel > worst) worst = rel;
    if (rel > 1e-2) {
      fprintf(stderr, "  step %d (batch %d): relative error %.3e\n", step, B, rel);
      failures++;
    }
  }
  printf("graph replay: %d random batches through one captured graph, each equal to eager; %d against the reference, "
         "worst relative error %.2e; %d failures\n", STEPS, checked, worst, failures);
  CHECK(failures == 0);
  cu.cuGraphExecDestroy(exec);
  cu.cuGraphDestroy(graph);
  cu.cuStreamDestroy(stream);
  kvattn_attention_destroy(a);
  kvattn_attention_destroy(ra);
  kvattn_workspace_free(gpu_ctx, &ws);
  kvattn_workspace_free(ref_ctx, &rws);
  cu.cuMemFree(dk);
  cu.cuMemFree(dv);
  cu.cuMemFree(dix);
  cu.cuMemFree(dq);
  cu.cuMemFree(dout);
  cu.cuMemFree(dout2);
  cu.cuMemFree(dlse);
  free(kh);
  free(vh);
  free(indices);
  free(qh);
  free(o1);
  free(o2);
  free(ref);
  free(ref_lse);
}

/* ---------------------------------------------------------------- workspace, determinism, 64-bit */

/* A simple decode problem on the device, for the tests below that vary one thing around it. */
typedef struct simple {
  int B, kvh, group, hd, P;
  int64_t pages;
  int32_t *kv_indptr, *last, *indices;
  CUdptr dk, dv, dq, dix, dout;
  kvattn_attention_desc desc;
  kvattn_bounds bounds;
  kvattn_batch batch;
} simple;

static void simple_make(simple *S, int B, int len, int64_t pages_in_cache, int64_t first_page) {
  memset(S, 0, sizeof *S);
  S->B = B, S->kvh = 2, S->group = 4, S->hd = 128, S->P = 16;
  const int per = (len + S->P - 1) / S->P;
  S->pages = pages_in_cache;
  S->kv_indptr = malloc(sizeof(int32_t) * (B + 1));
  S->last = malloc(sizeof(int32_t) * B);
  S->indices = malloc(sizeof(int32_t) * (size_t)B * per);
  S->kv_indptr[0] = 0;
  for (int i = 0; i < B; i++) {
    S->kv_indptr[i + 1] = S->kv_indptr[i] + per;
    S->last[i] = len - (per - 1) * S->P;
  }
  for (int64_t e = 0; e < (int64_t)B * per; e++) S->indices[e] = (int32_t)(first_page + e);
  const size_t page_elems = (size_t)S->P * S->kvh * S->hd, cache_bytes = (size_t)pages_in_cache * page_elems * 2;
  S->dk = dalloc(cache_bytes);
  S->dv = dalloc(cache_bytes);
  cu.cuMemsetD8(S->dk, 0xFF, cache_bytes); /* NaN everywhere the batch does not write */
  cu.cuMemsetD8(S->dv, 0xFF, cache_bytes);
  /* random K/V in the referenced pages (contiguous from first_page) */
  const size_t used = (size_t)B * per * page_elems;
  uint16_t *h = malloc(used * 2);
  for (size_t i = 0; i < used; i++) h[i] = float_to_bf16(rnd_sym());
  upload(S->dk + (CUdptr)first_page * page_elems * 2, h, used * 2);
  for (size_t i = 0; i < used; i++) h[i] = float_to_bf16(rnd_sym());
  upload(S->dv + (CUdptr)first_page * page_elems * 2, h, used * 2);
  free(h);
  const size_t qn = (size_t)B * S->kvh * S->group * S->hd;
  uint16_t *q = malloc(qn * 2);
  for (size_t i = 0; i < qn; i++) q[i] = float_to_bf16(2 * rnd_sym());
  S->dq = dalloc(qn * 2);
  upload(S->dq, q, qn * 2);
  free(q);
  S->dout = dalloc(qn * 2);
  S->dix = dalloc((size_t)B * per * 4);
  upload(S->dix, S->indices, (size_t)B * per * 4);
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_qo_heads = S->kvh * S->group;
  d.num_kv_heads = S->kvh;
  d.head_dim = S->hd;
  d.q_dtype = (DLDataType){kDLBfloat, 16, 1};
  S->desc = d;
  kvattn_bounds b = KVATTN_BOUNDS_INIT;
  b.max_batch = b.max_qo_tokens = B;
  b.max_kv_entries = (int64_t)B * per;
  S->bounds = b;
  kvattn_batch bt = KVATTN_BATCH_INIT;
  bt.batch_size = B;
  bt.kv_indptr = S->kv_indptr;
  bt.kv_last_page_len = S->last;
  bt.page_size = S->P;
  S->batch = bt;
}

static kvattn_status simple_run(simple *S, kvattn_attention *a, kvattn_workspace *ws) {
  kvattn_status s = kvattn_plan(a, &S->batch, ws, NULL);
  if (s) return s;
  const DLDataType bf = {kDLBfloat, 16, 1}, i32 = {kDLInt, 32, 1};
  int64_t q_shape[3] = {S->B, S->kvh * S->group, S->hd}, kv_shape[4] = {S->pages, S->P, S->kvh, S->hd};
  int64_t ix_shape[1] = {S->kv_indptr[S->B]};
  DLTensor q = make_tensor((void *)(uintptr_t)S->dq, 1, 3, q_shape, NULL, bf);
  DLTensor k = make_tensor((void *)(uintptr_t)S->dk, 1, 4, kv_shape, NULL, bf);
  DLTensor v = make_tensor((void *)(uintptr_t)S->dv, 1, 4, kv_shape, NULL, bf);
  DLTensor ix = make_tensor((void *)(uintptr_t)S->dix, 1, 1, ix_shape, NULL, i32);
  DLTensor o = make_tensor((void *)(uintptr_t)S->dout, 1, 3, q_shape, NULL, bf);
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.k = &k;
  kv.v = &v;
  kv.indices = &ix;
  return kvattn_run(a, &q, &kv, NULL, &o, NULL, NULL);
}

static void simple_free(simple *S) {
  cu.cuMemFree(S->dk);
  cu.cuMemFree(S->dv);
  cu.cuMemFree(S->dq);
  cu.cuMemFree(S->dix);
  cu.cuMemFree(S->dout);
  free(S->kv_indptr);
  free(S->last);
  free(S->indices);
}

TEST(workspace_of_exactly_the_reported_size_keeps_canaries_intact_and_reruns_are_bitwise_equal) {
  NEED_GPU();
  simple S;
  simple_make(&S, 5, 3000, 5 * 188 + 2, 1);
  kvattn_attention *a;
  CHECK_OK(kvattn_attention_create(gpu_ctx, &S.desc, &S.bounds, &a));
  size_t db, hb;
  CHECK_OK(kvattn_workspace_size(gpu_ctx, &S.desc, &S.bounds, &db, &hb));
  /* the reported sizes between 4 KiB canaries (device and pinned host) */
  const size_t canary = 4096;
  kvattn_workspace big;
  CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db + 2 * canary, hb + 2 * canary, &big));
  cu.cuMemsetD8((CUdptr)(uintptr_t)big.device, 0xA7, db + 2 * canary);
  memset(big.host, 0xA7, hb + 2 * canary);
  kvattn_workspace ws = {(char *)big.device + canary, db, (char *)big.host + canary, hb};
  CHECK_OK(simple_run(&S, a, &ws));
  CHECK(cu.cuCtxSynchronize() == 0);
  uint8_t *c = malloc(canary);
  download(c, (CUdptr)(uintptr_t)big.device, canary);
  for (size_t i = 0; i < canary; i++) CHECK_MSG(c[i] == 0xA7, "device canary before the workspace, byte %zu", i);
  download(c, (CUdptr)(uintptr_t)big.device + canary + db, canary);
  for (size_t i = 0; i < canary; i++) CHECK_MSG(c[i] == 0xA7, "device canary after the workspace, byte %zu", i);
  for (size_t i = 0; i < canary; i++) {
    CHECK(((uint8_t *)big.host)[i] == 0xA7);
    CHECK(((uint8_t *)big.host)[canary + hb + i] == 0xA7);
  }
  /* one byte less: the exact status, from plan */
  kvattn_workspace small = ws;
  small.device_bytes = db - 1;
  CHECK_STATUS(kvattn_plan(a, &S.batch, &small, NULL), KVATTN_ERROR_WORKSPACE_TOO_SMALL);
  small = ws;
  small.host_bytes = hb - 1;
  CHECK_STATUS(kvattn_plan(a, &S.batch, &small, NULL), KVATTN_ERROR_WORKSPACE_TOO_SMALL);
  /* determinism: the same plan and inputs give the same bits, 1000 runs in a row */
  const size_t on = (size_t)S.B * S.kvh * S.group * S.hd * 2;
  uint8_t *first = malloc(on), *again = malloc(on);
  CHECK_OK(simple_run(&S, a, &ws));
  CHECK(cu.cuCtxSynchronize() == 0);
  download(first, S.dout, on);
  for (int r = 0; r < 1000; r++) { /* RELIABILITY.md, tests 9 */
    cu.cuMemsetD8(S.dout, 0xFF, on);
    CHECK_OK(simple_run(&S, a, &ws));
    CHECK(cu.cuCtxSynchronize() == 0);
    download(again, S.dout, on);
    CHECK_MSG(memcmp(first, again, on) == 0, "rerun %d differs", r);
  }
  free(first);
  free(again);
  free(c);
  kvattn_workspace_free(gpu_ctx, &big);
  kvattn_attention_destroy(a);
  simple_free(&S);
}

/* Batch invariance (RELIABILITY.md tests 9, the optional mode): with desc.fixed_split_size a request's
 * KV is cut in the same pieces whatever the batch, so its output and LSE must be the same bits alone,
 * among a few requests and among many (at another position, with other page ids around it), on both
 * paths. Run the batch `lens` (request `at` is the target: its page ids are `xids`, its q `xq`) and
 * return the target's output row and LSE. */
static int invariance_run(kvattn_attention *a, kvattn_workspace *ws, CUdptr dk, CUdptr dv, int64_t num_pages,
                          int P, int kvh, int group, int hd, const int64_t *lens, int B, int at, const int32_t *xids,
                          const uint16_t *xq, uint16_t *out_row, float *lse_row) {
  const DLDataType bf = {kDLBfloat, 16, 1}, i32 = {kDLInt, 32, 1}, f32 = {kDLFloat, 32, 1};
  const int qh = kvh * group;
  int32_t *indptr = malloc((B + 1) * sizeof *indptr), *last = malloc(B * sizeof *last);
  int64_t total = 0;
  for (int i = 0; i < B; i++) total += (lens[i] + P - 1) / P;
  int32_t *ids = malloc((total > 0 ? total : 1) * sizeof *ids);
  uint16_t *q = malloc((size_t)B * qh * hd * 2), *o = malloc((size_t)B * qh * hd * 2);
  float *l = malloc((size_t)B * qh * 4);
  indptr[0] = 0;
  for (int i = 0; i < B; i++) {
    const int64_t pages = (lens[i] + P - 1) / P;
    for (int64_t e = 0; e < pages; e++) ids[indptr[i] + e] = i == at ? xids[e] : (int32_t)rnd_range(0, num_pages - 1);
    indptr[i + 1] = (int32_t)(indptr[i] + pages);
    last[i] = pages ? (int32_t)(lens[i] - (pages - 1) * P) : 1;
    for (int e = 0; e < qh * hd; e++) q[(size_t)i * qh * hd + e] = i == at ? xq[e] : float_to_bf16(2 * rnd_sym());
  }
  CUdptr dq = dalloc((size_t)B * qh * hd * 2), dout = dalloc((size_t)B * qh * hd * 2), dl = dalloc((size_t)B * qh * 4);
  CUdptr dix = dalloc((total > 0 ? total : 1) * 4);
  upload(dq, q, (size_t)B * qh * hd * 2);
  upload(dix, ids, (size_t)(total > 0 ? total : 1) * 4);
  cu.cuMemsetD8(dout, 0xFF, (size_t)B * qh * hd * 2);
  cu.cuMemsetD8(dl, 0xFF, (size_t)B * qh * 4);
  int ok = cu.cuCtxSynchronize() == 0;
  kvattn_batch batch = KVATTN_BATCH_INIT;
  batch.batch_size = B;
  batch.kv_indptr = indptr;
  batch.kv_last_page_len = last;
  batch.page_size = P;
  batch.num_pages = num_pages;
  int64_t q_shape[3] = {B, qh, hd}, kv_shape[4] = {num_pages, P, kvh, hd}, ix_shape[1] = {total}, l_shape[2] = {B, qh};
  DLTensor tq = make_tensor((void *)(uintptr_t)dq, 1, 3, q_shape, NULL, bf);
  DLTensor tk = make_tensor((void *)(uintptr_t)dk, 1, 4, kv_shape, NULL, bf);
  DLTensor tv = make_tensor((void *)(uintptr_t)dv, 1, 4, kv_shape, NULL, bf);
  DLTensor tix = make_tensor((void *)(uintptr_t)dix, 1, 1, ix_shape, NULL, i32);
  DLTensor to = make_tensor((void *)(uintptr_t)dout, 1, 3, q_shape, NULL, bf);
  DLTensor tl = make_tensor((void *)(uintptr_t)dl, 1, 2, l_shape, NULL, f32);
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.k = &tk;
  kv.v = &tv;
  kv.indices = &tix;
  poison_shared_memory(gpu_ctx, SHARED_NAN, NULL);
  ok = ok && kvattn_plan(a, &batch, ws, NULL) == KVATTN_SUCCESS;
  ok = ok && kvattn_run(a, &tq, &kv, NULL, &to, &tl, NULL) == KVATTN_SUCCESS && cu.cuCtxSynchronize() == 0;
  if (ok) {
    download(o, dout, (size_t)B * qh * hd * 2);
    download(l, dl, (size_t)B * qh * 4);
    memcpy(out_row, o + (size_t)at * qh * hd, (size_t)qh * hd * 2);
    memcpy(lse_row, l + (size_t)at * qh, (size_t)qh * 4);
  }
  cu.cuMemFree(dq), cu.cuMemFree(dout), cu.cuMemFree(dl), cu.cuMemFree(dix);
  free(indptr), free(last), free(ids), free(q), free(o), free(l);
  return ok;
}

TEST(fixed_split_size_gives_a_request_the_same_bits_in_any_batch) {
  NEED_GPU();
  const int kvh = 2, group = 4, hd = 128, P = 16, qh = kvh * group;
  const int64_t num_pages = 4096, xlen = 3001;
  const int64_t cache_elems = num_pages * P * kvh * hd;
  uint16_t *kh = malloc(cache_elems * 2), *vh = malloc(cache_elems * 2);
  for (int64_t i = 0; i < cache_elems; i++) {
    kh[i] = float_to_bf16(rnd_sym());
    vh[i] = float_to_bf16(rnd_sym());
  }
  CUdptr dk = dalloc(cache_elems * 2), dv = dalloc(cache_elems * 2);
  upload(dk, kh, cache_elems * 2);
  upload(dv, vh, cache_elems * 2);
  int32_t xids[(3001 + 15) / 16];
  for (int e = 0; e < (int)((xlen + P - 1) / P); e++) xids[e] = (int32_t)rnd_range(0, num_pages - 1);
  uint16_t xq[8 * 128];
  for (int e = 0; e < qh * hd; e++) xq[e] = float_to_bf16(2 * rnd_sym());
  /* the target alone; first among 3 short ones; in the middle of 40 of mixed lengths; last of 200 */
  enum { NB = 4 };
  int64_t l1[1] = {xlen}, l4[4] = {xlen, 17, 0, 900}, l40[40], l200[200];
  for (int i = 0; i < 40; i++) l40[i] = i == 21 ? xlen : rnd_range(0, 6000);
  for (int i = 0; i < 200; i++) l200[i] = i == 199 ? xlen : rnd_range(1, 300);
  const int64_t *lens[NB] = {l1, l4, l40, l200};
  const int sizes[NB] = {1, 4, 40, 200}, ats[NB] = {0, 0, 21, 199};
  const int kernels[2] = {KVATTN_KERNEL_TENSOR_CORE, KVATTN_KERNEL_CUDA_CORE};
  uint16_t out[NB][8 * 128];
  float lse[NB][8];
  for (int kk = 0; kk < 2; kk++) {
    kvattn_attention_desc desc = KVATTN_ATTENTION_DESC_INIT;
    desc.num_qo_heads = qh;
    desc.num_kv_heads = kvh;
    desc.head_dim = hd;
    desc.q_dtype = (DLDataType){kDLBfloat, 16, 1};
    desc.kernel = kernels[kk];
    desc.fixed_split_size = 8; /* 128 tokens: the target is 24 pieces */
    kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
    bounds.max_batch = 200;
    bounds.max_qo_tokens = 200;
    bounds.max_kv_entries = 40 * 6000 / P + 40;
    kvattn_attention *a = NULL;
    kvattn_workspace ws = {0};
    size_t db, hb;
    CHECK_OK(kvattn_attention_create(gpu_ctx, &desc, &bounds, &a));
    CHECK_OK(kvattn_workspace_size(gpu_ctx, &desc, &bounds, &db, &hb));
    CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws));
    for (int b = 0; b < NB; b++)
      CHECK(invariance_run(a, &ws, dk, dv, num_pages, P, kvh, group, hd, lens[b], sizes[b], ats[b], xids, xq, out[b],
                           lse[b]));
    int finite = 1;
    for (int e = 0; e < qh * hd; e++) finite &= isfinite(bf16_to_float(out[0][e]));
    CHECK_MSG(finite, "%s path: the target's output alone is not finite", kk ? "CUDA-core" : "tensor-core");
    for (int b = 1; b < NB; b++) {
      int nd = 0;
      for (int e = 0; e < qh * hd; e++) nd += out[b][e] != out[0][e];
      CHECK_MSG(nd == 0 && memcmp(lse[b], lse[0], sizeof lse[0]) == 0,
                "%s path: the target in a batch of %d differs from it alone (%d of %d outputs, LSE %s)",
                kk ? "CUDA-core" : "tensor-core", sizes[b], nd, qh * hd,
                memcmp(lse[b], lse[0], sizeof lse[0]) ? "differs" : "equal");
    }
    kvattn_workspace_free(gpu_ctx, &ws);
    kvattn_attention_destroy(a);
  }
  fprintf(stderr, "  a 3001-token request alone and in batches of 4, 40 and 200, pieces of 128 tokens: the same bits "
                  "on both paths\n");
  cu.cuMemFree(dk), cu.cuMemFree(dv);
  free(kh), free(vh);
}

/* KVATTN_DECODE_TRACE (a diagnostic build of the kernel, read by bench/decode_trace.py): an attention
 * created with it writes, when destroyed, one line per CTA of its latest launch; every CTA with work
 * passed its marks in order (entry <= wait <= first tile <= last item's end <= exit, a published piece
 * after its item's end), its SM id is one of the device's, and its outputs are the same bits as the
 * plain kernel's. */
TEST(the_decode_trace_records_each_ctas_phases_in_order) {
  NEED_GPU();
  simple S;
  simple_make(&S, 3, 2500, 3 * 157 + 1, 1);
  char path[] = "/tmp/kvattn-trace-XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  close(fd);
  const size_t on = (size_t)S.B * S.kvh * S.group * S.hd * 2;
  uint8_t *plain = malloc(on), *traced = malloc(on);
  for (int t = 0; t < 2; t++) {
    if (t) setenv("KVATTN_DECODE_TRACE", path, 1);
    kvattn_attention *a;
    kvattn_workspace ws;
    size_t db, hb;
    CHECK_OK(kvattn_attention_create(gpu_ctx, &S.desc, &S.bounds, &a));
    unsetenv("KVATTN_DECODE_TRACE"); /* read at create */
    CHECK_OK(kvattn_workspace_size(gpu_ctx, &S.desc, &S.bounds, &db, &hb));
    CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws));
    cu.cuMemsetD8(S.dout, 0xFF, on);
    CHECK_OK(simple_run(&S, a, &ws));
    CHECK(cu.cuCtxSynchronize() == 0);
    download(t ? traced : plain, S.dout, on);
    kvattn_workspace_free(gpu_ctx, &ws);
    kvattn_attention_destroy(a); /* writes the trace */
  }
  CHECK_MSG(memcmp(plain, traced, on) == 0, "the traced kernel's outputs differ from the plain kernel's");
  FILE *f = fopen(path, "r");
  CHECK(f != NULL);
  char line[1024];
  int ctas = 0, working = 0, bad = 0, header = 0;
  unsigned long long w[12];
  while (fgets(line, sizeof line, f)) {
    if (line[0] == '#') {
      header++;
      continue;
    }
    int n = sscanf(line, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &w[0], &w[1], &w[2], &w[3],
                   &w[4], &w[5], &w[6], &w[7], &w[8], &w[9], &w[10], &w[11]);
    CHECK_MSG(n == 12, "trace line %d has %d words", ctas, n);
    ctas++;
    if (w[1] < w[0]) bad++; /* globaltimer: exit before entry */
    if (!w[3]) continue;    /* no work: it left before the wait */
    working++;
    int ok = w[2] <= w[3] && w[3] <= w[4] && w[4] <= w[5] && w[5] <= w[8] && (!w[6] || w[6] >= w[5]) &&
             (!w[7] || w[7] >= w[6]) && w[9] < 1024 && w[10] >= 1 && w[11] >= 1;
    if (!ok && bad++ < 3) fprintf(stderr, "  CTA %d: marks out of order: %s", ctas - 1, line);
  }
  fclose(f);
  remove(path);
  fprintf(stderr, "  trace: %d CTAs, %d with work, %d out of order\n", ctas, working, bad);
  CHECK(header == 1 && ctas > 0 && working > 0 && bad == 0);
  free(plain), free(traced);
  simple_free(&S);
}

/* Run S's plan on `stream` with q read from `q` and the output written to `out` (device buffers of
 * S's q shape). */
static kvattn_status simple_run_on(simple *S, kvattn_attention *a, CUdptr q_buf, CUdptr out_buf, void *stream) {
  const DLDataType bf = {kDLBfloat, 16, 1}, i32 = {kDLInt, 32, 1};
  int64_t q_shape[3] = {S->B, S->kvh * S->group, S->hd}, kv_shape[4] = {S->pages, S->P, S->kvh, S->hd};
  int64_t ix_shape[1] = {S->kv_indptr[S->B]};
  DLTensor q = make_tensor((void *)(uintptr_t)q_buf, 1, 3, q_shape, NULL, bf);
  DLTensor k = make_tensor((void *)(uintptr_t)S->dk, 1, 4, kv_shape, NULL, bf);
  DLTensor v = make_tensor((void *)(uintptr_t)S->dv, 1, 4, kv_shape, NULL, bf);
  DLTensor ix = make_tensor((void *)(uintptr_t)S->dix, 1, 1, ix_shape, NULL, i32);
  DLTensor o = make_tensor((void *)(uintptr_t)out_buf, 1, 3, q_shape, NULL, bf);
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.k = &k;
  kv.v = &v;
  kv.indices = &ix;
  return kvattn_run(a, &q, &kv, NULL, &o, NULL, stream);
}

/* kvattn_workspace_alloc zeroes the device part; the zeros must land before anything a caller then
 * queues on its own stream. With the legacy stream busy (a 200 ms kernel queued first, so the zero
 * fill waits behind it), a workspace allocated, planned and run on a non-blocking stream must run
 * again, after the device went idle, with the same bits: a fill that landed after the plan's copy
 * would have erased the work lists, and the second run would leave its output unwritten. */
TEST(a_fresh_workspace_is_zero_before_a_plan_on_another_stream_writes_it) {
  NEED_GPU();
  simple S;
  simple_make(&S, 3, 3000, 3 * 188 + 2, 1);
  const size_t on = (size_t)S.B * S.kvh * S.group * S.hd * 2;
  kvattn_attention *a;
  CHECK_OK(kvattn_attention_create(gpu_ctx, &S.desc, &S.bounds, &a));
  size_t db, hb;
  CHECK_OK(kvattn_workspace_size(gpu_ctx, &S.desc, &S.bounds, &db, &hb));
  void *stream = NULL;
  CHECK(cu.cuStreamCreate(&stream, 1 /* non-blocking */) == 0);
  struct gpu_context *g = gpu_ctx->gpu;
  CUfunction spin = NULL;
  CHECK_OK(gpu_get_kernel(g, "jit_selftest.cu", "", "jit_spin", 0, &spin));
  unsigned long long ns = 200000000ull;
  void *args[] = {&ns};
  CHECK(cu.cuCtxSynchronize() == 0);
  CHECK_OK(gpu_launch(g, spin, 1, 32, 0, NULL, args, 0)); /* the legacy stream: busy for 200 ms */
  kvattn_workspace ws;
  CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws));
  CHECK_OK(kvattn_plan(a, &S.batch, &ws, stream));
  cu.cuMemsetD8(S.dout, 0xFF, on);
  CHECK(cu.cuCtxSynchronize() == 0);
  uint8_t *first = malloc(on), *again = malloc(on);
  CHECK_OK(simple_run_on(&S, a, S.dq, S.dout, stream));
  CHECK(cu.cuStreamSynchronize(stream) == 0);
  download(first, S.dout, on);
  CHECK(cu.cuCtxSynchronize() == 0);
  cu.cuMemsetD8(S.dout, 0xFF, on);
  CHECK(cu.cuCtxSynchronize() == 0);
  CHECK_OK(simple_run_on(&S, a, S.dq, S.dout, stream));
  CHECK(cu.cuStreamSynchronize(stream) == 0);
  download(again, S.dout, on);
  size_t nan_first = 0, nan_again = 0;
  for (size_t e = 0; e < on / 2; e++) {
    nan_first += !isfinite(bf16_to_float(((const uint16_t *)first)[e]));
    nan_again += !isfinite(bf16_to_float(((const uint16_t *)again)[e]));
  }
  CHECK_MSG(nan_first == 0 && nan_again == 0 && memcmp(first, again, on) == 0,
            "non-finite outputs: %zu in the first run, %zu in the second", nan_first, nan_again);
  free(first);
  free(again);
  cu.cuStreamDestroy(stream);
  kvattn_workspace_free(gpu_ctx, &ws);
  kvattn_attention_destroy(a);
  simple_free(&S);
}

/* Programmatic dependent launch (KVATTN_DECODE_PDL, default on sm_90+) lets a decode start while the
 * kernel before it finishes; it must still see everything that kernel wrote. A chain of decodes in
 * which each one's query is the previous one's output (and whose split pieces reuse the workspace's
 * partial states and counters launch after launch), launched back to back on one stream with no
 * synchronization, eagerly and as one captured graph, must give the bits of the same chain run one
 * launch at a time with the device idle in between; so must the plain launch (PDL off) and the 64-bit
 * loader (KVATTN_DECODE_NARROW=0). Every step is checked against the float64 reference too. */
TEST(chained_decodes_launched_back_to_back_see_the_previous_decodes_output) {
  NEED_GPU();
  enum { STEPS = 8 };
  simple S;
  simple_make(&S, 3, 3000, 3 * 188 + 2, 1); /* 3 long requests: split pieces on every launch */
  const size_t on = (size_t)S.B * S.kvh * S.group * S.hd * 2;
  CUdptr buf[STEPS];
  for (int i = 0; i < STEPS; i++) buf[i] = dalloc(on);
  uint8_t *want = malloc(on * STEPS), *got = malloc(on * STEPS);
  void *stream = NULL;
  CHECK(cu.cuStreamCreate(&stream, 1 /* non-blocking */) == 0);
  /* attentions: [0] the defaults (PDL where the device has it, the narrow loader), [1] PDL off,
   * [2] the 64-bit loader */
  enum { NATT = 3 };
  const char *envs[NATT][2] = {{NULL, NULL}, {"KVATTN_DECODE_PDL", "0"}, {"KVATTN_DECODE_NARROW", "0"}};
  kvattn_attention *a[NATT];
  kvattn_workspace ws[NATT];
  for (int i = 0; i < NATT; i++) {
    if (envs[i][0]) setenv(envs[i][0], envs[i][1], 1);
    CHECK_OK(kvattn_attention_create(gpu_ctx, &S.desc, &S.bounds, &a[i]));
    if (envs[i][0]) unsetenv(envs[i][0]);
    size_t db, hb;
    CHECK_OK(kvattn_workspace_size(gpu_ctx, &S.desc, &S.bounds, &db, &hb));
    CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws[i]));
    CHECK_OK(kvattn_plan(a[i], &S.batch, &ws[i], stream));
  }
  CHECK(cu.cuStreamSynchronize(stream) == 0);
#define POISON()                                                                  \
  do {                                                                            \
    for (int i_ = 0; i_ < STEPS; i_++) cu.cuMemsetD8(buf[i_], 0xFF, on); /* NaN */ \
    poison_shared_memory(gpu_ctx, SHARED_NAN, NULL);                              \
    CHECK(cu.cuCtxSynchronize() == 0);                                            \
  } while (0)
#define CHAIN(att, sync_each)                                                             \
  for (int i_ = 0; i_ < STEPS; i_++) {                                                    \
    CHECK_OK(simple_run_on(&S, att, i_ ? buf[i_ - 1] : S.dq, buf[i_], stream));           \
    if (sync_each) CHECK(cu.cuStreamSynchronize(stream) == 0);                            \
  }
#define COLLECT(dst)                                                     \
  do {                                                                   \
    CHECK(cu.cuStreamSynchronize(stream) == 0);                          \
    for (int i_ = 0; i_ < STEPS; i_++) download((dst) + on * i_, buf[i_], on); \
  } while (0)
  /* the reference chain: one launch at a time */
  POISON();
  CHAIN(a[0], 1);
  COLLECT(want);
  /* every step against the float64 reference, with the query the step before produced (each step's
   * non-finite outputs counted, and the first located: a NaN was seen once in the last step) */
  {
    const size_t page_elems = (size_t)S.P * S.kvh * S.hd, cache_elems = (size_t)S.pages * page_elems;
    uint16_t *kh = malloc(cache_elems * 2), *vh = malloc(cache_elems * 2), *q0 = malloc(on);
    download(kh, S.dk, cache_elems * 2);
    download(vh, S.dv, cache_elems * 2);
    download(q0, S.dq, on);
    const size_t n = on / 2;
    float *ref = malloc(n * 4);
    kvattn_attention_desc rd = S.desc;
    rd.o_dtype = (DLDataType){kDLFloat, 32, 1};
    kvattn_attention *ra;
    kvattn_workspace rws;
    size_t db, hb;
    CHECK_OK(kvattn_attention_create(ref_ctx, &rd, &S.bounds, &ra));
    CHECK_OK(kvattn_workspace_size(ref_ctx, &rd, &S.bounds, &db, &hb));
    CHECK_OK(kvattn_workspace_alloc(ref_ctx, db, hb, &rws));
    CHECK_OK(kvattn_plan(ra, &S.batch, &rws, NULL));
    const DLDataType bf = {kDLBfloat, 16, 1}, i32 = {kDLInt, 32, 1};
    int64_t q_shape[3] = {S.B, S.kvh * S.group, S.hd}, kv_shape[4] = {S.pages, S.P, S.kvh, S.hd};
    int64_t ix_shape[1] = {S.kv_indptr[S.B]};
    DLTensor rk = make_tensor(kh, 0, 4, kv_shape, NULL, bf);
    DLTensor rv = make_tensor(vh, 0, 4, kv_shape, NULL, bf);
    DLTensor rix = make_tensor(S.indices, 0, 1, ix_shape, NULL, i32);
    DLTensor ro = make_tensor(ref, 0, 3, q_shape, NULL, rd.o_dtype);
    kvattn_kv rkv = KVATTN_KV_INIT;
    rkv.k = &rk;
    rkv.v = &rv;
    rkv.indices = &rix;
    double worst = 0;
    for (int st = 0; st < STEPS; st++) {
      DLTensor rq = make_tensor(st ? (void *)(want + on * (st - 1)) : (void *)q0, 0, 3, q_shape, NULL, bf);
      CHECK_OK(kvattn_run(ra, &rq, &rkv, NULL, &ro, NULL, NULL));
      const uint16_t *got_st = (const uint16_t *)(want + on * st);
      double num = 0, den = 0;
      size_t bad = 0, first_bad = 0, bad_ref = 0;
      for (size_t i = 0; i < n; i++) {
        const float g = bf16_to_float(got_st[i]);
        if (!isfinite(ref[i])) {
          bad_ref++;
          continue;
        }
        if (!isfinite(g)) {
          if (bad++ == 0) first_bad = i;
          continue;
        }
        num += (double)(g - ref[i]) * (g - ref[i]);
        den += (double)ref[i] * ref[i];
      }
      const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
      if (bad || bad_ref || !(rel < 1e-2))
        printf("  step %d: rel %.2e, %zu non-finite outputs (first: element %zu = row %zu, head %zu, dim %zu), "
               "%zu non-finite in the reference\n", st, rel, bad, first_bad, first_bad / (n / S.B),
               first_bad % (n / S.B) / S.hd, first_bad % S.hd, bad_ref);
      if (bad && st == 0) {
        /* where the NaN came from: the inputs as the device holds them now, and one more launch after
         * a fresh plan (a fresh plan mending it pointed at the workspace race fixed on 2026-12-03) */
        int32_t *ix = malloc(sizeof(int32_t) * S.kv_indptr[S.B]);
        download(ix, S.dix, sizeof(int32_t) * S.kv_indptr[S.B]);
        size_t ix_bad = 0, kv_nan = 0, q_nan = 0;
        for (int32_t e = 0; e < S.kv_indptr[S.B]; e++) ix_bad += ix[e] != S.indices[e];
        for (size_t e = page_elems; e < (size_t)(S.kv_indptr[S.B] + 1) * page_elems; e++)
          kv_nan += !isfinite(bf16_to_float(kh[e])) + !isfinite(bf16_to_float(vh[e]));
        for (size_t e = 0; e < n; e++) q_nan += !isfinite(bf16_to_float(q0[e]));
        POISON();
        CHECK_OK(kvattn_plan(a[0], &S.batch, &ws[0], stream));
        CHECK_OK(simple_run_on(&S, a[0], S.dq, buf[0], stream));
        CHECK(cu.cuStreamSynchronize(stream) == 0);
        download(got, buf[0], on);
        size_t again = 0;
        for (size_t e = 0; e < n; e++) again += !isfinite(bf16_to_float(((const uint16_t *)got)[e]));
        printf("  step 0 diagnosis: %zu page ids differ on the device, %zu non-finite K/V values in the pages "
               "used, %zu in q; after a fresh plan one launch gives %zu non-finite outputs\n", ix_bad, kv_nan, q_nan,
               again);
        free(ix);
      }
      CHECK_MSG(bad == 0 && bad_ref == 0 && rel < 1e-2, "step %d against the reference", st);
      if (rel > worst) worst = rel;
    }
    printf("chained decodes: %d steps one at a time, worst step vs reference %.2e\n", STEPS, worst);
    kvattn_attention_destroy(ra);
    kvattn_workspace_free(ref_ctx, &rws);
    free(kh);
    free(vh);
    free(q0);
    free(ref);
  }
  /* back to back, each attention */
  for (int i = 0; i < NATT; i++) {
    POISON();
    CHAIN(a[i], 0);
    COLLECT(got);
    for (int st = 0; st < STEPS; st++) {
      /* on a mismatch, say how many 2-byte elements differ, where the first is, and how many are not
       * finite on each side (a flake was seen beside the sanitizers: step 0 everywhere) */
      const uint16_t *w16 = (const uint16_t *)(want + on * st), *g16 = (const uint16_t *)(got + on * st);
      size_t nd = 0, first = 0, w_nan = 0, g_nan = 0;
      for (size_t e = 0; e < on / 2; e++) {
        if (w16[e] != g16[e] && nd++ == 0) first = e;
        w_nan += !isfinite(bf16_to_float(w16[e]));
        g_nan += !isfinite(bf16_to_float(g16[e]));
      }
      CHECK_MSG(nd == 0,
                "attention %d, step %d: back to back differs in %zu of %zu elements, first at %zu (0x%04x, one at a "
                "time 0x%04x); non-finite: %zu back to back, %zu one at a time",
                i, st, nd, on / 2, first, g16[first], w16[first], g_nan, w_nan);
    }
  }
  /* one captured graph of the whole chain, replayed twice */
  {
    void *graph = NULL, *exec = NULL;
    CHECK(cu.cuStreamBeginCapture(stream, 2 /* relaxed */) == 0);
    kvattn_status s = KVATTN_SUCCESS;
    for (int i = 0; i < STEPS && s == KVATTN_SUCCESS; i++) s = simple_run_on(&S, a[0], i ? buf[i - 1] : S.dq, buf[i], stream);
    CHECK(cu.cuStreamEndCapture(stream, &graph) == 0);
    CHECK_OK(s);
    CHECK(cu.cuGraphInstantiateWithFlags(&exec, graph, 0) == 0);
    for (int r = 0; r < 2; r++) {
      POISON();
      CHECK(cu.cuGraphLaunch(exec, stream) == 0);
      COLLECT(got);
      for (int st = 0; st < STEPS; st++)
        CHECK_MSG(memcmp(want + on * st, got + on * st, on) == 0, "graph replay %d, step %d differs", r, st);
    }
    cu.cuGraphExecDestroy(exec);
    cu.cuGraphDestroy(graph);
  }
  printf("chained decodes: back to back (PDL, no PDL, 64-bit loader) and as a graph, bitwise equal to one at a time\n");
#undef POISON
#undef CHAIN
#undef COLLECT
  for (int i = 0; i < NATT; i++) {
    kvattn_attention_destroy(a[i]);
    kvattn_workspace_free(gpu_ctx, &ws[i]);
  }
  cu.cuStreamDestroy(stream);
  for (int i = 0; i < STEPS; i++) cu.cuMemFree(buf[i]);
  free(want);
  free(got);
  simple_free(&S);
}

/* The early prefetch (kernels/decode_paged.cu prefetch_early) asks L2 for K/V rows before the kernel before it
 * has finished, which may be writing them. Each step appends a token to every request with
 * kvattn_append_paged_kv over a NaN-poisoned slot and launches the decode right behind it on the same stream
 * (with PDL, it may start while the append runs): the decode must see the appended values (no NaN), and give the
 * same bits as a second run of its plan after a synchronization. */
TEST(a_decode_launched_right_behind_an_append_reads_the_appended_tokens) {
  NEED_GPU();
  enum { STEPS = 16, B = 4 };
  simple S;
  simple_make(&S, B, 1008, B * 63 + 3, 2); /* 63 pages a request; lengths 993..1008 keep them */
  const size_t on = (size_t)S.B * S.kvh * S.group * S.hd * 2, row = (size_t)S.kvh * S.hd;
  void *stream = NULL;
  CHECK(cu.cuStreamCreate(&stream, 1 /* non-blocking */) == 0);
  kvattn_attention *a;
  kvattn_workspace ws;
  size_t db, hb;
  CHECK_OK(kvattn_attention_create(gpu_ctx, &S.desc, &S.bounds, &a));
  CHECK_OK(kvattn_workspace_size(gpu_ctx, &S.desc, &S.bounds, &db, &hb));
  CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws));
  CUdptr dkn = dalloc(B * row * 2), dvn = dalloc(B * row * 2), dbi = dalloc(B * 4), dpos = dalloc(B * 4),
         dip = dalloc((B + 1) * 4), out2 = dalloc(on);
  upload(dip, S.kv_indptr, (B + 1) * 4);
  int32_t bidx[B], pos[B];
  for (int i = 0; i < B; i++) bidx[i] = i;
  upload(dbi, bidx, sizeof bidx);
  uint16_t *kn = malloc(B * row * 2), *vn = malloc(B * row * 2), *o1 = malloc(on), *o2 = malloc(on);
  const DLDataType bf = {kDLBfloat, 16, 1}, i32 = {kDLInt, 32, 1};
  int64_t new_shape[3] = {B, S.kvh, S.hd}, kv_shape[4] = {S.pages, S.P, S.kvh, S.hd}, ix_shape[1] = {S.kv_indptr[B]},
          ip_shape[1] = {B + 1}, t_shape[1] = {B};
  DLTensor g_kn = make_tensor((void *)(uintptr_t)dkn, 1, 3, new_shape, NULL, bf);
  DLTensor g_vn = make_tensor((void *)(uintptr_t)dvn, 1, 3, new_shape, NULL, bf);
  DLTensor g_k = make_tensor((void *)(uintptr_t)S.dk, 1, 4, kv_shape, NULL, bf);
  DLTensor g_v = make_tensor((void *)(uintptr_t)S.dv, 1, 4, kv_shape, NULL, bf);
  DLTensor g_ix = make_tensor((void *)(uintptr_t)S.dix, 1, 1, ix_shape, NULL, i32);
  DLTensor g_ip = make_tensor((void *)(uintptr_t)dip, 1, 1, ip_shape, NULL, i32);
  DLTensor g_b = make_tensor((void *)(uintptr_t)dbi, 1, 1, t_shape, NULL, i32);
  DLTensor g_p = make_tensor((void *)(uintptr_t)dpos, 1, 1, t_shape, NULL, i32);
  kvattn_kv gkv = KVATTN_KV_INIT;
  gkv.k = &g_k;
  gkv.v = &g_v;
  gkv.indices = &g_ix;
  int bad_steps = 0;
  for (int step = 0; step < STEPS; step++) {
    const int p_new = 992 + step; /* the appended token's position: lengths 993 + step */
    for (int i = 0; i < B; i++) {
      pos[i] = p_new;
      S.last[i] = p_new % S.P + 1;
      /* the slot the append will write holds NaN until then */
      const int64_t page = S.indices[S.kv_indptr[i] + p_new / S.P];
      const size_t at = ((size_t)page * S.P + (size_t)(p_new % S.P)) * row * 2;
      cu.cuMemsetD8(S.dk + at, 0xFF, row * 2);
      cu.cuMemsetD8(S.dv + at, 0xFF, row * 2);
    }
    for (size_t e = 0; e < B * row; e++) {
      kn[e] = float_to_bf16(rnd_sym());
      vn[e] = float_to_bf16(4 * rnd_sym());
    }
    upload(dkn, kn, B * row * 2);
    upload(dvn, vn, B * row * 2);
    upload(dpos, pos, sizeof pos);
    cu.cuMemsetD8(S.dout, 0xFF, on);
    CHECK(cu.cuCtxSynchronize() == 0);
    CHECK_OK(kvattn_plan(a, &S.batch, &ws, stream));
    CHECK_OK(kvattn_append_paged_kv(gpu_ctx, &g_kn, &g_vn, &g_b, &g_p, &gkv, &g_ip, stream));
    CHECK_OK(simple_run_on(&S, a, S.dq, S.dout, stream)); /* right behind the append */
    CHECK(cu.cuStreamSynchronize(stream) == 0);
    CHECK_OK(simple_run_on(&S, a, S.dq, out2, stream)); /* the same plan, everything written */
    CHECK(cu.cuStreamSynchronize(stream) == 0);
    download(o1, S.dout, on);
    download(o2, out2, on);
    int nan = 0;
    for (size_t e = 0; e < on / 2; e++) nan += bf16_to_float(o1[e]) != bf16_to_float(o1[e]);
    const int same = memcmp(o1, o2, on) == 0;
    if (nan || !same) {
      if (bad_steps++ < 3) fprintf(stderr, "  step %d: %d NaN outputs, %s the rerun\n", step, nan, same ? "equal to" : "unlike");
    }
  }
  fprintf(stderr, "  %d appends each followed at once by a decode: %d steps wrong\n", STEPS, bad_steps);
  CHECK(bad_steps == 0);
  cu.cuMemFree(dkn), cu.cuMemFree(dvn), cu.cuMemFree(dbi), cu.cuMemFree(dpos), cu.cuMemFree(dip), cu.cuMemFree(out2);
  free(kn), free(vn), free(o1), free(o2);
  kvattn_workspace_free(gpu_ctx, &ws);
  kvattn_attention_destroy(a);
  cu.cuStreamDestroy(stream);
  simple_free(&S);
}

TEST(a_cache_over_4_gib_with_page_ids_near_the_top_reads_the_right_pages) {
  NEED_GPU();
  /* 2 x 4.9 GB: element offsets of the used pages pass 2^31 (and their byte offsets 2^32) */
  const int64_t page_elems = 16 * 2 * 128, pages = (int64_t)600000;
  const int64_t first = pages - 4 * 63 - 1;
  CHECK(first * page_elems > ((int64_t)1 << 31));
  simple S;
  simple_make(&S, 4, 1000, pages, first);
  kvattn_attention *a, *ra;
  kvattn_workspace ws, rws;
  size_t db, hb;
  CHECK_OK(kvattn_attention_create(gpu_ctx, &S.desc, &S.bounds, &a));
  CHECK_OK(kvattn_workspace_size(gpu_ctx, &S.desc, &S.bounds, &db, &hb));
  CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws));
  cu.cuMemsetD8(S.dout, 0xFF, (size_t)S.B * 8 * 128 * 2);
  CHECK_OK(simple_run(&S, a, &ws));
  CHECK(cu.cuCtxSynchronize() == 0);
  /* the reference on a compact host copy of the used pages (ids renumbered from 0) */
  const int64_t used = S.kv_indptr[S.B];
  uint16_t *k = malloc(used * page_elems * 2), *v = malloc(used * page_elems * 2), *q = malloc((size_t)S.B * 8 * 128 * 2);
  uint16_t *got = malloc((size_t)S.B * 8 * 128 * 2);
  download(k, S.dk + (CUdptr)first * page_elems * 2, used * page_elems * 2);
  download(v, S.dv + (CUdptr)first * page_elems * 2, used * page_elems * 2);
  download(q, S.dq, (size_t)S.B * 8 * 128 * 2);
  download(got, S.dout, (size_t)S.B * 8 * 128 * 2);
  int32_t *ids = malloc(used * 4);
  for (int64_t e = 0; e < used; e++) ids[e] = (int32_t)e;
  kvattn_attention_desc rd = S.desc;
  rd.o_dtype = (DLDataType){kDLFloat, 32, 1};
  CHECK_OK(kvattn_attention_create(ref_ctx, &rd, &S.bounds, &ra));
  CHECK_OK(kvattn_workspace_size(ref_ctx, &rd, &S.bounds, &db, &hb));
  CHECK_OK(kvattn_workspace_alloc(ref_ctx, db, hb, &rws));
  CHECK_OK(kvattn_plan(ra, &S.batch, &rws, NULL));
  const DLDataType bf = {kDLBfloat, 16, 1}, f32 = {kDLFloat, 32, 1}, i32 = {kDLInt, 32, 1};
  int64_t q_shape[3] = {S.B, 8, 128}, kv_shape[4] = {used, 16, 2, 128}, ix_shape[1] = {used};
  float *ref = malloc((size_t)S.B * 8 * 128 * 4);
  DLTensor tq = make_tensor(q, 0, 3, q_shape, NULL, bf), tk = make_tensor(k, 0, 4, kv_shape, NULL, bf);
  DLTensor tv = make_tensor(v, 0, 4, kv_shape, NULL, bf), tix = make_tensor(ids, 0, 1, ix_shape, NULL, i32);
  DLTensor to = make_tensor(ref, 0, 3, q_shape, NULL, f32);
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.k = &tk;
  kv.v = &tv;
  kv.indices = &tix;
  CHECK_OK(kvattn_run(ra, &tq, &kv, NULL, &to, NULL, NULL));
  double num = 0, den = 0;
  for (size_t i = 0; i < (size_t)S.B * 8 * 128; i++) {
    float g = bf16_to_float(got[i]);
    CHECK_MSG(g == g, "out[%zu] is NaN (a wrong page was read)", i);
    num += (double)(g - ref[i]) * (g - ref[i]);
    den += (double)ref[i] * ref[i];
  }
  fprintf(stderr, "  > 4 GiB cache, pages %lld..%lld: relative error %.2e\n", (long long)first,
          (long long)(first + used - 1), sqrt(num / den));
  CHECK(sqrt(num / den) < 1e-2);
  kvattn_attention_destroy(a);
  kvattn_attention_destroy(ra);
  kvattn_workspace_free(gpu_ctx, &ws);
  kvattn_workspace_free(ref_ctx, &rws);
  free(k);
  free(v);
  free(q);
  free(got);
  free(ids);
  free(ref);
  simple_free(&S);
}

/* ---------------------------------------------------------------- plan time */

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

TEST(plan_for_batch_256_succeeds_and_prints_its_host_time) {
  NEED_GPU();
  const int B = 256, P = 16;
  kvattn_attention_desc desc = KVATTN_ATTENTION_DESC_INIT;
  desc.num_qo_heads = 32;
  desc.num_kv_heads = 8;
  desc.head_dim = 128;
  desc.q_dtype = (DLDataType){kDLBfloat, 16, 1};
  kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
  bounds.max_batch = B;
  bounds.max_qo_tokens = B;
  bounds.max_kv_entries = (int64_t)B * 2048 / P;
  kvattn_attention *a;
  kvattn_workspace ws;
  size_t db, hb;
  CHECK_OK(kvattn_attention_create(gpu_ctx, &desc, &bounds, &a));
  CHECK_OK(kvattn_workspace_size(gpu_ctx, &desc, &bounds, &db, &hb));
  CHECK_OK(kvattn_workspace_alloc(gpu_ctx, db, hb, &ws));
  int32_t kv_indptr[257], last[256];
  kv_indptr[0] = 0;
  for (int i = 0; i < B; i++) {
    kv_indptr[i + 1] = kv_indptr[i] + 2048 / P;
    last[i] = P;
  }
  kvattn_batch batch = KVATTN_BATCH_INIT;
  batch.batch_size = B;
  batch.kv_indptr = kv_indptr;
  batch.kv_last_page_len = last;
  batch.page_size = P;
  enum { REPS = 400 };
  double t[REPS];
  for (int r = 0; r < REPS; r++) {
    double t0 = now_us();
    kvattn_status s = kvattn_plan(a, &batch, &ws, NULL);
    t[r] = now_us() - t0;
    CHECK_OK(s);
    if (r % 50 == 49) cu.cuCtxSynchronize(); /* let the queued copies drain */
  }
  qsort(t, REPS, sizeof t[0], cmp_double);
  printf("kvattn_plan, decode batch 256 x 2048 tokens, 32/8 heads, page 16 (validation on, H2D enqueued): "
         "median %.2f us, p10 %.2f us, p90 %.2f us\n", t[REPS / 2], t[REPS / 10], t[REPS * 9 / 10]);
  /* where it goes (the planner alone, in the kernel's 64-token tiles, is test_plan_decode's print,
   * which scripts/gpu-final.sh runs on the same host): the batch's validation and
   * lowering, and the enqueue of one host-to-device copy of the work lists' size (898 items) */
  double tl[REPS], tc[REPS];
  int32_t scratch[257];
  for (int r = 0; r < REPS; r++) {
    batch_view bv;
    double t0 = now_us();
    kvattn_status s = batch_lower(&desc, &batch, 0, scratch, 257, &bv);
    tl[r] = now_us() - t0;
    CHECK_OK(s);
  }
  const size_t copy_bytes = 898 * 32 + 4096;
  for (int r = 0; r < REPS; r++) {
    double t0 = now_us();
    CHECK(gpu_ctx->gpu->api->cuMemcpyHtoDAsync((CUdeviceptr)(uintptr_t)ws.device, ws.host, copy_bytes, NULL) == 0);
    tc[r] = now_us() - t0;
    if (r % 50 == 49) cu.cuCtxSynchronize();
  }
  qsort(tl, REPS, sizeof tl[0], cmp_double);
  qsort(tc, REPS, sizeof tc[0], cmp_double);
  printf("  of which: batch validation and lowering median %.2f us; one %zu-byte cuMemcpyHtoDAsync enqueue median "
         "%.2f us\n", tl[REPS / 2], copy_bytes, tc[REPS / 2]);
  /* The 20 us bar is a benchmark's (`kvattn bench decode --batch 256 --kv-len 2048 --no-host-indices`,
   * run by scripts/gpu-final.sh), not this test's: a host-timed bound failed on a busy device host while
   * the same build timed 8-17 us elsewhere. The plans above were all checked to succeed. */
  cu.cuCtxSynchronize();
  kvattn_attention_destroy(a);
  kvattn_workspace_free(gpu_ctx, &ws);
}

/* ---------------------------------------------------------------- merge_states, append */

TEST(merge_states_matches_the_cpu) {
  NEED_GPU();
  const int T = 37, S = 5, H = 6, D = 128;
  const DLDataType bf = {kDLBfloat, 16, 1}, f32 = {kDLFloat, 32, 1};
  size_t nv = (size_t)T * S * H * D, ns = (size_t)T * S * H, no = (size_t)T * H * D, nso = (size_t)T * H;
  uint16_t *v = malloc(nv * 2), *go = malloc(no * 2);
  float *s = malloc(ns * 4), *ro = malloc(no * 4), *rs = malloc(nso * 4), *gs = malloc(nso * 4);
  for (size_t i = 0; i < nv; i++) v[i] = float_to_bf16(rnd_sym());
  for (size_t i = 0; i < ns; i++) s[i] = rnd() % 4 == 0 ? -INFINITY : (float)(10 * rnd_sym());
  /* one row all empty; an empty state's v full of NaN must not leak */
  for (int k = 0; k < S; k++) s[(size_t)3 * S * H + k * H + 2] = -INFINITY;
  for (int t = 0; t < T; t++)
    for (int k = 0; k < S; k++)
      for (int h = 0; h < H; h++)
        if (s[((size_t)t * S + k) * H + h] == -INFINITY)
          for (int d = 0; d < D; d++) v[(((size_t)t * S + k) * H + h) * D + d] = 0x7FC0;
  CUdptr dv = dalloc(nv * 2), ds = dalloc(ns * 4), dvo = dalloc(no * 2), dso = dalloc(nso * 4);
  upload(dv, v, nv * 2);
  upload(ds, s, ns * 4);
  cu.cuMemsetD8(dvo, 0xFF, no * 2);
  cu.cuMemsetD8(dso, 0xFF, nso * 4);
  int64_t v_shape[4] = {T, S, H, D}, s_shape[3] = {T, S, H}, o_shape[3] = {T, H, D}, so_shape[2] = {T, H};
  DLTensor gv = make_tensor((void *)(uintptr_t)dv, 1, 4, v_shape, NULL, bf);
  DLTensor gsd = make_tensor((void *)(uintptr_t)ds, 1, 3, s_shape, NULL, f32);
  DLTensor gvo = make_tensor((void *)(uintptr_t)dvo, 1, 3, o_shape, NULL, bf);
  DLTensor gso = make_tensor((void *)(uintptr_t)dso, 1, 2, so_shape, NULL, f32);
  CHECK_OK(kvattn_merge_states(gpu_ctx, &gv, &gsd, &gvo, &gso, NULL));
  CHECK(cu.cuCtxSynchronize() == 0);
  download(go, dvo, no * 2);
  download(gs, dso, nso * 4);
  DLTensor hv = make_tensor(v, 0, 4, v_shape, NULL, bf);
  DLTensor hs = make_tensor(s, 0, 3, s_shape, NULL, f32);
  DLTensor hvo = make_tensor(ro, 0, 3, o_shape, NULL, f32);
  DLTensor hso = make_tensor(rs, 0, 2, so_shape, NULL, f32);
  CHECK_OK(kvattn_merge_states(ref_ctx, &hv, &hs, &hvo, &hso, NULL));
  double num = 0, den = 0;
  for (size_t i = 0; i < no; i++) {
    float g = bf16_to_float(go[i]);
    CHECK_MSG(g == g, "merged v[%zu] is NaN", i);
    num += (double)(g - ro[i]) * (g - ro[i]);
    den += (double)ro[i] * ro[i];
  }
  for (size_t i = 0; i < nso; i++) {
    if (rs[i] == -INFINITY) CHECK(gs[i] == -INFINITY);
    else CHECK_MSG(fabsf(gs[i] - rs[i]) < 1e-4f * (1 + fabsf(rs[i])), "lse %zu: %g vs %g", i, gs[i], rs[i]);
  }
  for (int d = 0; d < D; d++) CHECK(bf16_to_float(go[((size_t)3 * H + 2) * D + d]) == 0.0f);
  CHECK_MSG(sqrt(num / den) < 1e-2, "merge relative error %.3e", sqrt(num / den));
  cu.cuMemFree(dv);
  cu.cuMemFree(ds);
  cu.cuMemFree(dvo);
  cu.cuMemFree(dso);
  free(v);
  free(go);
  free(s);
  free(ro);
  free(rs);
  free(gs);
}

TEST(append_paged_kv_matches_the_cpu) {
  NEED_GPU();
  const int B = 5, P = 16, KVH = 4, D = 128;
  const DLDataType f16 = {kDLFloat, 16, 1}, i32 = {kDLInt, 32, 1};
  int32_t kv_indptr[6] = {0, 3, 3, 7, 8, 12};
  const int64_t pages = 14, cache_elems = pages * P * KVH * D;
  int32_t indices[12];
  for (int i = 0; i < 12; i++) indices[i] = (i * 5 + 3) % 14;
  const int N = 40;
  int32_t bidx[40], pos[40];
  for (int t = 0; t < N; t++) {
    bidx[t] = (int32_t)rnd_range(0, B - 1);
    int np = kv_indptr[bidx[t] + 1] - kv_indptr[bidx[t]];
    pos[t] = np ? (int32_t)rnd_range(0, np * P - 1) : 0;
  }
  /* unique positions per request so the result does not depend on write order */
  for (int t = 0; t < N; t++)
    for (int u = 0; u < t; u++)
      if (bidx[u] == bidx[t] && pos[u] == pos[t]) bidx[t] = 1; /* request 1 has no pages: skipped */
  uint16_t *kn = malloc((size_t)N * KVH * D * 2), *vn = malloc((size_t)N * KVH * D * 2);
  uint16_t *kc = malloc(cache_elems * 2), *vc = malloc(cache_elems * 2), *gk = malloc(cache_elems * 2),
           *gv = malloc(cache_elems * 2);
  for (int64_t i = 0; i < (int64_t)N * KVH * D; i++) {
    kn[i] = float_to_half(rnd_sym());
    vn[i] = float_to_half(rnd_sym());
  }
  for (int64_t i = 0; i < cache_elems; i++) kc[i] = vc[i] = float_to_half(rnd_sym());
  CUdptr dkn = dalloc((size_t)N * KVH * D * 2), dvn = dalloc((size_t)N * KVH * D * 2), dk = dalloc(cache_elems * 2),
         dvv = dalloc(cache_elems * 2), dix = dalloc(sizeof indices), dip = dalloc(sizeof kv_indptr),
         db = dalloc(sizeof bidx), dp = dalloc(sizeof pos);
  upload(dkn, kn, (size_t)N * KVH * D * 2);
  upload(dvn, vn, (size_t)N * KVH * D * 2);
  upload(dk, kc, cache_elems * 2);
  upload(dvv, vc, cache_elems * 2);
  upload(dix, indices, sizeof indices);
  upload(dip, kv_indptr, sizeof kv_indptr);
  upload(db, bidx, sizeof bidx);
  upload(dp, pos, sizeof pos);
  int64_t new_shape[3] = {N, KVH, D}, cache_shape[4] = {pages, P, KVH, D}, ix_shape[1] = {12}, ip_shape[1] = {6},
          t_shape[1] = {N};
  DLTensor g_kn = make_tensor((void *)(uintptr_t)dkn, 1, 3, new_shape, NULL, f16);
  DLTensor g_vn = make_tensor((void *)(uintptr_t)dvn, 1, 3, new_shape, NULL, f16);
  DLTensor g_k = make_tensor((void *)(uintptr_t)dk, 1, 4, cache_shape, NULL, f16);
  DLTensor g_v = make_tensor((void *)(uintptr_t)dvv, 1, 4, cache_shape, NULL, f16);
  DLTensor g_ix = make_tensor((void *)(uintptr_t)dix, 1, 1, ix_shape, NULL, i32);
  DLTensor g_ip = make_tensor((void *)(uintptr_t)dip, 1, 1, ip_shape, NULL, i32);
  DLTensor g_b = make_tensor((void *)(uintptr_t)db, 1, 1, t_shape, NULL, i32);
  DLTensor g_p = make_tensor((void *)(uintptr_t)dp, 1, 1, t_shape, NULL, i32);
  kvattn_kv gkv = KVATTN_KV_INIT;
  gkv.k = &g_k;
  gkv.v = &g_v;
  gkv.indices = &g_ix;
  CHECK_OK(kvattn_append_paged_kv(gpu_ctx, &g_kn, &g_vn, &g_b, &g_p, &gkv, &g_ip, NULL));
  CHECK(cu.cuCtxSynchronize() == 0);
  download(gk, dk, cache_elems * 2);
  download(gv, dvv, cache_elems * 2);
  /* the CPU backend on host copies */
  kvattn_context *cpu;
  kvattn_options o = KVATTN_OPTIONS_INIT;
  o.backend = KVATTN_BACKEND_CPU;
  CHECK_OK(kvattn_context_create(&o, &cpu));
  DLTensor h_kn = make_tensor(kn, 0, 3, new_shape, NULL, f16), h_vn = make_tensor(vn, 0, 3, new_shape, NULL, f16);
  DLTensor h_k = make_tensor(kc, 0, 4, cache_shape, NULL, f16), h_v = make_tensor(vc, 0, 4, cache_shape, NULL, f16);
  DLTensor h_ix = make_tensor(indices, 0, 1, ix_shape, NULL, i32), h_ip = make_tensor(kv_indptr, 0, 1, ip_shape, NULL, i32);
  DLTensor h_b = make_tensor(bidx, 0, 1, t_shape, NULL, i32), h_p = make_tensor(pos, 0, 1, t_shape, NULL, i32);
  kvattn_kv hkv = KVATTN_KV_INIT;
  hkv.k = &h_k;
  hkv.v = &h_v;
  hkv.indices = &h_ix;
  kvattn_status s = kvattn_append_paged_kv(cpu, &h_kn, &h_vn, &h_b, &h_p, &hkv, &h_ip, NULL);
  /* the CPU checks each position (request 1 has no pages: INVALID_INDEX) — then compare only when it ran */
  if (s == KVATTN_SUCCESS) {
    CHECK(memcmp(gk, kc, cache_elems * 2) == 0);
    CHECK(memcmp(gv, vc, cache_elems * 2) == 0);
  } else {
    /* apply the valid tokens by hand: the GPU skips the others */
    for (int t = 0; t < N; t++) {
      int b = bidx[t];
      int64_t e = kv_indptr[b] + pos[t] / P;
      if (e >= kv_indptr[b + 1]) continue;
      for (int h = 0; h < KVH; h++)
        for (int d = 0; d < D; d++) {
          int64_t off = (((int64_t)indices[e] * P + pos[t] % P) * KVH + h) * D + d;
          kc[off] = kn[((int64_t)t * KVH + h) * D + d];
          vc[off] = vn[((int64_t)t * KVH + h) * D + d];
        }
    }
    CHECK(memcmp(gk, kc, cache_elems * 2) == 0);
    CHECK(memcmp(gv, vc, cache_elems * 2) == 0);
  }
  kvattn_context_destroy(cpu);
  cu.cuMemFree(dkn);
  cu.cuMemFree(dvn);
  cu.cuMemFree(dk);
  cu.cuMemFree(dvv);
  cu.cuMemFree(dix);
  cu.cuMemFree(dip);
  cu.cuMemFree(db);
  cu.cuMemFree(dp);
  free(kn);
  free(vn);
  free(kc);
  free(vc);
  free(gk);
  free(gv);
}

TEST_MAIN()
