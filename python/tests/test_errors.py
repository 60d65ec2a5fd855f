"""Bad input: each raises the kvattn.Error subclass of its status, with .status and a .detail that
names the argument, and leaves the outputs untouched."""

import numpy as np
import pytest

import kvattn
import reference as R

HEADS, HEAD_DIM, PAGE = 2, 8, 4


@pytest.fixture
def decode(backend, rng):
    """A planned decode wrapper and valid run arguments."""
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, [5, 9], PAGE)
    k = rng.standard_normal((num_pages, PAGE, HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((num_pages, PAGE, HEADS, HEAD_DIM)).astype(np.float32)
    q = rng.standard_normal((2, HEADS, HEAD_DIM)).astype(np.float32)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    w.plan(kv_indptr, kv_indices, last, HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="float32")
    return w, q, k, v, (kv_indptr, kv_indices, last)


def expect(exc, status, fn, *words):
    with pytest.raises(exc) as ei:
        fn()
    e = ei.value
    assert isinstance(e, kvattn.Error)
    assert e.status == status and e.status.name == status.name
    assert e.detail, "an error must carry the library's detail text"
    for w in words:
        assert w in e.detail, "%r not in detail %r" % (w, e.detail)
    return e


S = kvattn.Status


def test_q_of_the_wrong_dtype(decode):
    w, q, k, v, _ = decode
    out = np.full((2, HEADS, HEAD_DIM), 7.0, np.float32)
    expect(kvattn.InvalidDtypeError, S.INVALID_DTYPE,
           lambda: w.run(q.astype(np.float64), (k, v), out=out), "q")
    assert np.all(out == 7.0)


def test_kv_of_the_wrong_dtype(decode):
    w, q, k, v, _ = decode
    expect(kvattn.InvalidDtypeError, S.INVALID_DTYPE,
           lambda: w.run(q, (k.astype(np.float16), v.astype(np.float16))))


def test_q_of_the_wrong_shape(decode):
    w, q, k, v, _ = decode
    expect(kvattn.InvalidShapeError, S.INVALID_SHAPE, lambda: w.run(q[:, :1], (k, v)), "q")


def test_out_of_the_wrong_shape(decode):
    w, q, k, v, _ = decode
    expect(kvattn.InvalidShapeError, S.INVALID_SHAPE,
           lambda: w.run(q, (k, v), out=np.zeros((3, HEADS, HEAD_DIM), np.float32)), "out")


def test_lse_of_the_wrong_dtype(decode):
    w, q, k, v, _ = decode
    expect(kvattn.InvalidDtypeError, S.INVALID_DTYPE,
           lambda: w.run(q, (k, v), lse=np.zeros((2, HEADS), np.float64), return_lse=True), "lse")


def test_k_and_v_of_different_shapes(decode):
    w, q, k, v, _ = decode
    expect(kvattn.InvalidShapeError, S.INVALID_SHAPE, lambda: w.run(q, (k, v[:-1])), "v")


def test_read_only_output(decode):
    w, q, k, v, _ = decode
    out = np.zeros((2, HEADS, HEAD_DIM), np.float32)
    out.flags.writeable = False
    # NumPy >= 2.1 flags it read-only in the capsule; older NumPy refuses to export it at all.
    e = expect(kvattn.InvalidArgumentError, S.INVALID_ARGUMENT, lambda: w.run(q, (k, v), out=out),
               "out")
    assert "read-only" in e.detail


def test_not_a_tensor(decode):
    w, q, k, v, _ = decode
    expect(kvattn.InvalidArgumentError, S.INVALID_ARGUMENT, lambda: w.run(q.tolist(), (k, v)), "q")


def test_kv_tuple_of_three(decode):
    w, q, k, v, _ = decode
    expect(kvattn.InvalidArgumentError, S.INVALID_ARGUMENT, lambda: w.run(q, (k, v, v)),
           "paged_kv_cache")


def test_run_before_plan(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidUsageError, S.INVALID_USAGE,
           lambda: w.run(np.zeros((1, 1, 8), np.float32), (np.zeros((1, 4, 1, 8), np.float32),) * 2),
           "plan")


def test_page_index_outside_the_cache(decode):
    w, q, k, v, (kv_indptr, kv_indices, last) = decode
    bad = kv_indices.copy()
    bad[1] = k.shape[0] + 3
    w.plan(kv_indptr, bad, last, HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="float32")
    out = np.full((2, HEADS, HEAD_DIM), 7.0, np.float32)
    expect(kvattn.InvalidIndexError, S.INVALID_INDEX, lambda: w.run(q, (k, v), out=out),
           str(k.shape[0] + 3))
    assert np.all(out == 7.0)


def test_decreasing_indptr(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidIndexError, S.INVALID_INDEX,
           lambda: w.plan([0, 3, 2], [0, 1, 2], [1, 1], HEADS, HEADS, HEAD_DIM, PAGE,
                          q_data_type="float32"), "indptr")


def test_indptr_not_starting_at_zero(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidIndexError, S.INVALID_INDEX,
           lambda: w.plan([1, 2], [0, 1], [1], HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="float32"),
           "indptr")


@pytest.mark.parametrize("bad", [0, PAGE + 1])
def test_last_page_len_out_of_range(backend, bad):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidIndexError, S.INVALID_INDEX,
           lambda: w.plan([0, 2], [0, 1], [bad], HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="float32"),
           "last_page_len", str(bad))


def test_negative_page_index(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidIndexError, S.INVALID_INDEX,
           lambda: w.plan([0, 2], [0, -1], [1], HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="float32"),
           "-1")


def test_float_indptr_is_invalid_dtype(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidDtypeError, S.INVALID_DTYPE,
           lambda: w.plan(np.array([0.0, 2.0]), [0, 1], [1], HEADS, HEADS, HEAD_DIM, PAGE), "indptr")


def test_heads_not_divisible(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    with pytest.raises(kvattn.Error) as ei:
        w.plan([0, 1], [0], [1], 6, 4, HEAD_DIM, PAGE, q_data_type="float32")
    assert ei.value.status in (S.INVALID_ARGUMENT, S.INVALID_SHAPE)
    assert "6" in ei.value.detail and "4" in ei.value.detail


def test_unknown_q_data_type(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidDtypeError, S.INVALID_DTYPE,
           lambda: w.plan([0, 1], [0], [1], HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="complex64"),
           "complex64")


def test_bad_layout_and_pos_encoding(backend):
    expect(kvattn.InvalidArgumentError, S.INVALID_ARGUMENT,
           lambda: kvattn.BatchDecodeWithPagedKVCacheWrapper(backend, "NDH"), "NDH")
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    expect(kvattn.InvalidArgumentError, S.INVALID_ARGUMENT,
           lambda: w.plan([0, 1], [0], [1], HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="float32",
                          pos_encoding_mode="YARN"), "YARN")


def test_bfloat16_from_numpy_needs_torch(backend):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    w.plan([0, 1], [0], [1], HEADS, HEADS, HEAD_DIM, PAGE, q_data_type="bfloat16")
    expect(kvattn.InvalidDtypeError, S.INVALID_DTYPE,
           lambda: w.run(np.zeros((1, HEADS, HEAD_DIM), np.float32),
                         (np.zeros((1, PAGE, HEADS, HEAD_DIM), np.float32),) * 2), "bfloat16")


def test_head_dim_vo_different_is_unsupported(backend):
    w = kvattn.BatchPrefillWithPagedKVCacheWrapper(backend)
    expect(kvattn.UnsupportedError, S.UNSUPPORTED,
           lambda: w.plan([0, 1], [0, 1], [0], [1], HEADS, HEADS, 192, PAGE, head_dim_vo=128),
           "head_dim_vo")


def test_custom_mask_of_the_wrong_size(backend):
    w = kvattn.BatchPrefillWithRaggedKVCacheWrapper(backend)
    expect(kvattn.InvalidShapeError, S.INVALID_SHAPE,
           lambda: w.plan([0, 2], [0, 3], HEADS, HEADS, HEAD_DIM, custom_mask=np.ones(5, bool),
                          q_data_type="float32"), "custom_mask", "6")


def test_ragged_q_tokens_do_not_match_the_plan(backend, rng):
    w = kvattn.BatchPrefillWithRaggedKVCacheWrapper(backend)
    w.plan([0, 3], [0, 5], HEADS, HEADS, HEAD_DIM, q_data_type="float32")
    kv = np.zeros((5, HEADS, HEAD_DIM), np.float32)
    # A tensor that does not match the plan (rather than the description) is a usage error.
    expect(kvattn.InvalidUsageError, S.INVALID_USAGE,
           lambda: w.run(np.zeros((4, HEADS, HEAD_DIM), np.float32), kv, kv), "q", "plan")


def test_bsr_block_column_out_of_range(backend):
    w = kvattn.BlockSparseAttentionWrapper(backend)
    expect(kvattn.InvalidIndexError, S.INVALID_INDEX,
           lambda: w.plan([0, 1], [5], 4, 8, 4, 4, HEADS, HEADS, HEAD_DIM, q_data_type="float32"), "5")


def test_merge_state_lse_dtype(backend):
    v = np.zeros((2, 1, 4), np.float32)
    expect(kvattn.InvalidDtypeError, S.INVALID_DTYPE,
           lambda: kvattn.merge_state(v, np.zeros((2, 1)), v, np.zeros((2, 1), np.float32),
                                      context=backend), "s_a")


def test_errors_are_also_builtin_exception_types(decode):
    w, q, k, v, _ = decode
    with pytest.raises(TypeError):
        w.run(q.astype(np.float64), (k, v))
    with pytest.raises(ValueError):
        w.run(q[:, :1], (k, v))
