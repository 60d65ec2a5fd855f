"""merge_state / merge_states against NumPy's logaddexp, and append_paged_kv_cache against a NumPy
scatter."""

import numpy as np
import pytest

import kvattn
import reference as R


def np_merge(va, sa, vb, sb):
    s = np.logaddexp(sa.astype(np.float64), sb.astype(np.float64))
    wa = np.where(np.isneginf(sa), 0.0, np.exp(sa - np.where(np.isneginf(s), 0, s)))
    wb = np.where(np.isneginf(sb), 0.0, np.exp(sb - np.where(np.isneginf(s), 0, s)))
    return va * wa[..., None] + vb * wb[..., None], s


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3)])
def test_merge_state(backend, rng, dtype, tol):
    va = rng.standard_normal((5, 3, 16)).astype(dtype)
    vb = rng.standard_normal((5, 3, 16)).astype(dtype)
    sa = (3 * rng.standard_normal((5, 3))).astype(np.float32)
    sb = (3 * rng.standard_normal((5, 3))).astype(np.float32)
    sa[0, 0] = -np.inf            # an empty state contributes nothing
    sa[1, 1] = sb[1, 1] = -np.inf  # two empty states: 0, -inf
    v, s = kvattn.merge_state(va, sa, vb, sb, context=backend)
    rv, rs = np_merge(va.astype(np.float64), sa, vb.astype(np.float64), sb)
    assert v.dtype == np.dtype(dtype) and s.dtype == np.float32
    assert R.rel_err(v, rv) < tol
    assert np.allclose(s[np.isfinite(rs)], rs[np.isfinite(rs)], atol=1e-5)
    assert np.isneginf(s[1, 1]) and np.all(v[1, 1] == 0)
    assert np.allclose(v[0, 0], vb[0, 0].astype(np.float64), atol=tol)


def test_merge_state_in_place(backend, rng):
    va = rng.standard_normal((4, 2, 8)).astype(np.float32)
    vb = rng.standard_normal((4, 2, 8)).astype(np.float32)
    sa = rng.standard_normal((4, 2)).astype(np.float32)
    sb = rng.standard_normal((4, 2)).astype(np.float32)
    rv, rs = np_merge(va.astype(np.float64), sa, vb.astype(np.float64), sb)
    kvattn.merge_state_in_place(va, sa, vb, sb, context=backend)
    assert R.rel_err(va, rv) < 1e-6 and np.allclose(sa, rs, atol=1e-6)


def test_merge_states(backend, rng):
    n = 4
    v = rng.standard_normal((6, n, 3, 8)).astype(np.float32)
    s = (2 * rng.standard_normal((6, n, 3))).astype(np.float32)
    s[2, :, 0] = -np.inf  # a row with every state empty
    s[3, 1:, 2] = -np.inf
    vo, so = kvattn.merge_states(v, s, context=backend)
    rv, rs = v[:, 0].astype(np.float64), s[:, 0].astype(np.float64)
    for i in range(1, n):
        rv, rs = np_merge(rv, rs, v[:, i].astype(np.float64), s[:, i])
    assert vo.shape == (6, 3, 8) and so.shape == (6, 3)
    assert R.rel_err(vo, rv) < 1e-6
    assert np.allclose(so[np.isfinite(rs)], rs[np.isfinite(rs)], atol=1e-5)
    assert np.isneginf(so[2, 0]) and np.all(vo[2, 0] == 0)


def test_merge_state_shape_mismatch(backend, rng):
    va = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(kvattn.InvalidShapeError) as ei:
        kvattn.merge_state(va, np.zeros((4, 2), np.float32), np.zeros((4, 3, 8), np.float32),
                           np.zeros((4, 3), np.float32), context=backend)
    assert ei.value.detail


# --------------------------------------------------------------------------- append


def test_get_batch_indices_positions():
    bi, pos = kvattn.get_batch_indices_positions([0, 2, 2, 5], [7, 3, 4])
    assert bi.tolist() == [0, 0, 2, 2, 2]
    assert pos.tolist() == [5, 6, 1, 2, 3]
    assert bi.dtype == np.int32 and pos.dtype == np.int32


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("single_tensor", [False, True])
def test_append_paged_kv_cache(backend, rng, layout, single_tensor):
    page_size, heads, head_dim = 4, 2, 8
    old_lens, new_lens = np.array([3, 0, 8]), np.array([2, 5, 1])
    seq_lens = old_lens + new_lens
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, seq_lens.tolist(), page_size)
    shape = (num_pages, page_size, heads, head_dim) if layout == "NHD" else \
        (num_pages, heads, page_size, head_dim)
    cache = rng.standard_normal((num_pages, 2) + shape[1:]).astype(np.float32)
    before = cache.copy()
    append_indptr = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int32)
    nnz = int(append_indptr[-1])
    k_new = rng.standard_normal((nnz, heads, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((nnz, heads, head_dim)).astype(np.float32)
    bi, pos = kvattn.get_batch_indices_positions(append_indptr, seq_lens)
    target = cache if single_tensor else (cache[:, 0], cache[:, 1])
    kvattn.append_paged_kv_cache(k_new, v_new, bi, pos, target, kv_indices, kv_indptr, last, layout,
                                 context=backend)
    expect = before.copy()
    for t in range(nnz):
        page = kv_indices[kv_indptr[bi[t]] + pos[t] // page_size]
        slot = pos[t] % page_size
        if layout == "NHD":
            expect[page, 0, slot], expect[page, 1, slot] = k_new[t], v_new[t]
        else:
            expect[page, 0, :, slot], expect[page, 1, :, slot] = k_new[t], v_new[t]
    assert np.array_equal(cache, expect)


def test_append_position_outside_the_pages_is_invalid_index(backend, rng):
    cache = np.zeros((3, 2, 4, 1, 8), np.float32)
    before = cache.copy()
    with pytest.raises(kvattn.InvalidIndexError) as ei:
        kvattn.append_paged_kv_cache(np.ones((1, 1, 8), np.float32), np.ones((1, 1, 8), np.float32),
                                     [0], [4], cache, [2], [0, 1], context=backend)
    assert ei.value.detail
    assert np.array_equal(cache, before)
