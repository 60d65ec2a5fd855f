/*
 * reference.c - the float64 reference attention: the oracle every other path is tested against.
 *
 * Plain loops, no blocking, no cleverness: for every work row (request or BSR block row), every
 * query head and every query row, score every KV token of the row, apply the options in the order
 * the header's "Scores" section gives, soft-max in float64, and write o and lse. Whatever the
 * format, K and V arrive as 4-d views (page, slot, kv_head, dim) and the row's KV tokens are the
 * slots of its pages, in order (see batch_view in internal.h).
 */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

/* The page id of KV entry e: from the run's index tensor, else the plan's host copy, else e
 * itself (ragged: every token is its own one-slot page). */
static int64_t page_of_entry(const cpu_problem *p, int64_t e) {
  const tview *ix = &p->t->indices;
  if (ix->data) return ((const int32_t *)ix->data)[e * ix->stride[0]];
  if (p->bv->indices) return p->bv->indices[e];
  return e;
}

/* Rotate-half RoPE of one head vector x[head_dim] at position pos, in place. Pair d couples
 * dimensions d and d + head_dim/2 (the "llama" convention); an odd last dimension is left alone. */
static void rope_rotate(const kvattn_attention_desc *d, double *x, int64_t pos) {
  int half = d->head_dim / 2;
  for (int i = 0; i < half; i++) {
    double angle = ((double)pos / d->rope_scale) * rope_frequency(d, i);
    double c = cos(angle), s = sin(angle);
    double a = x[i], b = x[i + half];
    x[i] = a * c - b * s;
    x[i + half] = b * c + a * s;
  }
}

/* Read one head vector of a 3-d [tokens, heads, dim] or 4-d [page, slot, head, dim] view. */
static void load_vec(const tview *t, int64_t base, int head_dim, double *x) {
  int64_t sd = t->stride[t->ndim - 1];
  for (int d = 0; d < head_dim; d++) x[d] = tview_get(t, base + d * sd);
}

static int mask_bit(const tview *mask, int64_t bit) {
  const uint8_t *m = (const uint8_t *)mask->data;
  return (m[(bit >> 3) * mask->stride[0]] >> (bit & 7)) & 1;
}

kvattn_status cpu_attention_reference(const cpu_problem *p) {
  const kvattn_attention_desc *d = p->desc;
  const batch_view *bv = p->bv;
  const run_tensors *t = p->t;
  const int head_dim = d->head_dim, qo_heads = d->num_qo_heads;
  const int group = d->num_qo_heads / d->num_kv_heads;
  const int64_t page_size = bv->page_size, num_pages = t->k.shape[0];

  /* The run's indices may differ from the planned host copy: check them before any read. */
  for (int64_t e = 0; e < bv->kv_entries; e++) {
    int64_t page = page_of_entry(p, e);
    RETURN_IF(page < 0 || page >= num_pages, KVATTN_ERROR_INVALID_INDEX,
              "kvattn_run: indices[%lld]=%lld is outside the cache's %lld pages", (long long)e,
              (long long)page, (long long)num_pages);
  }

  int64_t kv_len_max = 0;
  for (int64_t i = 0; i < bv->batch; i++) {
    int64_t n = bv_kv_len(bv, i);
    if (n > kv_len_max) kv_len_max = n;
  }
  /* Per query: the score of each KV token of the row and where its V lives (-1: masked). */
  double *score = malloc(sizeof(double) * (size_t)(kv_len_max + 1));
  int64_t *v_base = malloc(sizeof(int64_t) * (size_t)(kv_len_max + 1));
  double *q = malloc(sizeof(double) * (size_t)head_dim * 3);
  if (!score || !v_base || !q) {
    free(score), free(v_base), free(q);
    return set_error(KVATTN_ERROR_OUT_OF_MEMORY, "kvattn_run: reference scratch for %lld KV tokens",
                     (long long)kv_len_max);
  }
  double *k = q + head_dim, *o = k + head_dim;

  int64_t mask_start = 0; /* request i's first mask bit, when the plan gave no offsets */
  for (int64_t i = 0; i < bv->batch; i++) {
    const int64_t qo_len = bv_qo_len(bv, i), kv_len = bv_kv_len(bv, i);
    const int64_t e0 = bv->kv_indptr[i], e1 = bv->kv_indptr[i + 1];
    const int64_t mask_first = p->mask_offset ? p->mask_offset[i] : mask_start;
    mask_start += ceil_div64(qo_len * kv_len, 8) * 8; /* each request's mask starts on a byte */
    for (int64_t r = 0; r < qo_len; r++) {
      const int64_t row = bv->qo_indptr[i] + r; /* global query token */
      const int64_t q_pos = bv->bsr_positions ? row : kv_len - qo_len + r;
      for (int h = 0; h < qo_heads; h++) {
        const int kv_head = h / group;
        load_vec(&t->q, row * t->q.stride[0] + h * t->q.stride[1], head_dim, q);
        if (d->rope) rope_rotate(d, q, q_pos);

        /* Score every KV token of the row: j counts tokens in order, kv_pos is its position. */
        double max_score = -INFINITY;
        int64_t j = 0;
        for (int64_t e = e0; e < e1; e++) {
          const int64_t page = page_of_entry(p, e);
          const int64_t slots = (e == e1 - 1) ? kv_len - (e - e0) * page_size : page_size;
          for (int64_t slot = 0; slot < slots; slot++, j++) {
            const int64_t kv_pos = bv->bsr_positions ? page * page_size + slot : j;
            v_base[j] = -1;
            if (kv_pos >= bv->kv_token_limit) continue; /* past the data (BSR partial block) */
            if (!visible(d, q_pos, kv_pos)) continue;
            if (t->mask.data) {
              int64_t bit = bv->bsr_positions ? row * bv->kv_token_limit + kv_pos
                                              : mask_first + r * kv_len + j;
              if (!mask_bit(&t->mask, bit)) continue;
            }
            const int64_t k_base = page * t->k.stride[0] + slot * t->k.stride[1] + kv_head * t->k.stride[2];
            load_vec(&t->k, k_base, head_dim, k);
            if (d->rope) rope_rotate(d, k, kv_pos);
            double s = 0;
            for (int x = 0; x < head_dim; x++) s += q[x] * k[x];
            s *= d->sm_scale;
            if (d->logits_soft_cap > 0) s = d->logits_soft_cap * tanh(s / d->logits_soft_cap);
            if (d->alibi) s += (double)p->alibi_slopes[h] * (double)(kv_pos - q_pos);
            score[j] = s;
            v_base[j] = page * t->v.stride[0] + slot * t->v.stride[1] + kv_head * t->v.stride[2];
            if (s > max_score) max_score = s;
          }
        }

        /* softmax over the unmasked tokens; none unmasked: o = 0, lse = -inf */
        double sum = 0;
        for (int x = 0; x < head_dim; x++) o[x] = 0;
        if (max_score > -INFINITY) {
          for (int64_t jj = 0; jj < j; jj++) {
            if (v_base[jj] < 0) continue;
            double w = exp(score[jj] - max_score);
            sum += w;
            load_vec(&t->v, v_base[jj], head_dim, k);
            for (int x = 0; x < head_dim; x++) o[x] += w * k[x];
          }
          for (int x = 0; x < head_dim; x++) o[x] /= sum;
        }
        const int64_t o_base = row * t->out.stride[0] + h * t->out.stride[1];
        for (int x = 0; x < head_dim; x++) tview_set(&t->out, o_base + x * t->out.stride[2], o[x]);
        if (t->lse.data) {
          double lse = max_score > -INFINITY ? max_score + log(sum) : -INFINITY;
          ((float *)t->lse.data)[row * t->lse.stride[0] + h * t->lse.stride[1]] = (float)lse;
        }
      }
    }
  }
  free(score), free(v_base), free(q);
  return KVATTN_SUCCESS;
}
