"""A NumPy float64 attention reference, written here from the math in include/kvattn.h and
independent of the C library's reference: dense per request, KV gathered from pages by plain
indexing."""

import numpy as np


def attention(q, k, v, causal=False, window_left=-1, soft_cap=0.0, sm_scale=None, q_pos=None,
              kv_pos=None, keep=None):
    """One request. q [qo, Hq, D], k/v [kv, Hk, D] -> (out [qo, Hq, D], lse [qo, Hq]) in float64.
    Positions default to bottom-right alignment: q_pos = kv_len - qo_len + r, kv_pos = j.
    keep: optional boolean [qo, kv] custom mask."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    qo, hq, d = q.shape
    kv, hk = k.shape[0], k.shape[1]
    group = hq // hk
    if sm_scale is None:
        sm_scale = 1.0 / np.sqrt(d)
    if q_pos is None:
        q_pos = kv - qo + np.arange(qo)
    if kv_pos is None:
        kv_pos = np.arange(kv)
    qp, kp = np.asarray(q_pos)[:, None], np.asarray(kv_pos)[None, :]
    visible = np.ones((qo, kv), dtype=bool)
    if causal:
        visible &= kp <= qp
    if window_left >= 0:
        visible &= kp >= qp - window_left
    if keep is not None:
        visible &= np.asarray(keep, dtype=bool)
    out = np.zeros((qo, hq, d))
    lse = np.full((qo, hq), -np.inf)
    for h in range(hq):
        kh, vh = k[:, h // group, :], v[:, h // group, :]
        s = sm_scale * (q[:, h, :] @ kh.T)  # [qo, kv]
        if soft_cap > 0:
            s = soft_cap * np.tanh(s / soft_cap)
        s = np.where(visible, s, -np.inf)
        m = s.max(axis=1, initial=-np.inf)
        rows = np.isfinite(m)
        if not rows.any():
            continue
        p = np.exp(s[rows] - m[rows, None])
        z = p.sum(axis=1)
        out[rows, h, :] = (p @ vh) / z[:, None]
        lse[rows, h] = m[rows] + np.log(z)
    return out, lse


def gather_pages(cache, indices, start, end, last_page_len, page_size, layout="NHD"):
    """Request's KV [kv_len, H, D] from a paged cache [pages, page_size, H, D] (NHD) or
    [pages, H, page_size, D] (HND)."""
    pages = [int(p) for p in indices[start:end]]
    if not pages:
        shape = cache.shape
        h, d = (shape[2], shape[3]) if layout == "NHD" else (shape[1], shape[3])
        return np.zeros((0, h, d))
    parts = []
    for n, p in enumerate(pages):
        page = np.asarray(cache[p], dtype=np.float64)
        if layout == "HND":
            page = page.transpose(1, 0, 2)
        used = last_page_len if n == len(pages) - 1 else page_size
        parts.append(page[:used])
    return np.concatenate(parts, axis=0)


def paged_attention(q, qo_indptr, k_cache, v_cache, kv_indptr, kv_indices, last_page_len, page_size,
                    layout="NHD", masks=None, **kw):
    """Batch over a paged cache; q [qo_tokens, Hq, D]. masks: optional list of [qo, kv] booleans."""
    outs, lses = [], []
    for i in range(len(kv_indptr) - 1):
        k = gather_pages(k_cache, kv_indices, kv_indptr[i], kv_indptr[i + 1], last_page_len[i],
                         page_size, layout)
        v = gather_pages(v_cache, kv_indices, kv_indptr[i], kv_indptr[i + 1], last_page_len[i],
                         page_size, layout)
        qi = q[qo_indptr[i]:qo_indptr[i + 1]]
        o, l = attention(qi, k, v, keep=None if masks is None else masks[i], **kw)
        outs.append(o)
        lses.append(l)
    return np.concatenate(outs), np.concatenate(lses)


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0)


def random_paged_batch(rng, kv_lens, page_size, spare_pages=3):
    """Page tables for requests of the given KV lengths, pages shuffled over a larger pool.
    Returns kv_indptr, kv_indices, last_page_len, num_pages."""
    pages_per = [(n + page_size - 1) // page_size for n in kv_lens]
    total = sum(pages_per)
    num_pages = total + spare_pages
    perm = rng.permutation(num_pages)[:total].astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(pages_per)]).astype(np.int32)
    last = np.array([(n - 1) % page_size + 1 if n > 0 else 1 for n in kv_lens], dtype=np.int32)
    return kv_indptr, perm, last, num_pages
