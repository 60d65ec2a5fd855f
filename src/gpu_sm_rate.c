/*
 * gpu_sm_rate.c - each SM's streaming rate relative to the others (kernels/sm_rate.cu), measured once per
 * context: the weights of the decode planner's lists (src/plan_decode.h stretch_q32).
 *
 * KVATTN_DECODE_SM_WEIGHTS, read when a decode attention is created (src/gpu_attention.c): unset or 1 = the
 * context's measured weights; 0 = none (equal stretches: plans then depend only on the batch, so the same batch
 * gives the same bits in every process); a list of numbers ("1.25,1" or "1.25:1") = these weights, cycled over
 * the SMs (tests and experiments). KVATTN_DECODE_SM_RATES_PRINT=1 prints each SM's measured rate on stderr.
 *
 * A failure (no room for the probe's buffer, a launch error) is not the caller's: the weights are then
 * absent and decode plans equal stretches, as before this existed.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_internal.h"

/* a slice is a multiple of PROBE_CHUNK_VECS 16-byte vectors: any probe stage (128 threads x up to 64 vectors) */
enum { PROBE_THREADS = 128, PROBE_CHUNK_VECS = 128 * 64, PROBE_PASSES = 4 };

static int cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Weights in sixteenths (16 = the median SM), from 8 (half as fast) to 32. */
static uint16_t weight16(double w) {
  long q = lround(w * 16.0);
  return (uint16_t)(q < 8 ? 8 : q > 32 ? 32 : q);
}

int gpu_parse_sm_weights(const char *s, int sms, uint16_t *out) {
  double v[256];
  int n = 0;
  const char *p = s;
  while (*p && n < 256) {
    char *end;
    v[n] = strtod(p, &end);
    if (end == p || !(v[n] > 0.0) || !isfinite(v[n])) return 0;
    n++;
    p = end;
    if (*p == ',' || *p == ':') p++;
    else if (*p) return 0;
  }
  if (n == 0 || *p) return 0;
  for (int i = 0; i < sms; i++) out[i] = weight16(v[i % n]);
  return 1;
}

/* Run the probe PROBE_PASSES times with `per_sm` CTAs per SM; rates[s] = SM s's median CTA rate over the passes
 * after the first (GB/s; 0 where no CTA ran there). *total = the device's read rate in the last pass. */
static kvattn_status probe(struct gpu_context *g, int per_sm, double *rates, double *total) {
  const cuda_api *api = g->api;
  const int sms = g->sm_count, grid = sms * per_sm;
  CUfunction fn;
  /* KVATTN_SM_PROBE_DEFINES: another shape of the probe (diagnostic: kernels/sm_rate.cu's PROBE_*) */
  const char *defs = getenv("KVATTN_SM_PROBE_DEFINES");
  TRY(gpu_get_kernel(g, "sm_rate.cu", defs ? defs : "", "sm_rate_probe", 0, &fn));
  TRY(gpu_make_current(g));
  /* 256 MiB, else 128: several times L2 (50 MiB on the H100/H200), so each slice is read from DRAM */
  CUdeviceptr buf = 0, out = 0;
  size_t bytes = (size_t)256 << 20;
  while (api->cuMemAlloc(&buf, bytes) != 0) {
    buf = 0;
    if (bytes <= ((size_t)128 << 20)) return set_error(KVATTN_ERROR_OUT_OF_MEMORY, "SM rate probe: no room for 128 MiB");
    bytes /= 2;
  }
  /* slices for the grid rounded up to 16 CTAs (the gather form reads in groups of up to 16) */
  long long slice_vecs = (long long)(bytes / 16 / (((size_t)grid + 15) / 16 * 16)) / PROBE_CHUNK_VECS * PROBE_CHUNK_VECS;
  double *cta_rate = calloc((size_t)PROBE_PASSES * sms, sizeof(double));
  int *cta_count = calloc((size_t)PROBE_PASSES * sms, sizeof(int));
  unsigned long long *host = malloc((size_t)grid * 4 * sizeof(unsigned long long));
  kvattn_status st = KVATTN_SUCCESS;
  CUresult r = 0;
  if (!cta_rate || !cta_count || !host) st = set_error(KVATTN_ERROR_OUT_OF_MEMORY, "SM rate probe: out of host memory");
  else if (slice_vecs < PROBE_CHUNK_VECS) st = set_error(KVATTN_ERROR_UNSUPPORTED, "SM rate probe: %d CTAs", grid);
  else if ((r = api->cuMemAlloc(&out, (size_t)grid * 4 * 8)) != 0 || (r = api->cuMemsetD8(buf, 0, bytes)) != 0)
    st = cuda_error(api, r, "SM rate probe: cuMemAlloc/cuMemsetD8");
  unsigned long long duration_ns = 200000;
  for (int pass = 0; pass < PROBE_PASSES && st == KVATTN_SUCCESS; pass++) {
    void *args[] = {&buf, &slice_vecs, &duration_ns, &out};
    if ((r = api->cuLaunchKernel(fn, (unsigned)grid, 1, 1, PROBE_THREADS, 1, 1, 0, NULL, args, NULL)) != 0 ||
        (r = api->cuMemcpyDtoHAsync(host, out, (size_t)grid * 4 * 8, NULL)) != 0 ||
        (r = api->cuStreamSynchronize(NULL)) != 0) {
      st = cuda_error(api, r, "SM rate probe: launch");
      break;
    }
    double sum_bytes = 0, max_ns = 1;
    for (int b = 0; b < grid; b++) {
      const unsigned long long sm = host[4 * b], by = host[4 * b + 1], ns = host[4 * b + 2];
      sum_bytes += (double)by;
      if ((double)ns > max_ns) max_ns = (double)ns;
      if (sm < (unsigned long long)sms && ns > 0) {
        cta_rate[(size_t)pass * sms + sm] += (double)by / (double)ns;
        cta_count[(size_t)pass * sms + sm]++;
      }
    }
    *total = sum_bytes / max_ns;
  }
  if (st == KVATTN_SUCCESS) {
    double v[PROBE_PASSES];
    for (int s = 0; s < sms; s++) {
      int n = 0;
      for (int pass = 1; pass < PROBE_PASSES; pass++) /* the first pass warms clocks and TLBs */
        if (cta_count[(size_t)pass * sms + s]) v[n++] = cta_rate[(size_t)pass * sms + s] / cta_count[(size_t)pass * sms + s];
      rates[s] = n ? median(v, n) : 0.0;
    }
  }
  if (out) api->cuMemFree(out);
  api->cuMemFree(buf);
  free(cta_rate);
  free(cta_count);
  free(host);
  return st;
}

static kvattn_status measure(struct gpu_context *g, int per_sm) {
  const int sms = g->sm_count;
  uint16_t *w = calloc((size_t)sms, sizeof *w);
  RETURN_IF(!w, KVATTN_ERROR_OUT_OF_MEMORY, "SM weights: out of host memory");
  double *rates = calloc((size_t)sms, sizeof(double)), *sorted = calloc((size_t)sms, sizeof(double));
  double total = 0;
  kvattn_status st = rates && sorted ? probe(g, per_sm, rates, &total)
                                     : set_error(KVATTN_ERROR_OUT_OF_MEMORY, "SM weights: out of host memory");
  if (st == KVATTN_SUCCESS) {
    int n = 0;
    for (int s = 0; s < sms; s++)
      if (rates[s] > 0) sorted[n++] = rates[s];
    const double mid = n ? median(sorted, n) : 0.0;
    int fast = 0;
    for (int s = 0; s < sms; s++) {
      w[s] = rates[s] > 0 && mid > 0 ? weight16(rates[s] / mid) : 16;
      fast += w[s] >= 18;
    }
    if (getenv("KVATTN_DECODE_SM_RATES_PRINT")) /* diagnostic: each SM's rate and weight, on stderr */
      for (int s = 0; s < sms; s++)
        fprintf(stderr, "kvattn SM rate: SM %3d  %6.2f GB/s a CTA  weight %2u/16\n", s, rates[s], (unsigned)w[s]);
    g->sm_weight = w;
    snprintf(g->sm_rate_desc, sizeof g->sm_rate_desc,
             "measured: %.2f TB/s in all, an SM's %.1f GB/s at the median, %d of %d SMs at >= 1.125x it", total / 1e3,
             mid * per_sm, fast, sms);
  } else {
    free(w);
    snprintf(g->sm_rate_desc, sizeof g->sm_rate_desc, "not measured: %.180s", kvattn_last_error());
    clear_error(); /* not the caller's failure: decode plans equal stretches */
  }
  free(rates);
  free(sorted);
  return KVATTN_SUCCESS;
}

kvattn_status gpu_sm_weights(struct gpu_context *g, int per_sm, const uint16_t **weights) {
  *weights = NULL;
  pthread_mutex_lock((pthread_mutex_t *)g->rate_lock);
  kvattn_status st = KVATTN_SUCCESS;
  if (!g->sm_rate_done) {
    st = measure(g, per_sm);
    g->sm_rate_done = 1;
  }
  *weights = g->sm_weight;
  pthread_mutex_unlock((pthread_mutex_t *)g->rate_lock);
  return st;
}

void gpu_sm_rate_info(struct gpu_context *g, char *buf, size_t size) {
  pthread_mutex_lock((pthread_mutex_t *)g->rate_lock);
  snprintf(buf, size, "%s", g->sm_rate_desc);
  pthread_mutex_unlock((pthread_mutex_t *)g->rate_lock);
}
