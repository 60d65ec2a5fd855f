/*
 * kvattn.c - the `kvattn` command-line tool.
 *
 *   kvattn info                            version, backends (CPU threads, GPU or why none), JIT cache
 *   kvattn demo                            one serving step over a paged cache, checked against float64
 *   kvattn bench decode|prefill|append     plan and run timings, bytes, GB/s, TFLOP/s, JSON
 *   kvattn check                           a random correctness sweep against the float64 reference
 *   kvattn warmup                          fill the JIT cubin cache for a model shape (no GPU needed)
 *
 * Exit codes (the same for every command, so scripts can branch on them):
 *   0 ok, 1 a check failed, 2 usage error (bad flag or value), 3 a backend or library error.
 * Messages go to stderr and start with "kvattn <command>:"; tables and results go to stdout.
 *
 * Every tensor the tool makes has two copies: a host copy, which the generator writes and the float64
 * reference (a KVATTN_BACKEND_REFERENCE context) reads, and a context-side copy, which the backend under
 * test reads and writes (device memory on a CUDA context, a separate host buffer on the CPU). So one
 * code path checks every backend, and the reference never sees what the backend under test wrote.
 * The public API has no memory copy, so on a CUDA context the tool uses the driver the library loaded
 * (src/gpu_internal.h: cuda_api_load) for allocation and copies — only then.
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kvattn.h"
#include "internal.h"
#include "gpu_internal.h"

enum { EXIT_OK = 0, EXIT_CHECK_FAILED = 1, EXIT_USAGE = 2, EXIT_LIBRARY = 3 };

/* "kvattn demo": the prefix of every message of the running command. */
static char g_cmd[64] = "kvattn";

/* ======================================================================== */
/* Messages                                                                 */
/* ======================================================================== */

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "%s: ", g_cmd);
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\nTry '%s --help'.\n", g_cmd);
  va_end(ap);
  return EXIT_USAGE;
}

/* The library's detail text, copied at once: it is valid only until the next kvattn call. */
static void status_text(kvattn_status s, char *buf, size_t size) {
  char detail[1024];
  snprintf(detail, sizeof detail, "%s", kvattn_last_error());
  snprintf(buf, size, "%s%s%s", kvattn_status_string(s), detail[0] ? ": " : "", detail);
}

static int library_error(const char *what, kvattn_status s) {
  char text[1200];
  status_text(s, text, sizeof text);
  fprintf(stderr, "%s: %s failed: %s\n", g_cmd, what, text);
  return EXIT_LIBRARY;
}

/* ======================================================================== */
/* Options: one table per command, "--name value" or "--name=value"         */
/* ======================================================================== */

typedef enum opt_kind { OPT_FLAG, OPT_INT, OPT_DOUBLE, OPT_STRING, OPT_CHOICE } opt_kind;

typedef struct opt_def {
  const char *name;    /* "--batch" */
  opt_kind kind;
  void *dst;           /* FLAG: int*; INT: int64_t*; DOUBLE: double*; STRING: const char**;
                          CHOICE: int* (the index of the choice) */
  int64_t min, max;    /* INT: the accepted range */
  const char *choices; /* CHOICE: "auto|cpu|cuda" */
  const char *help;
  int seen;
} opt_def;

/* The index of `value` among the '|'-separated `choices`, or -1. */
static int choice_index(const char *choices, const char *value) {
  int index = 0;
  const char *p = choices;
  size_t len = strlen(value);
  while (*p) {
    const char *end = strchr(p, '|');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    if (n == len && strncmp(p, value, n) == 0) return index;
    if (!end) break;
    p = end + 1;
    index++;
  }
  return -1;
}

static const char *choice_name(const char *choices, int index, char *buf, size_t size) {
  const char *p = choices;
  for (int i = 0; i < index && p; i++) {
    p = strchr(p, '|');
    if (p) p++;
  }
  if (!p) return "?";
  const char *end = strchr(p, '|');
  size_t n = end ? (size_t)(end - p) : strlen(p);
  if (n >= size) n = size - 1;
  memcpy(buf, p, n);
  buf[n] = 0;
  return buf;
}

/* Returns 0 when parsed, -1 when --help was asked, EXIT_USAGE (after a message) on a bad flag. */
static int parse_options(int argc, char **argv, opt_def *defs, int ndefs) {
  for (int i = 0; i < argc; i++) {
    const char *arg = argv[i];
    if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) return -1;
    if (strncmp(arg, "--", 2) != 0) return usage_error("unexpected argument '%s'", arg);
    const char *eq = strchr(arg, '=');
    size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
    opt_def *d = NULL;
    for (int k = 0; k < ndefs; k++)
      if (strlen(defs[k].name) == name_len && !strncmp(defs[k].name, arg, name_len)) d = &defs[k];
    if (!d) return usage_error("unknown option '%.*s'", (int)name_len, arg);
    if (d->seen) return usage_error("%s given twice", d->name);
    d->seen = 1;
    if (d->kind == OPT_FLAG) {
      if (eq) return usage_error("%s takes no value", d->name);
      *(int *)d->dst = 1;
      continue;
    }
    const char *val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
    if (!val || !val[0]) return usage_error("%s needs a value", d->name);
    char *end = NULL;
    errno = 0;
    switch (d->kind) {
    case OPT_INT: {
      long long x = strtoll(val, &end, 10);
      if (errno || *end) return usage_error("%s: '%s' is not an integer", d->name, val);
      if (x < d->min || x > d->max)
        return usage_error("%s: %lld is out of range %" PRId64 "..%" PRId64, d->name, x, d->min, d->max);
      *(int64_t *)d->dst = x;
      break;
    }
    case OPT_DOUBLE: {
      double x = strtod(val, &end);
      if (errno || *end || !isfinite(x)) return usage_error("%s: '%s' is not a number", d->name, val);
      *(double *)d->dst = x;
      break;
    }
    case OPT_STRING: *(const char **)d->dst = val; break;
    case OPT_CHOICE: {
      const char *choices = d->choices ? d->choices : "";
      int c = choice_index(choices, val);
      if (c < 0) return usage_error("%s: '%s' is not one of %s", d->name, val, choices);
      *(int *)d->dst = c;
      break;
    }
    default: break;
    }
  }
  return 0;
}

static void print_options(const opt_def *defs, int ndefs) {
  printf("Options:\n");
  for (int k = 0; k < ndefs; k++) {
    char left[96];
    const char *arg = defs[k].kind == OPT_FLAG     ? ""
                      : defs[k].kind == OPT_CHOICE ? defs[k].choices
                      : defs[k].kind == OPT_STRING ? "TEXT"
                                                   : "N";
    snprintf(left, sizeof left, "%s%s%s", defs[k].name, arg[0] ? " " : "", arg);
    printf("  %-34s %s\n", left, defs[k].help);
  }
  printf("  %-34s %s\n", "--help", "show this text");
}

/* ======================================================================== */
/* Random numbers, time, statistics                                         */
/* ======================================================================== */

typedef struct rng {
  uint64_t state;
} rng;

static uint64_t rng_next(rng *r) { /* splitmix64: fast, and any seed is a good seed */
  uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static double rng_uniform(rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }
static int64_t rng_int(rng *r, int64_t lo, int64_t hi) { /* inclusive */
  return lo + (int64_t)(rng_next(r) % (uint64_t)(hi - lo + 1));
}
static int rng_chance(rng *r, double p) { return rng_uniform(r) < p; }
/* Roughly normal (a sum of uniforms): values like activations, without the tails of a true normal. */
static double rng_value(rng *r) {
  return (rng_uniform(r) + rng_uniform(r) + rng_uniform(r) + rng_uniform(r) - 2.0) * 1.7;
}

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}
static double median(const double *v, int n) {
  if (n <= 0) return 0;
  double *s = malloc(sizeof(double) * n);
  if (!s) return v[0];
  memcpy(s, v, sizeof(double) * n);
  qsort(s, n, sizeof(double), cmp_double);
  double m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
  free(s);
  return m;
}

static const char *fmt_time(double us, char *buf, size_t size) {
  if (us < 1000) snprintf(buf, size, "%.1f us", us);
  else if (us < 1e6) snprintf(buf, size, "%.2f ms", us / 1e3);
  else snprintf(buf, size, "%.2f s", us / 1e6);
  return buf;
}
/* A rate with three significant digits, whatever its size ("2119", "27.2", "0.00531"). */
static const char *fmt_rate(double x, char *buf, size_t size) {
  if (x >= 100) snprintf(buf, size, "%.0f", x);
  else snprintf(buf, size, "%.3g", x);
  return buf;
}

static const char *fmt_bytes(double b, char *buf, size_t size) {
  if (b < 1e3) snprintf(buf, size, "%.0f B", b);
  else if (b < 1e6) snprintf(buf, size, "%.1f KB", b / 1e3);
  else if (b < 1e9) snprintf(buf, size, "%.1f MB", b / 1e6);
  else snprintf(buf, size, "%.2f GB", b / 1e9);
  return buf;
}

/* ======================================================================== */
/* dtypes                                                                   */
/* ======================================================================== */

static const DLDataType T_F16 = {kDLFloat, 16, 1}, T_BF16 = {kDLBfloat, 16, 1}, T_F32 = {kDLFloat, 32, 1},
                        T_F64 = {kDLFloat, 64, 1}, T_I32 = {kDLInt, 32, 1}, T_U8 = {kDLUInt, 8, 1};

static int same_dtype(DLDataType a, DLDataType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}
static size_t elem_size(DLDataType t) { return t.bits / 8; }
static const char *short_dtype(DLDataType t) {
  if (same_dtype(t, T_F16)) return "f16";
  if (same_dtype(t, T_BF16)) return "bf16";
  if (same_dtype(t, T_F32)) return "f32";
  if (same_dtype(t, T_F64)) return "f64";
  return "?";
}
static DLDataType dtype_from_choice(int index) { /* the choice list "f16|bf16|f32" */
  return index == 0 ? T_F16 : index == 1 ? T_BF16 : T_F32;
}

/* Element access on host memory; the conversions are the library's (round to nearest even). */
static double load_elem(DLDataType t, const void *base, int64_t i) {
  if (same_dtype(t, T_F16)) return half_to_float(((const uint16_t *)base)[i]);
  if (same_dtype(t, T_BF16)) return bf16_to_float(((const uint16_t *)base)[i]);
  if (same_dtype(t, T_F32)) return ((const float *)base)[i];
  if (same_dtype(t, T_F64)) return ((const double *)base)[i];
  if (same_dtype(t, T_I32)) return ((const int32_t *)base)[i];
  if (same_dtype(t, T_U8)) return ((const uint8_t *)base)[i];
  return NAN;
}
static void store_elem(DLDataType t, void *base, int64_t i, double v) {
  if (same_dtype(t, T_F16)) ((uint16_t *)base)[i] = float_to_half((float)v);
  else if (same_dtype(t, T_BF16)) ((uint16_t *)base)[i] = float_to_bf16((float)v);
  else if (same_dtype(t, T_F32)) ((float *)base)[i] = (float)v;
  else if (same_dtype(t, T_F64)) ((double *)base)[i] = v;
  else if (same_dtype(t, T_I32)) ((int32_t *)base)[i] = (int32_t)v;
  else if (same_dtype(t, T_U8)) ((uint8_t *)base)[i] = (uint8_t)v;
}

/* ======================================================================== */
/* Memory on the context's side                                             */
/* ======================================================================== */

/* Where the backend under test reads and writes: device memory through the driver the library
 * loaded (CUDA context), or plain host memory (CPU and reference contexts). */
typedef struct devmem {
  int cuda;
  const cuda_api *api;
  DLDevice device; /* what the context-side tensors carry */
} devmem;

static devmem g_dev = {0, NULL, {kDLCPU, 0}};

static kvattn_status devmem_init(kvattn_context *ctx) {
  kvattn_backend backend;
  TRY(kvattn_context_backend(ctx, &backend));
  g_dev.cuda = 0;
  g_dev.api = NULL;
  g_dev.device = (DLDevice){kDLCPU, 0};
  if (backend != KVATTN_BACKEND_CUDA) return KVATTN_SUCCESS;
  RETURN_IF(!ctx->gpu, KVATTN_ERROR_INTERNAL, "a CUDA context without its GPU state");
  TRY(cuda_api_load(&g_dev.api));
  TRY(gpu_make_current(ctx->gpu)); /* allocations below land in the context's (primary) CUDA context */
  g_dev.cuda = 1;
  g_dev.device = (DLDevice){kDLCUDA, ctx->device_id};
  return KVATTN_SUCCESS;
}

static kvattn_status dev_alloc(size_t bytes, void **p) {
  bytes = align_up(bytes ? bytes : 1, 256);
  *p = NULL;
  if (g_dev.cuda) {
    CUdeviceptr d = 0;
    CU_TRY(g_dev.api, cuMemAlloc(&d, bytes));
    *p = (void *)(uintptr_t)d;
    return KVATTN_SUCCESS;
  }
  *p = aligned_alloc(256, bytes);
  RETURN_IF(!*p, KVATTN_ERROR_OUT_OF_MEMORY, "allocating %zu bytes", bytes);
  return KVATTN_SUCCESS;
}

static void dev_free(void *p) {
  if (!p) return;
  if (g_dev.cuda) g_dev.api->cuMemFree((CUdeviceptr)(uintptr_t)p);
  else free(p);
}

static kvattn_status dev_sync(void) {
  if (g_dev.cuda) CU_TRY(g_dev.api, cuStreamSynchronize(NULL));
  return KVATTN_SUCCESS;
}

static kvattn_status dev_upload(void *dst, const void *src, size_t bytes) {
  if (!bytes) return KVATTN_SUCCESS;
  if (!g_dev.cuda) {
    memcpy(dst, src, bytes);
    return KVATTN_SUCCESS;
  }
  CU_TRY(g_dev.api, cuMemcpyHtoDAsync((CUdeviceptr)(uintptr_t)dst, src, bytes, NULL));
  return dev_sync();
}

static kvattn_status dev_download(void *dst, const void *src, size_t bytes) {
  if (!bytes) return KVATTN_SUCCESS;
  if (!g_dev.cuda) {
    memcpy(dst, src, bytes);
    return KVATTN_SUCCESS;
  }
  CU_TRY(g_dev.api, cuMemcpyDtoHAsync(dst, (CUdeviceptr)(uintptr_t)src, bytes, NULL));
  return dev_sync();
}

/* ======================================================================== */
/* Tensors: a host copy and a context-side copy of the same bytes           */
/* ======================================================================== */

typedef struct tensor {
  DLDataType dtype;
  int ndim;
  int64_t shape[TVIEW_MAX_DIMS];
  int64_t strides[TVIEW_MAX_DIMS]; /* elements */
  int compact;                     /* 1: pass strides == NULL (the DLPack "compact" convention) */
  uint64_t byte_offset;            /* data starts this far into the allocations */
  size_t bytes;                    /* byte_offset + the span the strides reach */
  void *host;                      /* the host copy: the generator writes it, the reference reads it */
  void *dev;                       /* the context-side copy, or NULL */
} tensor;

static int64_t tensor_numel(const tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

/* Describe a tensor. strides NULL = compact. The host copy is allocated and zeroed. */
static kvattn_status tensor_init(tensor *t, DLDataType dtype, int ndim, const int64_t *shape,
                                 const int64_t *strides, uint64_t byte_offset) {
  memset(t, 0, sizeof *t);
  t->dtype = dtype;
  t->ndim = ndim;
  t->compact = strides == NULL;
  t->byte_offset = byte_offset;
  int64_t stride = 1, span = 1, empty = 0;
  for (int i = ndim - 1; i >= 0; i--) {
    t->shape[i] = shape[i];
    t->strides[i] = strides ? strides[i] : stride;
    stride *= shape[i];
    if (shape[i] == 0) empty = 1;
    span += (shape[i] - 1) * t->strides[i];
  }
  if (empty) span = 0;
  t->bytes = byte_offset + (size_t)span * elem_size(dtype);
  t->host = calloc(1, t->bytes ? t->bytes : 1);
  RETURN_IF(!t->host, KVATTN_ERROR_OUT_OF_MEMORY, "allocating a %zu-byte host tensor", t->bytes);
  return KVATTN_SUCCESS;
}

static void tensor_free(tensor *t) {
  free(t->host);
  dev_free(t->dev);
  t->host = t->dev = NULL;
}

/* The context-side copy, holding the host copy's bytes. */
static kvattn_status tensor_upload(tensor *t) {
  if (!t->dev) TRY(dev_alloc(t->bytes, &t->dev));
  return dev_upload(t->dev, t->host, t->bytes);
}

static kvattn_status tensor_download(const tensor *t, void *dst) { return dev_download(dst, t->dev, t->bytes); }

/* A DLTensor over the host copy (side 0, what the reference reads) or the context side (1). */
static DLTensor tensor_dl(tensor *t, int side) {
  DLTensor d;
  memset(&d, 0, sizeof d);
  d.data = side ? t->dev : t->host;
  d.device = side ? g_dev.device : (DLDevice){kDLCPU, 0};
  d.ndim = t->ndim;
  d.dtype = t->dtype;
  d.shape = t->shape;
  d.strides = t->compact ? NULL : t->strides;
  d.byte_offset = t->byte_offset;
  return d;
}

/* Element `index` (row-major over the shape) of a tensor laid out in `base` (a copy of its bytes). */
static int64_t tensor_offset(const tensor *t, int64_t index) {
  int64_t off = 0;
  for (int i = t->ndim - 1; i >= 0; i--) {
    off += (index % t->shape[i]) * t->strides[i];
    index /= t->shape[i];
  }
  return off;
}
static double tensor_get(const tensor *t, const void *base, int64_t index) {
  return load_elem(t->dtype, (const char *)base + t->byte_offset, tensor_offset(t, index));
}
static void tensor_set(const tensor *t, void *base, int64_t index, double v) {
  store_elem(t->dtype, (char *)base + t->byte_offset, tensor_offset(t, index), v);
}

static void tensor_fill_random(tensor *t, rng *r) {
  int64_t n = tensor_numel(t);
  for (int64_t i = 0; i < n; i++) tensor_set(t, t->host, i, rng_value(r));
}

/* Fill every byte of the host copy (padding included) with NaN of the tensor's float dtype: unused
 * cache slots and outputs start as NaN, so a kernel that reads past the data or skips a write shows. */
static void tensor_poison(tensor *t) {
  size_t es = elem_size(t->dtype), n = t->bytes / es;
  for (size_t i = 0; i < n; i++) {
    if (es == 2) ((uint16_t *)t->host)[i] = same_dtype(t->dtype, T_BF16) ? 0x7FC0 : 0x7E00;
    else if (es == 4) ((float *)t->host)[i] = NAN;
    else if (es == 8) ((double *)t->host)[i] = NAN;
  }
}

/* Padded strides for a non-contiguous view: the last dimension is followed by `pad_last` unused
 * elements and the first dimension's stride gets `pad_first` more. */
static void padded_strides(int ndim, const int64_t *shape, int64_t pad_last, int64_t pad_first, int64_t *strides) {
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    strides[i] = stride;
    stride *= shape[i] + (i == ndim - 1 ? pad_last : 0);
  }
  strides[0] += pad_first;
}

/* ======================================================================== */
/* One attention problem, run on a backend and on the reference             */
/* ======================================================================== */

typedef struct attn_case {
  kvattn_attention_desc desc; /* what the backend under test gets */
  int format, layout;
  int batch_size;
  int32_t *qo_indptr;         /* host [batch+1]; NULL = decode, one query token per request */
  int32_t *kv_indptr;         /* host [rows+1] */
  int32_t *kv_indices;        /* host [kv entries] (paged, BSR) */
  int32_t *last_page_len;     /* host [batch] (paged) */
  int give_host_indices;      /* 1: plan gets kv_indices too (and checks them) */
  int page_size;
  int64_t num_pages;
  int block_rows, block_cols;
  int64_t num_rows, num_cols;
  int rows;                   /* work rows: batch_size, or BSR block rows */
  int64_t qo_tokens;
  int combined_kv;            /* paged: one [pages, 2, ...] tensor instead of k and v */
  int want_lse;
  int shared_cache;           /* 1: k, v, kv belong to a paged_cache (not freed here) */
  tensor q, k, v, kv, indices, mask;
  int rotations;              /* bench: runs cycle over these copies of k and v (0: only k, v) ... */
  void **rot_k, **rot_v;      /* ... context-side copies, so a sample's runs do not find KV in L2 */
  tensor out, lse;            /* the backend's outputs; the host copy receives the download */
  tensor ref_out, ref_lse;    /* the reference's outputs (host only): float64, float32 */
  char what[200];             /* a one-line description */
} attn_case;

static void case_free(attn_case *c) {
  for (int i = 1; i < c->rotations; i++) { /* [0] is the cache itself */
    dev_free(c->rot_k[i]);
    dev_free(c->rot_v[i]);
  }
  free(c->rot_k);
  free(c->rot_v);
  free(c->qo_indptr);
  free(c->kv_indptr);
  free(c->kv_indices);
  free(c->last_page_len);
  if (!c->shared_cache) {
    tensor_free(&c->k);
    tensor_free(&c->v);
    tensor_free(&c->kv);
  }
  tensor_free(&c->q);
  tensor_free(&c->indices);
  tensor_free(&c->mask);
  tensor_free(&c->out);
  tensor_free(&c->lse);
  tensor_free(&c->ref_out);
  tensor_free(&c->ref_lse);
  memset(c, 0, sizeof *c);
}

static kvattn_batch case_batch(const attn_case *c) {
  kvattn_batch b = KVATTN_BATCH_INIT;
  b.format = c->format;
  b.batch_size = c->batch_size;
  b.qo_indptr = c->qo_indptr;
  b.kv_indptr = c->kv_indptr;
  b.kv_indices = c->give_host_indices ? c->kv_indices : NULL;
  b.kv_last_page_len = c->last_page_len;
  b.page_size = c->page_size;
  b.num_pages = c->num_pages;
  b.block_rows = c->block_rows;
  b.block_cols = c->block_cols;
  b.num_rows = c->num_rows;
  b.num_cols = c->num_cols;
  return b;
}

/* The outputs: [qo_tokens, qo_heads, head_dim] in o_dtype and float32 [qo_tokens, qo_heads], and
 * the reference's float64 twin. */
static kvattn_status case_alloc_outputs(attn_case *c) {
  const kvattn_attention_desc *d = &c->desc;
  DLDataType o_dtype = d->o_dtype.bits ? d->o_dtype : d->q_dtype.bits ? d->q_dtype : T_F16;
  int64_t oshape[3] = {c->qo_tokens, d->num_qo_heads, d->head_dim};
  TRY(tensor_init(&c->out, o_dtype, 3, oshape, NULL, 0));
  TRY(tensor_init(&c->ref_out, T_F64, 3, oshape, NULL, 0));
  TRY(tensor_init(&c->lse, T_F32, 2, oshape, NULL, 0));
  TRY(tensor_init(&c->ref_lse, T_F32, 2, oshape, NULL, 0));
  return KVATTN_SUCCESS;
}

typedef struct exec_result {
  kvattn_status status;
  const char *step;  /* the call that failed */
  char text[1200];   /* its status and detail */
  double plan_us;    /* median host time of kvattn_plan */
  double run_us;     /* median time of kvattn_run (GPU: to completion) */
} exec_result;

/* Create the attention, size and allocate the workspace, then `samples` times: plan, and `inner`
 * runs. side 1: the context-side tensors; side 0: the host copies (the reference). */
static void exec_attention(kvattn_context *ctx, const kvattn_attention_desc *desc, attn_case *c, int side,
                           tensor *out, tensor *lse, int samples, int inner, exec_result *res) {
  memset(res, 0, sizeof *res);
  kvattn_status s = KVATTN_SUCCESS;
  kvattn_attention *attn = NULL;
  kvattn_workspace ws = {0};
  int ws_allocated = 0;
  double *plan_t = calloc(samples, sizeof(double)), *run_t = calloc(samples, sizeof(double));
#define STEP(name, call)      \
  do {                        \
    res->step = (name);       \
    s = (call);               \
    if (s) goto done;         \
  } while (0)
  STEP("allocating timing buffers", plan_t && run_t ? KVATTN_SUCCESS : KVATTN_ERROR_OUT_OF_MEMORY);
  kvattn_bounds bounds = KVATTN_BOUNDS_INIT;
  bounds.max_batch = c->rows > 0 ? c->rows : 1;
  bounds.max_qo_tokens = c->qo_tokens > 0 ? c->qo_tokens : 1;
  bounds.max_kv_entries = c->kv_indptr[c->rows] > 0 ? c->kv_indptr[c->rows] : 1;
  STEP("kvattn_attention_create", kvattn_attention_create(ctx, desc, &bounds, &attn));
  size_t dev_bytes = 0, host_bytes = 0;
  STEP("kvattn_workspace_size", kvattn_workspace_size(ctx, desc, &bounds, &dev_bytes, &host_bytes));
  STEP("kvattn_workspace_alloc", kvattn_workspace_alloc(ctx, dev_bytes, host_bytes, &ws));
  ws_allocated = 1;

  DLTensor q = tensor_dl(&c->q, side), k = tensor_dl(&c->k, side), v = tensor_dl(&c->v, side);
  DLTensor kvt = tensor_dl(&c->kv, side), idx = tensor_dl(&c->indices, side), mask = tensor_dl(&c->mask, side);
  DLTensor o = tensor_dl(out, side), l = tensor_dl(lse, side);
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.layout = c->layout;
  if (c->combined_kv) kv.kv = &kvt;
  else {
    kv.k = &k;
    kv.v = &v;
  }
  kv.indices = c->format == KVATTN_FORMAT_RAGGED ? NULL : &idx;
  kvattn_batch b = case_batch(c);
  for (int i = 0; i < samples; i++) {
    double t0 = now_us();
    STEP("kvattn_plan", kvattn_plan(attn, &b, &ws, NULL));
    double t1 = now_us();
    if (side) STEP("synchronizing after kvattn_plan", dev_sync());
    double t2 = now_us();
    for (int j = 0; j < inner; j++) {
      if (side && c->rotations > 0) {
        k.data = c->rot_k[j % c->rotations];
        v.data = c->rot_v[j % c->rotations];
      }
      STEP("kvattn_run", kvattn_run(attn, &q, &kv, c->desc.custom_mask ? &mask : NULL, &o,
                                    c->want_lse ? &l : NULL, NULL));
    }
    if (side) STEP("synchronizing after kvattn_run", dev_sync());
    double t3 = now_us();
    plan_t[i] = t1 - t0;
    run_t[i] = (t3 - t2) / inner;
  }
#undef STEP
done:
  res->status = s;
  if (s) status_text(s, res->text, sizeof res->text);
  else {
    res->plan_us = median(plan_t, samples);
    res->run_us = median(run_t, samples);
  }
  if (ws_allocated) kvattn_workspace_free(ctx, &ws);
  kvattn_attention_destroy(attn);
  free(plan_t);
  free(run_t);
}

typedef struct cmp_result {
  double max_rel;      /* max over (token, head) rows of |o - ref|_2 / |ref|_2 */
  double max_lse;      /* max over rows of |lse - ref| / (1 + |ref|) */
  int64_t nonfinite;   /* NaN or Inf in the output, NaN or +Inf in the LSE */
  int64_t empty_wrong; /* rows the reference finds fully masked (lse -inf) that are not 0 / -inf */
} cmp_result;

/* Compare the downloaded outputs (c->out.host, c->lse.host) with the reference's. */
static void compare_outputs(const attn_case *c, cmp_result *r) {
  memset(r, 0, sizeof *r);
  int64_t rows = c->qo_tokens * c->desc.num_qo_heads, dim = c->desc.head_dim;
  for (int64_t row = 0; row < rows; row++) {
    double ref_lse = tensor_get(&c->ref_lse, c->ref_lse.host, row);
    double diff2 = 0, ref2 = 0, out2 = 0;
    for (int64_t d = 0; d < dim; d++) {
      double o = tensor_get(&c->out, c->out.host, row * dim + d);
      double x = tensor_get(&c->ref_out, c->ref_out.host, row * dim + d);
      if (!isfinite(o)) r->nonfinite++;
      diff2 += (o - x) * (o - x);
      ref2 += x * x;
      out2 += o * o;
    }
    int empty = isinf(ref_lse) && ref_lse < 0;
    if (empty) {
      if (out2 != 0) r->empty_wrong++;
    } else if (ref2 > 0) {
      double rel = sqrt(diff2 / ref2);
      if (!(rel <= r->max_rel)) r->max_rel = rel; /* a NaN wins */
    } else if (diff2 > 0) {
      r->max_rel = INFINITY;
    }
    if (c->want_lse) {
      double l = tensor_get(&c->lse, c->lse.host, row);
      if (isnan(l) || (isinf(l) && l > 0)) r->nonfinite++;
      else if (empty != (isinf(l) && l < 0)) r->empty_wrong++;
      else if (!empty) {
        double e = fabs(l - ref_lse) / (1 + fabs(ref_lse));
        if (e > r->max_lse) r->max_lse = e;
      }
    }
  }
}

/* Tolerances by output dtype, relative (DESIGN.md): fp32 paths < 1e-5, fp16/bf16 inputs < 1e-2.
 * fp32 with RoPE gets 1e-4: the rotation angle pos * freq is rounded to fp32, an error that grows
 * with the position. The LSE of fp16/bf16 inputs gets 1e-3 relative to 1 + |lse|, and 1e-2 with RoPE:
 * a tensor-core kernel rounds the rotated q and k to the input dtype, one more rounding of the same
 * size as the inputs' own (seen on the H100: 2.8e-3 for bf16, head_dim 128). */
static void tolerances(const attn_case *c, double *out_tol, double *lse_tol) {
  DLDataType t = c->out.dtype;
  int wide = same_dtype(t, T_F32) || same_dtype(t, T_F64);
  int wide_in = same_dtype(c->q.dtype, T_F32) || same_dtype(c->q.dtype, T_F64);
  if (wide && wide_in) {
    *out_tol = c->desc.rope ? 1e-4 : 1e-5;
    *lse_tol = c->desc.rope ? 1e-4 : 1e-5;
  } else {
    *out_tol = 1e-2;
    *lse_tol = c->desc.rope ? 1e-2 : 1e-3;
  }
}

/* `kvattn check --perturb`: spoil the backend's output a little before the comparison, to show that
 * the comparison catches it. */
static int g_perturb = 0;

/* Add a tenth of the first row's reference norm to its first element (or write 1 there if the row is
 * fully masked). A case with no query rows has nothing to spoil. */
static void perturb_output(attn_case *c) {
  int64_t dim = c->desc.head_dim;
  if (c->qo_tokens * c->desc.num_qo_heads == 0) return;
  double norm2 = 0;
  for (int64_t d = 0; d < dim; d++) {
    double x = tensor_get(&c->ref_out, c->ref_out.host, d);
    norm2 += x * x;
  }
  double o = tensor_get(&c->out, c->out.host, 0);
  tensor_set(&c->out, c->out.host, 0, norm2 > 0 ? o + 0.1 * sqrt(norm2) : 1.0);
}

typedef struct verify_result {
  exec_result exec;    /* the backend under test */
  exec_result ref;     /* the reference */
  cmp_result cmp;
  double out_tol, lse_tol;
  int pass;
} verify_result;

/* Poison the outputs, run on ctx (timed), run the reference on the host copies, compare. */
static kvattn_status verify_case(kvattn_context *ctx, kvattn_context *ref, attn_case *c, int samples, int inner,
                                 verify_result *v) {
  memset(v, 0, sizeof *v);
  tensor_poison(&c->out);
  tensor_poison(&c->lse);
  tensor_poison(&c->ref_out);
  tensor_poison(&c->ref_lse);
  TRY(tensor_upload(&c->out));
  TRY(tensor_upload(&c->lse));
  exec_attention(ctx, &c->desc, c, 1, &c->out, &c->lse, samples, inner, &v->exec);
  if (v->exec.status) return v->exec.status;
  TRY(tensor_download(&c->out, c->out.host));
  TRY(tensor_download(&c->lse, c->lse.host));

  kvattn_attention_desc rd = c->desc;
  rd.o_dtype = T_F64;
  int want_lse = c->want_lse;
  c->want_lse = 1; /* the comparison needs the reference LSE to know the fully masked rows */
  exec_attention(ref, &rd, c, 0, &c->ref_out, &c->ref_lse, 1, 1, &v->ref);
  c->want_lse = want_lse;
  if (v->ref.status) return v->ref.status;
  if (g_perturb) perturb_output(c);
  compare_outputs(c, &v->cmp);
  tolerances(c, &v->out_tol, &v->lse_tol);
  v->pass = v->cmp.nonfinite == 0 && v->cmp.empty_wrong == 0 && v->cmp.max_rel <= v->out_tol &&
            v->cmp.max_lse <= v->lse_tol;
  return KVATTN_SUCCESS;
}

/* ======================================================================== */
/* A paged KV cache of variable-length requests (demo and bench)            */
/* ======================================================================== */

typedef struct paged_cache {
  int nreq;
  int32_t *cached;          /* [nreq] tokens in the cache before this step */
  int32_t *fresh;           /* [nreq] tokens this step adds (1 for a generating request) */
  int page_size, layout;
  DLDataType dtype;
  int kv_heads, head_dim;
  int64_t num_pages;
  int32_t *kv_indptr;       /* host [nreq+1]: the page table, sized for cached + fresh tokens */
  int32_t *kv_indices;      /* host [pages used]: scattered page ids, as a serving system's pool gives */
  int32_t *last_page_len;   /* host [nreq] */
  tensor k, v;              /* NHD [pages, page_size, kv_heads, head_dim] or HND [pages, kv_heads, page_size, head_dim] */
  tensor indices, indptr;   /* int32 copies of kv_indices and kv_indptr on the context side */
} paged_cache;

static void paged_cache_free(paged_cache *pc) {
  free(pc->cached);
  free(pc->fresh);
  free(pc->kv_indptr);
  free(pc->kv_indices);
  free(pc->last_page_len);
  tensor_free(&pc->k);
  tensor_free(&pc->v);
  tensor_free(&pc->indices);
  tensor_free(&pc->indptr);
  memset(pc, 0, sizeof *pc);
}

static int64_t cache_offset(const paged_cache *pc, int64_t page, int64_t slot, int64_t head, int64_t d) {
  if (pc->layout == KVATTN_LAYOUT_NHD)
    return ((page * pc->page_size + slot) * pc->kv_heads + head) * pc->head_dim + d;
  return ((page * pc->kv_heads + head) * pc->page_size + slot) * pc->head_dim + d;
}

/* The element of token `pos` of request `req` (head, d) in the cache. */
static int64_t token_offset(const paged_cache *pc, int req, int64_t pos, int64_t head, int64_t d) {
  int64_t page = pc->kv_indices[pc->kv_indptr[req] + pos / pc->page_size];
  return cache_offset(pc, page, pos % pc->page_size, head, d);
}

/* Lay out the page table (cached[] and fresh[] set by the caller), fill the cache: NaN everywhere,
 * random values in the cached tokens (and the fresh ones if `fill_fresh`; else the append writes
 * them), and put the cache and the page table on the context side. */
static kvattn_status paged_cache_build(paged_cache *pc, rng *r, int spare_pages, int fill_fresh) {
  int n = pc->nreq;
  pc->kv_indptr = calloc(n + 1, sizeof(int32_t));
  pc->last_page_len = calloc(n ? n : 1, sizeof(int32_t));
  RETURN_IF(!pc->kv_indptr || !pc->last_page_len, KVATTN_ERROR_OUT_OF_MEMORY, "page table");
  for (int i = 0; i < n; i++) {
    int64_t len = (int64_t)pc->cached[i] + pc->fresh[i];
    int64_t pages = ceil_div64(len, pc->page_size);
    RETURN_IF(pc->kv_indptr[i] + pages > INT32_MAX, KVATTN_ERROR_INVALID_ARGUMENT, "too many pages");
    pc->kv_indptr[i + 1] = (int32_t)(pc->kv_indptr[i] + pages);
    pc->last_page_len[i] = len ? (int32_t)(len - (pages - 1) * pc->page_size) : 0;
  }
  int64_t used = pc->kv_indptr[n];
  pc->num_pages = used + spare_pages;
  int32_t *pool = malloc(sizeof(int32_t) * (pc->num_pages ? pc->num_pages : 1));
  pc->kv_indices = malloc(sizeof(int32_t) * (used ? used : 1));
  if (!pool || !pc->kv_indices) {
    free(pool);
    return set_error(KVATTN_ERROR_OUT_OF_MEMORY, "page table");
  }
  for (int64_t i = 0; i < pc->num_pages; i++) pool[i] = (int32_t)i;
  for (int64_t i = pc->num_pages - 1; i > 0; i--) { /* shuffle: pages of a request are scattered */
    int64_t j = rng_int(r, 0, i);
    int32_t t = pool[i];
    pool[i] = pool[j];
    pool[j] = t;
  }
  memcpy(pc->kv_indices, pool, sizeof(int32_t) * used);
  free(pool);

  int64_t shape[4] = {pc->num_pages, pc->page_size, pc->kv_heads, pc->head_dim};
  if (pc->layout == KVATTN_LAYOUT_HND) {
    shape[1] = pc->kv_heads;
    shape[2] = pc->page_size;
  }
  TRY(tensor_init(&pc->k, pc->dtype, 4, shape, NULL, 0));
  TRY(tensor_init(&pc->v, pc->dtype, 4, shape, NULL, 0));
  tensor_poison(&pc->k);
  tensor_poison(&pc->v);
  for (int i = 0; i < n; i++) {
    int64_t filled = pc->cached[i] + (fill_fresh ? pc->fresh[i] : 0);
    for (int64_t pos = 0; pos < filled; pos++)
      for (int h = 0; h < pc->kv_heads; h++)
        for (int d = 0; d < pc->head_dim; d++) {
          int64_t off = token_offset(pc, i, pos, h, d);
          store_elem(pc->dtype, pc->k.host, off, rng_value(r));
          store_elem(pc->dtype, pc->v.host, off, rng_value(r));
        }
  }
  int64_t ishape[1] = {used}, pshape[1] = {n + 1};
  TRY(tensor_init(&pc->indices, T_I32, 1, ishape, NULL, 0));
  TRY(tensor_init(&pc->indptr, T_I32, 1, pshape, NULL, 0));
  memcpy(pc->indices.host, pc->kv_indices, sizeof(int32_t) * used);
  memcpy(pc->indptr.host, pc->kv_indptr, sizeof(int32_t) * (n + 1));
  TRY(tensor_upload(&pc->k));
  TRY(tensor_upload(&pc->v));
  TRY(tensor_upload(&pc->indices));
  TRY(tensor_upload(&pc->indptr));
  return KVATTN_SUCCESS;
}

/* An attention over requests reqs[0..n) of the cache: decode (one query token each, qo_indptr NULL)
 * or a chunk of fresh[i] query tokens each. The cache tensors are shared, not copied. */
static kvattn_status case_from_cache(attn_case *c, paged_cache *pc, const int *reqs, int n, int decode,
                                     const kvattn_attention_desc *desc, rng *r) {
  memset(c, 0, sizeof *c);
  c->desc = *desc;
  c->format = KVATTN_FORMAT_PAGED;
  c->layout = pc->layout;
  c->batch_size = c->rows = n;
  c->page_size = pc->page_size;
  c->num_pages = pc->num_pages;
  c->give_host_indices = 1;
  c->want_lse = 1;
  c->shared_cache = 1;
  c->k = pc->k;
  c->v = pc->v;
  c->kv_indptr = calloc(n + 1, sizeof(int32_t));
  c->last_page_len = calloc(n ? n : 1, sizeof(int32_t));
  c->qo_indptr = decode ? NULL : calloc(n + 1, sizeof(int32_t));
  RETURN_IF(!c->kv_indptr || !c->last_page_len || (!decode && !c->qo_indptr), KVATTN_ERROR_OUT_OF_MEMORY,
            "batch arrays");
  for (int i = 0; i < n; i++) {
    int q = reqs[i];
    c->kv_indptr[i + 1] = c->kv_indptr[i] + (pc->kv_indptr[q + 1] - pc->kv_indptr[q]);
    c->last_page_len[i] = pc->last_page_len[q];
    if (!decode) c->qo_indptr[i + 1] = c->qo_indptr[i] + pc->fresh[q];
  }
  c->qo_tokens = decode ? n : c->qo_indptr[n];
  int64_t entries = c->kv_indptr[n];
  c->kv_indices = malloc(sizeof(int32_t) * (entries ? entries : 1));
  RETURN_IF(!c->kv_indices, KVATTN_ERROR_OUT_OF_MEMORY, "batch arrays");
  for (int i = 0; i < n; i++)
    memcpy(c->kv_indices + c->kv_indptr[i], pc->kv_indices + pc->kv_indptr[reqs[i]],
           sizeof(int32_t) * (c->kv_indptr[i + 1] - c->kv_indptr[i]));
  int64_t ishape[1] = {entries};
  TRY(tensor_init(&c->indices, T_I32, 1, ishape, NULL, 0));
  memcpy(c->indices.host, c->kv_indices, sizeof(int32_t) * entries);
  TRY(tensor_upload(&c->indices));
  int64_t qshape[3] = {c->qo_tokens, desc->num_qo_heads, desc->head_dim};
  TRY(tensor_init(&c->q, desc->q_dtype, 3, qshape, NULL, 0));
  tensor_fill_random(&c->q, r);
  TRY(tensor_upload(&c->q));
  TRY(case_alloc_outputs(c));
  return KVATTN_SUCCESS;
}

/* Bytes an attention must move at least: q, K and V of every request once, the output, the LSE and
 * the page ids. (A prefill kernel re-reads K/V per query tile; that is traffic, not bytes moved.) */
static double attention_bytes(const attn_case *c) {
  const kvattn_attention_desc *d = &c->desc;
  double kv_tokens = 0;
  for (int i = 0; i < c->rows; i++) {
    int64_t pages = c->kv_indptr[i + 1] - c->kv_indptr[i];
    if (pages > 0) kv_tokens += (double)(pages - 1) * c->page_size + c->last_page_len[i];
  }
  double es_q = elem_size(c->q.dtype), es_kv = elem_size(c->k.dtype), es_o = elem_size(c->out.dtype);
  return c->qo_tokens * (double)d->num_qo_heads * d->head_dim * (es_q + es_o) +
         2.0 * kv_tokens * d->num_kv_heads * d->head_dim * es_kv +
         (c->want_lse ? 4.0 * c->qo_tokens * d->num_qo_heads : 0) + 4.0 * c->kv_indptr[c->rows];
}

/* FLOPs: 2 per multiply-add of QK^T and of PV, over the (query, key) pairs the mask keeps (causal:
 * bottom-right aligned, so request i's row r sees kv_len - qo_len + r + 1 keys). */
static double attention_flops(const attn_case *c) {
  const kvattn_attention_desc *d = &c->desc;
  double pairs = 0;
  for (int i = 0; i < c->rows; i++) {
    int64_t pages = c->kv_indptr[i + 1] - c->kv_indptr[i];
    int64_t kv_len = pages > 0 ? (pages - 1) * c->page_size + c->last_page_len[i] : 0;
    int64_t qo_len = c->qo_indptr ? c->qo_indptr[i + 1] - c->qo_indptr[i] : 1;
    for (int64_t row = 0; row < qo_len; row++) {
      int64_t seen = kv_len;
      if (d->causal) {
        seen = kv_len - qo_len + row + 1;
        if (seen < 0) seen = 0;
        if (seen > kv_len) seen = kv_len;
      }
      pairs += seen;
    }
  }
  return 4.0 * pairs * d->num_qo_heads * d->head_dim;
}

/* ======================================================================== */
/* Append (demo and bench)                                                  */
/* ======================================================================== */

typedef struct append_job {
  tensor k_new, v_new;     /* [tokens, kv_heads, head_dim] */
  tensor batch_indices;    /* int32 [tokens] */
  tensor positions;        /* int32 [tokens] */
  int64_t tokens;
} append_job;

static void append_job_free(append_job *a) {
  tensor_free(&a->k_new);
  tensor_free(&a->v_new);
  tensor_free(&a->batch_indices);
  tensor_free(&a->positions);
}

/* The fresh tokens of every request: request i's land at positions cached[i] .. cached[i]+fresh[i]-1. */
static kvattn_status append_job_build(append_job *a, const paged_cache *pc, rng *r) {
  memset(a, 0, sizeof *a);
  for (int i = 0; i < pc->nreq; i++) a->tokens += pc->fresh[i];
  int64_t shape[3] = {a->tokens, pc->kv_heads, pc->head_dim}, ishape[1] = {a->tokens};
  TRY(tensor_init(&a->k_new, pc->dtype, 3, shape, NULL, 0));
  TRY(tensor_init(&a->v_new, pc->dtype, 3, shape, NULL, 0));
  TRY(tensor_init(&a->batch_indices, T_I32, 1, ishape, NULL, 0));
  TRY(tensor_init(&a->positions, T_I32, 1, ishape, NULL, 0));
  tensor_fill_random(&a->k_new, r);
  tensor_fill_random(&a->v_new, r);
  int64_t t = 0;
  for (int i = 0; i < pc->nreq; i++)
    for (int j = 0; j < pc->fresh[i]; j++, t++) {
      ((int32_t *)a->batch_indices.host)[t] = i;
      ((int32_t *)a->positions.host)[t] = pc->cached[i] + j;
    }
  TRY(tensor_upload(&a->k_new));
  TRY(tensor_upload(&a->v_new));
  TRY(tensor_upload(&a->batch_indices));
  TRY(tensor_upload(&a->positions));
  return KVATTN_SUCCESS;
}

static double append_bytes(const append_job *a, const paged_cache *pc) {
  /* read k_new and v_new, write them into the cache, read the token's request and position */
  return 4.0 * a->tokens * pc->kv_heads * pc->head_dim * elem_size(pc->dtype) + 8.0 * a->tokens;
}

/* kvattn_append_paged_kv on the context side (side 1) or on the host copies (side 0). */
static kvattn_status run_append(kvattn_context *ctx, append_job *a, paged_cache *pc, int side) {
  DLTensor kn = tensor_dl(&a->k_new, side), vn = tensor_dl(&a->v_new, side);
  DLTensor bi = tensor_dl(&a->batch_indices, side), pos = tensor_dl(&a->positions, side);
  DLTensor k = tensor_dl(&pc->k, side), v = tensor_dl(&pc->v, side);
  DLTensor idx = tensor_dl(&pc->indices, side), indptr = tensor_dl(&pc->indptr, side);
  kvattn_kv kv = KVATTN_KV_INIT;
  kv.layout = pc->layout;
  kv.k = &k;
  kv.v = &v;
  kv.indices = &idx;
  TRY(kvattn_append_paged_kv(ctx, &kn, &vn, &bi, &pos, &kv, &indptr, NULL));
  if (side) TRY(dev_sync());
  return KVATTN_SUCCESS;
}

static kvattn_status run_append_reps(kvattn_context *ctx, append_job *a, paged_cache *pc, int reps);

/* The cache after the backend's append (downloaded) against the cache after the reference's:
 * bit-equal is the only pass (an append is a copy). Returns the number of differing elements and
 * the largest relative difference among them. */
static kvattn_status compare_caches(const paged_cache *pc, int64_t *differing, double *max_rel) {
  *differing = 0;
  *max_rel = 0;
  const tensor *ts[2] = {&pc->k, &pc->v};
  size_t es = elem_size(pc->dtype);
  for (int w = 0; w < 2; w++) {
    char *got = malloc(ts[w]->bytes ? ts[w]->bytes : 1);
    RETURN_IF(!got, KVATTN_ERROR_OUT_OF_MEMORY, "cache download buffer");
    kvattn_status s = tensor_download(ts[w], got);
    if (s) {
      free(got);
      return s;
    }
    size_t n = ts[w]->bytes / es;
    for (size_t i = 0; i < n; i++) {
      if (!memcmp(got + i * es, (char *)ts[w]->host + i * es, es)) continue;
      (*differing)++;
      double x = load_elem(pc->dtype, got, i), y = load_elem(pc->dtype, ts[w]->host, i);
      double rel = fabs(x - y) / (fabs(y) > 0 ? fabs(y) : 1);
      if (!(rel <= *max_rel)) *max_rel = isnan(rel) ? INFINITY : rel;
    }
    free(got);
  }
  return KVATTN_SUCCESS;
}

/* ======================================================================== */
/* Contexts                                                                 */
/* ======================================================================== */

static const char *const BACKENDS = "auto|cpu|cuda|reference"; /* indices = kvattn_backend values */

static const char *backend_name(kvattn_backend b) {
  switch (b) {
  case KVATTN_BACKEND_CPU: return "cpu";
  case KVATTN_BACKEND_CUDA: return "cuda";
  case KVATTN_BACKEND_REFERENCE: return "reference";
  default: return "auto";
  }
}

/* The context under test (and its memory), and the float64 reference context. Returns an exit code. */
/* The CUDA device ordinal of the commands that create contexts (--device). */
static int64_t g_device_id = 0;

static int open_contexts(int backend, int64_t threads, kvattn_context **ctx, kvattn_context **ref) {
  kvattn_options opt = KVATTN_OPTIONS_INIT;
  opt.backend = backend;
  opt.num_threads = (int32_t)threads;
  opt.device_id = (int32_t)g_device_id;
  *ctx = NULL;
  if (ref) *ref = NULL;
  kvattn_status s = kvattn_context_create(&opt, ctx);
  if (s) {
    char what[64];
    snprintf(what, sizeof what, "creating the %s context", backend_name((kvattn_backend)backend));
    return library_error(what, s);
  }
  s = devmem_init(*ctx);
  if (s) return library_error("preparing device memory for the context", s);
  if (ref) {
    opt.backend = KVATTN_BACKEND_REFERENCE;
    s = kvattn_context_create(&opt, ref);
    if (s) return library_error("creating the reference context", s);
  }
  return EXIT_OK;
}

/* The first line of kvattn_context_info(). */
static void context_summary(kvattn_context *ctx, char *buf, size_t size) {
  if (kvattn_context_info(ctx, buf, size) != KVATTN_SUCCESS) {
    kvattn_backend b = KVATTN_BACKEND_AUTO;
    kvattn_context_backend(ctx, &b);
    snprintf(buf, size, "%s", backend_name(b));
  }
  char *nl = strchr(buf, '\n');
  if (nl) *nl = 0;
}

static kvattn_attention_desc make_desc(int qo_heads, int kv_heads, int head_dim, DLDataType dtype, int causal) {
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  d.num_qo_heads = qo_heads;
  d.num_kv_heads = kv_heads;
  d.head_dim = head_dim;
  d.q_dtype = d.kv_dtype = d.o_dtype = dtype;
  d.causal = causal;
  return d;
}

/* ======================================================================== */
/* kvattn demo                                                              */
/* ======================================================================== */

enum { ROW_PASS, ROW_FAIL, ROW_ERROR };

typedef struct demo_row {
  const char *op;
  char shape[112];
  double us, bytes;
  double err;       /* max relative error (append: of the differing elements) */
  int exact;        /* append: bit-exact */
  int state;        /* ROW_PASS, ROW_FAIL, ROW_ERROR */
  char note[1300];  /* why it failed */
} demo_row;

static void kv_len_range(const attn_case *c, int64_t *lo, int64_t *hi, int64_t *sum) {
  *lo = INT64_MAX;
  *hi = *sum = 0;
  for (int i = 0; i < c->rows; i++) {
    int64_t pages = c->kv_indptr[i + 1] - c->kv_indptr[i];
    int64_t len = pages > 0 ? (pages - 1) * c->page_size + c->last_page_len[i] : 0;
    if (len < *lo) *lo = len;
    if (len > *hi) *hi = len;
    *sum += len;
  }
  if (*lo == INT64_MAX) *lo = 0;
}

static void demo_attention_row(kvattn_context *ctx, kvattn_context *ref, attn_case *c, int runs, demo_row *row) {
  verify_result v;
  kvattn_status s = verify_case(ctx, ref, c, runs, g_dev.cuda ? 10 : 1, &v);
  if (s) {
    row->state = ROW_ERROR;
    const exec_result *e = v.exec.status ? &v.exec : &v.ref;
    if (e->status) snprintf(row->note, sizeof row->note, "%s%s: %s", e == &v.ref ? "reference " : "", e->step, e->text);
    else status_text(s, row->note, sizeof row->note);
    return;
  }
  row->us = v.exec.run_us;
  row->bytes = attention_bytes(c);
  row->err = v.cmp.max_rel;
  row->state = v.pass ? ROW_PASS : ROW_FAIL;
  if (!v.pass)
    snprintf(row->note, sizeof row->note,
             "max rel err %.3g (tolerance %.0e), LSE err %.3g (tolerance %.0e), %" PRId64
             " non-finite values, %" PRId64 " fully masked rows not 0/-inf",
             v.cmp.max_rel, v.out_tol, v.cmp.max_lse, v.lse_tol, v.cmp.nonfinite, v.cmp.empty_wrong);
}

static int cmd_demo(int argc, char **argv) {
  int backend = KVATTN_BACKEND_AUTO, dtype_choice = 1;
  int64_t seed = 1, threads = 0, runs = 5;
  opt_def defs[] = {
      {"--backend", OPT_CHOICE, &backend, 0, 0, BACKENDS, "backend under test (default auto: CUDA when usable, else CPU)", 0},
      {"--seed", OPT_INT, &seed, 0, INT64_MAX, NULL, "seed of the request lengths and the data (default 1)", 0},
      {"--dtype", OPT_CHOICE, &dtype_choice, 0, 0, "f16|bf16", "q, KV and output dtype (default bf16)", 0},
      {"--threads", OPT_INT, &threads, 0, 4096, NULL, "CPU worker threads (default 0: one per core)", 0},
      {"--device", OPT_INT, &g_device_id, 0, 1024, NULL, "CUDA device ordinal (default 0)", 0},
      {"--runs", OPT_INT, &runs, 1, 10000, NULL, "timed runs of each op, the median is shown (default 5)", 0},
  };
  int ndefs = (int)(sizeof defs / sizeof defs[0]);
  int p = parse_options(argc, argv, defs, ndefs);
  if (p == -1) {
    printf("Usage: kvattn demo [options]\n\n"
           "One serving step over a paged KV cache of variable-length requests, each op checked against\n"
           "the float64 reference (a KVATTN_BACKEND_REFERENCE context on host copies of the same data):\n"
           "  append   the step's new K/V tokens of every request into their pages (kvattn_append_paged_kv)\n"
           "  decode   one query token for each generating request (plan/run)\n"
           "  prefill  a causal prompt chunk for each new request, against its pages (plan/run)\n"
           "Llama-3.1-8B attention shape: 32 query heads, 8 KV heads, head_dim 128, page_size 16.\n"
           "Unused cache slots and outputs start as NaN. Prints a table; exits 1 if a check fails.\n\n");
    print_options(defs, ndefs);
    return EXIT_OK;
  }
  if (p) return p;

  kvattn_context *ctx = NULL, *ref = NULL;
  int rc = open_contexts(backend, threads, &ctx, &ref);
  if (rc) {
    kvattn_context_destroy(ctx);
    kvattn_context_destroy(ref);
    return rc;
  }
  DLDataType dtype = dtype_choice == 0 ? T_F16 : T_BF16;
  const int qo_heads = 32, kv_heads = 8, head_dim = 128, page_size = 16, ndecode = 8, nreq = 10;
  rng r = {(uint64_t)seed};
  paged_cache pc;
  memset(&pc, 0, sizeof pc);
  pc.nreq = nreq;
  pc.page_size = page_size;
  pc.layout = KVATTN_LAYOUT_NHD;
  pc.dtype = dtype;
  pc.kv_heads = kv_heads;
  pc.head_dim = head_dim;
  pc.cached = calloc(nreq, sizeof(int32_t));
  pc.fresh = calloc(nreq, sizeof(int32_t));
  append_job aj;
  memset(&aj, 0, sizeof aj);
  attn_case dc, pf;
  memset(&dc, 0, sizeof dc);
  memset(&pf, 0, sizeof pf);
  demo_row rows[3];
  memset(rows, 0, sizeof rows);
  kvattn_status s = KVATTN_SUCCESS;
  const char *failed = "";
  if (!pc.cached || !pc.fresh) {
    s = KVATTN_ERROR_OUT_OF_MEMORY;
    goto setup_failed;
  }
  /* Generating requests: lengths skewed towards short, as in a serving batch. New requests: one
   * prompt's first chunk (nothing cached) and one later chunk of a long prompt (a cached prefix). */
  for (int i = 0; i < ndecode; i++) {
    double u = rng_uniform(&r);
    pc.cached[i] = 15 + (int32_t)(1200 * u * u);
    pc.fresh[i] = 1;
  }
  pc.cached[8] = 0;
  pc.fresh[8] = 32 + (int32_t)rng_int(&r, 0, 48);
  pc.cached[9] = 64 + (int32_t)rng_int(&r, 0, 128);
  pc.fresh[9] = 48 + (int32_t)rng_int(&r, 0, 48);
  failed = "building the paged cache";
  if ((s = paged_cache_build(&pc, &r, 6, 0))) goto setup_failed;
  failed = "building the append";
  if ((s = append_job_build(&aj, &pc, &r))) goto setup_failed;
  int decode_reqs[8] = {0, 1, 2, 3, 4, 5, 6, 7}, prefill_reqs[2] = {8, 9};
  kvattn_attention_desc desc = make_desc(qo_heads, kv_heads, head_dim, dtype, 0);
  failed = "building the decode batch";
  if ((s = case_from_cache(&dc, &pc, decode_reqs, ndecode, 1, &desc, &r))) goto setup_failed;
  desc.causal = 1;
  failed = "building the prefill batch";
  if ((s = case_from_cache(&pf, &pc, prefill_reqs, 2, 0, &desc, &r))) goto setup_failed;

  char info[512];
  context_summary(ctx, info, sizeof info);
  printf("kvattn %s demo: one serving step on %s\n", kvattn_version(), info);
  printf("  %d requests: %d generating (one new token each), 2 new (prompt chunks of %d tokens from scratch,\n"
         "  and %d tokens after a cached prefix of %d); heads %d q / %d kv, head_dim %d, %s, page_size %d\n\n",
         nreq, ndecode, pc.fresh[8], pc.fresh[9], pc.cached[9], qo_heads, kv_heads, head_dim, short_dtype(dtype),
         page_size);

  /* (a) append the step's tokens: timed on the context, then once on the reference's host copy */
  {
    demo_row *row = &rows[0];
    row->op = "append";
    snprintf(row->shape, sizeof row->shape, "%" PRId64 " new tokens of %d requests into %" PRId64 " pages",
             aj.tokens, nreq, pc.num_pages);
    double *t = calloc(runs, sizeof(double));
    kvattn_status as = t ? KVATTN_SUCCESS : KVATTN_ERROR_OUT_OF_MEMORY;
    int inner = g_dev.cuda ? 10 : 1;
    for (int i = 0; i < runs && !as; i++) { /* appending the same tokens again rewrites the same bytes */
      double t0 = now_us();
      as = run_append_reps(ctx, &aj, &pc, inner);
      t[i] = (now_us() - t0) / inner;
    }
    if (as) {
      row->state = ROW_ERROR;
      status_text(as, row->note, sizeof row->note);
    } else {
      row->us = median(t, (int)runs);
      row->bytes = append_bytes(&aj, &pc);
    }
    free(t);
    kvattn_status rs = run_append(ref, &aj, &pc, 0);
    if (rs) {
      row->state = ROW_ERROR;
      char text[1200];
      status_text(rs, text, sizeof text);
      snprintf(row->note, sizeof row->note, "reference append: %s", text);
      s = rs;
      failed = "the reference append";
      goto setup_failed; /* without the reference cache nothing below can be judged */
    }
    if (!as) {
      int64_t differing = 0;
      if ((s = compare_caches(&pc, &differing, &row->err))) {
        failed = "reading back the cache";
        goto setup_failed;
      }
      row->exact = differing == 0;
      row->state = differing == 0 ? ROW_PASS : ROW_FAIL;
      if (differing)
        snprintf(row->note, sizeof row->note, "%" PRId64 " cache elements differ from the reference's append",
                 differing);
    }
    if (row->state != ROW_PASS) { /* judge the attention ops on their own: give them the right cache */
      if ((s = tensor_upload(&pc.k)) || (s = tensor_upload(&pc.v))) {
        failed = "uploading the cache";
        goto setup_failed;
      }
    }
  }
  /* (b) decode for the generating requests, (c) a causal prefill chunk for the new ones */
  int64_t lo, hi, sum;
  rows[1].op = "decode";
  kv_len_range(&dc, &lo, &hi, &sum);
  snprintf(rows[1].shape, sizeof rows[1].shape, "%d requests x 1 query, kv %" PRId64 "..%" PRId64 " (%" PRId64 " tokens)",
           dc.rows, lo, hi, sum);
  demo_attention_row(ctx, ref, &dc, (int)runs, &rows[1]);
  rows[2].op = "prefill";
  snprintf(rows[2].shape, sizeof rows[2].shape, "2 requests, %d+%d queries, kv %d+%d, causal", pc.fresh[8],
           pc.fresh[9], pc.cached[8] + pc.fresh[8], pc.cached[9] + pc.fresh[9]);
  demo_attention_row(ctx, ref, &pf, (int)runs, &rows[2]);

  printf("%-8s %-52s %10s %10s %8s %12s  %s\n", "op", "shape", "time", "bytes", "GB/s", "max rel err", "check");
  int any_fail = 0, any_error = 0;
  for (int i = 0; i < 3; i++) {
    demo_row *row = &rows[i];
    char tb[32], bb[32], eb[32], gb[32];
    if (row->state == ROW_ERROR) {
      printf("%-8s %-52s %10s %10s %8s %12s  %s\n", row->op, row->shape, "-", "-", "-", "-", "ERROR");
      any_error = 1;
      continue;
    }
    if (row->exact) snprintf(eb, sizeof eb, "0 (exact)");
    else snprintf(eb, sizeof eb, "%.2e", row->err);
    snprintf(gb, sizeof gb, "%.2f", row->us > 0 ? row->bytes / (row->us * 1e3) : 0);
    printf("%-8s %-52s %10s %10s %8s %12s  %s\n", row->op, row->shape, fmt_time(row->us, tb, sizeof tb),
           fmt_bytes(row->bytes, bb, sizeof bb), gb, eb, row->state == ROW_PASS ? "PASS" : "FAIL");
    if (row->state == ROW_FAIL) any_fail = 1;
  }
  printf("\ntime: the median of %" PRId64 " runs of the op%s; plan is host work (see `kvattn bench`).\n"
         "bytes: the least each op must move (q, K/V once, out, LSE, page ids).\n"
         "max rel err: over (token, head) rows, |o - ref| / |ref| against the float64 reference; pass below\n"
         "1e-2 for %s (LSE within 1e-3); the append must be bit-exact.\n",
         runs, g_dev.cuda ? " (each the mean of 10 back-to-back runs)" : "", short_dtype(dtype));
  for (int i = 0; i < 3; i++)
    if (rows[i].state != ROW_PASS) fprintf(stderr, "%s: %s %s: %s\n", g_cmd, rows[i].op, rows[i].state == ROW_ERROR ? "error" : "check failed", rows[i].note);
  rc = any_error ? EXIT_LIBRARY : any_fail ? EXIT_CHECK_FAILED : EXIT_OK;
  printf("%s\n", rc == EXIT_OK ? "demo: all checks passed" : any_error ? "demo: a library call failed" : "demo: a check FAILED");
  goto cleanup;

setup_failed:
  rc = library_error(failed, s);
cleanup:
  case_free(&dc);
  case_free(&pf);
  append_job_free(&aj);
  paged_cache_free(&pc);
  kvattn_context_destroy(ref);
  kvattn_context_destroy(ctx);
  return rc;
}

/* ======================================================================== */
/* kvattn check: random cases against the reference                         */
/* ======================================================================== */

static void appendf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void appendf(char *buf, size_t size, const char *fmt, ...) {
  size_t len = strlen(buf);
  if (len + 1 >= size) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + len, size - len, fmt, ap);
  va_end(ap);
}

static int64_t random_kv_len(rng *r) {
  double u = rng_uniform(r);
  return u < 0.1 ? 0 : u < 0.8 ? rng_int(r, 1, 160) : rng_int(r, 161, 600);
}
static int64_t random_qo_len(rng *r) {
  double u = rng_uniform(r);
  return u < 0.1 ? 0 : u < 0.9 ? rng_int(r, 1, 16) : rng_int(r, 17, 40);
}

/* A K/V tensor of `shape`, maybe a non-contiguous view (padded rows and pages) at a byte offset,
 * all NaN until the data is written. */
static kvattn_status make_kv_tensor(tensor *t, DLDataType dtype, int ndim, const int64_t *shape, int strided,
                                    uint64_t byte_offset) {
  int64_t strides[TVIEW_MAX_DIMS];
  if (strided) padded_strides(ndim, shape, 8, 8 * (1 + (shape[0] % 3)), strides);
  TRY(tensor_init(t, dtype, ndim, shape, strided ? strides : NULL, byte_offset));
  tensor_poison(t);
  return KVATTN_SUCCESS;
}

/* Write random K and V for token `tok` (paged: of page `page`, slot `slot`; else tok) of every head. */
static void fill_kv_token(attn_case *c, rng *r, int64_t page, int64_t slot, int64_t tok) {
  const kvattn_attention_desc *d = &c->desc;
  for (int h = 0; h < d->num_kv_heads; h++)
    for (int e = 0; e < d->head_dim; e++)
      for (int w = 0; w < 2; w++) {
        int64_t idx;
        tensor *t;
        int nhd = c->layout == KVATTN_LAYOUT_NHD;
        int64_t H = d->num_kv_heads, D = d->head_dim, P = c->page_size;
        if (c->format != KVATTN_FORMAT_PAGED) { /* [tokens, H, D] or [H, tokens, D] */
          int64_t T = c->k.shape[nhd ? 0 : 1];
          idx = nhd ? (tok * H + h) * D + e : ((int64_t)h * T + tok) * D + e;
          t = w ? &c->v : &c->k;
        } else if (c->combined_kv) { /* [pages, 2, P, H, D] or [pages, 2, H, P, D] */
          idx = nhd ? (((page * 2 + w) * P + slot) * H + h) * D + e : (((page * 2 + w) * H + h) * P + slot) * D + e;
          t = &c->kv;
        } else {
          idx = nhd ? ((page * P + slot) * H + h) * D + e : ((page * H + h) * P + slot) * D + e;
          t = w ? &c->v : &c->k;
        }
        tensor_set(t, t->host, idx, rng_value(r));
      }
}

/* What a sweep may draw: any format (-1) or one; decode batches only. */
typedef struct case_filter {
  int format;
  int decode_only;
} case_filter;

/* One random case: a format, a layout, a dtype, heads, an option mix and a batch, with its data. */
static kvattn_status gen_case(attn_case *c, rng *r, int gpu, const case_filter *filter) {
  memset(c, 0, sizeof *c);
  kvattn_attention_desc d = KVATTN_ATTENTION_DESC_INIT;
  static const int groups[] = {1, 2, 4, 8}, gpu_dims[] = {64, 128, 256}, cpu_dims[] = {8, 40, 64, 128};
  d.num_kv_heads = (int32_t)rng_int(r, 1, 3);
  d.num_qo_heads = d.num_kv_heads * groups[rng_int(r, 0, 3)];
  d.head_dim = gpu ? gpu_dims[rng_int(r, 0, 2)] : cpu_dims[rng_int(r, 0, 3)];
  DLDataType dtype = gpu ? (rng_chance(r, 0.5) ? T_F16 : T_BF16) : dtype_from_choice((int)rng_int(r, 0, 2));
  d.q_dtype = d.kv_dtype = d.o_dtype = dtype;
  if (!gpu && dtype.bits == 16 && rng_chance(r, 0.2)) d.o_dtype = T_F32;
  d.causal = rng_chance(r, 0.5);
  if (rng_chance(r, 0.2)) d.window_left = (int32_t)rng_int(r, 0, 40);
  if (rng_chance(r, 0.15)) d.logits_soft_cap = (float)(5 + 45 * rng_uniform(r));
  if (rng_chance(r, 0.15)) d.alibi = 1;
  if (rng_chance(r, 0.15)) {
    d.rope = 1;
    d.rope_theta = rng_chance(r, 0.5) ? 10000.0f : 500000.0f;
    if (rng_chance(r, 0.3)) d.rope_llama31_factor = 8.0f;
  }
  if (rng_chance(r, 0.15)) d.custom_mask = 1;
  if (rng_chance(r, 0.2)) d.sm_scale = (float)(0.05 + 0.25 * rng_uniform(r));
  if (rng_chance(r, 0.1)) d.fixed_split_size = (int32_t)rng_int(r, 1, 3);
  else if (rng_chance(r, 0.1)) d.disable_split_kv = 1;
  d.kernel = (int32_t)rng_int(r, 0, 2);
  c->desc = d;
  c->layout = rng_chance(r, 0.5) ? KVATTN_LAYOUT_NHD : KVATTN_LAYOUT_HND;
  c->want_lse = rng_chance(r, 0.7);
  int strided = rng_chance(r, 0.3);
  uint64_t offset = rng_chance(r, 0.2) ? 256 : 0;
  double u = rng_uniform(r);
  c->format = u < 0.5 ? KVATTN_FORMAT_PAGED : u < 0.75 ? KVATTN_FORMAT_RAGGED : KVATTN_FORMAT_BLOCK_SPARSE;
  if (filter->format >= 0) c->format = filter->format;
  if (filter->decode_only) c->format = KVATTN_FORMAT_PAGED;
  int H = d.num_kv_heads, D = d.head_dim;
  int64_t mask_bits = 0;
  int64_t *qo_len = NULL, *kv_len = NULL;
  kvattn_status s = KVATTN_SUCCESS;

  if (c->format != KVATTN_FORMAT_BLOCK_SPARSE) {
    int n = rng_chance(r, 0.03) ? 0 : (int)rng_int(r, 1, 6);
    int decode = c->format == KVATTN_FORMAT_PAGED && (rng_chance(r, 0.35) || filter->decode_only);
    c->batch_size = c->rows = n;
    qo_len = calloc(n + 1, sizeof(int64_t));
    kv_len = calloc(n + 1, sizeof(int64_t));
    c->kv_indptr = calloc(n + 1, sizeof(int32_t));
    c->qo_indptr = calloc(n + 1, sizeof(int32_t));
    c->last_page_len = calloc(n + 1, sizeof(int32_t));
    if (!qo_len || !kv_len || !c->kv_indptr || !c->qo_indptr || !c->last_page_len) {
      s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "case arrays");
      goto out;
    }
    for (int i = 0; i < n; i++) {
      kv_len[i] = random_kv_len(r);
      qo_len[i] = decode ? 1 : random_qo_len(r);
      c->qo_indptr[i + 1] = (int32_t)(c->qo_indptr[i] + qo_len[i]);
      mask_bits += 8 * ceil_div64(qo_len[i] * kv_len[i], 8); /* each request's mask starts on a byte */
    }
    c->qo_tokens = c->qo_indptr[n];
    if (decode && rng_chance(r, 0.5)) { /* decode spelled the short way: qo_indptr NULL */
      free(c->qo_indptr);
      c->qo_indptr = NULL;
    }
    if (c->format == KVATTN_FORMAT_PAGED) {
      static const int page_sizes[] = {1, 2, 3, 5, 8, 16, 17};
      c->page_size = page_sizes[rng_int(r, 0, 6)];
      c->combined_kv = rng_chance(r, 0.25);
      c->give_host_indices = rng_chance(r, 0.7);
      for (int i = 0; i < n; i++) {
        int64_t pages = ceil_div64(kv_len[i], c->page_size);
        c->kv_indptr[i + 1] = (int32_t)(c->kv_indptr[i] + pages);
        /* an empty request's last_page_len is ignored: give it any value */
        c->last_page_len[i] = pages ? (int32_t)(kv_len[i] - (pages - 1) * c->page_size)
                                    : (int32_t)rng_int(r, 0, c->page_size);
      }
      int64_t used = c->kv_indptr[n];
      c->num_pages = used + rng_int(r, 0, 3);
      int32_t *pool = malloc(sizeof(int32_t) * (c->num_pages + 1));
      c->kv_indices = malloc(sizeof(int32_t) * (used + 1));
      if (!pool || !c->kv_indices) {
        free(pool);
        s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "case arrays");
        goto out;
      }
      for (int64_t i = 0; i < c->num_pages; i++) pool[i] = (int32_t)i;
      for (int64_t i = c->num_pages - 1; i > 0; i--) {
        int64_t j = rng_int(r, 0, i);
        int32_t t = pool[i];
        pool[i] = pool[j];
        pool[j] = t;
      }
      memcpy(c->kv_indices, pool, sizeof(int32_t) * used);
      free(pool);
      int64_t P = c->page_size, np = c->num_pages;
      int nhd = c->layout == KVATTN_LAYOUT_NHD;
      if (c->combined_kv) {
        int64_t shape[5] = {np, 2, nhd ? P : H, nhd ? H : P, D};
        TRY_GOTO(make_kv_tensor(&c->kv, dtype, 5, shape, strided, offset), s, out);
      } else {
        int64_t shape[4] = {np, nhd ? P : H, nhd ? H : P, D};
        TRY_GOTO(make_kv_tensor(&c->k, dtype, 4, shape, strided, offset), s, out);
        TRY_GOTO(make_kv_tensor(&c->v, dtype, 4, shape, strided, 0), s, out);
      }
      for (int i = 0; i < n; i++)
        for (int64_t pos = 0; pos < kv_len[i]; pos++)
          fill_kv_token(c, r, c->kv_indices[c->kv_indptr[i] + pos / P], pos % P, 0);
      int64_t ishape[1] = {used};
      TRY_GOTO(tensor_init(&c->indices, T_I32, 1, ishape, NULL, 0), s, out);
      memcpy(c->indices.host, c->kv_indices, sizeof(int32_t) * used);
    } else { /* ragged: kv_indptr over tokens of one packed tensor */
      free(c->last_page_len);
      c->last_page_len = NULL;
      c->page_size = 1;
      for (int i = 0; i < n; i++) c->kv_indptr[i + 1] = (int32_t)(c->kv_indptr[i] + kv_len[i]);
      int64_t T = c->kv_indptr[n];
      int nhd = c->layout == KVATTN_LAYOUT_NHD;
      int64_t shape[3] = {nhd ? T : H, nhd ? H : T, D};
      TRY_GOTO(make_kv_tensor(&c->k, dtype, 3, shape, strided, offset), s, out);
      TRY_GOTO(make_kv_tensor(&c->v, dtype, 3, shape, strided, 0), s, out);
      for (int64_t t = 0; t < T; t++) fill_kv_token(c, r, 0, 0, t);
    }
  } else { /* block-sparse: a random BSR pattern over an M x N matrix with (Br, Bc) blocks */
    static const int blocks[] = {1, 2, 3, 4, 8, 16};
    c->block_rows = blocks[rng_int(r, 0, 5)];
    c->block_cols = blocks[rng_int(r, 0, 5)];
    c->num_rows = rng_int(r, 1, 64);
    c->num_cols = rng_int(r, 1, 256);
    int64_t R = ceil_div64(c->num_rows, c->block_rows), C = ceil_div64(c->num_cols, c->block_cols);
    double density = 0.2 + 0.6 * rng_uniform(r);
    c->rows = (int)R;
    c->qo_tokens = c->num_rows;
    c->kv_indptr = calloc(R + 1, sizeof(int32_t));
    c->kv_indices = malloc(sizeof(int32_t) * (R * C + 1));
    if (!c->kv_indptr || !c->kv_indices) {
      s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "case arrays");
      goto out;
    }
    for (int64_t i = 0; i < R; i++) {
      c->kv_indptr[i + 1] = c->kv_indptr[i];
      for (int64_t j = 0; j < C; j++)
        if (rng_chance(r, density)) c->kv_indices[c->kv_indptr[i + 1]++] = (int32_t)j;
    }
    mask_bits = c->num_rows * c->num_cols;
    int nhd = c->layout == KVATTN_LAYOUT_NHD;
    int64_t N = c->num_cols, shape[3] = {nhd ? N : H, nhd ? H : N, D};
    TRY_GOTO(make_kv_tensor(&c->k, dtype, 3, shape, strided, offset), s, out);
    TRY_GOTO(make_kv_tensor(&c->v, dtype, 3, shape, strided, 0), s, out);
    for (int64_t t = 0; t < N; t++) fill_kv_token(c, r, 0, 0, t);
    int64_t ishape[1] = {c->kv_indptr[R]};
    TRY_GOTO(tensor_init(&c->indices, T_I32, 1, ishape, NULL, 0), s, out);
    memcpy(c->indices.host, c->kv_indices, sizeof(int32_t) * c->kv_indptr[R]);
    c->give_host_indices = 1;
  }

  int64_t qshape[3] = {c->qo_tokens, d.num_qo_heads, D};
  TRY_GOTO(tensor_init(&c->q, dtype, 3, qshape, NULL, 0), s, out);
  tensor_fill_random(&c->q, r);
  if (d.custom_mask) {
    int64_t mshape[1] = {ceil_div64(mask_bits, 8)};
    TRY_GOTO(tensor_init(&c->mask, T_U8, 1, mshape, NULL, 0), s, out);
    for (int64_t i = 0; i < mshape[0]; i++) {
      uint8_t byte = 0;
      for (int b = 0; b < 8; b++) byte |= (uint8_t)(rng_chance(r, 0.75) << b);
      ((uint8_t *)c->mask.host)[i] = byte;
    }
  }
  TRY_GOTO(case_alloc_outputs(c), s, out);
  tensor *inputs[] = {&c->q, &c->k, &c->v, &c->kv, &c->indices, &c->mask};
  for (int i = 0; i < 6; i++)
    if (inputs[i]->host) TRY_GOTO(tensor_upload(inputs[i]), s, out);

  /* the description, for progress and failure lines */
  static const char *formats[] = {"paged", "ragged", "bsr"};
  snprintf(c->what, sizeof c->what, "%s %s %s", formats[c->format], c->layout ? "hnd" : "nhd", short_dtype(dtype));
  if (!same_dtype(d.o_dtype, dtype)) appendf(c->what, sizeof c->what, "->%s", short_dtype(d.o_dtype));
  appendf(c->what, sizeof c->what, " h%d/%d d%d", d.num_qo_heads, d.num_kv_heads, D);
  if (c->format == KVATTN_FORMAT_BLOCK_SPARSE)
    appendf(c->what, sizeof c->what, " %" PRId64 "x%" PRId64 " blocks %dx%d nnz %d", c->num_rows, c->num_cols,
            c->block_rows, c->block_cols, c->kv_indptr[c->rows]);
  else {
    if (c->format == KVATTN_FORMAT_PAGED) appendf(c->what, sizeof c->what, " page %d", c->page_size);
    appendf(c->what, sizeof c->what, " b%d%s qo[", c->batch_size, c->qo_indptr ? "" : " decode");
    for (int i = 0; i < c->batch_size; i++) appendf(c->what, sizeof c->what, "%s%" PRId64, i ? "," : "", qo_len[i]);
    appendf(c->what, sizeof c->what, "] kv[");
    for (int i = 0; i < c->batch_size; i++) appendf(c->what, sizeof c->what, "%s%" PRId64, i ? "," : "", kv_len[i]);
    appendf(c->what, sizeof c->what, "]");
  }
  if (d.causal) appendf(c->what, sizeof c->what, " causal");
  if (d.window_left >= 0) appendf(c->what, sizeof c->what, " window%d", d.window_left);
  if (d.logits_soft_cap > 0) appendf(c->what, sizeof c->what, " softcap%.0f", d.logits_soft_cap);
  if (d.alibi) appendf(c->what, sizeof c->what, " alibi");
  if (d.rope) appendf(c->what, sizeof c->what, " rope%s", d.rope_llama31_factor > 0 ? "-llama31" : "");
  if (d.custom_mask) appendf(c->what, sizeof c->what, " mask");
  if (d.sm_scale > 0) appendf(c->what, sizeof c->what, " scale%.2f", d.sm_scale);
  if (d.fixed_split_size) appendf(c->what, sizeof c->what, " split%d", d.fixed_split_size);
  if (d.disable_split_kv) appendf(c->what, sizeof c->what, " nosplit");
  if (c->combined_kv) appendf(c->what, sizeof c->what, " kv-tensor");
  if (strided) appendf(c->what, sizeof c->what, " strided");
  if (offset) appendf(c->what, sizeof c->what, " offset%" PRIu64, offset);
  if (c->want_lse) appendf(c->what, sizeof c->what, " lse");
out:
  free(qo_len);
  free(kv_len);
  return s;
}

/* ---------------------------------------------------------------- the sweep's three kinds of case */

enum { CASE_PASS, CASE_FAIL, CASE_SKIP };

typedef struct case_outcome {
  int result;          /* CASE_PASS, CASE_FAIL, CASE_SKIP (the backend said UNSUPPORTED) */
  int wide;            /* fp32 inputs and outputs: the tighter tolerance applies */
  double err;          /* the largest relative error found (when compared) */
  kvattn_status setup; /* building the case failed (not the library under test): the sweep stops */
  char what[200];      /* the case, in one line */
  char detail[1400];   /* why it failed or was skipped; for a pass, its errors */
} case_outcome;

/* Sort a failed library call into skip (UNSUPPORTED) or failure. */
static void outcome_from_call(case_outcome *o, kvattn_status s, const char *who, const char *step, const char *text) {
  o->result = s == KVATTN_ERROR_UNSUPPORTED ? CASE_SKIP : CASE_FAIL;
  snprintf(o->detail, sizeof o->detail, "%s%s%s: %s", who, who[0] ? " " : "", step, text);
}

static void check_attention_case(kvattn_context *ctx, kvattn_context *ref, rng *r, int gpu, const case_filter *filter,
                                 case_outcome *o) {
  attn_case c;
  kvattn_status s = gen_case(&c, r, gpu, filter);
  if (s) {
    o->setup = s;
    case_free(&c);
    return;
  }
  snprintf(o->what, sizeof o->what, "%s", c.what);
  verify_result v;
  s = verify_case(ctx, ref, &c, 1, 1, &v);
  if (s) {
    const exec_result *e = v.exec.status ? &v.exec : v.ref.status ? &v.ref : NULL;
    char text[1200];
    if (!e) status_text(s, text, sizeof text);
    outcome_from_call(o, s, e == &v.ref ? "reference" : "", e ? e->step : "setting up", e ? e->text : text);
  } else {
    o->wide = same_dtype(c.out.dtype, T_F32) && same_dtype(c.q.dtype, T_F32);
    o->err = v.cmp.max_rel;
    o->result = v.pass ? CASE_PASS : CASE_FAIL;
    snprintf(o->detail, sizeof o->detail,
             "max rel err %.3g (tolerance %.0e), LSE err %.3g (tolerance %.0e), %" PRId64
             " non-finite values, %" PRId64 " fully masked rows not 0/-inf",
             v.cmp.max_rel, v.out_tol, v.cmp.max_lse, v.lse_tol, v.cmp.nonfinite, v.cmp.empty_wrong);
  }
  case_free(&c);
}

/* kvattn_merge_states over [tokens, states, heads, head_dim], or kvattn_merge_state of two states
 * given as strided views into such a tensor; some states empty (lse -inf), some rows all empty. */
static void check_merge_case(kvattn_context *ctx, kvattn_context *ref, rng *r, int gpu, case_outcome *o) {
  static const int gpu_dims[] = {64, 128, 256}, cpu_dims[] = {8, 40, 64, 128};
  int64_t T = rng_chance(r, 0.05) ? 0 : rng_int(r, 1, 40), N = rng_int(r, 1, 5), H = rng_int(r, 1, 8);
  int64_t D = gpu ? gpu_dims[rng_int(r, 0, 2)] : cpu_dims[rng_int(r, 0, 3)];
  DLDataType dt = gpu ? (rng_chance(r, 0.5) ? T_F16 : T_BF16) : dtype_from_choice((int)rng_int(r, 0, 2));
  int pair = rng_chance(r, 0.4);
  if (pair) N = 2;
  double p_empty = rng_chance(r, 0.3) ? 0.4 : 0.03;
  snprintf(o->what, sizeof o->what, "%s %s tokens %" PRId64 " states %" PRId64 " heads %" PRId64 " d%" PRId64 " empty %.0f%%",
           pair ? "merge_state" : "merge_states", short_dtype(dt), T, N, H, D, p_empty * 100);
  o->wide = same_dtype(dt, T_F32);
  tensor v, st, out, sout, rout, rsout;
  memset(&v, 0, sizeof v);
  memset(&st, 0, sizeof st);
  memset(&out, 0, sizeof out);
  memset(&sout, 0, sizeof sout);
  memset(&rout, 0, sizeof rout);
  memset(&rsout, 0, sizeof rsout);
  int64_t vshape[4] = {T, N, H, D}, sshape[3] = {T, N, H}, oshape[3] = {T, H, D};
  kvattn_status s;
  TRY_GOTO(tensor_init(&v, dt, 4, vshape, NULL, 0), s, setup_failed);
  TRY_GOTO(tensor_init(&st, T_F32, 3, sshape, NULL, 0), s, setup_failed);
  TRY_GOTO(tensor_init(&out, dt, 3, oshape, NULL, 0), s, setup_failed);
  TRY_GOTO(tensor_init(&sout, T_F32, 2, oshape, NULL, 0), s, setup_failed);
  TRY_GOTO(tensor_init(&rout, T_F64, 3, oshape, NULL, 0), s, setup_failed);
  TRY_GOTO(tensor_init(&rsout, T_F32, 2, oshape, NULL, 0), s, setup_failed);
  tensor_fill_random(&v, r);
  for (int64_t i = 0; i < T * N * H; i++)
    ((float *)st.host)[i] = rng_chance(r, p_empty) ? -INFINITY : (float)(4 * rng_value(r));
  tensor_poison(&out);
  tensor_poison(&sout);
  tensor_poison(&rout);
  tensor_poison(&rsout);
  TRY_GOTO(tensor_upload(&v), s, setup_failed);
  TRY_GOTO(tensor_upload(&st), s, setup_failed);
  TRY_GOTO(tensor_upload(&out), s, setup_failed);
  TRY_GOTO(tensor_upload(&sout), s, setup_failed);

  for (int side = 1; side >= 0; side--) { /* the backend under test, then the reference */
    kvattn_context *c = side ? ctx : ref;
    tensor *ot = side ? &out : &rout, *so = side ? &sout : &rsout;
    DLTensor vd = tensor_dl(&v, side), sd = tensor_dl(&st, side), od = tensor_dl(ot, side), sod = tensor_dl(so, side);
    kvattn_status ms;
    if (pair) { /* state a and state b: [T, H, D] views with the [T, 2, H, D] tensor's strides */
      int64_t vstr[3] = {2 * H * D, D, 1}, sstr[2] = {2 * H, 1}, vsh[3] = {T, H, D}, ssh[2] = {T, H};
      DLTensor va = vd, vb = vd, sa = sd, sb = sd;
      va.ndim = vb.ndim = 3;
      va.shape = vb.shape = vsh;
      va.strides = vb.strides = vstr;
      vb.byte_offset += (uint64_t)(H * D * elem_size(dt));
      sa.ndim = sb.ndim = 2;
      sa.shape = sb.shape = ssh;
      sa.strides = sb.strides = sstr;
      sb.byte_offset += (uint64_t)(H * sizeof(float));
      ms = kvattn_merge_state(c, &va, &sa, &vb, &sb, &od, &sod, NULL);
    } else {
      ms = kvattn_merge_states(c, &vd, &sd, &od, &sod, NULL);
    }
    if (!ms && side) ms = dev_sync();
    if (ms) {
      char text[1200];
      status_text(ms, text, sizeof text);
      outcome_from_call(o, ms, side ? "" : "reference", pair ? "kvattn_merge_state" : "kvattn_merge_states", text);
      goto done;
    }
  }
  TRY_GOTO(tensor_download(&out, out.host), s, setup_failed);
  TRY_GOTO(tensor_download(&sout, sout.host), s, setup_failed);
  if (g_perturb && T * H > 0) {
    double n2 = 0;
    for (int64_t d = 0; d < D; d++) n2 += pow(tensor_get(&rout, rout.host, d), 2);
    tensor_set(&out, out.host, 0, n2 > 0 ? tensor_get(&out, out.host, 0) + 0.1 * sqrt(n2) : 1.0);
  }
  double max_rel = 0, max_s = 0;
  int64_t bad = 0;
  for (int64_t row = 0; row < T * H; row++) {
    double ref_s = ((float *)rsout.host)[row], got_s = ((float *)sout.host)[row];
    double d2 = 0, r2 = 0;
    for (int64_t d = 0; d < D; d++) {
      double a = tensor_get(&out, out.host, row * D + d), b = tensor_get(&rout, rout.host, row * D + d);
      if (!isfinite(a)) bad++;
      d2 += (a - b) * (a - b);
      r2 += b * b;
    }
    if (isinf(ref_s) && ref_s < 0) { /* every state of the row empty: v = 0, s = -inf */
      if (d2 != 0 || !(isinf(got_s) && got_s < 0)) bad++;
      continue;
    }
    if (!isfinite(got_s)) bad++;
    double rel = r2 > 0 ? sqrt(d2 / r2) : sqrt(d2);
    if (!(rel <= max_rel)) max_rel = rel;
    double es = fabs(got_s - ref_s) / (1 + fabs(ref_s));
    if (!(es <= max_s)) max_s = es;
  }
  double tol = o->wide ? 1e-5 : 1e-2;
  o->err = max_rel;
  o->result = bad == 0 && max_rel <= tol && max_s <= 1e-5 ? CASE_PASS : CASE_FAIL;
  snprintf(o->detail, sizeof o->detail,
           "max rel err %.3g (tolerance %.0e), LSE err %.3g (tolerance 1e-05), %" PRId64
           " non-finite values or empty rows not 0/-inf",
           max_rel, tol, max_s, bad);
  goto done;
setup_failed:
  o->setup = s;
done:
  tensor_free(&v);
  tensor_free(&st);
  tensor_free(&out);
  tensor_free(&sout);
  tensor_free(&rout);
  tensor_free(&rsout);
}

/* kvattn_append_paged_kv of a few tokens per request into a NaN-filled paged cache, against the
 * reference's append: the caches must be bit-equal afterwards (untouched slots included). */
static void check_append_case(kvattn_context *ctx, kvattn_context *ref, rng *r, int gpu, case_outcome *o) {
  static const int gpu_dims[] = {64, 128, 256}, cpu_dims[] = {8, 40, 64, 128}, page_sizes[] = {1, 2, 5, 16, 17};
  paged_cache pc;
  memset(&pc, 0, sizeof pc);
  append_job aj;
  memset(&aj, 0, sizeof aj);
  kvattn_status s = KVATTN_SUCCESS;
  pc.nreq = (int)rng_int(r, 1, 6);
  pc.page_size = page_sizes[rng_int(r, 0, 4)];
  pc.layout = rng_chance(r, 0.5) ? KVATTN_LAYOUT_NHD : KVATTN_LAYOUT_HND;
  pc.dtype = gpu ? (rng_chance(r, 0.5) ? T_F16 : T_BF16) : dtype_from_choice((int)rng_int(r, 0, 2));
  pc.kv_heads = (int)rng_int(r, 1, 4);
  pc.head_dim = gpu ? gpu_dims[rng_int(r, 0, 2)] : cpu_dims[rng_int(r, 0, 3)];
  pc.cached = calloc(pc.nreq, sizeof(int32_t));
  pc.fresh = calloc(pc.nreq, sizeof(int32_t));
  if (!pc.cached || !pc.fresh) {
    s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "append case arrays");
    goto setup_failed;
  }
  snprintf(o->what, sizeof o->what, "append %s %s page %d kv_heads %d d%d b%d new[", pc.layout ? "hnd" : "nhd",
           short_dtype(pc.dtype), pc.page_size, pc.kv_heads, pc.head_dim, pc.nreq);
  for (int i = 0; i < pc.nreq; i++) {
    pc.cached[i] = rng_chance(r, 0.15) ? 0 : (int32_t)rng_int(r, 1, 150);
    pc.fresh[i] = (int32_t)rng_int(r, 0, 12);
    appendf(o->what, sizeof o->what, "%s%d", i ? "," : "", pc.fresh[i]);
  }
  appendf(o->what, sizeof o->what, "] cached[");
  for (int i = 0; i < pc.nreq; i++) appendf(o->what, sizeof o->what, "%s%d", i ? "," : "", pc.cached[i]);
  appendf(o->what, sizeof o->what, "]");
  o->wide = same_dtype(pc.dtype, T_F32);
  TRY_GOTO(paged_cache_build(&pc, r, (int)rng_int(r, 0, 3), 0), s, setup_failed);
  TRY_GOTO(append_job_build(&aj, &pc, r), s, setup_failed);
  kvattn_status as = run_append(ctx, &aj, &pc, 1);
  if (as) {
    char text[1200];
    status_text(as, text, sizeof text);
    outcome_from_call(o, as, "", "kvattn_append_paged_kv", text);
    goto done;
  }
  as = run_append(ref, &aj, &pc, 0);
  if (as) {
    char text[1200];
    status_text(as, text, sizeof text);
    outcome_from_call(o, as, "reference", "kvattn_append_paged_kv", text);
    goto done;
  }
  if (g_perturb && aj.tokens > 0) { /* spoil the first appended element of the reference's cache */
    int64_t t = 0;
    while (pc.fresh[t] == 0) t++;
    int64_t off = token_offset(&pc, (int)t, pc.cached[t], 0, 0);
    store_elem(pc.dtype, pc.k.host, off, load_elem(pc.dtype, pc.k.host, off) + 1.0);
  }
  int64_t differing = 0;
  TRY_GOTO(compare_caches(&pc, &differing, &o->err), s, setup_failed);
  o->result = differing == 0 ? CASE_PASS : CASE_FAIL;
  snprintf(o->detail, sizeof o->detail, "%" PRId64 " cache elements differ from the reference's append (largest rel %.3g)",
           differing, o->err);
  goto done;
setup_failed:
  o->setup = s;
done:
  append_job_free(&aj);
  paged_cache_free(&pc);
}

typedef struct skip_reason {
  char text[240];
  int count;
} skip_reason;

static int cmd_check(int argc, char **argv) {
  int backend = KVATTN_BACKEND_AUTO, verbose = 0, format = 0, decode_only = 0, op_choice = 0;
  int64_t cases = 100, seed = 1, threads = 0, only = -1;
  static const char *const OPS = "any|attention|merge|append";
  opt_def defs[] = {
      {"--cases", OPT_INT, &cases, 1, 100000000, NULL, "number of random cases (default 100)", 0},
      {"--seed", OPT_INT, &seed, 0, INT64_MAX, NULL, "seed of the sweep (default 1)", 0},
      {"--backend", OPT_CHOICE, &backend, 0, 0, BACKENDS, "backend under test (default auto)", 0},
      {"--threads", OPT_INT, &threads, 0, 4096, NULL, "CPU worker threads (default 0: one per core)", 0},
      {"--device", OPT_INT, &g_device_id, 0, 1024, NULL, "CUDA device ordinal (default 0)", 0},
      {"--only", OPT_INT, &only, 0, 100000000, NULL, "run only case N of the sweep (to reproduce a failure)", 0},
      {"--op", OPT_CHOICE, &op_choice, 0, 0, OPS, "draw only this op (default any: 80% attention, 10% each other)", 0},
      {"--format", OPT_CHOICE, &format, 0, 0, "any|paged|ragged|bsr", "attention only, in this KV format (default any)", 0},
      {"--decode", OPT_FLAG, &decode_only, 0, 0, NULL, "attention only, decode batches (paged, one query token each)", 0},
      {"--verbose", OPT_FLAG, &verbose, 0, 0, NULL, "print every case and its error", 0},
      {"--perturb", OPT_FLAG, &g_perturb, 0, 0, NULL, "spoil one output value of each case before comparing (every case with output must fail)", 0},
  };
  int ndefs = (int)(sizeof defs / sizeof defs[0]);
  int p = parse_options(argc, argv, defs, ndefs);
  if (p == -1) {
    printf("Usage: kvattn check [options]\n\n"
           "A random correctness sweep against the float64 reference (a KVATTN_BACKEND_REFERENCE context on\n"
           "host copies of the same data), outputs poisoned with NaN before each run:\n"
           "  attention  a format (paged, ragged, block-sparse), a layout, a dtype, heads and head_dim, options\n"
           "             (causal, sliding window, soft-cap, ALiBi, RoPE, custom mask, sm_scale, split-KV\n"
           "             settings, LSE), non-contiguous views, byte offsets, a combined K/V tensor, and a batch\n"
           "             with empty requests and qo_len > kv_len among others, through plan/run\n"
           "  merge      kvattn_merge_states, or kvattn_merge_state on strided views, with empty states\n"
           "  append     kvattn_append_paged_kv into a NaN-filled cache; the caches must be bit-equal\n"
           "Cases the backend reports as unsupported are skipped and counted. Exits 1 if a case fails.\n\n");
    print_options(defs, ndefs);
    return EXIT_OK;
  }
  if (p) return p;
  if ((format || decode_only) && op_choice > 1) return usage_error("--format and --decode are for --op attention");
  kvattn_context *ctx = NULL, *ref = NULL;
  int rc = open_contexts(backend, threads, &ctx, &ref);
  if (rc) {
    kvattn_context_destroy(ctx);
    kvattn_context_destroy(ref);
    return rc;
  }
  kvattn_backend actual = KVATTN_BACKEND_CPU;
  kvattn_context_backend(ctx, &actual);
  int gpu = actual == KVATTN_BACKEND_CUDA;
  int tty = isatty(2);
  int64_t first = only >= 0 ? only : 0, last = only >= 0 ? only + 1 : cases;
  int64_t passed = 0, failed = 0, skipped = 0;
  skip_reason reasons[8];
  memset(reasons, 0, sizeof reasons);
  int nreasons = 0;
  double worst_half = 0, worst_wide = 0, t_start = now_us();
  case_filter filter = {format - 1, decode_only};
  for (int64_t i = first; i < last; i++) {
    if (gpu && i > first && (i - first) % 32 == 0) {
      /* Each case is a new variant, hence new kernels; a context holds GPU_MAX_KERNELS of them, so the
       * sweep starts a fresh one now and then (a serving process needs a handful, not hundreds). */
      kvattn_context_destroy(ctx);
      ctx = NULL;
      rc = open_contexts(backend, threads, &ctx, NULL);
      if (rc) break;
    }
    rng r = {(uint64_t)seed * 0x100000001B3ull + (uint64_t)i};
    double u = rng_uniform(&r);
    int op = op_choice ? op_choice : (format || decode_only || u < 0.8) ? 1 : u < 0.9 ? 2 : 3;
    if (tty)
      fprintf(stderr, "\r[%" PRId64 "/%" PRId64 "] %" PRId64 " passed, %" PRId64 " failed, %" PRId64 " skipped", i - first + 1,
              last - first, passed, failed, skipped);
    case_outcome o;
    memset(&o, 0, sizeof o);
    if (op == 1) check_attention_case(ctx, ref, &r, gpu, &filter, &o);
    else if (op == 2) check_merge_case(ctx, ref, &r, gpu, &o);
    else check_append_case(ctx, ref, &r, gpu, &o);
    if (o.setup) {
      rc = library_error("building a case", o.setup);
      break;
    }
    char line[1800] = "";
    if (o.result == CASE_SKIP) {
      skipped++;
      char reason[240];
      snprintf(reason, sizeof reason, "%.236s", o.detail);
      int k = 0;
      while (k < nreasons && strcmp(reasons[k].text, reason)) k++;
      if (k == nreasons && nreasons < 8) snprintf(reasons[nreasons++].text, sizeof reasons[0].text, "%s", reason);
      if (k < nreasons) reasons[k].count++;
      if (verbose) snprintf(line, sizeof line, "case %" PRId64 " skipped: %s\n  %s", i, o.what, o.detail);
    } else {
      double *worst = o.wide ? &worst_wide : &worst_half;
      if (o.err > *worst) *worst = o.err;
      if (o.result == CASE_PASS) {
        passed++;
        if (verbose) snprintf(line, sizeof line, "case %" PRId64 " ok: %s\n  %s", i, o.what, o.detail);
      } else {
        failed++;
        snprintf(line, sizeof line, "case %" PRId64 " FAILED: %s\n  %s", i, o.what, o.detail);
      }
    }
    if (line[0]) {
      if (tty) fprintf(stderr, "\r%-100s\r", "");
      printf("%s\n", line);
      if (o.result == CASE_FAIL) {
        char f[16], opn[16];
        printf("  reproduce: kvattn check --backend %s --seed %" PRId64 " --only %" PRId64 "%s%s%s%s%s\n",
               backend_name(actual), seed, i, op_choice ? " --op " : "",
               op_choice ? choice_name(OPS, op_choice, opn, sizeof opn) : "", format ? " --format " : "",
               format ? choice_name("any|paged|ragged|bsr", format, f, sizeof f) : "", decode_only ? " --decode" : "");
      }
      fflush(stdout);
    }
  }
  if (tty) fprintf(stderr, "\r%-100s\r", "");
  char info[512];
  context_summary(ctx, info, sizeof info);
  char *semi = strchr(info, ';'); /* the backend and its threads or GPU; the rest is in `kvattn info` */
  if (semi) *semi = 0;
  printf("check: %" PRId64 " cases on %s in %.1f s: %" PRId64 " passed, %" PRId64 " failed, %" PRId64 " skipped\n",
         last - first, info, (now_us() - t_start) / 1e6, passed, failed, skipped);
  printf("  worst max rel err: %.2e (f16/bf16, tolerance 1e-2), %.2e (f32, tolerance 1e-5; 1e-4 with RoPE)\n",
         worst_half, worst_wide);
  for (int k = 0; k < nreasons; k++) printf("  skipped %d x: %s\n", reasons[k].count, reasons[k].text);
  if (!rc) {
    if (failed) rc = EXIT_CHECK_FAILED;
    else if (passed == 0 && skipped > 0) {
      fprintf(stderr, "%s: no case could run on this backend (all unsupported)\n", g_cmd);
      rc = EXIT_LIBRARY;
    }
  }
  kvattn_context_destroy(ref);
  kvattn_context_destroy(ctx);
  return rc;
}

/* ======================================================================== */
/* kvattn bench                                                             */
/* ======================================================================== */

static void json_string(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
    else if (ch == '\n') fputs("\\n", f);
    else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
    else fputc(ch, f);
  }
  fputc('"', f);
}
static void json_number(FILE *f, double x) { /* JSON has no NaN/Inf */
  if (isfinite(x)) fprintf(f, "%.9g", x);
  else fputs("null", f);
}

/* Append `reps` times (the same tokens: the same bytes land again), then wait for the device. */
static kvattn_status run_append_reps(kvattn_context *ctx, append_job *a, paged_cache *pc, int reps) {
  for (int i = 0; i < reps - 1; i++) {
    DLTensor kn = tensor_dl(&a->k_new, 1), vn = tensor_dl(&a->v_new, 1);
    DLTensor bi = tensor_dl(&a->batch_indices, 1), pos = tensor_dl(&a->positions, 1);
    DLTensor k = tensor_dl(&pc->k, 1), v = tensor_dl(&pc->v, 1);
    DLTensor idx = tensor_dl(&pc->indices, 1), indptr = tensor_dl(&pc->indptr, 1);
    kvattn_kv kv = KVATTN_KV_INIT;
    kv.layout = pc->layout;
    kv.k = &k;
    kv.v = &v;
    kv.indices = &idx;
    TRY(kvattn_append_paged_kv(ctx, &kn, &vn, &bi, &pos, &kv, &indptr, NULL));
  }
  return run_append(ctx, a, pc, 1); /* the last one synchronizes */
}

static int cmd_bench(int argc, char **argv) {
  static const char *const OPS = "decode|prefill|append";
  int op = -1;
  if (argc >= 1 && strncmp(argv[0], "--", 2) != 0 && strcmp(argv[0], "-h") != 0) {
    op = choice_index(OPS, argv[0]);
    if (op < 0) return usage_error("unknown benchmark '%s' (one of %s)", argv[0], OPS);
    snprintf(g_cmd, sizeof g_cmd, "kvattn bench %s", argv[0]);
    argc--;
    argv++;
  }
  int backend = KVATTN_BACKEND_AUTO, dtype_choice = 1, layout = 0, causal = 0, check = 0, no_host_indices = 0;
  int64_t batch = 16, kv_len = 1024, qo_len = 1, page_size = 16, qo_heads = 32, kv_heads = 8, head_dim = 128;
  int64_t iters = 10, threads = 0, seed = 1;
  const char *json = NULL;
  opt_def defs[] = {
      {"--backend", OPT_CHOICE, &backend, 0, 0, BACKENDS, "backend (default auto)", 0},
      {"--batch", OPT_INT, &batch, 1, 1 << 20, NULL, "requests (default 16; prefill 1)", 0},
      {"--kv-len", OPT_INT, &kv_len, 1, 1 << 26, NULL, "KV tokens of each request, the new ones included (default 1024; prefill: qo-len)", 0},
      {"--qo-len", OPT_INT, &qo_len, 1, 1 << 20, NULL, "query tokens (append: new tokens) per request (decode 1; prefill 512; append 1)", 0},
      {"--page-size", OPT_INT, &page_size, 1, 1 << 16, NULL, "tokens per page (default 16)", 0},
      {"--qo-heads", OPT_INT, &qo_heads, 1, 1024, NULL, "query heads (default 32)", 0},
      {"--kv-heads", OPT_INT, &kv_heads, 1, 1024, NULL, "KV heads (default 8)", 0},
      {"--head-dim", OPT_INT, &head_dim, 1, 1024, NULL, "head dimension (default 128)", 0},
      {"--dtype", OPT_CHOICE, &dtype_choice, 0, 0, "f16|bf16|f32", "q, KV and output dtype (default bf16)", 0},
      {"--layout", OPT_CHOICE, &layout, 0, 0, "nhd|hnd", "paged cache layout (default nhd)", 0},
      {"--causal", OPT_FLAG, &causal, 0, 0, NULL, "causal mask (prefill)", 0},
      {"--iters", OPT_INT, &iters, 1, 1000000, NULL, "timed samples, the median is reported (default 10)", 0},
      {"--threads", OPT_INT, &threads, 0, 4096, NULL, "CPU worker threads (default 0: one per core)", 0},
      {"--device", OPT_INT, &g_device_id, 0, 1024, NULL, "CUDA device ordinal (default 0)", 0},
      {"--seed", OPT_INT, &seed, 0, INT64_MAX, NULL, "seed of the data (default 1)", 0},
      {"--check", OPT_FLAG, &check, 0, 0, NULL, "also check against the float64 reference (one CPU thread: keep shapes small)", 0},
      {"--no-host-indices", OPT_FLAG, &no_host_indices, 0, 0, NULL,
       "plan from kv_indptr and last_page_len only (the page ids are not given to plan, so not checked there)", 0},
      {"--json", OPT_STRING, &json, 0, 0, NULL, "write the results as JSON to this file", 0},
  };
  int ndefs = (int)(sizeof defs / sizeof defs[0]);
  int p = parse_options(argc, argv, defs, ndefs);
  if (p == -1 || (p == 0 && op < 0)) {
    FILE *f = p == -1 ? stdout : stderr;
    fprintf(f, "Usage: kvattn bench decode|prefill|append [options]\n\n"
               "Times kvattn_plan (host) and kvattn_run separately over a paged cache of `batch` requests of\n"
               "kv-len tokens (medians of --iters samples; on a GPU a sample is several back-to-back runs\n"
               "ended by one synchronization) and reports time, bytes moved (q, K/V once, output, page ids),\n"
               "GB/s and TFLOP/s (2 FLOPs per multiply-add of QK^T and PV over the unmasked pairs).\n"
               "  decode   one query token per request\n"
               "  prefill  qo-len query tokens per request, the last qo-len of its kv-len (chunked prefill)\n"
               "  append   kvattn_append_paged_kv of qo-len new tokens per request\n\n");
    if (p == -1) {
      print_options(defs, ndefs);
      return EXIT_OK;
    }
    return usage_error("which benchmark: decode, prefill or append?");
  }
  if (p) return p;
  const char *op_name = op == 0 ? "decode" : op == 1 ? "prefill" : "append";
  if (op == 0 && defs[3].seen && qo_len != 1)
    return usage_error("decode has one query token per request; use prefill for --qo-len %" PRId64, qo_len);
  if (op == 1) {
    if (!defs[1].seen) batch = 1;
    if (!defs[3].seen) qo_len = 512;
    if (!defs[2].seen) kv_len = qo_len;
  }
  if (qo_len > kv_len)
    return usage_error("--qo-len %" PRId64 " exceeds --kv-len %" PRId64 ": the new tokens are part of the KV", qo_len, kv_len);
  if (qo_heads % kv_heads)
    return usage_error("--qo-heads %" PRId64 " is not a multiple of --kv-heads %" PRId64, qo_heads, kv_heads);
  if (batch * (kv_len + page_size) * kv_heads * head_dim > (int64_t)1 << 36)
    return usage_error("the cache would hold more than 2^36 elements; lower --batch or --kv-len");
  FILE *jf = NULL;
  if (json && !(jf = fopen(json, "w"))) return usage_error("cannot write --json %s: %s", json, strerror(errno));

  kvattn_context *ctx = NULL, *ref = NULL;
  int rc = open_contexts(backend, threads, &ctx, check ? &ref : NULL);
  paged_cache pc;
  memset(&pc, 0, sizeof pc);
  attn_case c;
  memset(&c, 0, sizeof c);
  append_job aj;
  memset(&aj, 0, sizeof aj);
  int *reqs = NULL;
  kvattn_status s = KVATTN_SUCCESS;
  const char *failed = "";
  if (rc) goto cleanup;
  DLDataType dtype = dtype_from_choice(dtype_choice);
  rng r = {(uint64_t)seed};
  pc.nreq = (int)batch;
  pc.page_size = (int)page_size;
  pc.layout = layout;
  pc.dtype = dtype;
  pc.kv_heads = (int)kv_heads;
  pc.head_dim = (int)head_dim;
  pc.cached = calloc(batch, sizeof(int32_t));
  pc.fresh = calloc(batch, sizeof(int32_t));
  reqs = calloc(batch, sizeof(int));
  failed = "allocating the batch";
  if (!pc.cached || !pc.fresh || !reqs) {
    s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "batch arrays");
    goto lib_failed;
  }
  for (int i = 0; i < batch; i++) {
    pc.fresh[i] = (int32_t)qo_len;
    pc.cached[i] = (int32_t)(kv_len - qo_len);
    reqs[i] = i;
  }
  failed = "building the paged cache";
  if ((s = paged_cache_build(&pc, &r, 0, op != 2))) goto lib_failed;

  double plan_us = 0, run_us = 0, bytes = 0, flops = 0, check_err = 0;
  int inner = 1, check_pass = -1, rotations = 1;
  char check_note[1300] = "";
  if (op != 2) {
    kvattn_attention_desc desc = make_desc((int)qo_heads, (int)kv_heads, (int)head_dim, dtype, causal);
    failed = "building the batch";
    if ((s = case_from_cache(&c, &pc, reqs, (int)batch, op == 0, &desc, &r))) goto lib_failed;
    c.want_lse = 0; /* what serving decode asks for */
    if (no_host_indices) c.give_host_indices = 0;
    TRY_GOTO(tensor_upload(&c.out), s, lib_failed);
    if (g_dev.cuda) { /* back-to-back runs cycle over copies of the cache that together exceed 4 x L2 */
      int l2 = 0;
      if (g_dev.api->cuDeviceGetAttribute(&l2, 38 /* CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE */, ctx->gpu->dev) || l2 <= 0)
        l2 = 64 << 20;
      double cache_bytes = 2.0 * pc.k.bytes;
      rotations = (int)fmin(16, ceil(4.0 * l2 / cache_bytes));
      if (rotations > 1) {
        c.rot_k = calloc(rotations, sizeof(void *));
        c.rot_v = calloc(rotations, sizeof(void *));
        failed = "allocating copies of the cache";
        if (!c.rot_k || !c.rot_v) {
          s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "rotation table");
          goto lib_failed;
        }
        c.rot_k[0] = pc.k.dev;
        c.rot_v[0] = pc.v.dev;
        for (int i = 1; i < rotations; i++) {
          c.rotations = i + 1; /* case_free frees [1, rotations), NULL entries included */
          TRY_GOTO(dev_alloc(pc.k.bytes, &c.rot_k[i]), s, lib_failed);
          TRY_GOTO(dev_alloc(pc.v.bytes, &c.rot_v[i]), s, lib_failed);
          TRY_GOTO(dev_upload(c.rot_k[i], pc.k.host, pc.k.bytes), s, lib_failed);
          TRY_GOTO(dev_upload(c.rot_v[i], pc.v.host, pc.v.bytes), s, lib_failed);
        }
      }
    }
    exec_result e;
    if (g_dev.cuda) { /* one sample to size the back-to-back runs of a sample to about a millisecond */
      exec_attention(ctx, &desc, &c, 1, &c.out, &c.lse, 1, 1, &e);
      if (e.status) goto exec_failed;
      inner = e.run_us > 0 ? (int)fmin(200, fmax(1, 1000 / e.run_us)) : 1;
      if (c.rotations > 1 && inner < c.rotations) inner = c.rotations;
    }
    exec_attention(ctx, &desc, &c, 1, &c.out, &c.lse, (int)iters, inner, &e);
    if (e.status) {
    exec_failed:
      fprintf(stderr, "%s: %s failed: %s\n", g_cmd, e.step, e.text);
      rc = EXIT_LIBRARY;
      goto cleanup;
    }
    plan_us = e.plan_us;
    run_us = e.run_us;
    bytes = attention_bytes(&c);
    flops = attention_flops(&c);
    if (check) {
      verify_result v;
      s = verify_case(ctx, ref, &c, 1, 1, &v);
      if (s) {
        const exec_result *fe = v.exec.status ? &v.exec : &v.ref;
        fprintf(stderr, "%s: check: %s%s failed: %s\n", g_cmd, fe == &v.ref ? "reference " : "", fe->step, fe->text);
        rc = EXIT_LIBRARY;
        goto cleanup;
      }
      check_err = v.cmp.max_rel;
      check_pass = v.pass;
      if (!v.pass)
        snprintf(check_note, sizeof check_note, "max rel err %.3g (tolerance %.0e), LSE err %.3g, %" PRId64 " non-finite",
                 v.cmp.max_rel, v.out_tol, v.cmp.max_lse, v.cmp.nonfinite);
    }
  } else {
    failed = "building the append";
    if ((s = append_job_build(&aj, &pc, &r))) goto lib_failed;
    failed = "kvattn_append_paged_kv";
    if ((s = run_append(ctx, &aj, &pc, 1))) goto lib_failed; /* warm-up */
    if (g_dev.cuda) {
      double t0 = now_us();
      if ((s = run_append(ctx, &aj, &pc, 1))) goto lib_failed;
      double once = now_us() - t0;
      inner = once > 0 ? (int)fmin(200, fmax(1, 1000 / once)) : 1;
    }
    double *t = calloc(iters, sizeof(double));
    if (!t) {
      s = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "timing buffer");
      goto lib_failed;
    }
    for (int i = 0; i < iters && !s; i++) {
      double t0 = now_us();
      s = run_append_reps(ctx, &aj, &pc, inner);
      t[i] = (now_us() - t0) / inner;
    }
    run_us = median(t, (int)iters);
    free(t);
    if (s) goto lib_failed;
    bytes = append_bytes(&aj, &pc);
    if (check) {
      failed = "the reference append";
      if ((s = run_append(ref, &aj, &pc, 0))) goto lib_failed;
      int64_t differing = 0;
      failed = "reading back the cache";
      if ((s = compare_caches(&pc, &differing, &check_err))) goto lib_failed;
      check_pass = differing == 0;
      if (differing) snprintf(check_note, sizeof check_note, "%" PRId64 " cache elements differ from the reference", differing);
    }
  }

  char info[512], tb[32], pb[32], bb[32], lay[8];
  context_summary(ctx, info, sizeof info);
  choice_name("nhd|hnd", layout, lay, sizeof lay);
  printf("kvattn bench %s on %s\n", op_name, info);
  printf("  batch %" PRId64 ", kv_len %" PRId64 ", qo_len %" PRId64 ", page_size %" PRId64 ", heads %" PRId64 " q / %" PRId64
         " kv, head_dim %" PRId64 ", %s, %s%s\n",
         batch, kv_len, op == 0 ? 1 : qo_len, page_size, qo_heads, kv_heads, head_dim, short_dtype(dtype), lay,
         causal ? ", causal" : "");
  if (op != 2) printf("  plan  %10s  (host, median of %" PRId64 ")\n", fmt_time(plan_us, pb, sizeof pb), iters);
  printf("  run   %10s  (median of %" PRId64 " samples%s)\n", fmt_time(run_us, tb, sizeof tb), iters,
         inner > 1 ? ", each the mean of back-to-back runs" : "");
  if (c.rotations > 1) printf("        the runs cycle over %d copies of the cache (> 4 x L2), as a serving step finds it: cold\n", c.rotations);
  char rb[32];
  printf("  bytes %10s  %8s GB/s\n", fmt_bytes(bytes, bb, sizeof bb),
         fmt_rate(run_us > 0 ? bytes / (run_us * 1e3) : 0, rb, sizeof rb));
  if (op != 2)
    printf("  FLOPs %10.3g  %8s TFLOP/s\n", flops, fmt_rate(run_us > 0 ? flops / (run_us * 1e6) : 0, rb, sizeof rb));
  if (check_pass >= 0)
    printf("  check %s (max rel err %.2e against the float64 reference)\n", check_pass ? "PASS" : "FAIL", check_err);
  if (check_pass == 0) {
    fprintf(stderr, "%s: check failed: %s\n", g_cmd, check_note);
    rc = EXIT_CHECK_FAILED;
  }
  if (jf) {
    fprintf(jf, "{\n  \"tool\": \"kvattn bench\",\n  \"version\": ");
    json_string(jf, kvattn_version());
    fprintf(jf, ",\n  \"op\": \"%s\",\n  \"backend\": ", op_name);
    kvattn_backend actual = KVATTN_BACKEND_CPU;
    kvattn_context_backend(ctx, &actual);
    json_string(jf, backend_name(actual));
    fprintf(jf, ",\n  \"device\": ");
    json_string(jf, info);
    fprintf(jf,
            ",\n  \"config\": {\"batch\": %" PRId64 ", \"kv_len\": %" PRId64 ", \"qo_len\": %" PRId64
            ", \"page_size\": %" PRId64 ", \"qo_heads\": %" PRId64 ", \"kv_heads\": %" PRId64 ", \"head_dim\": %" PRId64
            ", \"dtype\": \"%s\", \"layout\": \"%s\", \"causal\": %s},\n",
            batch, kv_len, op == 0 ? 1 : qo_len, page_size, qo_heads, kv_heads, head_dim, short_dtype(dtype), lay,
            causal ? "true" : "false");
    fprintf(jf, "  \"iters\": %" PRId64 ",\n  \"runs_per_sample\": %d,\n  \"cache_copies\": %d,\n  \"plan_us\": ", iters,
            inner, c.rotations > 1 ? c.rotations : 1);
    if (op != 2) json_number(jf, plan_us);
    else fputs("null", jf);
    fprintf(jf, ",\n  \"run_us\": ");
    json_number(jf, run_us);
    fprintf(jf, ",\n  \"bytes\": ");
    json_number(jf, bytes);
    fprintf(jf, ",\n  \"gb_per_s\": ");
    json_number(jf, run_us > 0 ? bytes / (run_us * 1e3) : 0);
    fprintf(jf, ",\n  \"flops\": ");
    json_number(jf, flops);
    fprintf(jf, ",\n  \"tflop_per_s\": ");
    json_number(jf, run_us > 0 ? flops / (run_us * 1e6) : 0);
    fprintf(jf, ",\n  \"check\": ");
    if (check_pass < 0) fputs("null", jf);
    else {
      fprintf(jf, "{\"pass\": %s, \"max_rel_err\": ", check_pass ? "true" : "false");
      json_number(jf, check_err);
      fputs("}", jf);
    }
    fprintf(jf, "\n}\n");
    if (fclose(jf) != 0) {
      jf = NULL;
      fprintf(stderr, "%s: writing %s failed: %s\n", g_cmd, json, strerror(errno));
      if (!rc) rc = EXIT_LIBRARY;
    }
    jf = NULL;
  }
  goto cleanup;

lib_failed:
  rc = library_error(failed, s);
cleanup:
  if (jf) fclose(jf);
  free(reqs);
  case_free(&c);
  append_job_free(&aj);
  paged_cache_free(&pc);
  kvattn_context_destroy(ref);
  kvattn_context_destroy(ctx);
  return rc;
}

/* ======================================================================== */
/* kvattn info                                                              */
/* ======================================================================== */

static void print_indented(const char *text, const char *indent) {
  const char *p = text;
  while (*p) {
    const char *nl = strchr(p, '\n');
    int n = nl ? (int)(nl - p) : (int)strlen(p);
    printf("%s%.*s\n", indent, n, p);
    if (!nl) break;
    p = nl + 1;
  }
}

/* The cache directory as the header documents it, when no context could say. */
static void default_cache_dir(char *buf, size_t size) {
  const char *env = getenv("KVATTN_CACHE_DIR"), *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
  if (env && env[0]) snprintf(buf, size, "%s", env);
  else if (xdg && xdg[0]) snprintf(buf, size, "%s/kvattn", xdg);
  else snprintf(buf, size, "%s/.cache/kvattn", home ? home : ".");
}

typedef struct dir_entry {
  char name[256];
  long long bytes;
  int is_dir;
} dir_entry;

static int cmp_entry(const void *a, const void *b) {
  return strcmp(((const dir_entry *)a)->name, ((const dir_entry *)b)->name);
}

/* List a directory's entries (sizes of files; directories marked), the first `limit` by name. */
static void list_directory(const char *dir, int limit) {
  DIR *d = opendir(dir);
  if (!d) {
    if (errno == ENOENT) printf("    (does not exist yet)\n");
    else printf("    (cannot open %s: %s)\n", dir, strerror(errno));
    return;
  }
  int n = 0, cap = 64;
  dir_entry *e = malloc(sizeof(dir_entry) * cap);
  struct dirent *de;
  long long total = 0;
  while (e && (de = readdir(d))) {
    if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
    if (n == cap) {
      dir_entry *grown = realloc(e, sizeof(dir_entry) * cap * 2);
      if (!grown) break;
      e = grown;
      cap *= 2;
    }
    char path[1400];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
    snprintf(e[n].name, sizeof e[n].name, "%s", de->d_name);
    e[n].bytes = stat(path, &st) == 0 ? (long long)st.st_size : -1;
    e[n].is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    if (!e[n].is_dir && e[n].bytes > 0) total += e[n].bytes;
    n++;
  }
  closedir(d);
  if (!e) return;
  qsort(e, n, sizeof(dir_entry), cmp_entry);
  if (n == 0) printf("    (empty)\n");
  for (int i = 0; i < n && i < limit; i++) {
    char bb[32];
    if (e[i].is_dir) printf("    %-64s %10s\n", e[i].name, "<dir>");
    else printf("    %-64s %10s\n", e[i].name, fmt_bytes((double)e[i].bytes, bb, sizeof bb));
  }
  if (n > limit) printf("    ... and %d more entries\n", n - limit);
  char tb[32];
  if (n) printf("    %d entries, %s in files\n", n, fmt_bytes((double)total, tb, sizeof tb));
  free(e);
}

static int cmd_info(int argc, char **argv) {
  const char *cache_dir = NULL;
  int64_t threads = 0, limit = 20;
  opt_def defs[] = {
      {"--cache-dir", OPT_STRING, &cache_dir, 0, 0, NULL, "the JIT cache directory to describe (default: the context's)", 0},
      {"--threads", OPT_INT, &threads, 0, 4096, NULL, "CPU worker threads of the contexts (default 0: one per core)", 0},
      {"--list", OPT_INT, &limit, 0, 1000000, NULL, "list at most N cache entries (default 20)", 0},
  };
  int ndefs = (int)(sizeof defs / sizeof defs[0]);
  int p = parse_options(argc, argv, defs, ndefs);
  if (p == -1) {
    printf("Usage: kvattn info [options]\n\n"
           "The library's version, the backends this machine offers (the CPU's threads; the GPU's name,\n"
           "architecture and SMs, or why there is none: no driver, no device, no NVRTC), what an AUTO\n"
           "context picks, and the JIT cubin cache: its directory, NVRTC, and its entries.\n\n");
    print_options(defs, ndefs);
    return EXIT_OK;
  }
  if (p) return p;
  printf("kvattn %s (library), header %s\n", kvattn_version(), KVATTN_VERSION_STRING);
  if (kvattn_version_number() != KVATTN_VERSION_NUMBER)
    printf("  note: this tool was built against header %s but runs library %s\n", KVATTN_VERSION_STRING, kvattn_version());
  int rc = EXIT_OK;
  char text[4096], ctx_cache_dir[1024] = "";
  printf("\nbackends:\n");
  static const kvattn_backend order[] = {KVATTN_BACKEND_CPU, KVATTN_BACKEND_CUDA, KVATTN_BACKEND_REFERENCE};
  for (int i = 0; i < 3; i++) {
    kvattn_options opt = KVATTN_OPTIONS_INIT;
    opt.backend = order[i];
    opt.num_threads = (int32_t)threads;
    opt.cache_dir = cache_dir;
    kvattn_context *ctx = NULL;
    kvattn_status s = kvattn_context_create(&opt, &ctx);
    if (s) {
      status_text(s, text, sizeof text);
      printf("  %-10s unavailable: %s\n", backend_name(order[i]), text);
      if (order[i] == KVATTN_BACKEND_CPU) rc = EXIT_LIBRARY; /* the CPU backend is always expected */
      continue;
    }
    printf("  %-10s available\n", backend_name(order[i]));
    if (kvattn_context_info(ctx, text, sizeof text) == KVATTN_SUCCESS) print_indented(text, "             ");
    if (order[i] == KVATTN_BACKEND_CUDA && ctx->gpu) {
      const struct gpu_context *g = ctx->gpu;
      int driver = 0;
      if (g->api && g->api->cuDriverGetVersion) g->api->cuDriverGetVersion(&driver);
      printf("             GPU %d: %s, %s (compute %d.%d), %d SMs, %d KiB shared memory per block, driver %d.%d\n",
             ctx->device_id, g->name, g->arch, g->cc_major, g->cc_minor, g->sm_count, g->max_smem_per_block_optin / 1024,
             driver / 1000, (driver % 1000) / 10);
    }
    if (!ctx_cache_dir[0] && ctx->cache_dir[0]) snprintf(ctx_cache_dir, sizeof ctx_cache_dir, "%s", ctx->cache_dir);
    kvattn_context_destroy(ctx);
  }
  {
    kvattn_options opt = KVATTN_OPTIONS_INIT;
    opt.num_threads = (int32_t)threads;
    opt.cache_dir = cache_dir;
    kvattn_context *ctx = NULL;
    kvattn_status s = kvattn_context_create(&opt, &ctx);
    if (s) {
      status_text(s, text, sizeof text);
      printf("\nauto: no context: %s\n", text);
      rc = EXIT_LIBRARY;
    } else {
      kvattn_backend b = KVATTN_BACKEND_AUTO;
      kvattn_context_backend(ctx, &b);
      printf("\nauto picks: %s\n", backend_name(b));
      if (kvattn_context_info(ctx, text, sizeof text) == KVATTN_SUCCESS) print_indented(text, "  ");
      kvattn_context_destroy(ctx);
    }
  }
  printf("\nJIT cache:\n");
  kvattn_status s = kvattn_cache_info(cache_dir, text, sizeof text);
  if (s) {
    char err[1200];
    status_text(s, err, sizeof err);
    printf("  kvattn_cache_info: %s\n", err);
  } else {
    print_indented(text, "  ");
  }
  char dir[1024];
  if (cache_dir) snprintf(dir, sizeof dir, "%s", cache_dir);
  else if (ctx_cache_dir[0]) snprintf(dir, sizeof dir, "%s", ctx_cache_dir);
  else default_cache_dir(dir, sizeof dir);
  printf("  contents of %s:\n", dir);
  list_directory(dir, (int)limit);
  return rc;
}

/* ======================================================================== */
/* kvattn warmup                                                            */
/* ======================================================================== */

static int cmd_warmup(int argc, char **argv) {
  int64_t qo_heads = 0, kv_heads = 0, head_dim = 0, window_left = -1;
  int dtype_choice = 1, causal = 0, alibi = 0, rope = 0, custom_mask = 0;
  double soft_cap = 0;
  const char *arch = NULL, *cache_dir = NULL;
  opt_def defs[] = {
      {"--qo-heads", OPT_INT, &qo_heads, 1, 1024, NULL, "query heads (required)", 0},
      {"--kv-heads", OPT_INT, &kv_heads, 1, 1024, NULL, "KV heads (required)", 0},
      {"--head-dim", OPT_INT, &head_dim, 1, 1024, NULL, "head dimension (required)", 0},
      {"--dtype", OPT_CHOICE, &dtype_choice, 0, 0, "f16|bf16", "q, KV and output dtype (default bf16)", 0},
      {"--arch", OPT_STRING, &arch, 0, 0, NULL, "sm_80, sm_86, sm_89, sm_90a (default: this GPU's, else sm_90a)", 0},
      {"--cache-dir", OPT_STRING, &cache_dir, 0, 0, NULL, "the cache to fill (default: $KVATTN_CACHE_DIR, else the XDG cache)", 0},
      {"--causal", OPT_FLAG, &causal, 0, 0, NULL, "the causal variant", 0},
      {"--window-left", OPT_INT, &window_left, -1, INT32_MAX, NULL, "the sliding-window variant", 0},
      {"--soft-cap", OPT_DOUBLE, &soft_cap, 0, 0, NULL, "the logits soft-cap variant", 0},
      {"--alibi", OPT_FLAG, &alibi, 0, 0, NULL, "the ALiBi variant", 0},
      {"--rope", OPT_FLAG, &rope, 0, 0, NULL, "the fused-RoPE variant", 0},
      {"--custom-mask", OPT_FLAG, &custom_mask, 0, 0, NULL, "the custom-mask variant", 0},
  };
  int ndefs = (int)(sizeof defs / sizeof defs[0]);
  int p = parse_options(argc, argv, defs, ndefs);
  if (p == -1) {
    printf("Usage: kvattn warmup --qo-heads N --kv-heads N --head-dim N [options]\n\n"
           "Compiles (NVRTC) or finds in the disk cache every GPU kernel an attention of this shape and\n"
           "variant needs, so serving pays no compile time. Needs NVRTC but no GPU: a cache filled here\n"
           "can travel to a GPU machine (give --arch). Page size and batch are run-time values and need\n"
           "no kernels of their own.\n\n");
    print_options(defs, ndefs);
    return EXIT_OK;
  }
  if (p) return p;
  if (!defs[0].seen || !defs[1].seen || !defs[2].seen) return usage_error("--qo-heads, --kv-heads and --head-dim are required");
  if (qo_heads % kv_heads)
    return usage_error("--qo-heads %" PRId64 " is not a multiple of --kv-heads %" PRId64, qo_heads, kv_heads);
  if (soft_cap < 0) return usage_error("--soft-cap must be >= 0");
  if (arch) { /* "sm_" then the compute capability, maybe with a suffix ("sm_90a"); kvattn needs sm_80+ */
    char *end = NULL;
    long cc = strncmp(arch, "sm_", 3) == 0 ? strtol(arch + 3, &end, 10) : -1;
    if (cc < 0 || !end || end == arch + 3 || (end[0] && (end[0] != 'a' || end[1])))
      return usage_error("--arch '%s' is not an architecture like sm_80 or sm_90a", arch);
    if (cc < 80) return usage_error("--arch %s: kvattn's kernels need sm_80 or newer (cp.async, bf16 MMA)", arch);
  }
  kvattn_attention_desc desc = make_desc((int)qo_heads, (int)kv_heads, (int)head_dim, dtype_choice ? T_BF16 : T_F16, causal);
  desc.window_left = (int32_t)window_left;
  desc.logits_soft_cap = (float)soft_cap;
  desc.alibi = alibi;
  desc.rope = rope;
  desc.custom_mask = custom_mask;

  char local_arch[16] = "";
  if (!arch) { /* this machine's GPU, else the H100 we serve on */
    kvattn_options opt = KVATTN_OPTIONS_INIT;
    opt.backend = KVATTN_BACKEND_CUDA;
    kvattn_context *ctx = NULL;
    kvattn_status s = kvattn_context_create(&opt, &ctx);
    if (s == KVATTN_SUCCESS && ctx->gpu) snprintf(local_arch, sizeof local_arch, "%s", ctx->gpu->arch);
    else {
      char text[1200];
      status_text(s, text, sizeof text);
      printf("no GPU here (%s); compiling for sm_90a (choose with --arch)\n", text);
      snprintf(local_arch, sizeof local_arch, "sm_90a");
    }
    kvattn_context_destroy(ctx);
    arch = local_arch;
  }
  int kernels = 0;
  double seconds = 0;
  double t0 = now_us();
  kvattn_status s = kvattn_warmup(&desc, arch, cache_dir, &kernels, &seconds);
  double wall = (now_us() - t0) / 1e6;
  if (s) {
    library_error("kvattn_warmup", s);
    /* a value the library rejects came from a flag */
    return s == KVATTN_ERROR_INVALID_ARGUMENT || s == KVATTN_ERROR_INVALID_SHAPE || s == KVATTN_ERROR_INVALID_DTYPE
               ? EXIT_USAGE
               : EXIT_LIBRARY;
  }
  printf("warmup: %d kernel specializations ready for %s (heads %" PRId64 " q / %" PRId64 " kv, head_dim %" PRId64
         ", %s): %.2f s of compilation, %.2f s in all\n",
         kernels, arch, qo_heads, kv_heads, head_dim, dtype_choice ? "bf16" : "f16", seconds, wall);
  char text[4096];
  if (kvattn_cache_info(cache_dir, text, sizeof text) == KVATTN_SUCCESS) print_indented(text, "  ");
  return EXIT_OK;
}

/* ======================================================================== */
/* main                                                                     */
/* ======================================================================== */

static void print_usage(FILE *f) {
  fprintf(f,
          "Usage: kvattn <command> [options]     (kvattn <command> --help for its options)\n\n"
          "Commands:\n"
          "  info                           version, backends (CPU, GPU or why none), JIT cache\n"
          "  demo                           one serving step (append, decode, prefill) over a paged\n"
          "                                 cache, checked against the float64 reference\n"
          "  bench decode|prefill|append    time plan and run; bytes, GB/s, TFLOP/s; --json FILE\n"
          "  check                          a random correctness sweep against the reference\n"
          "  warmup                         fill the JIT cache for a model shape (no GPU needed)\n\n"
          "Exit codes: 0 ok, 1 a check failed, 2 usage error, 3 backend or library error.\n");
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) {
    print_usage(stderr);
    return EXIT_USAGE;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
    print_usage(stdout);
    return EXIT_OK;
  }
  if (!strcmp(cmd, "--version")) {
    printf("kvattn %s\n", kvattn_version());
    return EXIT_OK;
  }
  static const struct {
    const char *name;
    int (*fn)(int, char **);
  } commands[] = {{"info", cmd_info}, {"demo", cmd_demo}, {"bench", cmd_bench}, {"check", cmd_check}, {"warmup", cmd_warmup}};
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (!strcmp(cmd, commands[i].name)) {
      snprintf(g_cmd, sizeof g_cmd, "kvattn %s", cmd);
      return commands[i].fn(argc - 2, argv + 2);
    }
  fprintf(stderr, "kvattn: unknown command '%s'\n", cmd);
  print_usage(stderr);
  return EXIT_USAGE;
}
