"""Paged and ragged prefill (causal, bottom-right aligned; windows; soft-cap; custom masks) against
the NumPy float64 reference."""

import numpy as np
import pytest

import kvattn
import reference as R


def paged_prefill_case(rng, backend, qo_lens, kv_lens, page_size, qo_heads=4, kv_heads=2, head_dim=16,
                       layout="NHD", dtype="float32", masks=None, single_tensor=False, **opts):
    kv_indptr, kv_indices, last, num_pages = R.random_paged_batch(rng, kv_lens, page_size)
    shape = (num_pages, page_size, kv_heads, head_dim) if layout == "NHD" else \
        (num_pages, kv_heads, page_size, head_dim)
    k = rng.standard_normal(shape).astype(dtype)
    v = rng.standard_normal(shape).astype(dtype)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], qo_heads, head_dim)).astype(dtype)
    w = kvattn.BatchPrefillWithPagedKVCacheWrapper(backend, layout)
    custom = None if masks is None else np.concatenate([m.reshape(-1) for m in masks])
    w.plan(qo_indptr, kv_indptr, kv_indices, last, qo_heads, kv_heads, head_dim, page_size,
           custom_mask=custom, q_data_type=dtype, **opts)
    out, lse = w.run(q, np.stack([k, v], 1) if single_tensor else (k, v), return_lse=True)
    ref_kw = {"causal": opts.get("causal", False), "window_left": opts.get("window_left", -1),
              "soft_cap": opts.get("logits_soft_cap") or 0.0, "sm_scale": opts.get("sm_scale")}
    ro, rl = R.paged_attention(q, qo_indptr, k, v, kv_indptr, kv_indices, last, page_size, layout,
                               masks=masks, **ref_kw)
    return out, lse, ro, rl


def assert_close(out, lse, ro, rl, tol=1e-5):
    assert R.rel_err(out, ro) < tol
    assert np.array_equal(np.isinf(lse), np.isinf(rl))
    fin = np.isfinite(rl)
    assert np.allclose(lse[fin], rl[fin], atol=10 * tol)
    assert not np.isnan(out).any()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_prefill(backend, rng, layout, page_size, causal):
    qo_lens, kv_lens = [5, 1, 0, 9, 3], [12, 7, 4, 9, 3]
    out, lse, ro, rl = paged_prefill_case(rng, backend, qo_lens, kv_lens, page_size, layout=layout,
                                          causal=causal)
    assert_close(out, lse, ro, rl)


def test_causal_qo_longer_than_kv_masks_the_first_rows(backend, rng):
    """qo_len > kv_len with causal: q_pos = kv_len - qo_len + r < 0 for the first rows, which see
    nothing: output 0, lse -inf."""
    out, lse, ro, rl = paged_prefill_case(rng, backend, [6, 4], [3, 0], 2, causal=True)
    assert_close(out, lse, ro, rl)
    assert np.all(out[:3] == 0) and np.all(np.isneginf(lse[:3]))
    assert np.all(out[6:] == 0) and np.all(np.isneginf(lse[6:]))  # the kv_len 0 request


@pytest.mark.parametrize("opts", [{"causal": True, "window_left": 3}, {"logits_soft_cap": 1.5},
                                  {"causal": True, "sm_scale": 0.5, "logits_soft_cap": 3.0}])
def test_paged_prefill_options(backend, rng, opts):
    out, lse, ro, rl = paged_prefill_case(rng, backend, [4, 7], [10, 7], 4, **opts)
    assert_close(out, lse, ro, rl)


def test_paged_prefill_single_kv_tensor_float16(backend, rng):
    out, lse, ro, rl = paged_prefill_case(rng, backend, [8, 3], [20, 33], 16, head_dim=64,
                                          dtype="float16", single_tensor=True, causal=True)
    assert out.dtype == np.float16
    assert_close(out, lse, ro, rl, tol=1e-2)


def test_paged_prefill_custom_mask(backend, rng):
    qo_lens, kv_lens = [3, 5, 2], [7, 5, 9]
    masks = [rng.random((q, k)) < 0.6 for q, k in zip(qo_lens, kv_lens)]
    masks[1][2, :] = False  # one row fully masked: 0 and -inf
    out, lse, ro, rl = paged_prefill_case(rng, backend, qo_lens, kv_lens, 4, masks=masks)
    assert_close(out, lse, ro, rl)
    assert np.all(out[3 + 2] == 0)


def test_custom_mask_equal_to_causal_gives_causal(backend, rng):
    qo_lens, kv_lens = [4, 6], [9, 6]
    masks = [np.tril(np.ones((q, k), bool), k - q) for q, k in zip(qo_lens, kv_lens)]
    a = paged_prefill_case(np.random.default_rng(7), backend, qo_lens, kv_lens, 4, masks=masks)
    b = paged_prefill_case(np.random.default_rng(7), backend, qo_lens, kv_lens, 4, causal=True)
    assert R.rel_err(a[0], b[0]) < 1e-6


def test_packed_custom_mask_layout():
    """Each request's bits start on a byte boundary, little bit order."""
    m1 = np.array([[1, 0, 1]], bool)           # 3 bits -> 1 byte
    m2 = np.array([[1, 1], [0, 0], [0, 1]], bool)  # 6 bits -> 1 byte
    packed = kvattn.pack_custom_mask(np.concatenate([m1.ravel(), m2.ravel()]), [1, 3], [3, 2])
    assert packed.tolist() == [0b101, 0b100011]


def ragged_case(rng, backend, qo_lens, kv_lens, layout="NHD", qo_heads=4, kv_heads=1, head_dim=8,
                **opts):
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], qo_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((kv_indptr[-1], kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv_indptr[-1], kv_heads, head_dim)).astype(np.float32)
    w = kvattn.BatchPrefillWithRaggedKVCacheWrapper(backend, layout)
    w.plan(qo_indptr, kv_indptr, qo_heads, kv_heads, head_dim, q_data_type="float32", **opts)
    kk, vv = (k, v) if layout == "NHD" else (np.ascontiguousarray(k.transpose(1, 0, 2)),
                                             np.ascontiguousarray(v.transpose(1, 0, 2)))
    out, lse = w.run(q, kk, vv, return_lse=True)
    outs, lses = [], []
    for i in range(len(qo_lens)):
        o, l = R.attention(q[qo_indptr[i]:qo_indptr[i + 1]], k[kv_indptr[i]:kv_indptr[i + 1]],
                           v[kv_indptr[i]:kv_indptr[i + 1]], causal=opts.get("causal", False),
                           window_left=opts.get("window_left", -1))
        outs.append(o)
        lses.append(l)
    return out, lse, np.concatenate(outs), np.concatenate(lses)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_prefill(backend, rng, layout, causal):
    out, lse, ro, rl = ragged_case(rng, backend, [7, 0, 3, 12], [7, 5, 8, 12], layout, causal=causal)
    assert_close(out, lse, ro, rl)


def test_ragged_prefill_window(backend, rng):
    out, lse, ro, rl = ragged_case(rng, backend, [16, 4], [16, 20], causal=True, window_left=4,
                                   qo_heads=2, kv_heads=2)
    assert_close(out, lse, ro, rl)


def test_split_kv_merged_equals_full_attention(backend, rng):
    """Attention over KV halves, merged with merge_state, equals attention over the whole KV (no
    causal: each half is a disjoint KV set for every row)."""
    heads, head_dim, qo, kv = 2, 8, 5, 30
    q = rng.standard_normal((qo, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((kv, heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv, heads, head_dim)).astype(np.float32)
    w = kvattn.BatchPrefillWithRaggedKVCacheWrapper(backend)
    w.plan([0, qo], [0, 11], heads, heads, head_dim, q_data_type="float32")
    oa, sa = w.run(q, k[:11], v[:11], return_lse=True)
    w.plan([0, qo], [0, kv - 11], heads, heads, head_dim, q_data_type="float32")
    ob, sb = w.run(q, k[11:], v[11:], return_lse=True)
    om, sm = kvattn.merge_state(oa, sa, ob, sb, context=backend)
    w.plan([0, qo], [0, kv], heads, heads, head_dim, q_data_type="float32")
    of, sf = w.run(q, k, v, return_lse=True)
    assert R.rel_err(om, of) < 1e-5 and np.allclose(sm, sf, atol=1e-5)


def llama31_frequencies(freq, factor, low, high, original_max_pos):
    """Llama-3.1 scaling: short wavelengths kept, long ones divided by factor, a smooth blend between."""
    wavelen = 2 * np.pi / freq
    smooth = (original_max_pos / wavelen - low) / (high - low)
    blended = (1 - smooth) * freq / factor + smooth * freq
    return np.where(wavelen < original_max_pos / high, freq,
                    np.where(wavelen > original_max_pos / low, freq / factor, blended))


def rope(x, pos, theta, scale, llama31=None):
    """Rotate-half ("llama") RoPE of x [n, H, D] at positions pos [n], in float64."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    if llama31 is not None:
        freq = llama31_frequencies(freq, *llama31)
    ang = (np.asarray(pos, np.float64)[:, None] / scale) * freq[None, :]  # [n, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


@pytest.mark.parametrize("theta,scale", [(10000.0, 1.0), (500000.0, 4.0)])
def test_ragged_prefill_rope(backend, rng, theta, scale):
    """RoPE on the fly: q at q_pos = kv_len - qo_len + r, k at its index, then causal attention."""
    qo_lens, kv_lens, heads, dim = [3, 6], [10, 6], 2, 16
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], heads, dim)).astype(np.float32)
    k = rng.standard_normal((kv_indptr[-1], heads, dim)).astype(np.float32)
    v = rng.standard_normal((kv_indptr[-1], heads, dim)).astype(np.float32)
    w = kvattn.BatchPrefillWithRaggedKVCacheWrapper(backend)
    w.plan(qo_indptr, kv_indptr, heads, heads, dim, causal=True, pos_encoding_mode="ROPE_LLAMA",
           rope_theta=theta, rope_scale=scale, q_data_type="float32")
    out = w.run(q, k, v)
    refs = []
    for i in range(2):
        n_q, n_kv = qo_lens[i], kv_lens[i]
        qi = rope(q[qo_indptr[i]:qo_indptr[i + 1]], n_kv - n_q + np.arange(n_q), theta, scale)
        ki = rope(k[kv_indptr[i]:kv_indptr[i + 1]], np.arange(n_kv), theta, scale)
        refs.append(R.attention(qi, ki, v[kv_indptr[i]:kv_indptr[i + 1]], causal=True)[0])
    assert R.rel_err(out, np.concatenate(refs)) < 1e-5


def test_llama31_rope_scaling(backend, rng):
    """One query over 3000 keys, head_dim 32, theta 5e5, llama-3.1 factors (8, 1, 4, 8192): every band
    of the scaling is exercised, and the result differs from unscaled RoPE."""
    n_kv, heads, dim, theta, l31 = 3000, 1, 32, 500000.0, (8.0, 1.0, 4.0, 8192)
    q = rng.standard_normal((1, heads, dim)).astype(np.float32)
    k = rng.standard_normal((n_kv, heads, dim)).astype(np.float32)
    v = rng.standard_normal((n_kv, heads, dim)).astype(np.float32)
    freq = theta ** (-np.arange(dim // 2) * 2.0 / dim)
    wavelen = 2 * np.pi / freq
    assert (wavelen < 8192 / 4).any() and (wavelen > 8192).any() and \
        ((wavelen >= 8192 / 4) & (wavelen <= 8192)).any()
    outs = {}
    for name, extra in (("l31", {"rope_llama31": l31}), ("plain", {})):
        w = kvattn.BatchPrefillWithRaggedKVCacheWrapper(backend)
        w.plan([0, 1], [0, n_kv], heads, heads, dim, pos_encoding_mode="ROPE_LLAMA", rope_theta=theta,
               q_data_type="float32", **extra)
        outs[name] = w.run(q, k, v)
    ref = R.attention(rope(q, [n_kv - 1], theta, 1.0, l31), rope(k, np.arange(n_kv), theta, 1.0, l31),
                      v)[0]
    assert R.rel_err(outs["l31"], ref) < 1e-5
    assert R.rel_err(outs["plain"], ref) > 1e-3
