/*
 * test.h - the tiny harness every C test file uses.
 *
 *   TEST(name_of_the_behaviour) { CHECK(cond); CHECK_STATUS(call, KVATTN_ERROR_INVALID_INDEX); }
 *   TEST_MAIN()
 *
 * Each file is one executable (one ctest test). It runs its cases in order (or only those whose
 * name contains argv[1]) and ends with the line "N passed, N failed", which scripts/run-tests.sh
 * sums over files. A case fails at its first failed CHECK; the message names file, line and
 * expression.
 */
#ifndef KVATTN_TEST_H
#define KVATTN_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvattn.h"

typedef void (*test_fn)(int *failed);
typedef struct test_case {
  const char *name;
  test_fn fn;
} test_case;

#define TEST_MAX 512
static test_case test_cases_[TEST_MAX];
static int test_count_;

#define TEST(name)                                                             \
  static void name(int *failed_);                                              \
  __attribute__((constructor)) static void register_##name(void) {             \
    if (test_count_ < TEST_MAX) test_cases_[test_count_++] = (test_case){#name, name}; \
  }                                                                            \
  static void name(int *failed_)

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      *failed_ = 1;                                                            \
      return;                                                                  \
    }                                                                          \
  } while (0)

#define CHECK_MSG(cond, ...)                                                   \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "  %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                            \
      fprintf(stderr, "\n");                                                   \
      *failed_ = 1;                                                            \
      return;                                                                  \
    }                                                                          \
  } while (0)

/* The call must return exactly `want`; prints the library's detail message when it does not. */
#define CHECK_STATUS(call, want)                                               \
  do {                                                                         \
    kvattn_status got_ = (call);                                               \
    if (got_ != (want)) {                                                      \
      fprintf(stderr, "  %s:%d: %s returned %s, want %s (%s)\n", __FILE__, __LINE__, #call, \
              kvattn_status_string(got_), kvattn_status_string(want), kvattn_last_error()); \
      *failed_ = 1;                                                            \
      return;                                                                  \
    }                                                                          \
  } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, KVATTN_SUCCESS)

/* Skip the rest of a case with a printed reason (counts as passed; the reason is shown). */
#define SKIP(...)                                                              \
  do {                                                                         \
    fprintf(stderr, "  skipped: ");                                            \
    fprintf(stderr, __VA_ARGS__);                                              \
    fprintf(stderr, "\n");                                                     \
    return;                                                                    \
  } while (0)

static inline int test_main_(int argc, char **argv) {
  int passed = 0, failed = 0;
  for (int i = 0; i < test_count_; i++) {
    if (argc > 1 && !strstr(test_cases_[i].name, argv[1])) continue;
    int f = 0;
    fprintf(stderr, "[ RUN  ] %s\n", test_cases_[i].name);
    test_cases_[i].fn(&f);
    fprintf(stderr, "[ %s ] %s\n", f ? "FAIL" : " OK ", test_cases_[i].name);
    if (f) failed++; else passed++;
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

#define TEST_MAIN() \
  int main(int argc, char **argv) { return test_main_(argc, argv); }

#endif
