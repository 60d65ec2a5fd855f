"""PyTorch tensors: outputs allocated with torch, bfloat16, views, int64 index tensors, and CUDA
(on a GPU machine). Skipped where torch is not installed."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvattn  # noqa: E402
import reference as R  # noqa: E402


def f64(t):
    return t.detach().to("cpu", torch.float64).numpy()


def paged_inputs(gen, kv_lens, page_size, qo_heads, kv_heads, head_dim, dtype, device="cpu",
                 qo_lens=None):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, page_size)
    # vLLM's cache layout: [num_blocks, 2, block_size, kv_heads, head_dim]
    cache = torch.randn(num_pages, 2, page_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    n_q = len(kv_lens) if qo_lens is None else sum(qo_lens)
    q = torch.randn(n_q, qo_heads, head_dim, generator=gen).to(device, dtype)
    return q, cache, kv_indptr, kv_indices, last


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 1e-2)])
def test_torch_decode_cpu(backend, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    kv_lens, ps = [17, 1, 40, 0], 16
    q, cache, kv_indptr, kv_indices, last = paged_inputs(gen, kv_lens, ps, 8, 2, 64, dtype)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(backend)
    w.plan(torch.from_numpy(kv_indptr), torch.from_numpy(kv_indices).long(), torch.from_numpy(last),
           8, 2, 64, ps, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32
    ro, rl = R.paged_attention(f64(q), np.arange(5), f64(cache[:, 0]), f64(cache[:, 1]), kv_indptr,
                               kv_indices, last, ps)
    assert R.rel_err(f64(out), ro) < tol
    assert torch.isneginf(lse[3]).all() and (out[3] == 0).all()


def test_torch_prefill_bf16_hnd_view(backend):
    """HND given as a permuted view of an NHD tensor (non-contiguous), bf16, causal."""
    gen = torch.Generator().manual_seed(2)
    qo_lens, kv_lens, ps = [5, 12], [9, 12], 4
    q, cache, kv_indptr, kv_indices, last = paged_inputs(gen, kv_lens, ps, 4, 4, 32, torch.bfloat16,
                                                         qo_lens=qo_lens)
    k_hnd, v_hnd = cache[:, 0].permute(0, 2, 1, 3), cache[:, 1].permute(0, 2, 1, 3)
    assert not k_hnd.is_contiguous()
    qo_indptr = torch.tensor([0, 5, 17], dtype=torch.int32)
    w = kvattn.BatchPrefillWithPagedKVCacheWrapper(backend, "HND")
    w.plan(qo_indptr, torch.from_numpy(kv_indptr), torch.from_numpy(kv_indices),
           torch.from_numpy(last), 4, 4, 32, ps, causal=True, q_data_type="bfloat16")
    out = w.run(q, (k_hnd, v_hnd))
    ro, _ = R.paged_attention(f64(q), qo_indptr.numpy(), f64(cache[:, 0]), f64(cache[:, 1]),
                              kv_indptr, kv_indices, last, ps, causal=True)
    assert out.dtype == torch.bfloat16 and R.rel_err(f64(out), ro) < 1e-2


def test_torch_tensors_requiring_grad(backend):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 8, generator=gen, requires_grad=True)
    k = torch.randn(7, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(7, 2, 8, generator=gen)
    w = kvattn.BatchPrefillWithRaggedKVCacheWrapper(backend)
    w.plan([0, 3], [0, 7], 2, 2, 8, q_data_type=torch.float32)
    out = w.run(q, k, v)
    ro, _ = R.attention(f64(q), f64(k), f64(v))
    assert R.rel_err(f64(out), ro) < 1e-5


def test_torch_merge_state(backend):
    gen = torch.Generator().manual_seed(4)
    va, vb = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    sa, sb = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    v, s = kvattn.merge_state(va, sa, vb, sb, context=backend)
    assert isinstance(v, torch.Tensor)
    ref_s = torch.logaddexp(sa.double(), sb.double())
    ref_v = va.double() * torch.exp(sa.double() - ref_s)[..., None] + \
        vb.double() * torch.exp(sb.double() - ref_s)[..., None]
    assert torch.allclose(v.double(), ref_v, atol=1e-5) and torch.allclose(s.double(), ref_s, atol=1e-5)


def test_torch_int64_batch_indices_for_append(backend):
    cache = torch.zeros(2, 2, 4, 1, 8)
    kvattn.append_paged_kv_cache(torch.ones(2, 1, 8), 2 * torch.ones(2, 1, 8),
                                 torch.tensor([0, 0]), torch.tensor([0, 5]), cache,
                                 torch.tensor([1, 0]), torch.tensor([0, 2]), context=backend)
    assert (cache[1, 0, 0] == 1).all() and (cache[1, 1, 0] == 2).all()
    assert (cache[0, 0, 1] == 1).all() and (cache[0, 1, 1] == 2).all()
    assert cache.sum() == 2 * 8 * 3


# --------------------------------------------------------------------------- CUDA

def _cuda_context():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    try:
        return kvattn.Context("cuda")
    except kvattn.BackendUnavailableError as e:
        pytest.skip("kvattn has no CUDA backend here: %s" % e.detail)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_decode(dtype, page_size):
    ctx = _cuda_context()
    gen = torch.Generator().manual_seed(5)
    kv_lens = [1, 100, 0, 513, 37]
    q, cache, kv_indptr, kv_indices, last = paged_inputs(gen, kv_lens, page_size, 32, 8, 128, dtype,
                                                         device="cuda")
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(ctx)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # q and the cache were made on the default one
    with torch.cuda.stream(stream):  # plan's copy and the run go on torch's current stream
        w.plan(torch.from_numpy(kv_indptr), torch.from_numpy(kv_indices).cuda(),
               torch.from_numpy(last), 32, 8, 128, page_size, q_data_type=dtype)
        out, lse = w.run(q, cache, return_lse=True)
    stream.synchronize()
    assert out.is_cuda and out.dtype == dtype
    ro, rl = R.paged_attention(f64(q), np.arange(len(kv_lens) + 1), f64(cache[:, 0]),
                               f64(cache[:, 1]), kv_indptr, kv_indices, last, page_size)
    assert R.rel_err(f64(out), ro) < 1e-2
    assert torch.isneginf(lse[2]).all().item()


def test_cuda_numpy_input_is_a_device_mismatch():
    ctx = _cuda_context()
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(ctx)
    w.plan([0, 1], torch.tensor([0], dtype=torch.int32, device="cuda"), [1], 2, 2, 64, 4,
           q_data_type="float16")
    cache = torch.zeros(1, 2, 4, 2, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(kvattn.DeviceMismatchError):
        w.run(np.zeros((1, 2, 64), np.float16), cache)


def test_cuda_merge_state():
    ctx = _cuda_context()
    va, vb = torch.randn(9, 4, 128, device="cuda"), torch.randn(9, 4, 128, device="cuda")
    sa, sb = torch.randn(9, 4, device="cuda"), torch.randn(9, 4, device="cuda")
    v, s = kvattn.merge_state(va, sa, vb, sb, context=ctx)
    torch.cuda.synchronize()
    ref_s = torch.logaddexp(sa, sb)
    ref_v = va * torch.exp(sa - ref_s)[..., None] + vb * torch.exp(sb - ref_s)[..., None]
    assert torch.allclose(v, ref_v, atol=1e-4) and torch.allclose(s, ref_s, atol=1e-4)


def test_cuda_graph_replays_new_plans_within_bounds():
    """Capture run() once; re-plan other batches (same batch size, other lengths, pages rewritten in
    the same index buffer) and replay: every replay equals the reference (the serving pattern)."""
    ctx = _cuda_context()
    batch, ps, heads, kv_heads, dim, max_pages = 8, 16, 8, 2, 128, 64
    gen = torch.Generator().manual_seed(6)
    cache = torch.randn(max_pages, 2, ps, kv_heads, dim, generator=gen).to("cuda", torch.float16)
    q = torch.zeros(batch, heads, dim, dtype=torch.float16, device="cuda")
    out = torch.zeros_like(q)
    indices = torch.zeros(max_pages, dtype=torch.int32, device="cuda")
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(ctx, "NHD", use_cuda_graph=True, max_batch=batch,
                                                  max_qo_tokens=batch, max_kv_entries=max_pages)
    rng = np.random.default_rng(6)

    def new_batch():
        kv_lens = rng.integers(0, 6 * ps, size=batch).tolist()
        kv_indptr, kv_indices, last, _ = R.random_paged_batch(rng, kv_lens, ps, spare_pages=0)
        kv_indices = rng.permutation(max_pages)[:len(kv_indices)].astype(np.int32)
        indices[:len(kv_indices)].copy_(torch.from_numpy(kv_indices))
        w.plan(kv_indptr, indices, last, heads, kv_heads, dim, ps, q_data_type=torch.float16)
        q.copy_(torch.randn(batch, heads, dim, generator=gen).to(torch.float16))
        return kv_indptr, kv_indices, last

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        new_batch()
        w.run(q, cache, out=out)  # warm-up outside the capture (compiles the kernels)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            w.run(q, cache, out=out)
        for _ in range(5):
            kv_indptr, kv_indices, last = new_batch()
            out.fill_(float("nan"))
            graph.replay()
            stream.synchronize()
            ro, _ = R.paged_attention(f64(q), np.arange(batch + 1), f64(cache[:, 0]),
                                      f64(cache[:, 1]), kv_indptr, kv_indices, last, ps)
            assert R.rel_err(f64(out), ro) < 1e-2
    with pytest.raises(kvattn.BoundsExceededError):  # one more request than captured
        w.plan(np.zeros(batch + 2, np.int32), indices, np.ones(batch + 1, np.int32), heads, kv_heads,
               dim, ps, q_data_type=torch.float16)


def test_cuda_append_paged_kv_cache():
    ctx = _cuda_context()
    cache = torch.zeros(4, 2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    k_new = torch.randn(3, 2, 64, device="cuda").to(torch.bfloat16)
    v_new = torch.randn(3, 2, 64, device="cuda").to(torch.bfloat16)
    kv_indptr = torch.tensor([0, 1, 3], dtype=torch.int32, device="cuda")
    kv_indices = torch.tensor([2, 0, 3], dtype=torch.int32, device="cuda")
    bi, pos = kvattn.get_batch_indices_positions(torch.tensor([0, 1, 3], dtype=torch.int32,
                                                              device="cuda"),
                                                 torch.tensor([5, 17], device="cuda"))
    kvattn.append_paged_kv_cache(k_new, v_new, bi, pos, cache, kv_indices, kv_indptr, context=ctx)
    torch.cuda.synchronize()
    assert torch.equal(cache[2, 0, 4], k_new[0]) and torch.equal(cache[2, 1, 4], v_new[0])
    assert torch.equal(cache[0, 0, 15], k_new[1]) and torch.equal(cache[3, 0, 0], k_new[2])
    assert int((cache != 0).sum()) == 3 * 2 * 2 * 64 - int((k_new == 0).sum() + (v_new == 0).sum())


@pytest.mark.parametrize("causal", [False, True])
def test_cuda_paged_prefill(causal):
    ctx = _cuda_context()
    gen = torch.Generator().manual_seed(8)
    qo_lens, kv_lens, ps = [7, 1, 33], [20, 1, 90], 16
    q, cache, kv_indptr, kv_indices, last = paged_inputs(gen, kv_lens, ps, 8, 2, 128, torch.float16,
                                                         device="cuda", qo_lens=qo_lens)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    w = kvattn.BatchPrefillWithPagedKVCacheWrapper(ctx)
    try:
        w.plan(qo_indptr, kv_indptr, torch.from_numpy(kv_indices).cuda(), last, 8, 2, 128, ps,
               causal=causal, q_data_type=torch.float16)
        out = w.run(q, cache)
    except kvattn.UnsupportedError as e:
        pytest.xfail("GPU prefill not implemented in this build: %s" % e.detail)
    torch.cuda.synchronize()
    ro, _ = R.paged_attention(f64(q), qo_indptr, f64(cache[:, 0]), f64(cache[:, 1]), kv_indptr,
                              kv_indices, last, ps, causal=causal)
    assert R.rel_err(f64(out), ro) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.uint8])
def test_direct_torch_borrow_equals_its_dlpack_export(dtype):
    """Torch tensors are read from their attributes where torch would not synchronize anyway; the
    DLTensor must be the one torch's own __dlpack__ gives."""
    from kvattn import _tensor
    base = torch.zeros(6, 7, 9, dtype=dtype)
    for t in (base, base[1:5:2, :, 3:], base.permute(2, 0, 1), base[2], base[:0]):
        direct = _tensor._borrow_torch_direct(t)
        via = _tensor.borrow(OnlyDLPack(t), "t")
        for b in (direct, via):
            assert b is not None
        same = lambda b: (b.shape, b.dtype, b.device, b.tensor.data + b.tensor.byte_offset  # noqa
                          if t.numel() else 0,
                          [b.tensor.strides[i] for i in range(b.tensor.ndim)] if t.numel() > 1 else 0)
        assert same(direct) == same(via)


class OnlyDLPack:
    """Hides that an object is a torch tensor, so the generic DLPack path is taken."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, **kw):
        return self.t.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


def test_direct_borrow_cache_tells_views_of_one_address_apart():
    from kvattn import _tensor
    base = torch.zeros(4, 6)
    views = [base, base.view(6, 4), base.t(), base[:, :3], base.view(torch.int32), base.view(24)]
    assert len({v.data_ptr() for v in views}) == 1
    seen = set()
    for v in views:
        b = _tensor.borrow(v, "v")
        t = b.tensor
        desc = (b.shape, b.dtype, tuple(t.strides[i] for i in range(t.ndim)))
        assert desc == (tuple(v.shape), str(v.dtype).split(".")[-1], tuple(v.stride()))
        seen.add(desc)
    assert len(seen) == len(views)
