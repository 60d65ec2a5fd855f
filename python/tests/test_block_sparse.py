"""BlockSparseAttentionWrapper (BSR over M x N with R x C blocks) against a dense NumPy reference."""

import numpy as np
import pytest

import kvattn
import reference as R


def random_bsr(rng, M, N, R_, C, density=0.5):
    rows, cols = -(-M // R_), -(-N // C)
    keep = rng.random((rows, cols)) < density
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    indices = np.concatenate([np.flatnonzero(r) for r in keep]).astype(np.int32) if keep.any() \
        else np.zeros(0, np.int32)
    dense = np.kron(keep, np.ones((R_, C), bool))[:M, :N]
    return indptr, indices, dense


def bsr_case(rng, backend, M, N, R_, C, qo_heads=4, kv_heads=2, head_dim=8, layout="NHD",
             mask=None, causal=False, density=0.5):
    indptr, indices, dense = random_bsr(rng, M, N, R_, C, density)
    q = rng.standard_normal((M, qo_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((N, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((N, kv_heads, head_dim)).astype(np.float32)
    w = kvattn.BlockSparseAttentionWrapper(backend, layout)
    w.plan(indptr, indices, M, N, R_, C, qo_heads, kv_heads, head_dim, causal=causal,
           mask=None if mask is None else mask(indptr, indices, dense), q_data_type="float32")
    kk, vv = (k, v) if layout == "NHD" else (k.transpose(1, 0, 2), v.transpose(1, 0, 2))
    out, lse = w.run(q, kk, vv, return_lse=True)
    return q, k, v, dense, out, lse


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("shape", [(16, 16, 4, 4), (10, 13, 4, 3), (7, 9, 1, 1), (12, 8, 3, 8)])
def test_bsr_matches_dense(backend, rng, shape, layout):
    M, N, R_, C = shape
    q, k, v, dense, out, lse = bsr_case(rng, backend, M, N, R_, C, layout=layout)
    ro, rl = R.attention(q, k, v, keep=dense, q_pos=np.arange(M), kv_pos=np.arange(N))
    assert R.rel_err(out, ro) < 1e-5
    assert np.array_equal(np.isinf(lse), np.isinf(rl))
    assert np.allclose(lse[np.isfinite(rl)], rl[np.isfinite(rl)], atol=1e-5)


def test_bsr_causal_uses_global_positions(backend, rng):
    M = N = 12
    q, k, v, dense, out, lse = bsr_case(rng, backend, M, N, 4, 4, causal=True, density=0.8)
    ro, rl = R.attention(q, k, v, keep=dense, causal=True, q_pos=np.arange(M), kv_pos=np.arange(N))
    assert R.rel_err(out, ro) < 1e-5


def test_bsr_per_block_mask_as_flashinfer_gives_it(backend, rng):
    M, N, R_, C = 8, 12, 4, 4
    masks = {}

    def per_block(indptr, indices, dense):
        blocks = rng.random((len(indices), R_, C)) < 0.5
        full = np.zeros((M, N), bool)
        for i in range(len(indptr) - 1):
            for e in range(indptr[i], indptr[i + 1]):
                full[i * R_:(i + 1) * R_, indices[e] * C:(indices[e] + 1) * C] = blocks[e]
        masks["dense"] = full
        return blocks

    q, k, v, dense, out, lse = bsr_case(rng, backend, M, N, R_, C, mask=per_block, density=0.7)
    ro, rl = R.attention(q, k, v, keep=masks["dense"] & dense, q_pos=np.arange(M),
                         kv_pos=np.arange(N))
    assert R.rel_err(out, ro) < 1e-5


def test_bsr_dense_mask(backend, rng):
    M, N = 6, 10
    masks = {}

    def dense_mask(indptr, indices, dense):
        masks["m"] = rng.random((M, N)) < 0.5
        return masks["m"]

    q, k, v, dense, out, lse = bsr_case(rng, backend, M, N, 2, 5, mask=dense_mask, density=0.9)
    ro, rl = R.attention(q, k, v, keep=masks["m"] & dense, q_pos=np.arange(M), kv_pos=np.arange(N))
    assert R.rel_err(out, ro) < 1e-5


def test_output_right_after_the_kv_in_memory_is_not_an_overlap(backend, rng):
    """N not a multiple of C: the last block column is partial. K/V and out placed back to back in
    one buffer must not be reported as overlapping (the check must use the tensor's own extent, not
    the block-padded one)."""
    M, N, R_, C, heads, dim = 4, 13, 4, 3, 1, 8
    indptr, indices, dense = random_bsr(rng, M, N, R_, C, density=1.0)
    buf = np.zeros(3 * N * heads * dim + M * heads * dim, np.float32)
    k = buf[:N * heads * dim].reshape(N, heads, dim)
    v = buf[N * heads * dim:2 * N * heads * dim].reshape(N, heads, dim)
    out = buf[3 * N * heads * dim:].reshape(M, heads, dim)  # a gap of N rows after v...
    k2 = buf[2 * N * heads * dim:3 * N * heads * dim].reshape(N, heads, dim)  # ...holding k2
    k[:], v[:], k2[:] = (rng.standard_normal((N, heads, dim)) for _ in range(3))
    q = rng.standard_normal((M, heads, dim)).astype(np.float32)
    w = kvattn.BlockSparseAttentionWrapper(backend)
    w.plan(indptr, indices, M, N, R_, C, heads, heads, dim, q_data_type="float32")
    w.run(q, v, k2, out=out)  # v's padded extent would reach into k2, k2's into out
    ro, _ = R.attention(q, v, k2, keep=dense, q_pos=np.arange(M), kv_pos=np.arange(N))
    assert R.rel_err(out, ro) < 1e-5


def test_bsr_packed_mask_in_flashinfer_layout(backend, rng):
    M, N, R_, C = 8, 12, 4, 4
    got = {}

    def blocks(indptr, indices, dense):
        got["blocks"] = rng.random((len(indices), R_, C)) < 0.5
        got["indptr"], got["indices"] = indptr, indices
        return got["blocks"]

    q, k, v, dense, out, lse = bsr_case(np.random.default_rng(3), backend, M, N, R_, C, mask=blocks,
                                        density=0.7)
    w = kvattn.BlockSparseAttentionWrapper(backend)
    w.plan(got["indptr"], got["indices"], M, N, R_, C, 4, 2, 8, q_data_type="float32",
           packed_mask=np.packbits(got["blocks"].reshape(-1), bitorder="little"))
    assert np.array_equal(w.run(q, k, v), out)
