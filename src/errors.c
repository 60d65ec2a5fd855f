/* errors.c - statuses, the thread-local detail message, versions. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

static _Thread_local char last_error[1024];

kvattn_status set_error(kvattn_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return s;
}

void clear_error(void) { last_error[0] = 0; }

KVATTN_API const char *kvattn_last_error(void) { return last_error; }

KVATTN_API const char *kvattn_status_string(kvattn_status s) {
  switch (s) {
    case KVATTN_SUCCESS: return "KVATTN_SUCCESS";
    case KVATTN_ERROR_INVALID_ARGUMENT: return "KVATTN_ERROR_INVALID_ARGUMENT";
    case KVATTN_ERROR_INVALID_DTYPE: return "KVATTN_ERROR_INVALID_DTYPE";
    case KVATTN_ERROR_INVALID_SHAPE: return "KVATTN_ERROR_INVALID_SHAPE";
    case KVATTN_ERROR_INVALID_STRIDE: return "KVATTN_ERROR_INVALID_STRIDE";
    case KVATTN_ERROR_INVALID_INDEX: return "KVATTN_ERROR_INVALID_INDEX";
    case KVATTN_ERROR_DEVICE_MISMATCH: return "KVATTN_ERROR_DEVICE_MISMATCH";
    case KVATTN_ERROR_INVALID_USAGE: return "KVATTN_ERROR_INVALID_USAGE";
    case KVATTN_ERROR_WORKSPACE_TOO_SMALL: return "KVATTN_ERROR_WORKSPACE_TOO_SMALL";
    case KVATTN_ERROR_BOUNDS_EXCEEDED: return "KVATTN_ERROR_BOUNDS_EXCEEDED";
    case KVATTN_ERROR_UNSUPPORTED: return "KVATTN_ERROR_UNSUPPORTED";
    case KVATTN_ERROR_BACKEND_UNAVAILABLE: return "KVATTN_ERROR_BACKEND_UNAVAILABLE";
    case KVATTN_ERROR_OUT_OF_MEMORY: return "KVATTN_ERROR_OUT_OF_MEMORY";
    case KVATTN_ERROR_CUDA: return "KVATTN_ERROR_CUDA";
    case KVATTN_ERROR_COMPILE: return "KVATTN_ERROR_COMPILE";
    case KVATTN_ERROR_INTERNAL: return "KVATTN_ERROR_INTERNAL";
  }
  return "KVATTN_ERROR_UNKNOWN_STATUS";
}

KVATTN_API unsigned kvattn_version_number(void) { return KVATTN_VERSION_NUMBER; }
KVATTN_API const char *kvattn_version(void) { return KVATTN_VERSION_STRING; }
