/*
 * merge.c - exact merge of attention states (o, lse) on the CPU, float64 math.
 *
 * A state over a KV set A is (v_A, s_A) with s_A = log sum_{j in A} e^{score_j} and v_A the
 * softmax-weighted mean of V over A. For disjoint sets the union's state is
 *   s = log sum_k e^{s_k},   v = sum_k e^{s_k - s} v_k,
 * computed here with the largest s_k subtracted first so nothing overflows. A state with
 * s_k = -inf (an empty KV set) has weight 0 and its v_k is never read, so garbage there (even NaN)
 * cannot leak; when every state is empty the result is v = 0, s = -inf.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "internal.h"

typedef struct merge_job {
  const tview *v, *s, *v_out, *s_out; /* v [tokens, states, heads, dim], s [tokens, states, heads] */
  int64_t token_begin, token_end;
  double *acc; /* [head_dim] scratch of this job */
} merge_job;

static void merge_range(const merge_job *job) {
  const tview *v = job->v, *s = job->s, *vo = job->v_out, *so = job->s_out;
  const int64_t states = v->shape[1], heads = v->shape[2], head_dim = v->shape[3];
  const float *sp = (const float *)s->data;
  double *acc = job->acc;
  for (int64_t t = job->token_begin; t < job->token_end; t++) {
    for (int64_t h = 0; h < heads; h++) {
      double max_s = -INFINITY;
      for (int64_t k = 0; k < states; k++) {
        double sk = sp[t * s->stride[0] + k * s->stride[1] + h * s->stride[2]];
        if (sk > max_s) max_s = sk;
      }
      double sum = 0;
      for (int64_t x = 0; x < head_dim; x++) acc[x] = 0;
      if (max_s > -INFINITY) {
        for (int64_t k = 0; k < states; k++) {
          double sk = sp[t * s->stride[0] + k * s->stride[1] + h * s->stride[2]];
          if (sk == -INFINITY) continue; /* empty: contributes nothing, its v is not read */
          double w = exp(sk - max_s);
          sum += w;
          int64_t base = t * v->stride[0] + k * v->stride[1] + h * v->stride[2];
          for (int64_t x = 0; x < head_dim; x++) acc[x] += w * tview_get(v, base + x * v->stride[3]);
        }
        for (int64_t x = 0; x < head_dim; x++) acc[x] /= sum;
      }
      /* Every input of (t, h) was read above, so outputs aliasing the inputs are safe. */
      int64_t ob = t * vo->stride[0] + h * vo->stride[1];
      for (int64_t x = 0; x < head_dim; x++) tview_set(vo, ob + x * vo->stride[2], acc[x]);
      if (so->data)
        ((float *)so->data)[t * so->stride[0] + h * so->stride[1]] =
            (float)(max_s > -INFINITY ? max_s + log(sum) : -INFINITY);
    }
  }
}

static void *merge_thread(void *arg) {
  merge_range((const merge_job *)arg);
  return NULL;
}

kvattn_status cpu_merge_states(const tview *v, const tview *s, const tview *v_out, const tview *s_out,
                               int num_threads) {
  RETURN_IF(v->ndim != 4 || s->ndim != 3 || v_out->ndim != 3, KVATTN_ERROR_INTERNAL,
            "cpu_merge_states: views of ndim %d/%d/%d, expected 4/3/3", v->ndim, s->ndim, v_out->ndim);
  RETURN_IF(!dtype_eq(s->dtype, DT_F32) || (s_out->data && !dtype_eq(s_out->dtype, DT_F32)),
            KVATTN_ERROR_INTERNAL, "cpu_merge_states: lse views must be float32");
  const int64_t tokens = v->shape[0], head_dim = v->shape[3];
  if (tokens == 0 || v->shape[2] == 0) return KVATTN_SUCCESS;

  /* Threads only pay off past a few thousand rows' worth of work. */
  int64_t work = tokens * v->shape[1] * v->shape[2] * head_dim;
  int threads = num_threads < 1 ? 1 : num_threads;
  if (threads > tokens) threads = (int)tokens;
  if (work < (1 << 16)) threads = 1;

  double *acc = malloc(sizeof(double) * (size_t)(head_dim > 0 ? head_dim : 1) * (size_t)threads);
  merge_job *jobs = malloc(sizeof(merge_job) * (size_t)threads);
  pthread_t *tid = malloc(sizeof(pthread_t) * (size_t)threads);
  int *started = malloc(sizeof(int) * (size_t)threads);
  if (!acc || !jobs || !tid || !started) {
    free(acc), free(jobs), free(tid), free(started);
    return set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_merge_states: scratch for %d threads", threads);
  }
  for (int i = 0; i < threads; i++)
    jobs[i] = (merge_job){v, s, v_out, s_out, tokens * i / threads, tokens * (i + 1) / threads, acc + head_dim * i};
  /* Job 0 runs on the calling thread; a thread that fails to start runs its job here too. */
  for (int i = 1; i < threads; i++) started[i] = pthread_create(&tid[i], NULL, merge_thread, &jobs[i]) == 0;
  merge_range(&jobs[0]);
  for (int i = 1; i < threads; i++) {
    if (started[i]) pthread_join(tid[i], NULL);
    else merge_range(&jobs[i]);
  }
  free(acc), free(jobs), free(tid), free(started);
  return KVATTN_SUCCESS;
}
