/*
 * jit.c - NVRTC, loaded at run time, and jit_compile(): a kernels/ source + its specialization
 * (-D definitions) + an architecture -> a cubin, through the disk cache (jit_cache.c).
 *
 * The kernel sources are embedded in the library (cmake/embed.cmake writes `kernel_sources`). A
 * source may `#include "other.cuh"` of another embedded file: those are handed to NVRTC as named
 * headers, so nothing is read from disk at run time. Angle-bracket includes (<cuda_fp16.h>,
 * <cuda_bf16.h>) come from the CUDA toolkit's include directory, found next to the loaded NVRTC
 * (NVRTC 13.0 does not ship them built in: "could not open source file cuda_fp16.h").
 *
 * The NVRTC options are fixed, so that a specialization is only its source and its definitions:
 *   --gpu-architecture=<arch>  a real architecture (sm_80, sm_86, sm_89, sm_90a): the result is a
 *                              CUBIN (nvrtcGetCUBIN), no PTX left for the driver to compile
 *   -default-device            functions without an execution space are __device__
 *   --std=c++17
 *   -lineinfo                  source lines for compute-sanitizer and ncu; no effect on the code
 * and NOT --use_fast_math: kernels that want approximate exp/rcp ask for them explicitly
 * (exp2f on pre-scaled logits, __expf, __fdividef, ex2.approx), so the rest of the math stays
 * IEEE (no flush-to-zero of fp32 accumulators). Kernels are entered by extern "C" names.
 *
 * The cache key hashes: a format tag, the NVRTC version, every option above (arch included), the
 * definitions in order, and the name and text of the source and of every embedded file it
 * includes, transitively. The -I path is not hashed (the NVRTC version already names the
 * toolkit), so a cache filled on one machine is valid on another with the same NVRTC.
 */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "gpu_internal.h"

/* The table cmake/embed.cmake generates (same shape as there). */
typedef struct kernel_source {
  const char *name;
  const char *text;
  size_t size;
} kernel_source;
extern const kernel_source kernel_sources[];
extern const int kernel_source_count;

/* ---------------------------------------------------------------- NVRTC, loaded */

typedef int nvrtcResult; /* 0 = NVRTC_SUCCESS */
typedef struct _nvrtcProgram *nvrtcProgram;
enum { NVRTC_ERR_INVALID_OPTION = 5, NVRTC_ERR_COMPILATION = 6 };

typedef struct nvrtc_api {
  void *lib;
  int major, minor;
  char path[PATH_MAX];    /* the library file that was loaded */
  char include[PATH_MAX];  /* the toolkit include dir (holds cuda_fp16.h), "" if none found */
  nvrtcResult (*nvrtcVersion)(int *major, int *minor);
  const char *(*nvrtcGetErrorString)(nvrtcResult r);
  nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram *p, const char *src, const char *name, int num_headers,
                                    const char *const *headers, const char *const *include_names);
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram *p);
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram p, int num_options, const char *const *options);
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram p, size_t *size);
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram p, char *log);
  nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram p, size_t *size);
  nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram p, char *cubin);
} nvrtc_api;

static nvrtc_api g_nvrtc;
static int g_nvrtc_ok;
static char g_nvrtc_error[900];
static pthread_once_t g_nvrtc_once = PTHREAD_ONCE_INIT;

static int is_dir(const char *p) {
  struct stat st;
  return p && stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* out = a/b; 0 if it does not fit (then the path is not used). */
static int join(char *out, size_t size, const char *a, const char *b) {
  int n = snprintf(out, size, "%s/%s", a, b);
  return n > 0 && (size_t)n < size;
}

/* dst = src; 0 if it does not fit. */
static int copy_str(char *dst, size_t size, const char *src) {
  int n = snprintf(dst, size, "%s", src);
  return n >= 0 && (size_t)n < size;
}

static int has_fp16_header(const char *dir) {
  char p[PATH_MAX];
  struct stat st;
  return join(p, sizeof p, dir, "cuda_fp16.h") && stat(p, &st) == 0;
}

/* Append `what` to the list of places tried (for the error message). */
static void note_tried(char *tried, size_t size, const char *what, const char *suffix) {
  size_t n = strlen(tried);
  if (n + 3 < size && snprintf(tried + n, size - n, "%s%s%s", n ? "; " : "", what, suffix) < 0) tried[n] = 0;
}

static void *try_open(const char *file, char *tried, size_t tried_size) {
  void *lib = dlopen(file, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char *e = dlerror();
    /* dlerror repeats the file name; for a path that does not exist a short note is enough. */
    struct stat st;
    if (strchr(file, '/') && stat(file, &st) != 0) {
      note_tried(tried, tried_size, file, ": not found");
    } else {
      note_tried(tried, tried_size, e ? e : file, "");
    }
  }
  return lib;
}

static void *open_in_dir(const char *dir, char *tried, size_t tried_size) {
  static const char *const names[] = {"libnvrtc.so.13", "libnvrtc.so.12"};
  for (int i = 0; i < 2; i++) {
    char p[PATH_MAX];
    struct stat st;
    if (!join(p, sizeof p, dir, names[i]) || stat(p, &st) != 0) continue; /* absent: not worth a note each */
    void *lib = try_open(p, tried, tried_size);
    if (lib) return lib;
  }
  return NULL;
}

static void find_include_dir(void) {
  const char *e = getenv("KVATTN_CUDA_INCLUDE");
  if (e && e[0] && has_fp16_header(e) && copy_str(g_nvrtc.include, sizeof g_nvrtc.include, e)) return;
  /* Next to the library: <cuda>/lib64/libnvrtc.so.13 -> <cuda>/include (also lib/,
   * targets/<arch>/lib/); the real path, so that /usr/local/cuda -> cuda-13.0 links resolve. */
  char real[PATH_MAX];
  if (realpath(g_nvrtc.path, real)) {
    char *slash = strrchr(real, '/');
    if (slash) {
      *slash = 0;
      char cand[PATH_MAX], resolved[PATH_MAX];
      static const char *const ups[] = {"../include", "../../include"};
      for (int i = 0; i < 2; i++)
        if (join(cand, sizeof cand, real, ups[i]) && has_fp16_header(cand) && realpath(cand, resolved) &&
            copy_str(g_nvrtc.include, sizeof g_nvrtc.include, resolved))
          return;
    }
  }
  const char *homes[] = {getenv("CUDA_HOME"), getenv("CUDA_PATH"), "/usr/local/cuda"};
  for (int i = 0; i < 3; i++) {
    if (!homes[i] || !homes[i][0]) continue;
    char cand[PATH_MAX];
    if (join(cand, sizeof cand, homes[i], "include") && has_fp16_header(cand) &&
        copy_str(g_nvrtc.include, sizeof g_nvrtc.include, cand))
      return;
  }
  g_nvrtc.include[0] = 0; /* kernels that include <cuda_fp16.h> will fail to compile, and say so */
}

static void nvrtc_load_once(void) {
  char tried[800] = "";
  void *lib = NULL;
  const char *env = getenv("KVATTN_NVRTC");
  if (env && env[0]) {
    /* An explicit choice is final: a wrong KVATTN_NVRTC is reported, not silently replaced. */
    lib = is_dir(env) ? open_in_dir(env, tried, sizeof tried) : try_open(env, tried, sizeof tried);
    if (!lib) {
      snprintf(g_nvrtc_error, sizeof g_nvrtc_error, "cannot load NVRTC from KVATTN_NVRTC=%s (%s)", env,
               tried[0] ? tried : "no libnvrtc.so.13 or .12 there");
      return;
    }
  } else {
    const char *homes[] = {getenv("CUDA_HOME"), getenv("CUDA_PATH"), "/usr/local/cuda"};
    for (int i = 0; i < 3 && !lib; i++) {
      if (!homes[i] || !homes[i][0]) continue;
      char d[PATH_MAX];
      if (join(d, sizeof d, homes[i], "lib64")) lib = open_in_dir(d, tried, sizeof tried);
      if (!lib && join(d, sizeof d, homes[i], "lib")) lib = open_in_dir(d, tried, sizeof tried);
    }
    if (!lib) lib = try_open("libnvrtc.so.13", tried, sizeof tried);
    if (!lib) lib = try_open("libnvrtc.so.12", tried, sizeof tried);
    if (!lib) {
      snprintf(g_nvrtc_error, sizeof g_nvrtc_error,
               "cannot load NVRTC (libnvrtc.so.13 or .12; set KVATTN_NVRTC to its path): %s", tried);
      return;
    }
  }
  nvrtc_api a;
  memset(&a, 0, sizeof a);
  a.lib = lib;
#define R(field)                                                                                   \
  do {                                                                                             \
    *(void **)&a.field = dlsym(lib, #field);                                                       \
    if (!a.field) {                                                                                \
      snprintf(g_nvrtc_error, sizeof g_nvrtc_error, "NVRTC library has no symbol %s (too old?)", #field); \
      dlclose(lib);                                                                                \
      return;                                                                                      \
    }                                                                                              \
  } while (0)
  R(nvrtcVersion);
  R(nvrtcGetErrorString);
  R(nvrtcCreateProgram);
  R(nvrtcDestroyProgram);
  R(nvrtcCompileProgram);
  R(nvrtcGetProgramLogSize);
  R(nvrtcGetProgramLog);
  R(nvrtcGetCUBINSize);
  R(nvrtcGetCUBIN);
#undef R
  if (a.nvrtcVersion(&a.major, &a.minor) != 0) {
    snprintf(g_nvrtc_error, sizeof g_nvrtc_error, "nvrtcVersion failed");
    dlclose(lib);
    return;
  }
  if (a.major < 12) {
    snprintf(g_nvrtc_error, sizeof g_nvrtc_error, "NVRTC %d.%d is too old: kvattn needs 12 or newer", a.major,
             a.minor);
    dlclose(lib);
    return;
  }
  Dl_info info;
  if (!dladdr(*(void **)&a.nvrtcVersion, &info) || !info.dli_fname ||
      !copy_str(a.path, sizeof a.path, info.dli_fname))
    a.path[0] = 0;
  g_nvrtc = a;
  find_include_dir();
  g_nvrtc_ok = 1;
}

kvattn_status jit_nvrtc_load(char *desc, size_t desc_size) {
  pthread_once(&g_nvrtc_once, nvrtc_load_once);
  if (!g_nvrtc_ok) return set_error(KVATTN_ERROR_BACKEND_UNAVAILABLE, "%s", g_nvrtc_error);
  if (desc && desc_size)
    snprintf(desc, desc_size, "NVRTC %d.%d (%s), headers %s%s", g_nvrtc.major, g_nvrtc.minor, g_nvrtc.path,
             g_nvrtc.include[0] ? "-I" : "", g_nvrtc.include[0] ? g_nvrtc.include : "not found (no cuda_fp16.h)");
  return KVATTN_SUCCESS;
}

/* ---------------------------------------------------------------- sources and their includes */

static const kernel_source *find_source(const char *name) {
  for (int i = 0; i < kernel_source_count; i++)
    if (strcmp(kernel_sources[i].name, name) == 0) return &kernel_sources[i];
  return NULL;
}

#define JIT_MAX_FILES 64

/* The embedded files `src` includes with #include "name", transitively, appended to files[]
 * (files[0] is the source itself). Conditional includes are counted too (a superset is harmless:
 * it only widens the key). Names that are not embedded are left to NVRTC, which reports them. */
static int collect_includes(const kernel_source *files[], int *n) {
  for (int f = 0; f < *n; f++) {
    const char *p = files[f]->text, *end = p + files[f]->size;
    while (p < end) {
      const char *line_end = memchr(p, '\n', (size_t)(end - p));
      if (!line_end) line_end = end;
      const char *q = p;
      while (q < line_end && (*q == ' ' || *q == '\t')) q++;
      if (q < line_end && *q == '#') {
        q++;
        while (q < line_end && (*q == ' ' || *q == '\t')) q++;
        if ((size_t)(line_end - q) > 7 && strncmp(q, "include", 7) == 0) {
          q += 7;
          while (q < line_end && (*q == ' ' || *q == '\t')) q++;
          if (q < line_end && *q == '"') {
            const char *name = q + 1, *close = memchr(name, '"', (size_t)(line_end - name));
            if (close && close - name < 256) {
              char buf[256];
              memcpy(buf, name, (size_t)(close - name));
              buf[close - name] = 0;
              const kernel_source *inc = find_source(buf);
              int seen = 0;
              for (int k = 0; k < *n && inc; k++) seen |= files[k] == inc;
              if (inc && !seen) {
                if (*n >= JIT_MAX_FILES) return 0;
                files[(*n)++] = inc;
              }
            }
          }
        }
      }
      p = line_end + 1;
    }
  }
  return 1;
}

/* ---------------------------------------------------------------- jit_compile */

#define JIT_MAX_DEFINES 128
#define JIT_KEY_FORMAT "kvattn-jit-1"

static double now_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void hash_str(hash128 *h, const char *s) {
  size_t n = strlen(s);
  uint64_t len = n;
  hash128_update(h, &len, sizeof len); /* length-prefixed: no two lists of strings collide */
  hash128_update(h, s, n);
}

/* KVATTN_JIT_VERBOSE=1: every compile and cache hit, and NVRTC's full log, on stderr (logging is
 * opt-in; errors always travel as statuses and kvattn_last_error()). 2: also ptxas's resource
 * report (registers, spill stores/loads) in that log, for compiles (not cache hits): the figures of
 * the kernels kvattn really runs, which nvcc on the same source does not always reproduce. */
static int jit_verbose_level(void) {
  const char *e = getenv("KVATTN_JIT_VERBOSE");
  if (!e || !e[0] || strcmp(e, "0") == 0) return 0;
  return atoi(e) >= 2 ? 2 : 1;
}
static int jit_verbose(void) { return jit_verbose_level() > 0; }

/* The log's first lines, at most `max` bytes. */
static void log_head(const char *log, char *out, size_t max) {
  size_t n = 0;
  for (const char *p = log; *p && n + 1 < max; p++) out[n++] = *p;
  out[n] = 0;
  while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' ')) out[--n] = 0;
}

static kvattn_status nvrtc_compile(const jit_spec *spec, const kernel_source *files[], int nfiles,
                                   const char *const *options, int noptions, void **cubin, size_t *cubin_size) {
  const nvrtc_api *a = &g_nvrtc;
  const char *headers[JIT_MAX_FILES], *names[JIT_MAX_FILES];
  for (int i = 1; i < nfiles; i++) {
    headers[i - 1] = files[i]->text;
    names[i - 1] = files[i]->name;
  }
  nvrtcProgram prog = NULL;
  nvrtcResult r = a->nvrtcCreateProgram(&prog, files[0]->text, files[0]->name, nfiles - 1, headers, names);
  if (r != 0)
    return set_error(KVATTN_ERROR_COMPILE, "jit: nvrtcCreateProgram(%s): %s", spec->source, a->nvrtcGetErrorString(r));
  kvattn_status st = KVATTN_SUCCESS;
  r = a->nvrtcCompileProgram(prog, noptions, options);
  if (r != 0) {
    size_t log_size = 0;
    char *log = NULL;
    if (a->nvrtcGetProgramLogSize(prog, &log_size) == 0 && log_size > 0 && (log = malloc(log_size + 1))) {
      if (a->nvrtcGetProgramLog(prog, log) != 0) log[0] = 0;
      log[log_size] = 0;
    }
    char head[640];
    log_head(log ? log : "", head, sizeof head);
    /* INVALID_OPTION is the caller's arch or definitions; everything else is the source. */
    st = set_error(r == NVRTC_ERR_INVALID_OPTION ? KVATTN_ERROR_INVALID_ARGUMENT : KVATTN_ERROR_COMPILE,
                   "jit: NVRTC %d.%d failed on %s for %s (%s) [%s]: %s", a->major, a->minor, spec->source,
                   spec->arch, a->nvrtcGetErrorString(r), spec->defines ? spec->defines : "", head);
    if (jit_verbose() && log) fprintf(stderr, "kvattn jit: NVRTC log for %s (%s):\n%s\n", spec->source, spec->arch, log);
    free(log);
    a->nvrtcDestroyProgram(&prog);
    return st;
  }
  if (jit_verbose()) { /* warnings of a successful compile, only when asked for */
    size_t log_size = 0;
    char *log = NULL;
    if (a->nvrtcGetProgramLogSize(prog, &log_size) == 0 && log_size > 1 && (log = malloc(log_size + 1)) &&
        a->nvrtcGetProgramLog(prog, log) == 0) {
      log[log_size] = 0;
      fprintf(stderr, "kvattn jit: NVRTC log for %s (%s) [%s]:\n%s\n", spec->source, spec->arch,
              spec->defines ? spec->defines : "", log);
    }
    free(log);
  }
  size_t n = 0;
  if ((r = a->nvrtcGetCUBINSize(prog, &n)) != 0 || n == 0) {
    st = set_error(KVATTN_ERROR_COMPILE, "jit: no CUBIN for %s on %s (%s): is the architecture a real one (sm_XX)?",
                   spec->source, spec->arch, r ? a->nvrtcGetErrorString(r) : "size 0");
  } else if (!(*cubin = malloc(n))) {
    st = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "jit: cannot allocate %zu bytes for a cubin", n);
  } else if ((r = a->nvrtcGetCUBIN(prog, *cubin)) != 0) {
    free(*cubin);
    *cubin = NULL;
    st = set_error(KVATTN_ERROR_COMPILE, "jit: nvrtcGetCUBIN(%s): %s", spec->source, a->nvrtcGetErrorString(r));
  } else {
    *cubin_size = n;
  }
  a->nvrtcDestroyProgram(&prog);
  return st;
}

/* "sm_" then digits, optionally one 'a' or 'f' (arch-specific / family) suffix. */
static int valid_arch(const char *arch) {
  if (strncmp(arch, "sm_", 3) != 0) return 0;
  const char *p = arch + 3;
  int digits = 0;
  while (*p >= '0' && *p <= '9') p++, digits++;
  if (*p == 'a' || *p == 'f') p++;
  return digits >= 2 && digits <= 3 && *p == 0;
}

kvattn_status jit_compile(const jit_spec *spec, const char *cache_dir, void **cubin, size_t *cubin_size,
                          double *seconds, int *cache_hit) {
  RETURN_IF(!spec || !spec->source || !spec->arch || !cubin || !cubin_size, KVATTN_ERROR_INVALID_ARGUMENT,
            "jit_compile: spec, spec->source, spec->arch, cubin and cubin_size must not be NULL");
  *cubin = NULL;
  *cubin_size = 0;
  if (seconds) *seconds = 0;
  if (cache_hit) *cache_hit = 0;
  RETURN_IF(!valid_arch(spec->arch), KVATTN_ERROR_INVALID_ARGUMENT,
            "jit_compile: arch=\"%s\": want a real architecture such as sm_80, sm_86, sm_89, sm_90a", spec->arch);
  TRY(jit_nvrtc_load(NULL, 0));

  const kernel_source *files[JIT_MAX_FILES];
  int nfiles = 1;
  files[0] = find_source(spec->source);
  RETURN_IF(!files[0], KVATTN_ERROR_INVALID_ARGUMENT, "jit_compile: no kernel source \"%s\" is embedded in kvattn",
            spec->source);
  RETURN_IF(!collect_includes(files, &nfiles), KVATTN_ERROR_UNSUPPORTED,
            "jit_compile: %s includes more than %d files", spec->source, JIT_MAX_FILES);

  /* Options: the fixed ones, then each definition as its own option. */
  char arch_opt[64], include_opt[PATH_MAX + 8];
  const char *options[8 + JIT_MAX_DEFINES];
  int nopt = 0, nhashed;
  snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=%s", spec->arch);
  options[nopt++] = arch_opt;
  options[nopt++] = "-default-device";
  options[nopt++] = "--std=c++17";
  options[nopt++] = "-lineinfo";
  char *defs = strdup(spec->defines ? spec->defines : "");
  RETURN_IF(!defs, KVATTN_ERROR_OUT_OF_MEMORY, "jit_compile: out of memory");
  kvattn_status st = KVATTN_SUCCESS;
  int hit = 0;
  double compile_s = 0;
  jit_key key = {0, 0};
  for (char *save = NULL, *tok = strtok_r(defs, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
    /* Only definitions: an option smuggled in here would change the code without the reader of the
     * spec seeing it. */
    if (strncmp(tok, "-D", 2) != 0 || tok[2] == 0 || tok[2] == '=') {
      st = set_error(KVATTN_ERROR_INVALID_ARGUMENT, "jit_compile: defines=\"%s\": \"%s\" is not a -DNAME[=VALUE]",
                     spec->defines, tok);
      goto done;
    }
    if (nopt >= 8 + JIT_MAX_DEFINES - 2) { /* room for the include and the ptxas report */
      st = set_error(KVATTN_ERROR_INVALID_ARGUMENT, "jit_compile: more than %d definitions", JIT_MAX_DEFINES);
      goto done;
    }
    options[nopt++] = tok;
  }
  nhashed = nopt;
  if (g_nvrtc.include[0] && snprintf(include_opt, sizeof include_opt, "-I%s", g_nvrtc.include) > 0)
    options[nopt++] = include_opt;
  if (jit_verbose_level() >= 2) options[nopt++] = "--ptxas-options=-v"; /* a report only: not in the key */

  hash128 h;
  hash128_init(&h, 0);
  hash_str(&h, JIT_KEY_FORMAT);
  uint64_t ver[2] = {(uint64_t)g_nvrtc.major, (uint64_t)g_nvrtc.minor};
  hash128_update(&h, ver, sizeof ver);
  for (int i = 0; i < nhashed; i++) hash_str(&h, options[i]);
  for (int i = 0; i < nfiles; i++) {
    hash_str(&h, files[i]->name);
    uint64_t len = files[i]->size;
    hash128_update(&h, &len, sizeof len);
    hash128_update(&h, files[i]->text, files[i]->size);
  }
  key = hash128_final(&h);

  char dir[1024];
  int have_dir = jit_cache_dir(cache_dir, dir, sizeof dir);
  if (have_dir && jit_cache_load(dir, key, cubin, cubin_size)) {
    hit = 1;
    goto done;
  }
  /* Miss: take the key's lock, look again (another process may have just compiled it), compile. */
  int lock = have_dir ? jit_cache_lock(dir, key) : -1;
  if (lock >= 0 && jit_cache_load(dir, key, cubin, cubin_size)) {
    jit_cache_unlock(lock);
    hit = 1;
    goto done;
  }
  double t0 = now_seconds();
  st = nvrtc_compile(spec, files, nfiles, options, nopt, cubin, cubin_size);
  compile_s = now_seconds() - t0;
  if (seconds) *seconds = compile_s;
  if (st == KVATTN_SUCCESS && have_dir) jit_cache_store(dir, key, *cubin, *cubin_size);
  jit_cache_unlock(lock);
done:
  if (jit_verbose() && st == KVATTN_SUCCESS)
    fprintf(stderr, "kvattn jit: %s %s [%s] key %016llx%016llx: %s %.3f s, %zu-byte cubin\n", spec->source,
            spec->arch, spec->defines ? spec->defines : "", (unsigned long long)key.hi, (unsigned long long)key.lo,
            hit ? "cache hit" : "compiled in", compile_s, *cubin_size);
  if (cache_hit) *cache_hit = hit;
  free(defs);
  return st;
}
