/*
 * test_gpu_runtime.c - the GPU runtime on a real device: the driver loaded, a context on the
 * primary context, the self-test kernel compiled by NVRTC (through the disk cache), loaded,
 * launched, and its results read back and checked bit for bit; workspace memory zeroed; bad device
 * ids and bad kernel names give their statuses.
 *
 * Skipped, with the reason, when there is no driver or no GPU.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gpu_internal.h"
#include "shared_poison.h"
#include "test.h"

/* A context on device `id` with its own cache dir, or a skip reason in `why`. */
static kvattn_status make_context(kvattn_context *ctx, int id, const char *cache_dir) {
  memset(ctx, 0, sizeof *ctx);
  ctx->backend = KVATTN_BACKEND_CUDA;
  ctx->device_id = id;
  snprintf(ctx->cache_dir, sizeof ctx->cache_dir, "%s", cache_dir ? cache_dir : "");
  return gpu_context_init(ctx);
}

/* Skip when the machine has no usable GPU (no driver, no device, too old, no NVRTC). */
#define NEED_GPU(ctx, dir)                                                                 \
  do {                                                                                     \
    kvattn_status s_ = make_context((ctx), 0, (dir));                                      \
    if (s_ == KVATTN_ERROR_BACKEND_UNAVAILABLE) SKIP("no usable GPU: %s", kvattn_last_error()); \
    CHECK_OK(s_);                                                                          \
  } while (0)

static void fresh_dir(char *out, size_t size) {
  snprintf(out, size, "/tmp/kvattn-test-gpu-XXXXXX");
  if (!mkdtemp(out)) {
    perror("mkdtemp");
    exit(2);
  }
}

TEST(context_reports_the_device) {
  kvattn_context ctx;
  NEED_GPU(&ctx, NULL);
  struct gpu_context *g = ctx.gpu;
  CHECK(g != NULL);
  int driver = 0;
  CHECK(g->api->cuDriverGetVersion(&driver) == 0);
  char nvrtc[700] = "";
  CHECK_OK(jit_nvrtc_load(nvrtc, sizeof nvrtc));
  fprintf(stderr, "  device 0: %s, cc %d.%d -> %s, %d SMs, %d bytes smem opt-in, driver API %d\n  %s\n", g->name,
          g->cc_major, g->cc_minor, g->arch, g->sm_count, g->max_smem_per_block_optin, driver, nvrtc);
  CHECK(g->cc_major >= 8);
  CHECK(g->sm_count > 0);
  CHECK(g->max_smem_per_block_optin >= 48 * 1024);
  CHECK(g->name[0] != 0);
  CHECK(!strncmp(g->arch, "sm_", 3));
  if (g->cc_major == 9 && g->cc_minor == 0) CHECK(!strcmp(g->arch, "sm_90a"));
  /* The primary context: the one the runtime and PyTorch share. */
  CHECK_OK(gpu_make_current(g));
  CUcontext cur = NULL;
  CHECK(g->api->cuCtxGetCurrent(&cur) == 0 && cur == g->cu_ctx);
  gpu_context_release(&ctx);
  CHECK(ctx.gpu == NULL);
}

TEST(wrong_device_id_is_invalid_argument) {
  kvattn_context ctx;
  NEED_GPU(&ctx, NULL);
  int count = 0;
  CHECK(ctx.gpu->api->cuDeviceGetCount(&count) == 0);
  gpu_context_release(&ctx);
  kvattn_context bad;
  CHECK_STATUS(make_context(&bad, count, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  fprintf(stderr, "  %s\n", kvattn_last_error());
  CHECK(strstr(kvattn_last_error(), "device_id") != NULL);
  CHECK(bad.gpu == NULL);
  CHECK_STATUS(make_context(&bad, -1, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(bad.gpu == NULL);
}

TEST(selftest_kernel_compiles_launches_and_computes) {
  kvattn_context ctx;
  NEED_GPU(&ctx, NULL);
  struct gpu_context *g = ctx.gpu;
  char dir[64];
  fresh_dir(dir, sizeof dir);
  snprintf(g->cache_dir, sizeof g->cache_dir, "%s", dir); /* a fresh cache: the compile below is cold */
  const cuda_api *api = g->api;

  /* The compile time of the self-test kernel for this device, cold (fresh cache). */
  jit_spec spec = {"jit_selftest.cu", "-DSELFTEST_BIAS=0.5f", g->arch};
  void *cubin = NULL;
  size_t cubin_size = 0;
  double seconds = -1;
  int hit = -1;
  CHECK_OK(jit_compile(&spec, dir, &cubin, &cubin_size, &seconds, &hit));
  free(cubin);
  fprintf(stderr, "  cold NVRTC compile of jit_selftest.cu for %s: %.3f s\n", g->arch, seconds);
  CHECK(hit == 0);

  CUfunction fn = NULL, again = NULL;
  CHECK_OK(gpu_get_kernel(g, "jit_selftest.cu", "-DSELFTEST_BIAS=0.5f", "jit_selftest", 0, &fn));
  CHECK(fn != NULL);
  CHECK(g->num_kernels == 1);
  CHECK_OK(gpu_get_kernel(g, "jit_selftest.cu", "-DSELFTEST_BIAS=0.5f", "jit_selftest", 0, &again));
  CHECK(again == fn && g->num_kernels == 1); /* memoized */

  enum { N = 1000 }; /* not a multiple of the block */
  size_t bytes = N * sizeof(float);
  kvattn_workspace ws;
  CHECK_OK(gpu_alloc(&ctx, 4 * bytes, 4 * bytes, &ws));
  CHECK(ws.device != NULL && ws.host != NULL && ws.device_bytes == 4 * bytes);
  float *host = ws.host;
  /* Both parts come zeroed. */
  int nonzero = 0;
  for (int i = 0; i < 4 * N; i++) nonzero += host[i] != 0.0f;
  CHECK(nonzero == 0);
  for (int i = 0; i < 4 * N; i++) host[i] = -1.0f;
  CHECK(api->cuMemcpyDtoHAsync(host, (CUdeviceptr)(uintptr_t)ws.device, 4 * bytes, NULL) == 0);
  CHECK(api->cuStreamSynchronize(NULL) == 0);
  for (int i = 0; i < 4 * N; i++) nonzero += host[i] != 0.0f;
  CHECK(nonzero == 0);

  /* x spans magnitudes and signs so that the fp16/bf16 roundings are exercised. */
  float *x = host;
  uint32_t state = 12345;
  for (int i = 0; i < N; i++) {
    state = state * 1664525u + 1013904223u;
    float u = (float)(state >> 8) / (float)(1u << 24); /* [0, 1) */
    x[i] = (u - 0.5f) * ldexpf(1.0f, (i % 30) - 12);
  }
  CUdeviceptr dx = (CUdeviceptr)(uintptr_t)ws.device, dy = dx + bytes, dh = dx + 2 * bytes, db = dx + 3 * bytes;
  CHECK(api->cuMemcpyHtoDAsync(dx, x, bytes, NULL) == 0);
  float a = 3.0f;
  int n = N;
  void *params[] = {&dx, &dy, &dh, &db, &a, &n};
  CHECK(api->cuLaunchKernel(fn, (N + 127) / 128, 1, 1, 128, 1, 1, 0, NULL, params, NULL) == 0);
  float *y = host + N, *h = host + 2 * N, *b = host + 3 * N;
  CHECK(api->cuMemcpyDtoHAsync(y, dy, 3 * bytes, NULL) == 0);
  CHECK(api->cuStreamSynchronize(NULL) == 0);
  int bad_y = 0, bad_h = 0, bad_b = 0;
  for (int i = 0; i < N; i++) {
    float want_y = fmaf(a, x[i], 0.5f);
    float want_h = half_to_float(float_to_half(x[i]));
    float want_b = bf16_to_float(float_to_bf16(x[i]));
    if (memcmp(&y[i], &want_y, 4)) bad_y++;
    if (memcmp(&h[i], &want_h, 4)) bad_h++;
    if (memcmp(&b[i], &want_b, 4)) bad_b++;
    if ((bad_y + bad_h + bad_b) && (bad_y + bad_h + bad_b) < 4)
      fprintf(stderr, "  i=%d x=%a: y %a (want %a), h %a (%a), b %a (%a)\n", i, x[i], y[i], want_y, h[i], want_h, b[i],
              want_b);
  }
  CHECK_MSG(bad_y == 0 && bad_h == 0 && bad_b == 0, "mismatches: y %d, fp16 %d, bf16 %d of %d", bad_y, bad_h, bad_b, N);

  /* A second specialization is a second module; the first stays valid. */
  CUfunction fn2 = NULL;
  CHECK_OK(gpu_get_kernel(g, "jit_selftest.cu", "-DSELFTEST_BIAS=-2.0f", "jit_selftest", 0, &fn2));
  CHECK(fn2 != fn && g->num_kernels == 2);
  CHECK(api->cuLaunchKernel(fn2, (N + 127) / 128, 1, 1, 128, 1, 1, 0, NULL, params, NULL) == 0);
  CHECK(api->cuMemcpyDtoHAsync(y, dy, bytes, NULL) == 0);
  CHECK(api->cuStreamSynchronize(NULL) == 0);
  for (int i = 0; i < N; i++) {
    float want = fmaf(a, x[i], -2.0f);
    bad_y += memcmp(&y[i], &want, 4) != 0;
  }
  CHECK(bad_y == 0);

  CHECK_OK(gpu_free(&ctx, &ws));
  CHECK(ws.device == NULL && ws.host == NULL);
  gpu_context_release(&ctx);
  /* The cache now holds the two specializations (the cold compile above stored the first). */
  char info[2048];
  CHECK_OK(kvattn_cache_info(dir, info, sizeof info));
  fprintf(stderr, "  %s", info);
  CHECK(strstr(info, "2 entries") != NULL);
}

TEST(large_shared_memory_is_opted_in_and_limits_are_checked) {
  kvattn_context ctx;
  NEED_GPU(&ctx, NULL);
  struct gpu_context *g = ctx.gpu;
  CUfunction fn = NULL;
  CHECK_OK(gpu_get_kernel(g, "jit_selftest.cu", "", "jit_selftest", 64 * 1024, &fn));
  int max_dynamic = 0;
  CHECK(g->api->cuFuncGetAttribute(&max_dynamic, 8 /* MAX_DYNAMIC_SHARED_SIZE_BYTES */, fn) == 0);
  CHECK(max_dynamic == 64 * 1024);
  /* Asking again for less never lowers it. */
  CHECK_OK(gpu_get_kernel(g, "jit_selftest.cu", "", "jit_selftest", 50 * 1024, &fn));
  CHECK(g->api->cuFuncGetAttribute(&max_dynamic, 8, fn) == 0 && max_dynamic == 64 * 1024);
  CHECK_STATUS(gpu_get_kernel(g, "jit_selftest.cu", "", "jit_selftest", g->max_smem_per_block_optin + 1, &fn),
               KVATTN_ERROR_UNSUPPORTED);
  gpu_context_release(&ctx);
}

/* The GPU suites fill every SM's shared memory with NaN before a kernel under test
 * (tests/gpu/shared_poison.h): that only finds reads of unwritten shared memory if the fill reaches
 * the next kernel's blocks. A kernel that reads its shared memory without writing it must see the
 * pattern in every word, on every SM, for two patterns. */
TEST(shared_memory_poison_reaches_the_next_kernel) {
  kvattn_context ctx;
  NEED_GPU(&ctx, NULL);
  struct gpu_context *g = ctx.gpu;
  const int bytes = g->max_smem_per_block_optin, words = bytes / 4, blocks = g->sm_count;
  CUfunction rd = NULL;
  CHECK_OK(gpu_get_kernel(g, "jit_selftest.cu", "", "jit_read_shared", bytes, &rd));
  const size_t out_bytes = (size_t)blocks * words * 4;
  kvattn_workspace ws;
  CHECK_OK(gpu_alloc(&ctx, out_bytes, out_bytes, &ws));
  const unsigned patterns[2] = {0xA5A5A5A5u, 0x3C3C0FF0u};
  for (int p = 0; p < 2; p++) {
    poison_shared_memory(&ctx, patterns[p], NULL);
    CUdeviceptr out = (CUdeviceptr)(uintptr_t)ws.device;
    int w = words;
    void *args[] = {&out, &w};
    /* one block per SM (each takes the most shared memory a block may have) */
    CHECK_OK(gpu_launch(g, rd, blocks, 1024, bytes, NULL, args, 0));
    CHECK(g->api->cuMemcpyDtoHAsync(ws.host, out, out_bytes, NULL) == 0);
    CHECK(g->api->cuStreamSynchronize(NULL) == 0);
    const unsigned *h = ws.host;
    size_t other = 0;
    for (size_t i = 0; i < (size_t)blocks * words; i++) other += h[i] != patterns[p];
    fprintf(stderr, "  pattern 0x%08x: %zu of %zu words of %d blocks x %d KiB differ\n", patterns[p], other,
            (size_t)blocks * words, blocks, bytes / 1024);
    CHECK(other == 0);
  }
  CHECK_OK(gpu_free(&ctx, &ws));
  gpu_context_release(&ctx);
}

TEST(unknown_entry_and_broken_source_give_statuses) {
  kvattn_context ctx;
  NEED_GPU(&ctx, NULL);
  struct gpu_context *g = ctx.gpu;
  CUfunction fn = NULL;
  CHECK_STATUS(gpu_get_kernel(g, "jit_selftest.cu", "", "no_such_entry", 0, &fn), KVATTN_ERROR_CUDA);
  fprintf(stderr, "  %s\n", kvattn_last_error());
  CHECK(strstr(kvattn_last_error(), "no_such_entry") != NULL);
  CHECK_STATUS(gpu_get_kernel(g, "jit_selftest.cu", "-DSELFTEST_SYNTAX_ERROR", "jit_selftest", 0, &fn),
               KVATTN_ERROR_COMPILE);
  CHECK(g->num_kernels == 0);
  gpu_context_release(&ctx);
}

TEST_MAIN()
