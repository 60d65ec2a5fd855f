/*
 * test_context.c - contexts and the error model: backend choice (AUTO falls back to the CPU and
 * says why), CPU and REFERENCE contexts, CUDA without a GPU, versions, status strings, and the
 * thread-local last error.
 */
#define _GNU_SOURCE /* setenv, pthread barriers under -std=c11 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvattn.h"
#include "test.h"

static kvattn_status make(int backend, int threads, kvattn_context **ctx) {
  kvattn_options opt = KVATTN_OPTIONS_INIT;
  opt.backend = backend;
  opt.num_threads = threads;
  return kvattn_context_create(&opt, ctx);
}

/* Is there a usable GPU here? (AUTO picks CUDA exactly then.) */
static int gpu_present(void) {
  kvattn_context *ctx = NULL;
  kvattn_backend b = KVATTN_BACKEND_CPU;
  if (make(KVATTN_BACKEND_AUTO, 0, &ctx) == KVATTN_SUCCESS) kvattn_context_backend(ctx, &b);
  kvattn_context_destroy(ctx);
  return b == KVATTN_BACKEND_CUDA;
}

/* ---------------------------------------------------------------- backends */

TEST(auto_context_serves_and_says_which_backend_and_why) {
  kvattn_context *ctx = NULL;
  CHECK_OK(make(KVATTN_BACKEND_AUTO, 0, &ctx));
  CHECK(ctx != NULL);
  CHECK(strcmp(kvattn_last_error(), "") == 0); /* the GPU probe's failure is not left behind */
  kvattn_backend b;
  CHECK_OK(kvattn_context_backend(ctx, &b));
  CHECK(b == KVATTN_BACKEND_CPU || b == KVATTN_BACKEND_CUDA); /* never AUTO */
  char info[2048];
  CHECK_OK(kvattn_context_info(ctx, info, sizeof info));
  fprintf(stderr, "  info: %s\n", info);
  if (b == KVATTN_BACKEND_CUDA) {
    CHECK(strstr(info, "cuda") != NULL);
  } else {
    /* the fallback names itself and gives the GPU probe's reason, which is not empty */
    CHECK(strstr(info, "backend: cpu") != NULL);
    const char *why = strstr(info, "GPU backend not used: ");
    CHECK_MSG(why != NULL, "info \"%s\" does not say why the GPU backend is not used", info);
    why += strlen("GPU backend not used: ");
    CHECK(*why && *why != ';');
  }
  kvattn_context_destroy(ctx);
}

TEST(null_options_mean_the_defaults) {
  kvattn_context *ctx = NULL;
  CHECK_OK(kvattn_context_create(NULL, &ctx));
  kvattn_backend b;
  CHECK_OK(kvattn_context_backend(ctx, &b));
  CHECK(b == (gpu_present() ? KVATTN_BACKEND_CUDA : KVATTN_BACKEND_CPU));
  kvattn_context_destroy(ctx);
}

TEST(cpu_context_uses_the_threads_asked_for) {
  kvattn_context *ctx = NULL;
  CHECK_OK(make(KVATTN_BACKEND_CPU, 3, &ctx));
  kvattn_backend b;
  CHECK_OK(kvattn_context_backend(ctx, &b));
  CHECK(b == KVATTN_BACKEND_CPU);
  char info[1024];
  CHECK_OK(kvattn_context_info(ctx, info, sizeof info));
  CHECK_MSG(strstr(info, "backend: cpu (3 threads)") != NULL, "info: %s", info);
  kvattn_context_destroy(ctx);
}

TEST(cpu_context_with_zero_threads_takes_every_online_core) {
  kvattn_context *ctx = NULL;
  CHECK_OK(make(KVATTN_BACKEND_CPU, 0, &ctx));
  char info[1024], want[64];
  CHECK_OK(kvattn_context_info(ctx, info, sizeof info));
  snprintf(want, sizeof want, "(%ld threads)", sysconf(_SC_NPROCESSORS_ONLN));
  CHECK_MSG(strstr(info, want) != NULL, "info \"%s\" lacks \"%s\"", info, want);
  kvattn_context_destroy(ctx);
}

TEST(reference_context) {
  kvattn_context *ctx = NULL;
  CHECK_OK(make(KVATTN_BACKEND_REFERENCE, 0, &ctx));
  kvattn_backend b;
  CHECK_OK(kvattn_context_backend(ctx, &b));
  CHECK(b == KVATTN_BACKEND_REFERENCE);
  char info[1024];
  CHECK_OK(kvattn_context_info(ctx, info, sizeof info));
  CHECK_MSG(strstr(info, "reference") && strstr(info, "float64"), "info: %s", info);
  kvattn_context_destroy(ctx);
}

TEST(cuda_context_without_a_gpu_is_backend_unavailable) {
  if (gpu_present()) SKIP("a GPU is present here: the no-GPU path cannot be observed");
  kvattn_context *ctx = (kvattn_context *)(uintptr_t)0x1;
  CHECK_STATUS(make(KVATTN_BACKEND_CUDA, 0, &ctx), KVATTN_ERROR_BACKEND_UNAVAILABLE);
  CHECK(ctx == NULL);
  const char *why = kvattn_last_error();
  fprintf(stderr, "  message: %s\n", why);
  CHECK(strlen(why) > 10);
  CHECK(strstr(why, "kvattn_context_create") != NULL);
}

TEST(cuda_context_with_a_gpu_runs_on_it) {
  if (!gpu_present()) SKIP("no GPU here");
  kvattn_context *ctx = NULL;
  CHECK_OK(make(KVATTN_BACKEND_CUDA, 0, &ctx));
  kvattn_backend b;
  CHECK_OK(kvattn_context_backend(ctx, &b));
  CHECK(b == KVATTN_BACKEND_CUDA);
  kvattn_context_destroy(ctx);
}

TEST(cuda_context_on_a_device_that_does_not_exist_is_an_error) {
  if (!gpu_present()) SKIP("no GPU here");
  kvattn_options opt = KVATTN_OPTIONS_INIT;
  opt.backend = KVATTN_BACKEND_CUDA;
  opt.device_id = 4095;
  kvattn_context *ctx = (kvattn_context *)(uintptr_t)0x1;
  kvattn_status s = kvattn_context_create(&opt, &ctx);
  CHECK(s != KVATTN_SUCCESS);
  CHECK(ctx == NULL);
  CHECK(strstr(kvattn_last_error(), "4095") != NULL);
}

TEST(context_info_truncates_to_the_buffer) {
  kvattn_context *ctx = NULL;
  CHECK_OK(make(KVATTN_BACKEND_CPU, 2, &ctx));
  char buf[16];
  memset(buf, '#', sizeof buf);
  CHECK_OK(kvattn_context_info(ctx, buf, 8));
  CHECK(strlen(buf) == 7); /* 7 characters and the terminating 0 */
  CHECK(memcmp(buf, "backend", 7) == 0);
  for (int i = 8; i < 16; i++) CHECK(buf[i] == '#');
  CHECK_OK(kvattn_context_info(ctx, buf, 1));
  CHECK(buf[0] == 0);
  kvattn_context_destroy(ctx);
}

TEST(context_info_names_the_jit_cache_directory) {
  kvattn_options opt = KVATTN_OPTIONS_INIT;
  opt.backend = KVATTN_BACKEND_CPU;
  opt.cache_dir = "/tmp/kvattn-test-cache-dir";
  kvattn_context *ctx = NULL;
  CHECK_OK(kvattn_context_create(&opt, &ctx));
  char info[2048];
  CHECK_OK(kvattn_context_info(ctx, info, sizeof info));
  CHECK_MSG(strstr(info, "jit cache: /tmp/kvattn-test-cache-dir"), "info: %s", info);
  kvattn_context_destroy(ctx);

  /* without an explicit directory, $KVATTN_CACHE_DIR wins */
  const char *old = getenv("KVATTN_CACHE_DIR");
  char *saved = old ? strdup(old) : NULL;
  setenv("KVATTN_CACHE_DIR", "/tmp/kvattn-env-cache", 1);
  opt.cache_dir = NULL;
  kvattn_status s = kvattn_context_create(&opt, &ctx);
  if (saved) setenv("KVATTN_CACHE_DIR", saved, 1);
  else unsetenv("KVATTN_CACHE_DIR");
  free(saved);
  CHECK_OK(s);
  CHECK_OK(kvattn_context_info(ctx, info, sizeof info));
  CHECK_MSG(strstr(info, "jit cache: /tmp/kvattn-env-cache"), "info: %s", info);
  kvattn_context_destroy(ctx);
}

TEST(options_from_a_newer_caller_with_a_bigger_struct_are_accepted) {
  /* append-only ABI: a caller built against a later header passes a larger struct_size */
  struct {
    kvattn_options o;
    int64_t field_from_the_future;
  } newer;
  memset(&newer, 0, sizeof newer);
  newer.o = (kvattn_options)KVATTN_OPTIONS_INIT;
  newer.o.struct_size = sizeof newer;
  newer.o.backend = KVATTN_BACKEND_CPU;
  newer.o.num_threads = 2;
  newer.field_from_the_future = 12345;
  kvattn_context *ctx = NULL;
  CHECK_OK(kvattn_context_create(&newer.o, &ctx));
  char info[256];
  CHECK_OK(kvattn_context_info(ctx, info, sizeof info));
  CHECK(strstr(info, "(2 threads)"));
  kvattn_context_destroy(ctx);
}

TEST(several_contexts_live_side_by_side) {
  kvattn_context *a = NULL, *b = NULL;
  CHECK_OK(make(KVATTN_BACKEND_CPU, 1, &a));
  CHECK_OK(make(KVATTN_BACKEND_REFERENCE, 0, &b));
  kvattn_backend ba, bb;
  CHECK_OK(kvattn_context_backend(a, &ba));
  CHECK_OK(kvattn_context_backend(b, &bb));
  CHECK(ba == KVATTN_BACKEND_CPU && bb == KVATTN_BACKEND_REFERENCE);
  CHECK_OK(kvattn_context_destroy(a));
  CHECK_OK(kvattn_context_backend(b, &bb));
  CHECK_OK(kvattn_context_destroy(b));
}

/* ---------------------------------------------------------------- versions */

TEST(version_macros_match_the_library) {
  CHECK(KVATTN_VERSION_NUMBER == kvattn_version_number());
  CHECK(KVATTN_VERSION_NUMBER ==
        KVATTN_VERSION_MAJOR * 10000 + KVATTN_VERSION_MINOR * 100 + KVATTN_VERSION_PATCH);
  CHECK(strcmp(kvattn_version(), KVATTN_VERSION_STRING) == 0);
  char want[32];
  snprintf(want, sizeof want, "%d.%d.%d", KVATTN_VERSION_MAJOR, KVATTN_VERSION_MINOR, KVATTN_VERSION_PATCH);
  CHECK(strcmp(kvattn_version(), want) == 0);
  kvattn_options o = KVATTN_OPTIONS_INIT;
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  CHECK(o.version == KVATTN_VERSION_NUMBER && d.version == KVATTN_VERSION_NUMBER);
  CHECK(o.struct_size == sizeof(kvattn_options) && d.struct_size == sizeof(kvattn_attention_desc));
}

/* ---------------------------------------------------------------- statuses */

TEST(every_status_has_its_own_name) {
  static const struct {
    kvattn_status s;
    int value;
    const char *name;
  } table[] = {
      {KVATTN_SUCCESS, 0, "KVATTN_SUCCESS"},
      {KVATTN_ERROR_INVALID_ARGUMENT, 1, "KVATTN_ERROR_INVALID_ARGUMENT"},
      {KVATTN_ERROR_INVALID_DTYPE, 2, "KVATTN_ERROR_INVALID_DTYPE"},
      {KVATTN_ERROR_INVALID_SHAPE, 3, "KVATTN_ERROR_INVALID_SHAPE"},
      {KVATTN_ERROR_INVALID_STRIDE, 4, "KVATTN_ERROR_INVALID_STRIDE"},
      {KVATTN_ERROR_INVALID_INDEX, 5, "KVATTN_ERROR_INVALID_INDEX"},
      {KVATTN_ERROR_DEVICE_MISMATCH, 6, "KVATTN_ERROR_DEVICE_MISMATCH"},
      {KVATTN_ERROR_INVALID_USAGE, 7, "KVATTN_ERROR_INVALID_USAGE"},
      {KVATTN_ERROR_WORKSPACE_TOO_SMALL, 8, "KVATTN_ERROR_WORKSPACE_TOO_SMALL"},
      {KVATTN_ERROR_BOUNDS_EXCEEDED, 9, "KVATTN_ERROR_BOUNDS_EXCEEDED"},
      {KVATTN_ERROR_UNSUPPORTED, 10, "KVATTN_ERROR_UNSUPPORTED"},
      {KVATTN_ERROR_BACKEND_UNAVAILABLE, 11, "KVATTN_ERROR_BACKEND_UNAVAILABLE"},
      {KVATTN_ERROR_OUT_OF_MEMORY, 12, "KVATTN_ERROR_OUT_OF_MEMORY"},
      {KVATTN_ERROR_CUDA, 13, "KVATTN_ERROR_CUDA"},
      {KVATTN_ERROR_COMPILE, 14, "KVATTN_ERROR_COMPILE"},
      {KVATTN_ERROR_INTERNAL, 15, "KVATTN_ERROR_INTERNAL"},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
    CHECK((int)table[i].s == table[i].value); /* values are fixed forever */
    const char *got = kvattn_status_string(table[i].s);
    CHECK(got != NULL);
    CHECK_MSG(strcmp(got, table[i].name) == 0, "status %d is named %s", table[i].value, got);
  }
}

TEST(unknown_status_has_a_name_too) {
  const char *s = kvattn_status_string((kvattn_status)16);
  CHECK(s != NULL && strlen(s) > 0);
  CHECK(strcmp(s, "KVATTN_ERROR_INTERNAL") != 0);
  CHECK(kvattn_status_string((kvattn_status)-1) != NULL);
  CHECK(kvattn_status_string((kvattn_status)100000) != NULL);
}

/* ---------------------------------------------------------------- the last error */

TEST(last_error_is_empty_after_a_success) {
  kvattn_options bad = KVATTN_OPTIONS_INIT;
  bad.num_threads = -1;
  kvattn_context *ctx = NULL;
  CHECK_STATUS(kvattn_context_create(&bad, &ctx), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(strlen(kvattn_last_error()) > 0);
  CHECK_OK(make(KVATTN_BACKEND_CPU, 1, &ctx));
  CHECK(strcmp(kvattn_last_error(), "") == 0);
  kvattn_backend b;
  CHECK_STATUS(kvattn_context_backend(NULL, &b), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_OK(kvattn_context_backend(ctx, &b));
  CHECK(strcmp(kvattn_last_error(), "") == 0);
  kvattn_context_destroy(ctx);
}

TEST(last_error_names_the_function) {
  kvattn_options bad = KVATTN_OPTIONS_INIT;
  bad.backend = 42;
  kvattn_context *ctx = NULL;
  CHECK_STATUS(kvattn_context_create(&bad, &ctx), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(kvattn_last_error(), "kvattn_context_create") != NULL);
  CHECK(strstr(kvattn_last_error(), "options.backend=42") != NULL);
}

typedef struct thread_arg {
  int num_threads;     /* the bad value this thread passes */
  pthread_barrier_t *barrier;
  char seen[256];      /* its last error after the other thread failed too */
  kvattn_status status;
} thread_arg;

static void *fail_then_wait(void *p) {
  thread_arg *a = p;
  kvattn_options bad = KVATTN_OPTIONS_INIT;
  bad.backend = KVATTN_BACKEND_CPU;
  bad.num_threads = a->num_threads;
  kvattn_context *ctx = NULL;
  a->status = kvattn_context_create(&bad, &ctx);
  pthread_barrier_wait(a->barrier); /* both have failed now */
  pthread_barrier_wait(a->barrier);
  snprintf(a->seen, sizeof a->seen, "%s", kvattn_last_error());
  return NULL;
}

TEST(last_error_is_thread_local) {
  pthread_barrier_t barrier;
  pthread_barrier_init(&barrier, NULL, 3);
  thread_arg a = {.num_threads = -11, .barrier = &barrier}, b = {.num_threads = -22, .barrier = &barrier};
  pthread_t ta, tb;
  CHECK(pthread_create(&ta, NULL, fail_then_wait, &a) == 0);
  CHECK(pthread_create(&tb, NULL, fail_then_wait, &b) == 0);
  pthread_barrier_wait(&barrier);
  /* while both threads hold their errors, this thread succeeds: its own text is empty */
  kvattn_context *ctx = NULL;
  kvattn_status mine = make(KVATTN_BACKEND_CPU, 1, &ctx);
  const char *main_text = kvattn_last_error();
  int main_empty = main_text[0] == 0;
  pthread_barrier_wait(&barrier);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  pthread_barrier_destroy(&barrier);
  kvattn_context_destroy(ctx);
  CHECK_OK(mine);
  CHECK(main_empty);
  CHECK(a.status == KVATTN_ERROR_INVALID_ARGUMENT && b.status == KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_MSG(strstr(a.seen, "num_threads=-11") != NULL, "thread a sees \"%s\"", a.seen);
  CHECK_MSG(strstr(b.seen, "num_threads=-22") != NULL, "thread b sees \"%s\"", b.seen);
}

TEST(warmup_judges_the_architecture_before_loading_nvrtc) {
  /* the same statuses with or without NVRTC on the machine */
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_qo_heads = 8;
  d.num_kv_heads = 2;
  d.head_dim = 64;
  CHECK_STATUS(kvattn_warmup(&d, "sm_75", "/nonexistent/kvattn-cache", NULL, NULL), KVATTN_ERROR_UNSUPPORTED);
  CHECK(strstr(kvattn_last_error(), "sm_75") != NULL);
  CHECK_STATUS(kvattn_warmup(&d, "compute_90", NULL, NULL, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_warmup(&d, "sm_90b", NULL, NULL, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_warmup(&d, "sm_9", NULL, NULL, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(kvattn_warmup(&d, NULL, NULL, NULL, NULL), KVATTN_ERROR_INVALID_ARGUMENT);
}

TEST_MAIN()
