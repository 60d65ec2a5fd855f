/*
 * test_cli.c - the `kvattn` command-line tool, run as a user and a script would: its exit codes
 * (0 ok, 1 a check failed, 2 usage error, 3 backend/library error), its messages, its demo, check
 * sweep, benchmarks with JSON output, info and warmup.
 *
 * The tool is found through $KVATTN_CLI, else as ./kvattn or ../kvattn from the working directory
 * (ctest runs in the build directory, where CMake puts the tool). Without it every case is skipped
 * with the reason printed.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test.h"

static const char *cli_path(void) {
  static char path[1024];
  static int searched;
  if (searched) return path[0] ? path : NULL;
  searched = 1;
  const char *env = getenv("KVATTN_CLI");
  const char *candidates[] = {env, "./kvattn", "../kvattn"};
  for (int i = 0; i < 3; i++) {
    struct stat st;
    if (candidates[i] && candidates[i][0] && stat(candidates[i], &st) == 0 && S_ISREG(st.st_mode) &&
        access(candidates[i], X_OK) == 0) {
      snprintf(path, sizeof path, "%s", candidates[i]);
      return path;
    }
  }
  return NULL;
}

#define NEED_CLI()                                                                              \
  do {                                                                                          \
    if (!cli_path()) SKIP("the kvattn tool is not at $KVATTN_CLI, ./kvattn or ../kvattn");     \
  } while (0)

/* Run `kvattn ARGS` with stdout and stderr captured together; returns its exit code (-1 if it
 * did not exit normally, e.g. a crash). */
static int run_cli(const char *args, char *out, size_t size) {
  char cmd[4096];
  snprintf(cmd, sizeof cmd, "%s %s 2>&1", cli_path(), args);
  out[0] = 0;
  FILE *p = popen(cmd, "r");
  if (!p) return -1;
  size_t n = 0, got;
  char chunk[4096];
  while ((got = fread(chunk, 1, sizeof chunk, p)) > 0) { /* keep the tail if it is long */
    if (got >= size) got = size - 1;
    if (n + got >= size) {
      size_t drop = n + got - (size - 1);
      memmove(out, out + drop, n - drop);
      n -= drop;
    }
    memcpy(out + n, chunk, got);
    n += got;
    out[n] = 0;
  }
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int count_of(const char *text, const char *word) {
  int n = 0;
  for (const char *p = text; (p = strstr(p, word)); p += strlen(word)) n++;
  return n;
}

static char out_[1 << 16];

TEST(no_command_is_a_usage_error) {
  NEED_CLI();
  CHECK_MSG(run_cli("", out_, sizeof out_) == 2, "%s", out_);
  CHECK(strstr(out_, "Usage: kvattn"));
}

TEST(unknown_command_is_a_usage_error_naming_it) {
  NEED_CLI();
  CHECK_MSG(run_cli("frobnicate", out_, sizeof out_) == 2, "%s", out_);
  CHECK(strstr(out_, "frobnicate"));
}

TEST(every_command_has_help_that_exits_0) {
  NEED_CLI();
  const char *cmds[] = {"info", "demo", "bench", "check", "warmup"};
  for (int i = 0; i < 5; i++) {
    char args[64], want[64];
    snprintf(args, sizeof args, "%s --help", cmds[i]);
    snprintf(want, sizeof want, "Usage: kvattn %s", cmds[i]);
    int rc = run_cli(args, out_, sizeof out_);
    CHECK_MSG(rc == 0, "kvattn %s exited %d:\n%s", args, rc, out_);
    CHECK_MSG(strstr(out_, want) && strstr(out_, "--help"), "kvattn %s printed:\n%s", args, out_);
  }
  CHECK(run_cli("bench decode --help", out_, sizeof out_) == 0);
  CHECK(run_cli("--help", out_, sizeof out_) == 0);
  CHECK(strstr(out_, "Exit codes"));
}

TEST(bad_flags_and_values_exit_2_with_a_message_naming_them) {
  NEED_CLI();
  static const struct {
    const char *args, *named;
  } bad[] = {
      {"demo --bogus", "--bogus"},
      {"demo --seed", "--seed"},
      {"demo --seed abc", "abc"},
      {"demo --seed 1 --seed 2", "twice"},
      {"demo --backend tpu", "tpu"},
      {"demo stray", "stray"},
      {"bench", "decode"},
      {"bench decodee", "decodee"},
      {"bench decode --batch 0", "--batch"},
      {"bench decode --batch -3", "--batch"},
      {"bench decode --batch 99999999999999999999", "--batch"},
      {"bench decode --qo-len 4", "--qo-len"},
      {"bench prefill --qo-len 64 --kv-len 32", "--kv-len"},
      {"bench decode --qo-heads 30 --kv-heads 8", "--kv-heads"},
      {"bench decode --dtype f8", "f8"},
      {"bench decode --layout xyz", "xyz"},
      {"bench decode --causal=1", "--causal"},
      {"bench append --json /nonexistent-dir/x/y.json --batch 1 --kv-len 8", "/nonexistent-dir/x/y.json"},
      {"check --cases 0", "--cases"},
      {"check --cases 5x", "5x"},
      {"check --op merge --decode", "--op attention"},
      {"check --op gemm", "gemm"},
      {"info --threads", "--threads"},
      {"warmup --qo-heads 32", "required"},
      {"warmup --qo-heads 32 --kv-heads 5 --head-dim 128", "--kv-heads"},
      {"warmup --qo-heads 32 --kv-heads 8 --head-dim 128 --arch sm_75", "sm_80"},
      {"warmup --qo-heads 32 --kv-heads 8 --head-dim 128 --arch hopper", "hopper"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int rc = run_cli(bad[i].args, out_, sizeof out_);
    CHECK_MSG(rc == 2, "kvattn %s exited %d, want 2:\n%s", bad[i].args, rc, out_);
    CHECK_MSG(strstr(out_, bad[i].named), "kvattn %s: the message does not name '%s':\n%s", bad[i].args,
              bad[i].named, out_);
  }
}

TEST(info_reports_version_backends_and_cache) {
  NEED_CLI();
  int rc = run_cli("info", out_, sizeof out_);
  CHECK_MSG(rc == 0, "exit %d:\n%s", rc, out_);
  CHECK(strstr(out_, KVATTN_VERSION_STRING));
  CHECK_MSG(strstr(out_, "cpu        available"), "%s", out_);
  /* the GPU is either there or the reason it is not is given */
  CHECK_MSG(strstr(out_, "cuda       available") || strstr(out_, "cuda       unavailable: KVATTN_ERROR_"), "%s", out_);
  CHECK(strstr(out_, "auto picks:"));
  CHECK(strstr(out_, "JIT cache:"));
}

TEST(demo_passes_on_the_cpu) {
  NEED_CLI();
  int rc = run_cli("demo --backend cpu --runs 2", out_, sizeof out_);
  CHECK_MSG(rc == 0, "exit %d:\n%s", rc, out_);
  CHECK_MSG(count_of(out_, "PASS") == 3 && !strstr(out_, "FAIL"), "%s", out_);
  CHECK(strstr(out_, "append") && strstr(out_, "decode") && strstr(out_, "prefill"));
  CHECK(strstr(out_, "demo: all checks passed"));
}

TEST(demo_with_another_seed_and_f16_passes) {
  NEED_CLI();
  int rc = run_cli("demo --backend cpu --seed 7 --dtype f16 --runs 1 --threads 1", out_, sizeof out_);
  CHECK_MSG(rc == 0, "exit %d:\n%s", rc, out_);
  CHECK_MSG(count_of(out_, "PASS") == 3, "%s", out_);
}

TEST(check_sweep_of_20_cases_passes_on_the_cpu) {
  NEED_CLI();
  int rc = run_cli("check --cases 20 --backend cpu", out_, sizeof out_);
  CHECK_MSG(rc == 0, "exit %d:\n%s", rc, out_);
  CHECK_MSG(strstr(out_, "check: 20 cases") && strstr(out_, "20 passed, 0 failed"), "%s", out_);
}

TEST(check_sweeps_merge_and_append_too) {
  NEED_CLI();
  const char *ops[] = {"merge", "append"};
  for (int i = 0; i < 2; i++) {
    char args[128];
    snprintf(args, sizeof args, "check --cases 30 --backend cpu --op %s --seed 4", ops[i]);
    int rc = run_cli(args, out_, sizeof out_);
    CHECK_MSG(rc == 0 && strstr(out_, "30 passed, 0 failed"), "kvattn %s exited %d:\n%s", args, rc, out_);
    /* and spoiled results are caught */
    snprintf(args, sizeof args, "check --cases 10 --backend cpu --op %s --seed 4 --perturb", ops[i]);
    rc = run_cli(args, out_, sizeof out_);
    CHECK_MSG(rc == 1 && count_of(out_, "FAILED") >= 5, "kvattn %s exited %d:\n%s", args, rc, out_);
  }
}

TEST(check_fails_with_exit_1_when_outputs_are_spoiled) {
  NEED_CLI();
  /* --perturb adds a tenth of a row's norm to one output value: every case with query rows must fail */
  int rc = run_cli("check --cases 12 --backend cpu --format paged --decode --perturb --verbose", out_, sizeof out_);
  CHECK_MSG(rc == 1, "exit %d, want 1:\n%s", rc, out_);
  CHECK_MSG(count_of(out_, "FAILED") >= 6, "%s", out_);
  for (const char *p = out_; (p = strstr(p, " ok: ")); p++) { /* only a batch of 0 requests may pass */
    const char *eol = strchr(p, '\n');
    const char *b0 = strstr(p, " b0 ");
    CHECK_MSG(b0 && (!eol || b0 < eol), "a spoiled case passed:\n%s", out_);
  }
  CHECK(strstr(out_, "reproduce: kvattn check --backend cpu --seed 1 --only 0 --format paged --decode"));
}

TEST(check_reruns_one_case_with_only) {
  NEED_CLI();
  int rc = run_cli("check --backend cpu --seed 3 --only 5 --verbose", out_, sizeof out_);
  CHECK_MSG(rc == 0, "exit %d:\n%s", rc, out_);
  CHECK_MSG(strstr(out_, "case 5 ok") && strstr(out_, "check: 1 cases"), "%s", out_);
}

/* Read a whole small file. */
static int read_file(const char *path, char *buf, size_t size) {
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  size_t n = fread(buf, 1, size - 1, f);
  buf[n] = 0;
  fclose(f);
  return 1;
}

/* The number after "key": in a JSON text, or -1. */
static double json_value(const char *json, const char *key) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\": ", key);
  const char *p = strstr(json, pat);
  if (!p) return -1;
  return strtod(p + strlen(pat), NULL);
}

TEST(bench_times_each_op_checks_it_and_writes_json) {
  NEED_CLI();
  static const char *runs[] = {
      "bench decode --backend cpu --batch 3 --kv-len 100 --page-size 7 --iters 2 --check",
      "bench prefill --backend cpu --batch 2 --qo-len 33 --kv-len 70 --causal --iters 2 --check --layout hnd",
      "bench append --backend cpu --batch 3 --kv-len 50 --qo-len 5 --page-size 4 --iters 3 --check",
  };
  static const char *ops[] = {"decode", "prefill", "append"};
  char json_path[] = "/tmp/kvattn_test_cli_XXXXXX";
  int fd = mkstemp(json_path);
  CHECK(fd >= 0);
  close(fd);
  for (int i = 0; i < 3; i++) {
    char args[512], json[8192], op[64];
    snprintf(args, sizeof args, "%s --json %s", runs[i], json_path);
    int rc = run_cli(args, out_, sizeof out_);
    CHECK_MSG(rc == 0, "kvattn %s exited %d:\n%s", args, rc, out_);
    CHECK_MSG(strstr(out_, "check PASS") && strstr(out_, "GB/s"), "%s", out_);
    CHECK(read_file(json_path, json, sizeof json));
    snprintf(op, sizeof op, "\"op\": \"%s\"", ops[i]);
    CHECK_MSG(strstr(json, op) && strstr(json, "\"pass\": true"), "%s", json);
    CHECK_MSG(json_value(json, "run_us") > 0 && json_value(json, "bytes") > 0 && json_value(json, "gb_per_s") > 0,
              "%s", json);
    if (i < 2) CHECK_MSG(json_value(json, "flops") > 0 && json_value(json, "plan_us") > 0, "%s", json);
  }
  /* prefill FLOPs count the causal mask: 2 requests, rows r of 33 see 70 - 33 + r + 1 keys */
  char json[8192];
  CHECK(run_cli("bench prefill --backend cpu --batch 2 --qo-len 33 --kv-len 70 --causal --iters 1 --qo-heads 2 "
                "--kv-heads 1 --head-dim 16 --json /dev/stdout", out_, sizeof out_) == 0);
  double pairs = 0;
  for (int r = 0; r < 33; r++) pairs += 70 - 33 + r + 1;
  double want = 4.0 * 2 * pairs * 2 * 16;
  CHECK_MSG(json_value(out_, "flops") == want, "flops %g, want %g:\n%s", json_value(out_, "flops"), want, out_);
  unlink(json_path);
  (void)json;
}

TEST(cuda_backend_runs_or_says_why_not) {
  NEED_CLI();
  int rc = run_cli("demo --backend cuda --runs 1", out_, sizeof out_);
  if (rc == 0) {
    CHECK_MSG(count_of(out_, "PASS") == 3, "%s", out_);
  } else {
    CHECK_MSG(rc == 3, "exit %d, want 0 (GPU) or 3 (no GPU):\n%s", rc, out_);
    CHECK_MSG(strstr(out_, "KVATTN_ERROR_BACKEND_UNAVAILABLE") || strstr(out_, "KVATTN_ERROR_"), "%s", out_);
  }
}

TEST(warmup_fills_a_cache_without_a_gpu_or_says_why) {
  NEED_CLI();
  char dir[] = "/tmp/kvattn_test_cli_cache_XXXXXX";
  CHECK(mkdtemp(dir));
  char args[512];
  snprintf(args, sizeof args, "warmup --qo-heads 32 --kv-heads 8 --head-dim 128 --arch sm_90a --cache-dir %s", dir);
  int rc = run_cli(args, out_, sizeof out_);
  if (rc == 3) {
    CHECK_MSG(strstr(out_, "KVATTN_ERROR_"), "%s", out_);
    SKIP("warmup unavailable here: %s", out_);
  }
  CHECK_MSG(rc == 0, "exit %d:\n%s", rc, out_);
  CHECK_MSG(strstr(out_, "kernel specializations ready for sm_90a"), "%s", out_);
  /* a second warmup finds everything in the cache */
  rc = run_cli(args, out_, sizeof out_);
  CHECK_MSG(rc == 0 && strstr(out_, ": 0.00 s of compilation"), "exit %d:\n%s", rc, out_);
  /* info lists what the cache holds */
  snprintf(args, sizeof args, "info --cache-dir %s", dir);
  rc = run_cli(args, out_, sizeof out_);
  CHECK_MSG(rc == 0 && strstr(out_, ".cubin") && strstr(out_, dir), "exit %d:\n%s", rc, out_);
  snprintf(args, sizeof args, "rm -rf '%s'", dir);
  CHECK(system(args) == 0);
}

TEST_MAIN()
