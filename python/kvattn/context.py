"""kvattn contexts (a GPU device or the CPU) and streams."""

import ctypes
import threading

from . import _lib, _tensor
from ._lib import Backend, Status, raise_error

_BACKEND_NAMES = {"auto": Backend.AUTO, "cpu": Backend.CPU, "cuda": Backend.CUDA, "gpu": Backend.CUDA,
                  "reference": Backend.REFERENCE}


def _backend(spec):
    if isinstance(spec, Backend):
        return spec
    if isinstance(spec, str) and spec.lower() in _BACKEND_NAMES:
        return _BACKEND_NAMES[spec.lower()]
    raise_error(Status.INVALID_ARGUMENT, "backend %r: expected one of %s"
                % (spec, ", ".join(_BACKEND_NAMES)))


class Context:
    """A kvattn context: `backend` is "auto" (CUDA when usable, else CPU), "cpu", "cuda" or
    "reference" (the float64 oracle). The context is freed with close() or when collected."""

    def __init__(self, backend="auto", device_id=0, num_threads=0, skip_validation=False,
                 cache_dir=None):
        self._ptr = None
        self._cache_dir = None if cache_dir is None else str(cache_dir).encode()  # kept alive
        opt = _lib.options_init(backend=_backend(backend), device_id=int(device_id),
                                num_threads=int(num_threads), skip_validation=int(bool(skip_validation)),
                                cache_dir=self._cache_dir)
        handle = ctypes.c_void_p()
        _lib.call("kvattn_context_create", ctypes.byref(opt), ctypes.byref(handle))
        self._ptr = handle
        b = ctypes.c_int()
        _lib.call("kvattn_context_backend", self._ptr, ctypes.byref(b))
        self.backend = Backend(b.value)
        self.device_id = int(device_id)
        self.last_torch_stream = None

    @property
    def handle(self):
        if self._ptr is None:
            raise_error(Status.INVALID_USAGE, "the kvattn Context was closed")
        return self._ptr

    @property
    def is_cuda(self):
        return self.backend == Backend.CUDA

    @property
    def device(self):
        """(DLDeviceType, device_id) that tensors of this context live on."""
        return (_lib.kDLCUDA, self.device_id) if self.is_cuda else (_lib.kDLCPU, 0)

    def info(self):
        buf = ctypes.create_string_buffer(4096)
        _lib.call("kvattn_context_info", self.handle, buf, len(buf))
        return buf.value.decode(errors="replace")

    def close(self):
        if self._ptr is not None:
            _lib.lib.kvattn_context_destroy(self._ptr)
            self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def __repr__(self):
        return "kvattn.Context(backend=%s, device_id=%d)" % (self.backend.name.lower(), self.device_id)

    def resolve_stream(self, stream=None, tensors=()):
        """The CUstream to pass to C: None on the CPU; else `stream` (an int handle, a
        torch.cuda.Stream, a CuPy stream or anything with .cuda_stream / .ptr), else the current
        PyTorch stream of the device when torch tensors are involved, else the legacy default (0)."""
        if not self.is_cuda:
            return None
        if stream is not None:
            for attr in ("cuda_stream", "ptr", "handle"):
                if hasattr(stream, attr):
                    return int(getattr(stream, attr))
            return int(stream)
        torch = _tensor._torch()
        if torch is not None:
            for t in tensors:
                if t is not None and _tensor.is_torch(t):
                    if t.is_cuda:
                        st = torch.cuda.current_stream(self.device_id)
                        self.last_torch_stream = st  # lets plan() record its event without a lookup
                        return st.cuda_stream
                    break  # the call's first torch tensor decides; CPU tensors fail the device check
        return 0


_default_lock = threading.Lock()
_shared = {}


def shared_context(backend="cpu", device_id=0):
    """One context per (backend, device), created on first use and kept for the process's life."""
    key = (_backend(backend), int(device_id))
    with _default_lock:
        ctx = _shared.get(key)
        if ctx is None:
            ctx = Context(backend=key[0], device_id=key[1])
            _shared[key] = ctx
        return ctx


def default_context(device=None):
    """The shared context for a device: (kDLCPU, 0) -> the "cpu" context, (kDLCUDA, n) -> the
    "cuda" context of device n."""
    dev_type, dev_id = device if device is not None else (_lib.kDLCPU, 0)
    if dev_type in (_lib.kDLCUDA, _lib.kDLCUDAManaged):
        return shared_context(Backend.CUDA, dev_id)
    return shared_context(Backend.CPU, 0)


def context_for(context, *tensors):
    """The context a call uses: `context` if given (a Context; a backend name: its shared context;
    a tensor: the default context of its device), else the default context of the first tensor on
    a GPU, else the CPU's."""
    if isinstance(context, Context):
        return context
    if isinstance(context, (str, Backend)):
        return shared_context(context)
    if context is not None:
        return default_context(_tensor.device_of(context))
    for t in tensors:
        if t is not None and _tensor.is_cuda(t):
            return default_context(_tensor.device_of(t))
    return default_context()
