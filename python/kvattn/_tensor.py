"""Tensors in and out: DLPack borrowing, dtype names, host index arrays, output allocation.

A tensor argument is any object with `__dlpack__` (NumPy arrays, PyTorch CPU/CUDA tensors, CuPy...).
We ask for a DLPack 1.x capsule, unwrap the DLTensor inside with PyCapsule_GetPointer and pass its
address to C. We never take ownership: the capsule keeps its "dltensor" name, so when the Borrowed
holding it is dropped (after the C call), the capsule's destructor calls the producer's deleter.
"""

import ctypes
import sys
from ctypes import POINTER, c_int32

import numpy as np

from . import _lib
from ._lib import DLDataType, DLManagedTensorVersioned, DLTensor, Status, raise_error

_pyapi = ctypes.pythonapi
_pyapi.PyCapsule_GetName.restype = ctypes.c_char_p
_pyapi.PyCapsule_GetName.argtypes = [ctypes.py_object]
_pyapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_pyapi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_pyapi.PyCapsule_IsValid.restype = ctypes.c_int
_pyapi.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]

_DL_TENSOR_OFFSET_VERSIONED = DLManagedTensorVersioned.dl_tensor.offset

# ----------------------------------------------------------------------------- dtypes

# (code, bits) -> our canonical name; the names match numpy's and torch's.
_DTYPE_NAMES = {
    (_lib.kDLFloat, 16): "float16", (_lib.kDLBfloat, 16): "bfloat16",
    (_lib.kDLFloat, 32): "float32", (_lib.kDLFloat, 64): "float64",
    (_lib.kDLInt, 32): "int32", (_lib.kDLInt, 64): "int64", (_lib.kDLUInt, 8): "uint8",
    (_lib.kDLInt, 8): "int8", (_lib.kDLBool, 8): "bool",
    (_lib.kDLFloat8_e4m3fn, 8): "float8_e4m3fn", (_lib.kDLFloat8_e5m2, 8): "float8_e5m2",
}
_DTYPE_CODES = {name: code_bits for code_bits, name in _DTYPE_NAMES.items()}
_ALIASES = {"half": "float16", "fp16": "float16", "f16": "float16", "bf16": "bfloat16",
            "float": "float32", "fp32": "float32", "f32": "float32", "double": "float64",
            "fp64": "float64", "f64": "float64", "e4m3": "float8_e4m3fn",
            "fp8_e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2", "fp8_e5m2": "float8_e5m2"}


def dtype_name(spec):
    """Canonical name of a dtype given as a string, a NumPy dtype/type, a torch dtype, or a
    DLDataType. None stays None."""
    if spec is None:
        return None
    if isinstance(spec, DLDataType):
        name = _DTYPE_NAMES.get((spec.code, spec.bits))
        if name is None or spec.lanes != 1:
            return "code=%d,bits=%d,lanes=%d" % (spec.code, spec.bits, spec.lanes)
        return name
    if isinstance(spec, str):
        name = spec
    elif type(spec).__module__ == "torch":  # torch.dtype: str() is "torch.bfloat16"
        name = str(spec).split(".")[-1]
    else:
        try:
            name = np.dtype(spec).name
        except TypeError:
            name = str(spec)
    name = name.lower()
    name = _ALIASES.get(name, name)
    if name not in _DTYPE_CODES:
        raise_error(Status.INVALID_DTYPE, "unknown dtype %r (expected one of %s)"
                    % (spec, ", ".join(sorted(_DTYPE_CODES))))
    return name


def dl_dtype(spec):
    """DLDataType for a dtype spec; None -> {0,0,0} (the C library's "unset")."""
    if spec is None:
        return DLDataType(0, 0, 0)
    code, bits = _DTYPE_CODES[dtype_name(spec)]
    return DLDataType(code, bits, 1)


# ----------------------------------------------------------------------------- frameworks


def _torch():
    return sys.modules.get("torch")


def is_torch(x):
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def device_of(x):
    """(DLDeviceType, device_id) of a tensor-like, without exporting it."""
    if isinstance(x, np.ndarray):
        return (_lib.kDLCPU, 0)
    if is_torch(x):  # torch's __dlpack_device__ is slow Python; these are C attributes
        return (_lib.kDLCUDA, x.get_device()) if x.is_cuda else (_lib.kDLCPU, 0)
    f = getattr(x, "__dlpack_device__", None)
    if f is None:
        return (_lib.kDLCPU, 0)  # lists and other host data, converted with numpy
    dev_type, dev_id = f()
    return (int(dev_type), int(dev_id))


def is_cuda(x):
    return device_of(x)[0] in (_lib.kDLCUDA, _lib.kDLCUDAManaged)


# ----------------------------------------------------------------------------- borrowing


class Borrowed:
    """A DLTensor borrowed from a producer for the duration of one C call."""
    __slots__ = ("obj", "capsule", "tensor", "read_only")

    def __init__(self, obj, capsule, tensor, read_only):
        self.obj = obj          # the producer's object (keeps its memory alive too)
        self.capsule = capsule  # owns the managed tensor (its destructor calls the deleter), or
                                # the shape/strides arrays of a tensor read directly
        self.tensor = tensor    # DLTensor living inside the managed tensor
        self.read_only = read_only

    @property
    def ptr(self):
        return ctypes.pointer(self.tensor)

    @property
    def shape(self):
        t = self.tensor
        return tuple(t.shape[i] for i in range(t.ndim))

    @property
    def dtype(self):
        return dtype_name(self.tensor.dtype)

    @property
    def device(self):
        return (self.tensor.device.device_type, self.tensor.device.device_id)


def _export(x, dev_type, stream, same_stream):
    """Call x.__dlpack__ as DLPack 1.1 asks, falling back for producers that predate it."""
    # For CUDA data the consumer names the stream it will use, so the producer can order its pending
    # work before it (1 = the legacy default stream; 0 is not allowed by the standard). When that
    # stream is torch's own current stream, -1 ("no synchronization") says so and spares torch
    # building a stream object and an event on every call.
    dl_stream = None
    if dev_type in (_lib.kDLCUDA, _lib.kDLCUDAManaged):
        dl_stream = -1 if same_stream else (1 if not stream else int(stream))
    try:
        return x.__dlpack__(stream=dl_stream, max_version=(1, 1))
    except TypeError:
        pass  # a producer without max_version (DLPack < 1.0 era, e.g. NumPy < 2.1, torch < 2.6)
    if dl_stream is None:
        return x.__dlpack__()
    return x.__dlpack__(stream=dl_stream)


_TORCH_DL = {}  # torch.dtype -> (code, bits), filled on first use


def _torch_dl_dtype(dtype):
    dl = _TORCH_DL.get(dtype)
    if dl is None:
        name = str(dtype).split(".")[-1]
        dl = _DTYPE_CODES.get(_ALIASES.get(name, name))
        _TORCH_DL[dtype] = dl  # None: a dtype kvattn has no name for (DLPack path reports it)
    return dl


_I64_ARRAYS = [ctypes.c_int64 * n for n in range(9)]
# A DLTensor is a pure function of (data pointer, shape, strides, dtype, device): built once per
# such key and reused, since serving loops pass the same caches and buffers on every call. Bounded.
_DIRECT_CACHE = {}
_DIRECT_CACHE_MAX = 1024


def _borrow_torch_direct(x):
    """The DLTensor of a strided torch tensor, read from its attributes. Gives the bytes that
    x.__dlpack__(stream=-1) would (no synchronization; data_ptr is already past the storage offset)
    for less host time; used where no stream ordering is asked of torch. None if not applicable."""
    if x.layout is not _torch().strided or x.is_neg():
        return None
    key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x.get_device())
    entry = _DIRECT_CACHE.get(key)
    if entry is None:
        dl = _torch_dl_dtype(x.dtype)
        n = len(key[1])
        if dl is None or x.is_conj() or n >= len(_I64_ARRAYS):
            return None
        arr = _I64_ARRAYS[n]
        shape_arr, strides_arr = arr(*key[1]), arr(*key[2])
        dev = _lib.DLDevice(_lib.kDLCUDA, key[4]) if x.is_cuda else _lib.DLDevice(_lib.kDLCPU, 0)
        t = DLTensor(key[0], dev, n, DLDataType(dl[0], dl[1], 1), shape_arr, strides_arr, 0)
        entry = (t, (shape_arr, strides_arr))
        if len(_DIRECT_CACHE) >= _DIRECT_CACHE_MAX:
            _DIRECT_CACHE.clear()
        _DIRECT_CACHE[key] = entry
    return Borrowed(x, entry[1], entry[0], False)


def borrow(x, name, stream=None, writable=False, same_stream=False):
    """Borrow `x` (anything with __dlpack__) as a DLTensor. `name` is the argument's name for error
    messages; `writable` refuses producers that flag their data read-only; `same_stream` says that
    `stream` is torch's current stream (so a torch producer needs no synchronization)."""
    if x is None:
        return None
    if is_torch(x):
        if x.requires_grad:
            x = x.detach()  # torch refuses to export tensors that require grad; we only touch data
        if same_stream or not x.is_cuda:
            b = _borrow_torch_direct(x)
            if b is not None:
                return b
        dev_type = _lib.kDLCUDA if x.is_cuda else _lib.kDLCPU  # cheaper than __dlpack_device__
    elif not hasattr(x, "__dlpack__"):
        raise_error(Status.INVALID_ARGUMENT, "%s: a %s has no __dlpack__; pass a NumPy array or a "
                    "PyTorch tensor" % (name, type(x).__name__))
    else:
        dev_type = device_of(x)[0]
        same_stream = False  # -1 is torch's promise; other producers get the stream itself
    try:
        capsule = _export(x, dev_type, stream, same_stream)
    except BufferError as e:  # e.g. torch: a tensor on another GPU than the current one
        hint = ""
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            # NumPy < 2.1 has no versioned DLPack and so cannot flag (hence export) read-only data.
            hint = " (a read-only NumPy array: NumPy %s cannot export it through DLPack before 2.1; " \
                   "pass a writable copy, np.array(x))" % np.__version__
        raise_error(Status.INVALID_ARGUMENT, "%s: the producer refused to export it: %s%s"
                    % (name, e, hint))
    cname = _pyapi.PyCapsule_GetName(capsule)
    if cname == b"dltensor_versioned":
        addr = _pyapi.PyCapsule_GetPointer(capsule, cname)
        managed = DLManagedTensorVersioned.from_address(addr)
        if managed.version.major != 1:
            raise_error(Status.UNSUPPORTED, "%s: DLPack version %d.%d; kvattn reads 1.x"
                        % (name, managed.version.major, managed.version.minor))
        read_only = bool(managed.flags & _lib.DLPACK_FLAG_BITMASK_READ_ONLY)
        tensor = DLTensor.from_address(addr + _DL_TENSOR_OFFSET_VERSIONED)
    elif cname == b"dltensor":
        addr = _pyapi.PyCapsule_GetPointer(capsule, cname)
        read_only = False  # pre-1.0 DLPack cannot say; producers refuse to export read-only data
        tensor = DLTensor.from_address(addr)  # dl_tensor is the first member of DLManagedTensor
    else:
        raise_error(Status.INVALID_ARGUMENT, "%s: __dlpack__ returned a capsule named %r (expected "
                    "'dltensor' or 'dltensor_versioned'; a capsule can be consumed only once)"
                    % (name, cname))
    if writable and read_only:
        raise_error(Status.INVALID_ARGUMENT, "%s: the tensor is read-only (DLPack read-only flag); "
                    "an output must be writable" % name)
    return Borrowed(x, capsule, tensor, read_only)


def ptr(b):
    """POINTER(DLTensor) or None for an optional argument (struct fields)."""
    return None if b is None else ctypes.pointer(b.tensor)


def ref(b):
    """A DLTensor* function argument, or None (byref: cheaper than a pointer object)."""
    return None if b is None else ctypes.byref(b.tensor)


# ----------------------------------------------------------------------------- host index arrays


def host_int32(x, name):
    """A C-contiguous int32 NumPy array with the values of `x` (list, NumPy, torch CPU or CUDA
    tensor, any __dlpack__ host array). Integer arrays of other widths are converted when every value
    fits in int32; anything else is INVALID_DTYPE."""
    if is_torch(x):
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__") and not is_cuda(x):
        x = np.from_dlpack(x)
    elif hasattr(x, "get") and is_cuda(x):  # CuPy: copy to the host
        x = x.get()
    a = np.asarray(x)
    if a.size == 0 and a.dtype.kind == "f":  # an empty list becomes float64 in NumPy
        a = a.astype(np.int32)
    if a.dtype.kind not in "iu":
        raise_error(Status.INVALID_DTYPE, "%s: dtype %s; index arrays must be int32" % (name, a.dtype))
    if a.ndim != 1:
        raise_error(Status.INVALID_SHAPE, "%s: shape %s; index arrays are 1-d" % (name, a.shape))
    if a.dtype != np.int32 and a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < -2**31 or hi >= 2**31:
            raise_error(Status.INVALID_INDEX, "%s: value %d does not fit in int32"
                        % (name, hi if hi >= 2**31 else lo))
    return np.ascontiguousarray(a, dtype=np.int32)


def int32_ptr(a):
    return None if a is None else a.ctypes.data_as(POINTER(c_int32))


# ----------------------------------------------------------------------------- allocation


def _torch_dtype(name):
    return getattr(_torch(), name)


def empty(like, shape, dtype, name="out"):
    """An uninitialized array of `shape`/`dtype` in the framework and on the device of `like`."""
    dtype = dtype_name(dtype)
    if is_torch(like):
        return _torch().empty(shape, dtype=_torch_dtype(dtype), device=like.device)
    if device_of(like)[0] == _lib.kDLCPU:
        if dtype == "bfloat16" or dtype.startswith("float8"):
            raise_error(Status.INVALID_DTYPE, "%s: NumPy has no %s; pass PyTorch tensors for %s (or "
                        "pass %s= yourself)" % (name, dtype, dtype, name))
        return np.empty(shape, dtype=dtype)
    mod = sys.modules.get(type(like).__module__.split(".")[0])
    if mod is not None and hasattr(mod, "empty"):  # CuPy and friends: same call shape as NumPy
        return mod.empty(shape, dtype=dtype)
    raise_error(Status.INVALID_ARGUMENT, "cannot allocate %s like a %s: pass %s= explicitly"
                % (name, type(like).__name__, name))


def to_device_like(a, ctx_device, like=None, name="array"):
    """Put host NumPy array `a` on the context's device: itself on the CPU, a torch CUDA tensor on
    a GPU."""
    dev_type, dev_id = ctx_device
    if dev_type == _lib.kDLCPU:
        return a
    torch = _torch()
    if torch is None:
        raise_error(Status.DEVICE_MISMATCH, "%s: a host array, but the context is on CUDA device %d; "
                    "pass a device tensor (or import torch so kvattn can copy it)" % (name, dev_id))
    return torch.from_numpy(np.ascontiguousarray(a)).to("cuda:%d" % dev_id)


def device_int32(x, ctx_device, name):
    """`x` as int32 on the context's device, for index tensors the run reads. A tensor that is
    already there with dtype int32 is used as is (no copy)."""
    if ctx_device[0] != _lib.kDLCPU and is_cuda(x):
        if is_torch(x):
            t = _torch()
            if x.dtype != t.int32:
                x = x.to(t.int32)
            return x.contiguous()
        return x  # another framework: C checks dtype and device
    return to_device_like(host_int32(x, name), ctx_device, name=name)


def _host_numpy(x):
    if is_torch(x):
        return x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__") and not is_cuda(x):
        return np.from_dlpack(x)
    if hasattr(x, "get") and is_cuda(x):
        return x.get()
    return np.asarray(x)


def host_bool(x, name, flat=True):
    """A boolean mask on the host (any integer/bool array; nonzero = keep)."""
    a = _host_numpy(x)
    if a.dtype.kind not in "biu":
        raise_error(Status.INVALID_DTYPE, "%s: dtype %s; a mask is boolean (or integer 0/1)"
                    % (name, a.dtype))
    a = a.astype(bool, copy=False)
    return a.reshape(-1) if flat else a


def host_uint8(x, name):
    a = _host_numpy(x)
    if a.dtype != np.uint8:
        raise_error(Status.INVALID_DTYPE, "%s: dtype %s; a packed mask is uint8" % (name, a.dtype))
    return np.ascontiguousarray(a.reshape(-1))


def host_float32(x, name):
    a = _host_numpy(x)
    if a.dtype.kind not in "fiu":
        raise_error(Status.INVALID_DTYPE, "%s: dtype %s; expected float values" % (name, a.dtype))
    return np.ascontiguousarray(a, dtype=np.float32)
