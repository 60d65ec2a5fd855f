"""Attention-state merges and KV-cache maintenance (FlashInfer-shaped free functions)."""

import ctypes

import numpy as np

from . import _lib, _tensor
from ._lib import Status, raise_error
from .attention import _layout
from .context import context_for


def merge_state(v_a, s_a, v_b, s_b, *, v_out=None, s_out=None, context=None, stream=None):
    """Merge two attention states over disjoint KV sets, exactly:
    s = log(e^s_a + e^s_b), v = v_a e^(s_a - s) + v_b e^(s_b - s).
    v_*: [tokens, heads, head_dim], s_*: float32 [tokens, heads] (natural-log LSE).
    Returns (v, s), allocated like v_a unless v_out / s_out are given (they may be v_a / s_a)."""
    ctx = context_for(context, v_a)
    st = ctx.resolve_stream(stream, (v_a, v_b, v_out))
    ins = [_tensor.borrow(v_a, "v_a", st), _tensor.borrow(s_a, "s_a", st),
           _tensor.borrow(v_b, "v_b", st), _tensor.borrow(s_b, "s_b", st)]
    if v_out is None:
        v_out = _tensor.empty(v_a, ins[0].shape, ins[0].dtype, "v_out")
    if s_out is None:
        s_out = _tensor.empty(v_a, ins[1].shape, "float32", "s_out")
    outs = [_tensor.borrow(v_out, "v_out", st, writable=True),
            _tensor.borrow(s_out, "s_out", st, writable=True)]
    _lib.call("kvattn_merge_state", ctx.handle, *[_tensor.ptr(a) for a in ins + outs],
              None if st is None else ctypes.c_void_p(st))
    return v_out, s_out


def merge_state_in_place(v, s, v_other, s_other, *, context=None, stream=None):
    """v, s <- merge((v, s), (v_other, s_other)), written into v and s."""
    merge_state(v, s, v_other, s_other, v_out=v, s_out=s, context=context, stream=stream)


def merge_states(v, s, *, v_out=None, s_out=None, context=None, stream=None):
    """Merge N states per row: v [tokens, num_states, heads, head_dim], s float32
    [tokens, num_states, heads] -> (v [tokens, heads, head_dim], s [tokens, heads])."""
    ctx = context_for(context, v)
    st = ctx.resolve_stream(stream, (v, v_out))
    ins = [_tensor.borrow(v, "v", st), _tensor.borrow(s, "s", st)]
    vs = ins[0].shape
    if v_out is None or s_out is None:
        if len(vs) != 4:
            raise_error(Status.INVALID_SHAPE, "kvattn.merge_states: v has shape %s; expected "
                        "[tokens, num_states, heads, head_dim]" % (vs,))
        if v_out is None:
            v_out = _tensor.empty(v, (vs[0], vs[2], vs[3]), ins[0].dtype, "v_out")
        if s_out is None:
            s_out = _tensor.empty(v, (vs[0], vs[2]), "float32", "s_out")
    outs = [_tensor.borrow(v_out, "v_out", st, writable=True),
            _tensor.borrow(s_out, "s_out", st, writable=True)]
    _lib.call("kvattn_merge_states", ctx.handle, *[_tensor.ptr(a) for a in ins + outs],
              None if st is None else ctypes.c_void_p(st))
    return v_out, s_out


def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache,
                          kv_indices, kv_indptr, kv_last_page_len=None, kv_layout="NHD", *,
                          context=None, stream=None):
    """Write new tokens into a paged cache whose page tables already hold them.
    append_key/append_value: [tokens, kv_heads, head_dim] in the cache's dtype; batch_indices and
    positions: int32 [tokens] (see get_batch_indices_positions); paged_kv_cache: (k, v) or one
    [pages, 2, ...] tensor; kv_indices / kv_indptr: the page tables on the cache's device.
    kv_last_page_len is accepted for FlashInfer's signature and not needed: a token's slot follows
    from its position."""
    ctx = context_for(context, append_key)
    dev = ctx.device
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise_error(Status.INVALID_ARGUMENT, "paged_kv_cache: a tuple of %d tensors; expected "
                        "(k_cache, v_cache)" % len(paged_kv_cache))
        k, v, kv = paged_kv_cache[0], paged_kv_cache[1], None
    else:
        k, v, kv = None, None, paged_kv_cache
    bi = _tensor.device_int32(batch_indices, dev, "batch_indices")
    pos = _tensor.device_int32(positions, dev, "positions")
    idx = _tensor.device_int32(kv_indices, dev, "kv_indices")
    ptr = _tensor.device_int32(kv_indptr, dev, "kv_indptr")
    s = ctx.resolve_stream(stream, (append_key, k, kv))
    b = {name: _tensor.borrow(x, name, s, writable=name in ("k_cache", "v_cache", "paged_kv_cache"))
         for name, x in (("append_key", append_key), ("append_value", append_value),
                         ("batch_indices", bi), ("positions", pos), ("k_cache", k), ("v_cache", v),
                         ("paged_kv_cache", kv), ("kv_indices", idx), ("kv_indptr", ptr))}
    kvs = _lib.kv_init(_layout(kv_layout))
    kvs.k, kvs.v = _tensor.ptr(b["k_cache"]), _tensor.ptr(b["v_cache"])
    kvs.kv, kvs.indices = _tensor.ptr(b["paged_kv_cache"]), _tensor.ptr(b["kv_indices"])
    _lib.call("kvattn_append_paged_kv", ctx.handle, _tensor.ptr(b["append_key"]),
              _tensor.ptr(b["append_value"]), _tensor.ptr(b["batch_indices"]),
              _tensor.ptr(b["positions"]), ctypes.byref(kvs), _tensor.ptr(b["kv_indptr"]),
              None if s is None else ctypes.c_void_p(s))


def get_batch_indices_positions(append_indptr, seq_lens, nnz=None):
    """For tokens appended per request (append_indptr [batch+1]) to sequences that, after the append,
    are seq_lens [batch] long: each token's request and position. Returns int32 arrays [nnz] in the
    framework/device of append_indptr (computed on the host)."""
    indptr = _tensor.host_int32(append_indptr, "append_indptr").astype(np.int64)
    lens = _tensor.host_int32(seq_lens, "seq_lens").astype(np.int64)
    counts = np.diff(indptr)
    if len(lens) != len(counts):
        raise_error(Status.INVALID_SHAPE, "seq_lens has %d entries for %d requests"
                    % (len(lens), len(counts)))
    if np.any(counts < 0) or np.any(counts > lens):
        raise_error(Status.INVALID_INDEX, "append_indptr must be non-decreasing and append at most "
                    "seq_lens[i] tokens to request i")
    total = int(indptr[-1]) if len(indptr) else 0
    nnz = total if nnz is None else int(nnz)
    batch_indices = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    first = lens - counts  # position of each request's first appended token
    positions = (np.arange(total, dtype=np.int64) - np.repeat(indptr[:-1], counts)
                 + np.repeat(first, counts)).astype(np.int32)
    batch_indices, positions = batch_indices[:nnz], positions[:nnz]
    if _tensor.is_torch(append_indptr):
        torch = _tensor._torch()
        return (torch.from_numpy(batch_indices).to(append_indptr.device),
                torch.from_numpy(positions).to(append_indptr.device))
    return batch_indices, positions
