"""kvattn: an attention engine for LLM inference serving (Python binding of libkvattn, via ctypes).

Tensors are any objects with __dlpack__ (NumPy arrays, PyTorch CPU/CUDA tensors). The wrappers
follow FlashInfer's shape, so moving a caller over is a small change:

    import kvattn
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper("cpu", "NHD")
    w.plan(kv_indptr, kv_indices, kv_last_page_len, 32, 8, 128, 16, q_data_type="float32")
    out = w.run(q, (k_cache, v_cache))

The library is found through $KVATTN_LIBRARY, else next to this package, else a checkout's
build/libkvattn.so, else the system loader; its version must equal kvattn.__version__.
"""

from ._version import __version__
from ._lib import (Backend, BackendUnavailableError, BoundsExceededError, CompileError, CudaError,
                   DeviceMismatchError, Error, InternalError, InvalidArgumentError, InvalidDtypeError,
                   InvalidIndexError, InvalidShapeError, InvalidStrideError, InvalidUsageError,
                   OutOfMemoryError, Status, UnsupportedError, WorkspaceTooSmallError, library_path,
                   library_version)
from .context import Context, default_context, shared_context
from .attention import (BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper,
                        BatchPrefillWithRaggedKVCacheWrapper, BlockSparseAttentionWrapper,
                        pack_custom_mask)
from .ops import (append_paged_kv_cache, get_batch_indices_positions, merge_state,
                  merge_state_in_place, merge_states)
from . import _lib


def status_string(status):
    """The C library's name for a status code, e.g. "KVATTN_ERROR_INVALID_INDEX"."""
    return _lib.lib.kvattn_status_string(int(status)).decode()


def last_error():
    """kvattn_last_error() of this thread: the detail of the last failed call ("" after success)."""
    return _lib.last_error()


def warmup(num_qo_heads, num_kv_heads, head_dim, arch="sm_90a", q_data_type="float16",
           kv_data_type=None, cache_dir=None, **options):
    """Compile (or find in the cubin cache) the GPU kernels an attention needs on `arch`; works
    without a GPU. Returns (kernels, seconds)."""
    import ctypes
    from .attention import _AttentionWrapper
    w = _AttentionWrapper.__new__(_AttentionWrapper)
    w._use_tensor_cores = bool(options.pop("use_tensor_cores", False))
    desc, _keep = w._make_desc(num_qo_heads, num_kv_heads, head_dim, q_data_type=q_data_type,
                               kv_data_type=kv_data_type, **options)
    n, secs = ctypes.c_int(), ctypes.c_double()
    _lib.call("kvattn_warmup", ctypes.byref(desc), arch.encode(),
              None if cache_dir is None else str(cache_dir).encode(), ctypes.byref(n),
              ctypes.byref(secs))
    return n.value, secs.value


def cache_info(cache_dir=None):
    """A description of the JIT cubin cache."""
    import ctypes
    buf = ctypes.create_string_buffer(8192)
    _lib.call("kvattn_cache_info", None if cache_dir is None else str(cache_dir).encode(), buf,
              len(buf))
    return buf.value.decode(errors="replace")


__all__ = [
    "__version__", "library_path", "library_version", "Backend", "Status", "Context",
    "default_context", "shared_context", "status_string", "last_error", "warmup", "cache_info",
    "BatchDecodeWithPagedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper", "BlockSparseAttentionWrapper", "pack_custom_mask",
    "merge_state", "merge_state_in_place", "merge_states", "append_paged_kv_cache",
    "get_batch_indices_positions",
    "Error", "InvalidArgumentError", "InvalidDtypeError", "InvalidShapeError", "InvalidStrideError",
    "InvalidIndexError", "DeviceMismatchError", "InvalidUsageError", "WorkspaceTooSmallError",
    "BoundsExceededError", "UnsupportedError", "BackendUnavailableError", "OutOfMemoryError",
    "CudaError", "CompileError", "InternalError",
]
