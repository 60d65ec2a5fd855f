"""Attention wrappers in the shape serving systems already call (FlashInfer's
BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper,
BatchPrefillWithRaggedKVCacheWrapper, BlockSparseAttentionWrapper): construct once, plan() per
batch from the index arrays, run() per layer.

The workspace is kvattn's business: each wrapper asks the library how many bytes its bounds need
(kvattn_workspace_size) and allocates them (kvattn_workspace_alloc). Bounds default to the first
plan's batch and grow (x2) when a later batch needs more, unless they were given explicitly or
use_cuda_graph=True: then they are fixed, as a captured graph needs, and a larger batch is a
BoundsExceededError from plan.
"""

import ctypes

import numpy as np

from . import _lib, _tensor
from ._lib import Status, raise_error
from .context import context_for

_LAYOUTS = {"NHD": _lib.LAYOUT_NHD, "HND": _lib.LAYOUT_HND}
_POS_ENCODINGS = ("NONE", "ROPE_LLAMA", "ALIBI")


def _layout(kv_layout):
    if kv_layout not in _LAYOUTS:
        raise_error(Status.INVALID_ARGUMENT, "kv_layout %r: expected 'NHD' or 'HND'" % (kv_layout,))
    return _LAYOUTS[kv_layout]


def _kv_lens_paged(kv_indptr, last_page_len, page_size):
    pages = np.diff(kv_indptr.astype(np.int64))
    lens = (pages - 1) * page_size + last_page_len.astype(np.int64)
    return np.where(pages > 0, lens, 0)


def pack_custom_mask(custom_mask, qo_lens, kv_lens):
    """Bit-pack a boolean mask given as the concatenation of each request's row-major
    qo_len x kv_len matrix into kvattn's layout: little bit order, each request starting on a byte
    boundary (the same layout as FlashInfer's segment_packbits)."""
    flat = _tensor.host_bool(custom_mask, "custom_mask")
    sizes = np.asarray(qo_lens, dtype=np.int64) * np.asarray(kv_lens, dtype=np.int64)
    if flat.size != int(sizes.sum()):
        raise_error(Status.INVALID_SHAPE, "custom_mask: %d elements, but the batch's requests need "
                    "sum(qo_len * kv_len) = %d" % (flat.size, int(sizes.sum())))
    parts, start = [], 0
    for n in sizes:
        parts.append(np.packbits(flat[start:start + n], bitorder="little"))
        start += n
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


class _AttentionWrapper:
    """What the four wrappers share: the context, the attention object, the workspace, plan/run."""

    _format = None

    def __init__(self, context=None, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 *, max_batch=None, max_qo_tokens=None, max_kv_entries=None):
        """context: a kvattn.Context; or a backend name ("cpu", "cuda", "reference", "auto"); or a
        tensor, whose device picks the context (so FlashInfer's `Wrapper(workspace_buffer, "NHD")`
        keeps working: kvattn sizes its own workspace and leaves the buffer alone); or None: the
        device of the index arrays given to the first plan() decides.
        max_batch / max_qo_tokens / max_kv_entries: the workspace's bounds (requests; query tokens;
        pages, KV tokens (ragged) or blocks (block-sparse)); given ones are fixed."""
        self._ctx = None if context is None else context_for(context)
        self._layout = _layout(kv_layout)
        self.kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)
        self._use_tensor_cores = bool(use_tensor_cores)
        self._explicit = (max_batch, max_qo_tokens, max_kv_entries)
        self._fixed = use_cuda_graph or any(b is not None for b in self._explicit)
        self._bounds = None        # (max_batch, max_qo_tokens, max_kv_entries) of the attention
        self._attn = None          # kvattn_attention*
        self._desc_key = None
        self._desc_keep = None     # buffers the desc points to (alibi slopes)
        self._ws = _lib.Workspace()
        self._ws_live = False
        self._plan = None          # what run() needs from the last plan
        self._copy_done = None     # GPU: an event after the last plan's host-to-device copy
        self._event = None         # the torch.cuda.Event reused for it
        self._desc_obj = None      # the desc object the attention was created from

    # ------------------------------------------------------------------ resources

    @property
    def context(self):
        return self._ctx

    @property
    def workspace_bytes(self):
        """(device_bytes, host_bytes) allocated now."""
        return (self._ws.device_bytes, self._ws.host_bytes) if self._ws_live else (0, 0)

    @property
    def bounds(self):
        """(max_batch, max_qo_tokens, max_kv_entries) the current attention was created with."""
        return self._bounds

    def _release(self):
        if self._attn is not None:
            _lib.lib.kvattn_attention_destroy(self._attn)
            self._attn = None
        if self._ws_live:
            # The GPU backend's free waits for the device (cuMemFree synchronizes), so work still in
            # flight on the old workspace is not cut short.
            _lib.lib.kvattn_workspace_free(self._ctx.handle, ctypes.byref(self._ws))
            self._ws = _lib.Workspace()
            self._ws_live = False

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass

    def _resolve_context(self, *arrays):
        if self._ctx is None:
            self._ctx = context_for(None, *arrays)
        return self._ctx

    def _prepare(self, desc, desc_keep, need):
        """Make sure an attention for `desc` with bounds covering `need` exists, and a workspace big
        enough for it."""
        if self._attn is not None and desc is self._desc_obj and \
                all(n <= b for n, b in zip(need, self._bounds)):
            return  # the memoized description of the last plan, and the batch fits
        # The struct's bytes: any changed field means a new attention. The slopes are compared by
        # value, not address (a ctypes pointer field read back is a view, so re-point it from keep).
        desc.alibi_slopes = None
        key = bytes(desc)
        if desc_keep is not None:
            desc.alibi_slopes = desc_keep.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if desc_keep is not None:
            key += desc_keep.tobytes()
        old = self._bounds
        if old is None:
            bounds = tuple(int(e) if e is not None else int(n) for e, n in zip(self._explicit, need))
        elif self._fixed:
            bounds = old  # plan() reports BOUNDS_EXCEEDED when the batch does not fit
        else:
            bounds = tuple(o if n <= o else max(n, 2 * o) for o, n in zip(old, need))
        if self._attn is not None and key == self._desc_key and bounds == old:
            self._desc_obj = desc
            return
        b = _lib.bounds_init(*bounds)
        dev_bytes, host_bytes = ctypes.c_size_t(), ctypes.c_size_t()
        _lib.call("kvattn_workspace_size", self._ctx.handle, ctypes.byref(desc), ctypes.byref(b),
                  ctypes.byref(dev_bytes), ctypes.byref(host_bytes))
        if self._attn is not None:
            _lib.lib.kvattn_attention_destroy(self._attn)
            self._attn = None
        if not self._ws_live or self._ws.device_bytes < dev_bytes.value \
                or self._ws.host_bytes < host_bytes.value:
            self._release()
            ws = _lib.Workspace()
            _lib.call("kvattn_workspace_alloc", self._ctx.handle, dev_bytes.value, host_bytes.value,
                      ctypes.byref(ws))
            self._ws, self._ws_live = ws, True
        attn = ctypes.c_void_p()
        _lib.call("kvattn_attention_create", self._ctx.handle, ctypes.byref(desc), ctypes.byref(b),
                  ctypes.byref(attn))
        self._attn, self._desc_key, self._desc_keep, self._bounds = attn, key, desc_keep, bounds
        self._desc_obj = desc

    # ------------------------------------------------------------------ plan / run

    def _make_desc(self, *args, **kw):
        """_build_desc, memoized on its arguments: a serving loop plans with the same ones every step,
        and then the attention is known unchanged without comparing structs."""
        try:
            key = (args, tuple(sorted(kw.items())))
            hash(key)
        except TypeError:  # an array argument (alibi_slopes): build afresh
            return self._build_desc(*args, **kw)
        memo = getattr(self, "_desc_memo", None)
        if memo is not None and memo[0] == key:
            return memo[1], memo[2]
        desc, keep = self._build_desc(*args, **kw)
        self._desc_memo = (key, desc, keep)
        return desc, keep

    def _build_desc(self, num_qo_heads, num_kv_heads, head_dim, causal=False, window_left=-1,
                   logits_soft_cap=None, pos_encoding_mode="NONE", sm_scale=None, rope_theta=None,
                   rope_scale=None, q_data_type="float16", kv_data_type=None, o_data_type=None,
                   alibi_slopes=None, rope_llama31=None, custom_mask=False, disable_split_kv=False,
                   fixed_split_size=None):
        d = _lib.desc_init()
        d.num_qo_heads, d.num_kv_heads, d.head_dim = int(num_qo_heads), int(num_kv_heads), int(head_dim)
        d.q_dtype = _tensor.dl_dtype(q_data_type)
        d.kv_dtype = _tensor.dl_dtype(kv_data_type)  # None -> unset -> q's dtype
        d.o_dtype = _tensor.dl_dtype(o_data_type)
        d.sm_scale = 0.0 if sm_scale is None else float(sm_scale)
        d.causal = int(bool(causal))
        d.window_left = -1 if window_left is None else int(window_left)
        d.logits_soft_cap = 0.0 if logits_soft_cap is None else float(logits_soft_cap)
        mode = str(pos_encoding_mode).upper()
        if mode not in _POS_ENCODINGS:
            raise_error(Status.INVALID_ARGUMENT, "pos_encoding_mode %r: expected one of %s"
                        % (pos_encoding_mode, ", ".join(_POS_ENCODINGS)))
        d.rope = int(mode == "ROPE_LLAMA")
        d.alibi = int(mode == "ALIBI")
        d.rope_theta = 0.0 if rope_theta is None else float(rope_theta)
        d.rope_scale = 0.0 if rope_scale is None else float(rope_scale)
        if rope_llama31 is not None:  # (factor, low_freq_factor, high_freq_factor, original_max_pos)
            f, lo, hi, orig = rope_llama31
            d.rope_llama31_factor, d.rope_llama31_low_freq_factor = float(f), float(lo)
            d.rope_llama31_high_freq_factor, d.rope_llama31_original_max_pos = float(hi), int(orig)
        keep = None
        if alibi_slopes is not None:
            keep = np.ascontiguousarray(_tensor.host_float32(alibi_slopes, "alibi_slopes"))
            if keep.shape != (d.num_qo_heads,):
                raise_error(Status.INVALID_SHAPE, "alibi_slopes: shape %s, expected (%d,) (num_qo_heads)"
                            % (keep.shape, d.num_qo_heads))
            d.alibi_slopes = keep.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        d.custom_mask = int(bool(custom_mask))
        d.kernel = _lib.KERNEL_TENSOR_CORE if self._use_tensor_cores else _lib.KERNEL_AUTO
        d.disable_split_kv = int(bool(disable_split_kv))
        d.fixed_split_size = 0 if fixed_split_size is None else int(fixed_split_size)
        return d, keep

    def _do_plan(self, desc, desc_keep, batch, need, plan_state, stream, arrays):
        self._plan = None  # a failed plan leaves nothing to run
        self._prepare(desc, desc_keep, need)
        s = self._ctx.resolve_stream(stream, arrays)
        if self._copy_done is not None:
            # On a GPU, plan writes the work lists into pinned host memory and copies them
            # asynchronously: they may be rewritten only once the last plan's copy has run.
            self._copy_done.synchronize()
            self._copy_done = None
        _lib.call("kvattn_plan", self._attn, ctypes.byref(batch), ctypes.byref(self._ws), s)
        if self._ctx.is_cuda:
            self._copy_done = self._record_event(s)
        plan_state["num_qo_heads"] = desc.num_qo_heads
        plan_state["head_dim"] = desc.head_dim
        plan_state["o_dtype"] = _tensor.dtype_name(
            desc.o_dtype if desc.o_dtype.bits else desc.q_dtype if desc.q_dtype.bits
            else _lib.DLDataType(_lib.kDLFloat, 16, 1))
        self._plan = plan_state

    def _record_event(self, s):
        """An event marking the plan's copy on stream `s` (through torch, when it is loaded; without
        torch the caller keeps the order, as the C API asks)."""
        torch = _tensor._torch()
        if torch is None:
            return None
        dev = self._ctx.device_id
        st = self._ctx.last_torch_stream
        if st is None or st.cuda_stream != s:
            cur = torch.cuda.current_stream(dev)
            st = cur if cur.cuda_stream == s else torch.cuda.ExternalStream(s, device=dev)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(st)
        return self._event

    def _do_run(self, q, k, v, kv, out, lse, return_lse, stream):
        p = self._plan
        if p is None or self._attn is None:
            raise_error(Status.INVALID_USAGE, "%s.run() before a successful plan()"
                        % type(self).__name__)
        rows, heads, dim = p["qo_tokens"], p["num_qo_heads"], p["head_dim"]
        if out is None:
            out = _tensor.empty(q, (rows, heads, dim), p["o_dtype"], "out")
        if return_lse and lse is None:
            lse = _tensor.empty(q, (rows, heads), "float32", "lse")
        s = self._ctx.resolve_stream(stream, (q, k, v, kv, out))
        same = stream is None  # s is then torch's current stream (when torch tensors are here)
        bq = _tensor.borrow(q, "q", s, same_stream=same)
        bk = _tensor.borrow(k, "k", s, same_stream=same)
        bv = _tensor.borrow(v, "v", s, same_stream=same)
        bkv = _tensor.borrow(kv, "paged_kv_cache", s, same_stream=same)
        bidx = _tensor.borrow(p.get("indices"), "indices", s, same_stream=same)
        bmask = _tensor.borrow(p.get("mask"), "custom_mask", s, same_stream=same)
        bout = _tensor.borrow(out, "out", s, writable=True, same_stream=same)
        blse = _tensor.borrow(lse, "lse", s, writable=True, same_stream=same)
        kvs = _lib.kv_init(self._layout)
        kvs.k, kvs.v, kvs.kv, kvs.indices = (_tensor.ptr(bk), _tensor.ptr(bv), _tensor.ptr(bkv),
                                             _tensor.ptr(bidx))
        _lib.call("kvattn_run", self._attn, _tensor.ref(bq), ctypes.byref(kvs), _tensor.ref(bmask),
                  _tensor.ref(bout), _tensor.ref(blse), s)
        return (out, lse) if return_lse else out

    @staticmethod
    def _split_paged_kv(paged_kv_cache):
        """(k, v, kv): a (k, v) pair, or one [pages, 2, ...] tensor."""
        if isinstance(paged_kv_cache, (tuple, list)):
            if len(paged_kv_cache) != 2:
                raise_error(Status.INVALID_ARGUMENT, "paged_kv_cache: a tuple of %d tensors; expected "
                            "(k_cache, v_cache)" % len(paged_kv_cache))
            return paged_kv_cache[0], paged_kv_cache[1], None
        if paged_kv_cache is None:
            raise_error(Status.INVALID_ARGUMENT, "paged_kv_cache is None")
        return None, None, paged_kv_cache

    def _device_indices(self, indices, name, kv_indptr):
        """The index tensor run() reads, on the context's device. A buffer longer than the batch
        needs (serving systems keep one of fixed size, e.g. for CUDA graphs) is viewed as its first
        kv_indptr[-1] entries: same address, the shape the plan expects."""
        x = _tensor.device_int32(indices, self._ctx.device, name)
        entries = int(kv_indptr[-1]) if len(kv_indptr) else 0
        if len(x) > entries >= 0:
            x = x[:entries]
        return x

    def _device_mask(self, custom_mask, packed_custom_mask, qo_lens, kv_lens):
        """The packed mask the run reads, on the context's device, or None."""
        if packed_custom_mask is not None:
            if self._ctx.is_cuda and _tensor.is_cuda(packed_custom_mask):
                return packed_custom_mask
            packed = _tensor.host_uint8(packed_custom_mask, "packed_custom_mask")
        elif custom_mask is not None:
            packed = pack_custom_mask(custom_mask, qo_lens, kv_lens)
        else:
            return None
        return _tensor.to_device_like(packed, self._ctx.device, name="custom_mask")


def _check_fa_compat(head_dim_qk, head_dim_vo, use_fp16_qk_reduction):
    if head_dim_vo is not None and int(head_dim_vo) != int(head_dim_qk):
        raise_error(Status.UNSUPPORTED, "head_dim_vo=%d != head_dim_qk=%d: kvattn uses one head_dim "
                    "for q/k and v" % (head_dim_vo, head_dim_qk))
    if use_fp16_qk_reduction:
        raise_error(Status.UNSUPPORTED, "use_fp16_qk_reduction=True: kvattn always accumulates q.k in "
                    "float32")


def _legacy_dtype(q_data_type, kv_data_type, data_type):
    # FlashInfer's older `data_type` argument set both dtypes.
    if data_type is not None:
        return data_type, data_type
    return q_data_type, kv_data_type


class BatchDecodeWithPagedKVCacheWrapper(_AttentionWrapper):
    """Decode (one query token per request) over a paged KV cache.

    q: [batch_size, num_qo_heads, head_dim]; paged_kv_cache: (k, v) each [pages, page_size, kv_heads,
    head_dim] (NHD) or [pages, kv_heads, page_size, head_dim] (HND), or one [pages, 2, ...] tensor."""

    _format = _lib.FORMAT_PAGED

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
             pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type="float16",
             kv_data_type=None, data_type=None, sm_scale=None, rope_scale=None, rope_theta=None,
             non_blocking=True, *, o_data_type=None, alibi_slopes=None, rope_llama31=None,
             disable_split_kv=False, fixed_split_size=None, stream=None):
        """indptr [batch+1] (pages per request), indices [indptr[-1]] (page ids, kept for run()),
        last_page_len [batch] (1..page_size). Host copies of indptr/last_page_len are read here (a
        device tensor is copied to the host, which waits for it); `non_blocking` is accepted for
        FlashInfer compatibility and changes nothing."""
        self._resolve_context(indices, indptr)
        q_data_type, kv_data_type = _legacy_dtype(q_data_type, kv_data_type, data_type)
        kv_indptr = _tensor.host_int32(indptr, "indptr")
        lpl = _tensor.host_int32(last_page_len, "last_page_len")
        dev_indices = self._device_indices(indices, "indices", kv_indptr)
        host_indices = dev_indices if isinstance(dev_indices, np.ndarray) else None
        batch_size = max(len(kv_indptr) - 1, 0)
        desc, keep = self._make_desc(num_qo_heads, num_kv_heads, head_dim, causal=False,
                                     window_left=window_left, logits_soft_cap=logits_soft_cap,
                                     pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                                     rope_theta=rope_theta, rope_scale=rope_scale,
                                     q_data_type=q_data_type, kv_data_type=kv_data_type,
                                     o_data_type=o_data_type, alibi_slopes=alibi_slopes,
                                     rope_llama31=rope_llama31, disable_split_kv=disable_split_kv,
                                     fixed_split_size=fixed_split_size)
        b = _lib.batch_init()
        b.format, b.batch_size, b.page_size = _lib.FORMAT_PAGED, batch_size, int(page_size)
        b.kv_indptr, b.kv_last_page_len = _tensor.int32_ptr(kv_indptr), _tensor.int32_ptr(lpl)
        b.kv_indices = _tensor.int32_ptr(host_indices)
        entries = int(kv_indptr[-1]) if len(kv_indptr) else 0
        self._do_plan(desc, keep, b, (batch_size, batch_size, entries),
                      {"qo_tokens": batch_size, "indices": dev_indices}, stream, (indices, indptr))

    def run(self, q, paged_kv_cache, out=None, lse=None, return_lse=False, *, stream=None):
        """Attention of each request's query over its pages. Returns out [batch, qo_heads, head_dim]
        (allocated in q's framework when None), and lse float32 [batch, qo_heads] (natural log) when
        return_lse."""
        k, v, kv = self._split_paged_kv(paged_kv_cache)
        return self._do_run(q, k, v, kv, out, lse, return_lse, stream)

    def run_return_lse(self, q, paged_kv_cache, out=None, lse=None, *, stream=None):
        return self.run(q, paged_kv_cache, out=out, lse=lse, return_lse=True, stream=stream)


class BatchPrefillWithPagedKVCacheWrapper(_AttentionWrapper):
    """Prefill / append (several query tokens per request) over a paged KV cache. The queries of
    request i are the last qo_len of its kv_len positions (causal masks bottom-right aligned).

    q: [qo_indptr[-1], num_qo_heads, head_dim]; paged_kv_cache as in the decode wrapper."""

    _format = _lib.FORMAT_PAGED

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None,
             packed_custom_mask=None, causal=False, pos_encoding_mode="NONE",
             use_fp16_qk_reduction=False, sm_scale=None, window_left=-1, logits_soft_cap=None,
             rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
             non_blocking=True, *, o_data_type=None, alibi_slopes=None, rope_llama31=None,
             disable_split_kv=False, fixed_split_size=None, stream=None):
        """custom_mask: boolean, the concatenated row-major qo_len x kv_len matrices of the requests
        (True = keep); packed_custom_mask: the same, bit-packed per request (little bit order, each
        request byte-aligned)."""
        _check_fa_compat(head_dim_qk, head_dim_vo, use_fp16_qk_reduction)
        self._resolve_context(paged_kv_indices, paged_kv_indptr, qo_indptr)
        qo = _tensor.host_int32(qo_indptr, "qo_indptr")
        kv_indptr = _tensor.host_int32(paged_kv_indptr, "paged_kv_indptr")
        lpl = _tensor.host_int32(paged_kv_last_page_len, "paged_kv_last_page_len")
        dev_indices = self._device_indices(paged_kv_indices, "paged_kv_indices", kv_indptr)
        host_indices = dev_indices if isinstance(dev_indices, np.ndarray) else None
        batch_size = max(len(kv_indptr) - 1, 0)
        mask = None
        if custom_mask is not None or packed_custom_mask is not None:
            if len(qo) != len(kv_indptr) or len(lpl) != batch_size:
                raise_error(Status.INVALID_SHAPE, "qo_indptr has %d entries, paged_kv_indptr %d and "
                            "paged_kv_last_page_len %d: they must describe the same batch"
                            % (len(qo), len(kv_indptr), len(lpl)))
            mask = self._device_mask(custom_mask, packed_custom_mask, np.diff(qo),
                                     _kv_lens_paged(kv_indptr, lpl, int(page_size)))
        desc, keep = self._make_desc(num_qo_heads, num_kv_heads, head_dim_qk, causal=causal,
                                     window_left=window_left, logits_soft_cap=logits_soft_cap,
                                     pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                                     rope_theta=rope_theta, rope_scale=rope_scale,
                                     q_data_type=q_data_type, kv_data_type=kv_data_type,
                                     o_data_type=o_data_type, alibi_slopes=alibi_slopes,
                                     rope_llama31=rope_llama31, custom_mask=mask is not None,
                                     disable_split_kv=disable_split_kv,
                                     fixed_split_size=fixed_split_size)
        b = _lib.batch_init()
        b.format, b.batch_size, b.page_size = _lib.FORMAT_PAGED, batch_size, int(page_size)
        b.qo_indptr, b.kv_indptr = _tensor.int32_ptr(qo), _tensor.int32_ptr(kv_indptr)
        b.kv_last_page_len = _tensor.int32_ptr(lpl)
        b.kv_indices = _tensor.int32_ptr(host_indices)
        qo_tokens = int(qo[-1]) if len(qo) else 0
        entries = int(kv_indptr[-1]) if len(kv_indptr) else 0
        self._do_plan(desc, keep, b, (batch_size, qo_tokens, entries),
                      {"qo_tokens": qo_tokens, "indices": dev_indices, "mask": mask}, stream,
                      (paged_kv_indices, paged_kv_indptr, qo_indptr))

    def run(self, q, paged_kv_cache, out=None, lse=None, return_lse=False, *, stream=None):
        k, v, kv = self._split_paged_kv(paged_kv_cache)
        return self._do_run(q, k, v, kv, out, lse, return_lse, stream)

    def run_return_lse(self, q, paged_kv_cache, out=None, lse=None, *, stream=None):
        return self.run(q, paged_kv_cache, out=out, lse=lse, return_lse=True, stream=stream)


class BatchPrefillWithRaggedKVCacheWrapper(_AttentionWrapper):
    """Prefill over packed (ragged) KV: request i's keys are rows kv_indptr[i]..kv_indptr[i+1] of
    k/v [kv_tokens, kv_heads, head_dim] (NHD) or [kv_heads, kv_tokens, head_dim] (HND)."""

    _format = _lib.FORMAT_RAGGED

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None,
             custom_mask=None, packed_custom_mask=None, causal=False, pos_encoding_mode="NONE",
             use_fp16_qk_reduction=False, window_left=-1, logits_soft_cap=None, sm_scale=None,
             rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
             non_blocking=True, *, o_data_type=None, alibi_slopes=None, rope_llama31=None,
             disable_split_kv=False, fixed_split_size=None, stream=None):
        _check_fa_compat(head_dim_qk, head_dim_vo, use_fp16_qk_reduction)
        self._resolve_context(kv_indptr, qo_indptr)
        qo = _tensor.host_int32(qo_indptr, "qo_indptr")
        kvp = _tensor.host_int32(kv_indptr, "kv_indptr")
        batch_size = max(len(kvp) - 1, 0)
        mask = None
        if custom_mask is not None or packed_custom_mask is not None:
            if len(qo) != len(kvp):
                raise_error(Status.INVALID_SHAPE, "qo_indptr has %d entries, kv_indptr %d: they must "
                            "describe the same batch" % (len(qo), len(kvp)))
            mask = self._device_mask(custom_mask, packed_custom_mask, np.diff(qo), np.diff(kvp))
        desc, keep = self._make_desc(num_qo_heads, num_kv_heads, head_dim_qk, causal=causal,
                                     window_left=window_left, logits_soft_cap=logits_soft_cap,
                                     pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                                     rope_theta=rope_theta, rope_scale=rope_scale,
                                     q_data_type=q_data_type, kv_data_type=kv_data_type,
                                     o_data_type=o_data_type, alibi_slopes=alibi_slopes,
                                     rope_llama31=rope_llama31, custom_mask=mask is not None,
                                     disable_split_kv=disable_split_kv,
                                     fixed_split_size=fixed_split_size)
        b = _lib.batch_init()
        b.format, b.batch_size = _lib.FORMAT_RAGGED, batch_size
        b.qo_indptr, b.kv_indptr = _tensor.int32_ptr(qo), _tensor.int32_ptr(kvp)
        qo_tokens = int(qo[-1]) if len(qo) else 0
        entries = int(kvp[-1]) if len(kvp) else 0
        self._do_plan(desc, keep, b, (batch_size, qo_tokens, entries),
                      {"qo_tokens": qo_tokens, "mask": mask}, stream, (kv_indptr, qo_indptr))

    def run(self, q, k, v, out=None, lse=None, return_lse=False, *, stream=None):
        return self._do_run(q, k, v, None, out, lse, return_lse, stream)

    def run_return_lse(self, q, k, v, out=None, lse=None, *, stream=None):
        return self.run(q, k, v, out=out, lse=lse, return_lse=True, stream=stream)


class BlockSparseAttentionWrapper(_AttentionWrapper):
    """Attention under a block-sparse (BSR) mask over an M x N (query rows x KV tokens) matrix with
    blocks of R x C: block row i keeps block columns indices[indptr[i]:indptr[i+1]].
    q: [M, num_qo_heads, head_dim]; k, v: [N, num_kv_heads, head_dim] (NHD) or [kv_heads, N, dim].
    Positions: q_pos = the row, kv_pos = the column (so causal compares global row and column)."""

    _format = _lib.FORMAT_BLOCK_SPARSE

    def plan(self, indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim, mask=None,
             packed_mask=None, causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False,
             logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None,
             q_data_type="float16", kv_data_type=None, o_data_type=None, non_blocking=True, *,
             window_left=-1, alibi_slopes=None, rope_llama31=None, disable_split_kv=False,
             fixed_split_size=None, stream=None):
        """mask: boolean, either FlashInfer's per-block [nnz_blocks, R, C] or a dense [M, N] matrix
        (True = keep); packed_mask: as FlashInfer packs it, the [nnz_blocks, R, C] masks flattened and
        bit-packed little-endian (uint8). Both become kvattn's one M x N bit matrix."""
        _check_fa_compat(head_dim, None, use_fp16_qk_reduction)
        self._resolve_context(indices, indptr)
        bptr = _tensor.host_int32(indptr, "indptr")
        dev_indices = self._device_indices(indices, "indices", bptr)
        host_indices = dev_indices if isinstance(dev_indices, np.ndarray) else \
            _tensor.host_int32(indices, "indices") if mask is not None else None
        M, N, R, C = int(M), int(N), int(R), int(C)
        dev_mask = None
        if packed_mask is not None:  # FlashInfer's layout: the [nnz, R, C] block masks bit-packed
            if host_indices is None:
                host_indices = _tensor.host_int32(indices, "indices")
            nnz = int(bptr[-1]) if len(bptr) else 0
            bits = np.unpackbits(_tensor.host_uint8(packed_mask, "packed_mask"), bitorder="little")
            if bits.size < nnz * R * C:
                raise_error(Status.INVALID_SHAPE, "packed_mask: %d bits, the %d blocks of %dx%d need %d"
                            % (bits.size, nnz, R, C, nnz * R * C))
            mask = bits[:nnz * R * C].reshape(nnz, R, C).astype(bool)
        if mask is not None:
            dense = _tensor.host_bool(mask, "mask", flat=False)
            if dense.ndim == 3:  # per-block masks: scatter them into the M x N matrix
                dense = self._scatter_block_masks(dense, bptr, host_indices, M, N, R, C)
            if dense.shape != (M, N):
                raise_error(Status.INVALID_SHAPE, "mask: shape %s; expected (M, N) = (%d, %d) or "
                            "(nnz_blocks, R, C)" % (dense.shape, M, N))
            dev_mask = _tensor.to_device_like(np.packbits(dense.reshape(-1), bitorder="little"),
                                              self._ctx.device, name="mask")
        desc, keep = self._make_desc(num_qo_heads, num_kv_heads, head_dim, causal=causal,
                                     window_left=window_left, logits_soft_cap=logits_soft_cap,
                                     pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                                     rope_theta=rope_theta, rope_scale=rope_scale,
                                     q_data_type=q_data_type, kv_data_type=kv_data_type,
                                     o_data_type=o_data_type, alibi_slopes=alibi_slopes,
                                     rope_llama31=rope_llama31, custom_mask=dev_mask is not None,
                                     disable_split_kv=disable_split_kv,
                                     fixed_split_size=fixed_split_size)
        b = _lib.batch_init()
        b.format = _lib.FORMAT_BLOCK_SPARSE
        b.kv_indptr = _tensor.int32_ptr(bptr)
        b.kv_indices = _tensor.int32_ptr(host_indices)
        b.block_rows, b.block_cols, b.num_rows, b.num_cols = R, C, M, N
        block_rows = max(len(bptr) - 1, 0)
        entries = int(bptr[-1]) if len(bptr) else 0
        self._do_plan(desc, keep, b, (block_rows, M, entries),
                      {"qo_tokens": M, "indices": dev_indices, "mask": dev_mask}, stream,
                      (indices, indptr))

    @staticmethod
    def _scatter_block_masks(blocks, bptr, indices, M, N, R, C):
        nnz = len(indices)
        if blocks.shape != (nnz, R, C):
            raise_error(Status.INVALID_SHAPE, "mask: shape %s; per-block masks must be (nnz_blocks, R, "
                        "C) = (%d, %d, %d)" % (blocks.shape, nnz, R, C))
        rows_pad, cols_pad = -(-M // R) * R, -(-N // C) * C
        dense = np.zeros((rows_pad, cols_pad), dtype=bool)
        for i in range(len(bptr) - 1):
            for e in range(bptr[i], bptr[i + 1]):
                j = int(indices[e])
                if 0 <= j < cols_pad // C:  # out-of-range ids: plan reports them
                    dense[i * R:(i + 1) * R, j * C:(j + 1) * C] = blocks[e]
        return dense[:M, :N]

    def run(self, q, k, v, out=None, lse=None, return_lse=False, *, stream=None):
        return self._do_run(q, k, v, None, out, lse, return_lse, stream)

    def run_return_lse(self, q, k, v, out=None, lse=None, *, stream=None):
        return self.run(q, k, v, out=out, lse=lse, return_lse=True, stream=stream)
