/*
 * test_merge_state.c - kvattn_merge_state / kvattn_merge_states through the public API.
 *
 * The merge of attention states is exact: s = log sum e^s_k, v = sum e^(s_k - s) v_k. Checked
 * against that formula computed here in float64, for its algebra (commutative, associative,
 * identity), for empty states (s = -inf contributes nothing, even with NaN in its v), and end to
 * end: attention over two halves of a KV sequence, merged, equals attention over the whole.
 */
#include "test.h"
#include "util.h"

static kvattn_context *cpu_ctx(void) {
  static kvattn_context *c;
  if (!c) c = test_context(KVATTN_BACKEND_CPU, 2);
  return c;
}
static kvattn_context *ref_ctx(void) {
  static kvattn_context *c;
  if (!c) c = test_context(KVATTN_BACKEND_REFERENCE, 1);
  return c;
}

/* N states [tokens, N, heads, dim] + [tokens, N, heads] with random values; lse in [-3, 3]. */
typedef struct states {
  host_tensor v, s, v_out, s_out, v_want, s_want;
  int64_t tokens, n, heads, dim;
} states;

static int states_make(states *st, DLDataType dt, int64_t tokens, int64_t n, int64_t heads, int64_t dim, uint64_t seed) {
  memset(st, 0, sizeof *st);
  st->tokens = tokens, st->n = n, st->heads = heads, st->dim = dim;
  int64_t vs[4] = {tokens, n, heads, dim}, ss[3] = {tokens, n, heads}, os[3] = {tokens, heads, dim}, ls[2] = {tokens, heads};
  if (!ht_alloc(&st->v, dt, 4, vs) || !ht_alloc(&st->s, TDT_F32, 3, ss) || !ht_alloc(&st->v_out, dt, 3, os) ||
      !ht_alloc(&st->s_out, TDT_F32, 2, ls) || !ht_alloc(&st->v_want, TDT_F64, 3, os) ||
      !ht_alloc(&st->s_want, TDT_F64, 2, ls))
    return 0;
  test_rng r = rng_seed(seed);
  ht_fill_normal(&st->v, &r, 1.0);
  int64_t idx[3] = {0};
  do ht_set(&st->s, idx, rng_uniform(&r) * 6 - 3);
  while (ht_next(3, ss, idx));
  return 1;
}
static void states_free(states *st) {
  ht_free(&st->v), ht_free(&st->s), ht_free(&st->v_out), ht_free(&st->s_out), ht_free(&st->v_want), ht_free(&st->s_want);
}

/* The formula, in float64, into v_want / s_want. */
static void states_expect(states *st) {
  for (int64_t t = 0; t < st->tokens; t++)
    for (int64_t h = 0; h < st->heads; h++) {
      double m = -INFINITY;
      for (int64_t k = 0; k < st->n; k++) m = fmax(m, ht_get(&st->s, (int64_t[]){t, k, h}));
      double z = 0;
      for (int64_t k = 0; k < st->n && m > -INFINITY; k++) {
        double sk = ht_get(&st->s, (int64_t[]){t, k, h});
        if (sk > -INFINITY) z += exp(sk - m);
      }
      for (int64_t x = 0; x < st->dim; x++) {
        double acc = 0;
        for (int64_t k = 0; k < st->n && z > 0; k++) {
          double sk = ht_get(&st->s, (int64_t[]){t, k, h});
          if (sk > -INFINITY) acc += exp(sk - m) * ht_get(&st->v, (int64_t[]){t, k, h, x});
        }
        ht_set(&st->v_want, (int64_t[]){t, h, x}, z > 0 ? acc / z : 0);
      }
      ht_set(&st->s_want, (int64_t[]){t, h}, z > 0 ? m + log(z) : -INFINITY);
    }
}

/* One state k of a multi-state tensor as a [tokens, heads, dim] (or [tokens, heads]) view. */
static DLTensor state_view(const host_tensor *h, int64_t k, int64_t *shape, int64_t *strides) {
  DLTensor t = h->t;
  int nd = h->t.ndim;
  t.byte_offset += (uint64_t)(k * h->strides[1]) * tdt_size(h->t.dtype);
  t.ndim = nd - 1;
  shape[0] = h->shape[0], strides[0] = h->strides[0];
  for (int i = 2; i < nd; i++) shape[i - 1] = h->shape[i], strides[i - 1] = h->strides[i];
  t.shape = shape;
  t.strides = strides;
  return t;
}

TEST(merge_states_matches_the_formula_f32) {
  states st;
  CHECK(states_make(&st, TDT_F32, 17, 5, 4, 64, 1));
  states_expect(&st);
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  double e = rel_error(&st.v_out, &st.v_want), l = lse_error(&st.s_out, &st.s_want);
  states_free(&st);
  CHECK_MSG(e < 1e-6 && l < 1e-5, "v err %g lse err %g", e, l);
}

TEST(merge_states_matches_the_formula_f16_and_bf16) {
  DLDataType dts[2] = {TDT_F16, TDT_BF16};
  for (int k = 0; k < 2; k++) {
    states st;
    CHECK(states_make(&st, dts[k], 9, 3, 8, 128, 2 + k));
    states_expect(&st);
    CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
    double e = rel_error(&st.v_out, &st.v_want), l = lse_error(&st.s_out, &st.s_want);
    states_free(&st);
    CHECK_MSG(e < 1e-2 && l < 1e-5, "%s: v err %g lse err %g", tdt_name(dts[k]), e, l);
  }
}

TEST(merge_states_reference_backend_agrees) {
  states st;
  CHECK(states_make(&st, TDT_F64, 5, 4, 3, 16, 3));
  states_expect(&st);
  CHECK_OK(kvattn_merge_states(ref_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  double e = rel_error(&st.v_out, &st.v_want), l = lse_error(&st.s_out, &st.s_want);
  states_free(&st);
  CHECK_MSG(e < 1e-12 && l < 1e-5, "v err %g lse err %g", e, l);
}

TEST(merge_states_many_tokens_use_threads_correctly) {
  states st;
  CHECK(states_make(&st, TDT_F32, 1500, 3, 4, 32, 4));
  states_expect(&st);
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  double e = rel_error(&st.v_out, &st.v_want), l = lse_error(&st.s_out, &st.s_want);
  states_free(&st);
  CHECK_MSG(e < 1e-6 && l < 1e-5, "v err %g lse err %g", e, l);
}

TEST(merge_states_single_state_is_the_identity) {
  states st;
  CHECK(states_make(&st, TDT_F32, 6, 1, 2, 8, 5));
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  int64_t shape[3], strides[3];
  DLTensor v0 = state_view(&st.v, 0, shape, strides);
  host_tensor view = st.v_out;
  view.t = v0;
  memcpy(view.shape, shape, sizeof shape);
  memcpy(view.strides, strides, sizeof strides);
  view.t.shape = view.shape, view.t.strides = view.strides;
  int same = ht_bitwise_equal(&st.v_out, &view);
  states_free(&st);
  CHECK(same);
}

TEST(merge_states_empty_states_contribute_nothing_even_with_nan_values) {
  states st;
  CHECK(states_make(&st, TDT_F32, 4, 3, 2, 16, 6));
  /* state 1 of every row is empty, its values are NaN */
  for (int64_t t = 0; t < 4; t++)
    for (int64_t h = 0; h < 2; h++) {
      ht_set(&st.s, (int64_t[]){t, 1, h}, -INFINITY);
      for (int64_t x = 0; x < 16; x++) ht_set(&st.v, (int64_t[]){t, 1, h, x}, NAN);
    }
  states_expect(&st);
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  double e = rel_error(&st.v_out, &st.v_want), l = lse_error(&st.s_out, &st.s_want);
  states_free(&st);
  CHECK_MSG(e < 1e-6 && l < 1e-5, "v err %g lse err %g", e, l);
}

TEST(merge_states_all_empty_gives_zero_and_minus_inf) {
  states st;
  CHECK(states_make(&st, TDT_BF16, 3, 4, 2, 8, 7));
  int64_t idx[3] = {0};
  do ht_set(&st.s, idx, -INFINITY);
  while (ht_next(3, st.s.shape, idx));
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  int ok = 1;
  int64_t o[3] = {0};
  do ok &= ht_get(&st.v_out, o) == 0;
  while (ht_next(3, st.v_out.shape, o));
  int64_t l[2] = {0};
  do ok &= isinf(ht_get(&st.s_out, l)) && ht_get(&st.s_out, l) < 0;
  while (ht_next(2, st.s_out.shape, l));
  states_free(&st);
  CHECK(ok);
}

TEST(merge_states_without_s_out) {
  states st;
  CHECK(states_make(&st, TDT_F32, 5, 2, 3, 8, 8));
  states_expect(&st);
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, NULL, NULL));
  double e = rel_error(&st.v_out, &st.v_want);
  states_free(&st);
  CHECK(e < 1e-6);
}

TEST(merge_states_large_lse_does_not_overflow) {
  states st;
  CHECK(states_make(&st, TDT_F32, 2, 2, 1, 4, 9));
  for (int64_t t = 0; t < 2; t++) {
    ht_set(&st.s, (int64_t[]){t, 0, 0}, 1000.0);
    ht_set(&st.s, (int64_t[]){t, 1, 0}, 999.0);
  }
  states_expect(&st);
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  double e = rel_error(&st.v_out, &st.v_want), l = lse_error(&st.s_out, &st.s_want);
  states_free(&st);
  CHECK_MSG(e < 1e-6 && l < 1e-3, "v err %g lse err %g", e, l); /* lse ~1000 in float32: ulp 6e-5 */
}

TEST(merge_states_strided_views) {
  states st;
  memset(&st, 0, sizeof st);
  st.tokens = 4, st.n = 3, st.heads = 2, st.dim = 24;
  int64_t vs[4] = {4, 3, 2, 24}, ss[3] = {4, 3, 2}, os[3] = {4, 2, 24}, ls[2] = {4, 2};
  CHECK(ht_alloc_padded(&st.v, TDT_F32, 4, vs, 3, 2) && ht_alloc_padded(&st.s, TDT_F32, 3, ss, 1, 1));
  CHECK(ht_alloc_padded(&st.v_out, TDT_F16, 3, os, 2, 1) && ht_alloc_padded(&st.s_out, TDT_F32, 2, ls, 1, 3));
  CHECK(ht_alloc(&st.v_want, TDT_F64, 3, os) && ht_alloc(&st.s_want, TDT_F64, 2, ls));
  test_rng r = rng_seed(10);
  ht_fill_normal(&st.v, &r, 1.0);
  ht_fill_normal(&st.s, &r, 1.0);
  states_expect(&st);
  CHECK_OK(kvattn_merge_states(cpu_ctx(), &st.v.t, &st.s.t, &st.v_out.t, &st.s_out.t, NULL));
  double e = rel_error(&st.v_out, &st.v_want), l = lse_error(&st.s_out, &st.s_want);
  states_free(&st);
  CHECK_MSG(e < 1e-3 && l < 1e-5, "v err %g lse err %g", e, l);
}

/* ------------------------------------------------------------------ two states */

typedef struct pair {
  host_tensor va, sa, vb, sb, vo, so;
} pair;
static int pair_make(pair *p, int64_t tokens, int64_t heads, int64_t dim, uint64_t seed) {
  memset(p, 0, sizeof *p);
  int64_t vs[3] = {tokens, heads, dim}, ss[2] = {tokens, heads};
  if (!ht_alloc(&p->va, TDT_F32, 3, vs) || !ht_alloc(&p->vb, TDT_F32, 3, vs) || !ht_alloc(&p->vo, TDT_F32, 3, vs) ||
      !ht_alloc(&p->sa, TDT_F32, 2, ss) || !ht_alloc(&p->sb, TDT_F32, 2, ss) || !ht_alloc(&p->so, TDT_F32, 2, ss))
    return 0;
  test_rng r = rng_seed(seed);
  ht_fill_normal(&p->va, &r, 1), ht_fill_normal(&p->vb, &r, 1);
  ht_fill_normal(&p->sa, &r, 2), ht_fill_normal(&p->sb, &r, 2);
  return 1;
}
static void pair_free(pair *p) {
  ht_free(&p->va), ht_free(&p->sa), ht_free(&p->vb), ht_free(&p->sb), ht_free(&p->vo), ht_free(&p->so);
}

TEST(merge_state_matches_the_two_state_formula) {
  pair p;
  CHECK(pair_make(&p, 7, 3, 32, 11));
  CHECK_OK(kvattn_merge_state(cpu_ctx(), &p.va.t, &p.sa.t, &p.vb.t, &p.sb.t, &p.vo.t, &p.so.t, NULL));
  double worst = 0;
  for (int64_t t = 0; t < 7; t++)
    for (int64_t h = 0; h < 3; h++) {
      double a = ht_get(&p.sa, (int64_t[]){t, h}), b = ht_get(&p.sb, (int64_t[]){t, h});
      double s = log(exp(a) + exp(b));
      worst = fmax(worst, fabs(ht_get(&p.so, (int64_t[]){t, h}) - s));
      for (int64_t x = 0; x < 32; x++) {
        double want = ht_get(&p.va, (int64_t[]){t, h, x}) * exp(a - s) + ht_get(&p.vb, (int64_t[]){t, h, x}) * exp(b - s);
        worst = fmax(worst, fabs(ht_get(&p.vo, (int64_t[]){t, h, x}) - want));
      }
    }
  pair_free(&p);
  CHECK_MSG(worst < 1e-5, "max error %g", worst);
}

TEST(merge_state_with_an_empty_state_returns_the_other_exactly) {
  pair p;
  CHECK(pair_make(&p, 3, 2, 16, 12));
  int64_t idx[3] = {0};
  do ht_set(&p.va, idx, NAN);
  while (ht_next(3, p.va.shape, idx));
  int64_t l[2] = {0};
  do ht_set(&p.sa, l, -INFINITY);
  while (ht_next(2, p.sa.shape, l));
  CHECK_OK(kvattn_merge_state(cpu_ctx(), &p.va.t, &p.sa.t, &p.vb.t, &p.sb.t, &p.vo.t, &p.so.t, NULL));
  int same = ht_bitwise_equal(&p.vo, &p.vb) && ht_bitwise_equal(&p.so, &p.sb);
  pair_free(&p);
  CHECK(same);
}

TEST(merge_state_of_two_empty_states_is_empty) {
  pair p;
  CHECK(pair_make(&p, 2, 2, 8, 13));
  int64_t l[2] = {0};
  do ht_set(&p.sa, l, -INFINITY), ht_set(&p.sb, l, -INFINITY);
  while (ht_next(2, p.sa.shape, l));
  CHECK_OK(kvattn_merge_state(cpu_ctx(), &p.va.t, &p.sa.t, &p.vb.t, &p.sb.t, &p.vo.t, &p.so.t, NULL));
  int ok = 1;
  int64_t idx[3] = {0};
  do ok &= ht_get(&p.vo, idx) == 0;
  while (ht_next(3, p.vo.shape, idx));
  memset(l, 0, sizeof l);
  do ok &= isinf(ht_get(&p.so, l)) && ht_get(&p.so, l) < 0;
  while (ht_next(2, p.so.shape, l));
  pair_free(&p);
  CHECK(ok);
}

TEST(merge_state_output_may_alias_the_first_input) {
  pair p, q;
  CHECK(pair_make(&p, 5, 2, 16, 14) && pair_make(&q, 5, 2, 16, 14));
  CHECK_OK(kvattn_merge_state(cpu_ctx(), &q.va.t, &q.sa.t, &q.vb.t, &q.sb.t, &q.vo.t, &q.so.t, NULL));
  CHECK_OK(kvattn_merge_state(cpu_ctx(), &p.va.t, &p.sa.t, &p.vb.t, &p.sb.t, &p.va.t, &p.sa.t, NULL));
  int same = ht_bitwise_equal(&p.va, &q.vo) && ht_bitwise_equal(&p.sa, &q.so);
  pair_free(&p), pair_free(&q);
  CHECK(same);
}

TEST(merge_state_is_commutative_and_associative) {
  pair p, q;
  CHECK(pair_make(&p, 4, 2, 8, 15) && pair_make(&q, 4, 2, 8, 16));
  /* (a + b) + c vs a + (b + c), with c = q.va/q.sa; and a + b vs b + a */
  host_tensor ab_v, ab_s, bc_v, bc_s, r1_v, r1_s, r2_v, r2_s, ba_v, ba_s;
  int64_t vs[3] = {4, 2, 8}, ss[2] = {4, 2};
  CHECK(ht_alloc(&ab_v, TDT_F32, 3, vs) && ht_alloc(&ab_s, TDT_F32, 2, ss) && ht_alloc(&bc_v, TDT_F32, 3, vs) &&
        ht_alloc(&bc_s, TDT_F32, 2, ss) && ht_alloc(&r1_v, TDT_F32, 3, vs) && ht_alloc(&r1_s, TDT_F32, 2, ss) &&
        ht_alloc(&r2_v, TDT_F32, 3, vs) && ht_alloc(&r2_s, TDT_F32, 2, ss) && ht_alloc(&ba_v, TDT_F32, 3, vs) &&
        ht_alloc(&ba_s, TDT_F32, 2, ss));
  kvattn_context *c = cpu_ctx();
  CHECK_OK(kvattn_merge_state(c, &p.va.t, &p.sa.t, &p.vb.t, &p.sb.t, &ab_v.t, &ab_s.t, NULL));
  CHECK_OK(kvattn_merge_state(c, &p.vb.t, &p.sb.t, &p.va.t, &p.sa.t, &ba_v.t, &ba_s.t, NULL));
  CHECK_OK(kvattn_merge_state(c, &ab_v.t, &ab_s.t, &q.va.t, &q.sa.t, &r1_v.t, &r1_s.t, NULL));
  CHECK_OK(kvattn_merge_state(c, &p.vb.t, &p.sb.t, &q.va.t, &q.sa.t, &bc_v.t, &bc_s.t, NULL));
  CHECK_OK(kvattn_merge_state(c, &p.va.t, &p.sa.t, &bc_v.t, &bc_s.t, &r2_v.t, &r2_s.t, NULL));
  double comm = rel_error(&ba_v, &ab_v) + lse_error(&ba_s, &ab_s);
  double assoc = rel_error(&r1_v, &r2_v) + lse_error(&r1_s, &r2_s);
  pair_free(&p), pair_free(&q);
  host_tensor *all[] = {&ab_v, &ab_s, &bc_v, &bc_s, &r1_v, &r1_s, &r2_v, &r2_s, &ba_v, &ba_s};
  for (int i = 0; i < 10; i++) ht_free(all[i]);
  CHECK_MSG(comm < 1e-6 && assoc < 1e-6, "commutative %g associative %g", comm, assoc);
}

/* ------------------------------------------------------------------ end to end */

TEST(attention_over_two_kv_halves_merged_equals_attention_over_all) {
  /* One ragged request, 3 queries x 100 KV tokens, no position-dependent options: the state over
   * tokens [0, 40) merged with the state over [40, 100) is the state over all 100. */
  test_spec sp = test_spec_default();
  static const int32_t qo[1] = {3}, kv[1] = {100};
  sp.format = KVATTN_FORMAT_RAGGED, sp.batch_size = 1, sp.qo_lens = qo, sp.kv_lens = kv;
  test_rng r = rng_seed(21);
  test_batch full;
  CHECK(tb_build(&full, &sp, &r));
  kvattn_attention_desc d = tb_desc(&sp);
  CHECK_OK(tb_run(cpu_ctx(), &d, &full, &full.ref, &full.ref_lse));

  host_tensor part_v[2], part_s[2];
  int64_t os[3] = {3, sp.num_qo_heads, sp.head_dim}, ls[2] = {3, sp.num_qo_heads};
  for (int h = 0; h < 2; h++) {
    CHECK(ht_alloc(&part_v[h], TDT_F32, 3, os) && ht_alloc(&part_s[h], TDT_F32, 2, ls));
    /* the half as its own batch: same q, K/V views starting at token 0 or 40 */
    static const int32_t halves[2][2] = {{0, 40}, {0, 60}};
    test_batch half = full; /* shallow: shares the tensors */
    int32_t qo_ind[2] = {0, 3}, kv_ind[2] = {halves[h][0], halves[h][1]};
    half.batch.qo_indptr = qo_ind;
    half.batch.kv_indptr = kv_ind;
    half.kv_entries = halves[h][1];
    DLTensor kt = full.k.t, vt = full.v.t;
    int64_t shape[3] = {halves[h][1], sp.num_kv_heads, sp.head_dim};
    kt.shape = vt.shape = shape;
    kt.byte_offset = vt.byte_offset = (uint64_t)(h ? 40 : 0) * (uint64_t)full.k.strides[0] * 4;
    half.kv.k = &kt, half.kv.v = &vt;
    CHECK_OK(tb_run(cpu_ctx(), &d, &half, &part_v[h], &part_s[h]));
  }
  CHECK_OK(kvattn_merge_state(cpu_ctx(), &part_v[0].t, &part_s[0].t, &part_v[1].t, &part_s[1].t, &full.out.t,
                              &full.out_lse.t, NULL));
  double e = rel_error(&full.out, &full.ref), l = lse_error(&full.out_lse, &full.ref_lse);
  for (int h = 0; h < 2; h++) ht_free(&part_v[h]), ht_free(&part_s[h]);
  tb_free(&full);
  CHECK_MSG(e < 1e-5 && l < 1e-5, "v err %g lse err %g", e, l);
}

TEST_MAIN()
