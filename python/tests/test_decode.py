"""BatchDecodeWithPagedKVCacheWrapper against the NumPy float64 reference."""

import numpy as np
import pytest

import kvattn
import reference as R

# float64 on the reference: the desc carries sm_scale as a float32, so ~1e-8 relative.
TOL = {"float32": 1e-5, "float16": 1e-2, "float64": 1e-6}


def make_cache(rng, num_pages, page_size, kv_heads, head_dim, dtype, layout):
    shape = (num_pages, page_size, kv_heads, head_dim) if layout == "NHD" else \
        (num_pages, kv_heads, page_size, head_dim)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(2)]


def decode_case(rng, backend, kv_lens, page_size, qo_heads, kv_heads, head_dim, dtype="float32",
                layout="NHD", single_tensor=False, return_lse=True, **plan_kw):
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, page_size)
    k, v = make_cache(rng, num_pages, page_size, kv_heads, head_dim, dtype, layout)
    q = rng.standard_normal((len(kv_lens), qo_heads, head_dim)).astype(dtype)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend, layout)
    w.plan(kv_indptr, kv_indices, last, qo_heads, kv_heads, head_dim, page_size, q_data_type=dtype,
           **plan_kw)
    cache = np.stack([k, v], axis=1) if single_tensor else (k, v)
    res = w.run(q, cache, return_lse=return_lse)
    ref_kw = {key: plan_kw[key] for key in ("window_left", "sm_scale") if key in plan_kw}
    if "logits_soft_cap" in plan_kw:
        ref_kw["soft_cap"] = plan_kw["logits_soft_cap"]
    ro, rl = R.paged_attention(q, np.arange(len(kv_lens) + 1), k, v, kv_indptr, kv_indices, last,
                               page_size, layout, **ref_kw)
    return res, ro, rl


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("single_tensor", [False, True])
def test_decode_matches_reference(backend, rng, layout, page_size, single_tensor):
    kv_lens = [1, 17, 0, 40, page_size, 3]
    (out, lse), ro, rl = decode_case(rng, backend, kv_lens, page_size, 8, 2, 32, layout=layout,
                                     single_tensor=single_tensor)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (6, 8, 32)
    assert R.rel_err(out, ro) < TOL["float32"]
    assert np.array_equal(np.isinf(lse), np.isinf(rl))
    fin = np.isfinite(rl)
    assert np.allclose(lse[fin], rl[fin], atol=1e-5)
    assert np.all(out[2] == 0) and np.all(lse[2] == -np.inf)  # the empty request


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_decode_group_sizes(backend, rng, group):
    out, ro, _ = decode_case(rng, backend, [9, 33, 2], 4, 8, 8 // group, 16, return_lse=False)
    assert R.rel_err(out, ro) < TOL["float32"]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_head_dims(backend, rng, head_dim):
    out, ro, _ = decode_case(rng, backend, [20, 7], 16, 4, 1, head_dim, return_lse=False)
    assert R.rel_err(out, ro) < TOL["float32"]


def test_decode_float16(backend, rng):
    (out, lse), ro, rl = decode_case(rng, backend, [30, 64, 1], 16, 4, 2, 64, dtype="float16")
    assert out.dtype == np.float16
    assert R.rel_err(out, ro) < TOL["float16"]


def test_decode_float64_on_the_reference(rng):
    (out, lse), ro, rl = decode_case(rng, "reference", [11, 3], 4, 2, 1, 8, dtype="float64")
    assert out.dtype == np.float64
    assert R.rel_err(out, ro) < TOL["float64"]


@pytest.mark.parametrize("opts", [{"window_left": 5}, {"logits_soft_cap": 2.0},
                                  {"sm_scale": 0.3}, {"window_left": 0, "sm_scale": 1.0}])
def test_decode_options(backend, rng, opts):
    (out, lse), ro, rl = decode_case(rng, backend, [12, 1, 29], 4, 4, 2, 16, **opts)
    assert R.rel_err(out, ro) < TOL["float32"]
    fin = np.isfinite(rl)
    assert np.allclose(lse[fin], rl[fin], atol=1e-5)


def test_decode_into_given_out_and_lse(backend, rng):
    kv_lens = [5, 9]
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, 4)
    k, v = make_cache(rng, num_pages, 4, 2, 16, np.float32, "NHD")
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    out = np.full((2, 4, 16), np.nan, np.float32)
    lse = np.full((2, 4), np.nan, np.float32)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    w.plan(kv_indptr, kv_indices, last, 4, 2, 16, 4, q_data_type="float32")
    res = w.run(q, (k, v), out=out, lse=lse, return_lse=True)
    assert res[0] is out and res[1] is lse
    ro, rl = R.paged_attention(q, np.arange(3), k, v, kv_indptr, kv_indices, last, 4)
    assert R.rel_err(out, ro) < 1e-5 and np.allclose(lse, rl, atol=1e-5)


def test_decode_non_contiguous_cache_views(backend, rng):
    """K and V are views into a wider buffer (more heads, padded head_dim): strides are honoured."""
    kv_lens = [13, 4, 21]
    page_size, kv_heads, head_dim = 4, 2, 16
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, page_size)
    big = rng.standard_normal((num_pages, 2, page_size, kv_heads + 3, head_dim + 8)).astype(np.float32)
    k = big[:, 0, :, 1:1 + kv_heads, :head_dim]
    v = big[:, 1, :, 3:3 + kv_heads, 8:]
    q = rng.standard_normal((3, 4, head_dim)).astype(np.float32)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    w.plan(kv_indptr, kv_indices, last, 4, kv_heads, head_dim, page_size, q_data_type="float32")
    out = w.run(q, (k, v))
    ro, _ = R.paged_attention(q, np.arange(4), k, v, kv_indptr, kv_indices, last, page_size)
    assert R.rel_err(out, ro) < 1e-5


def test_decode_replans_and_grows_the_workspace(backend, rng):
    """One wrapper, batches of growing size: the bounds follow, results stay right; a smaller batch
    reuses the attention."""
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    page_size, heads, head_dim = 4, 2, 8
    for n, max_len in [(2, 9), (5, 40), (3, 8), (16, 100)]:
        kv_lens = rng.integers(0, max_len, size=n).tolist()
        kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, page_size)
        k, v = make_cache(rng, num_pages, page_size, heads, head_dim, np.float32, "NHD")
        q = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
        w.plan(kv_indptr, kv_indices, last, heads, heads, head_dim, page_size, q_data_type="float32")
        assert all(b >= need for b, need in zip(w.bounds, (n, n, kv_indptr[-1])))
        out = w.run(q, (k, v))
        ro, _ = R.paged_attention(q, np.arange(n + 1), k, v, kv_indptr, kv_indices, last, page_size)
        assert R.rel_err(out, ro) < 1e-5
    assert w.workspace_bytes[0] > 0
    assert w.bounds[0] >= 16


def test_explicit_bounds_are_fixed(backend, rng):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend, max_batch=4, max_kv_entries=64)
    kv_indptr, kv_indices, last, _ = R.random_paged_batch(rng, [3, 5], 4)
    w.plan(kv_indptr, kv_indices, last, 2, 2, 8, 4, q_data_type="float32")
    assert w.bounds == (4, 2, 64)  # max_qo_tokens from the first plan, the rest as given
    kv_indptr, kv_indices, last, _ = R.random_paged_batch(rng, [3, 5, 1, 1, 2], 4)
    with pytest.raises(kvattn.BoundsExceededError) as ei:
        w.plan(kv_indptr, kv_indices, last, 2, 2, 8, 4, q_data_type="float32")
    assert ei.value.detail
    with pytest.raises(kvattn.InvalidUsageError):  # the failed plan left nothing to run
        w.run(np.zeros((5, 2, 8), np.float32), (np.zeros((4, 4, 2, 8), np.float32),) * 2)


def test_decode_alibi(backend, rng):
    """ALiBi: s += slope[h] * (kv_pos - q_pos), with given slopes."""
    kv_lens, page_size, heads, head_dim = [7, 12], 4, 4, 8
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, page_size)
    k, v = make_cache(rng, num_pages, page_size, heads, head_dim, np.float32, "NHD")
    q = rng.standard_normal((2, heads, head_dim)).astype(np.float32)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    w.plan(kv_indptr, kv_indices, last, heads, heads, head_dim, page_size, q_data_type="float32",
           pos_encoding_mode="ALIBI", alibi_slopes=slopes)
    out = w.run(q, (k, v))
    for i, n in enumerate(kv_lens):
        kk = R.gather_pages(k, kv_indices, kv_indptr[i], kv_indptr[i + 1], last[i], page_size)
        vv = R.gather_pages(v, kv_indices, kv_indptr[i], kv_indptr[i + 1], last[i], page_size)
        for h in range(heads):
            s = kk[:, h, :] @ q[i, h].astype(np.float64) / np.sqrt(head_dim)
            s += slopes[h] * (np.arange(n) - (n - 1))
            p = np.exp(s - s.max())
            ref = p @ vv[:, h, :] / p.sum()
            assert np.allclose(out[i, h], ref, atol=1e-5)


def test_indices_buffer_longer_than_the_batch(backend, rng):
    """Serving systems keep one fixed-size page-id buffer; only its first kv_indptr[-1] entries
    belong to the batch."""
    kv_lens = [6, 11]
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, 4)
    buf = np.full(64, 12345, np.int32)  # garbage past the batch's entries
    buf[:len(kv_indices)] = kv_indices
    k, v = make_cache(rng, num_pages, 4, 2, 8, np.float32, "NHD")
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    w.plan(kv_indptr, buf, last, 2, 2, 8, 4, q_data_type="float32")
    out = w.run(q, (k, v))
    ro, _ = R.paged_attention(q, np.arange(3), k, v, kv_indptr, kv_indices, last, 4)
    assert R.rel_err(out, ro) < 1e-5


def test_flashinfer_style_constructor_with_a_workspace_buffer(rng):
    """Wrapper(workspace_buffer, "NHD") as FlashInfer callers write it: the buffer's device picks
    the context; kvattn sizes its own workspace."""
    buf = np.empty(1 << 20, np.uint8)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(buf, "NHD")
    assert w.context is kvattn.default_context()
    out, ro, _ = decode_case(rng, "cpu", [5, 6], 4, 2, 2, 8, return_lse=False)
    assert R.rel_err(out, ro) < 1e-5


def test_context_from_the_index_arrays_when_none_is_given(rng):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper()
    assert w.context is None
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, [3], 4)
    w.plan(kv_indptr, kv_indices, last, 2, 2, 8, 4, q_data_type="float32")
    assert w.context is kvattn.default_context()  # host arrays: the CPU


def test_replanning_with_another_description(backend, rng):
    """Other heads / dtypes on the same wrapper: a new attention, right results."""
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    for heads, kv_heads, dim, dtype, tol in [(4, 2, 16, "float32", 1e-5), (8, 8, 32, "float16", 1e-2),
                                             (4, 1, 16, "float32", 1e-5)]:
        kv_lens = [7, 19]
        kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, 4)
        k, v = make_cache(rng, num_pages, 4, kv_heads, dim, dtype, "NHD")
        q = rng.standard_normal((2, heads, dim)).astype(dtype)
        w.plan(kv_indptr, kv_indices, last, heads, kv_heads, dim, 4, q_data_type=dtype)
        out = w.run(q, (k, v))
        ro, _ = R.paged_attention(q, np.arange(3), k, v, kv_indptr, kv_indices, last, 4)
        assert out.dtype == np.dtype(dtype) and R.rel_err(out, ro) < tol
