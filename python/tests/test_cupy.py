"""CuPy arrays on a GPU: the generic DLPack path (no torch), the stream handed to the producer,
outputs allocated with CuPy. Skipped without CuPy or a CUDA context."""

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

import kvattn  # noqa: E402
import reference as R  # noqa: E402


def _cuda_context():
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError as e:
        pytest.skip("no CUDA device: %s" % e)
    try:
        return kvattn.Context("cuda")
    except kvattn.BackendUnavailableError as e:
        pytest.skip("kvattn has no CUDA backend here: %s" % e.detail)


def test_cupy_decode_on_its_own_stream():
    ctx = _cuda_context()
    rng = np.random.default_rng(11)
    kv_lens, ps, heads, kv_heads, dim = [33, 0, 200], 16, 8, 2, 128
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, ps)
    k = rng.standard_normal((num_pages, ps, kv_heads, dim)).astype(np.float16)
    v = rng.standard_normal((num_pages, ps, kv_heads, dim)).astype(np.float16)
    q = rng.standard_normal((3, heads, dim)).astype(np.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        dk, dv, dq = cp.asarray(k), cp.asarray(v), cp.asarray(q)
        w = kvattn.BatchDecodeWithPagedKVCacheWrapper(ctx)
        w.plan(kv_indptr, cp.asarray(kv_indices), last, heads, kv_heads, dim, ps,
               q_data_type="float16", stream=stream)
        out, lse = w.run(dq, (dk, dv), return_lse=True, stream=stream)
    stream.synchronize()
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float16
    ro, rl = R.paged_attention(q, np.arange(4), k, v, kv_indptr, kv_indices, last, ps)
    assert R.rel_err(cp.asnumpy(out), ro) < 1e-2
    assert np.all(np.isneginf(cp.asnumpy(lse)[1]))


def test_cupy_merge_state():
    ctx = _cuda_context()
    va, vb = cp.random.randn(5, 4, 64, dtype=cp.float32), cp.random.randn(5, 4, 64, dtype=cp.float32)
    sa, sb = cp.random.randn(5, 4, dtype=cp.float32), cp.random.randn(5, 4, dtype=cp.float32)
    v, s = kvattn.merge_state(va, sa, vb, sb, context=ctx)
    cp.cuda.Device().synchronize()
    ref_s = cp.logaddexp(sa, sb)
    ref_v = va * cp.exp(sa - ref_s)[..., None] + vb * cp.exp(sb - ref_s)[..., None]
    assert cp.allclose(v, ref_v, atol=1e-5) and cp.allclose(s, ref_s, atol=1e-5)
