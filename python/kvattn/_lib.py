"""libkvattn through ctypes: finding the library, the C structs, the prototypes, the errors.

Every struct here mirrors include/kvattn.h / include/kvattn_dlpack.h field for field (same order,
same C types); tests/test_abi.py compiles a C program and compares sizes and offsets.
"""

import ctypes
import ctypes.util
import enum
import os
from ctypes import (POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p)

from ._version import __version__

# ----------------------------------------------------------------------------- DLPack (kvattn_dlpack.h)

# Device types and type codes: values fixed by the DLPack standard.
kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged = 1, 2, 3, 13
kDLInt, kDLUInt, kDLFloat, kDLBfloat, kDLBool = 0, 1, 2, 4, 6
kDLFloat8_e4m3fn, kDLFloat8_e5m2 = 10, 12


class DLDevice(Structure):
    _fields_ = [("device_type", c_int),  # DLDeviceType (a C enum: int)
                ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]

    def __eq__(self, other):
        return (isinstance(other, DLDataType) and (self.code, self.bits, self.lanes)
                == (other.code, other.bits, other.lanes))

    def __hash__(self):
        return hash((self.code, self.bits, self.lanes))

    def __repr__(self):
        return "DLDataType(code=%d, bits=%d, lanes=%d)" % (self.code, self.bits, self.lanes)


class DLTensor(Structure):
    _fields_ = [("data", c_void_p),
                ("device", DLDevice),
                ("ndim", c_int32),
                ("dtype", DLDataType),
                ("shape", POINTER(c_int64)),
                ("strides", POINTER(c_int64)),  # NULL = compact row-major
                ("byte_offset", c_uint64)]


# The managed wrappers a producer puts in its capsule (DLPack standard, not in kvattn_dlpack.h:
# the C library only ever sees the DLTensor inside them).
class DLPackVersion(Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensor(Structure):  # capsule name "dltensor" (DLPack < 1.0)
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", c_void_p)]


class DLManagedTensorVersioned(Structure):  # capsule name "dltensor_versioned" (DLPack >= 1.0)
    _fields_ = [("version", DLPackVersion), ("manager_ctx", c_void_p), ("deleter", c_void_p),
                ("flags", c_uint64), ("dl_tensor", DLTensor)]


DLPACK_FLAG_BITMASK_READ_ONLY = 1 << 0

# ----------------------------------------------------------------------------- kvattn.h

KVATTN_VERSION_NUMBER = 10000 * int(__version__.split(".")[0]) + 100 * int(__version__.split(".")[1]) \
    + int(__version__.split(".")[2])


class Status(enum.IntEnum):
    """kvattn_status: values fixed forever by include/kvattn.h."""
    SUCCESS = 0
    INVALID_ARGUMENT = 1
    INVALID_DTYPE = 2
    INVALID_SHAPE = 3
    INVALID_STRIDE = 4
    INVALID_INDEX = 5
    DEVICE_MISMATCH = 6
    INVALID_USAGE = 7
    WORKSPACE_TOO_SMALL = 8
    BOUNDS_EXCEEDED = 9
    UNSUPPORTED = 10
    BACKEND_UNAVAILABLE = 11
    OUT_OF_MEMORY = 12
    CUDA = 13
    COMPILE = 14
    INTERNAL = 15


class Backend(enum.IntEnum):
    AUTO = 0
    CPU = 1
    CUDA = 2
    REFERENCE = 3


FORMAT_PAGED, FORMAT_RAGGED, FORMAT_BLOCK_SPARSE = 0, 1, 2
LAYOUT_NHD, LAYOUT_HND = 0, 1
KERNEL_AUTO, KERNEL_CUDA_CORE, KERNEL_TENSOR_CORE = 0, 1, 2


class Options(Structure):  # kvattn_options
    _fields_ = [("struct_size", c_uint32), ("version", c_uint32), ("backend", c_int32),
                ("device_id", c_int32), ("num_threads", c_int32), ("skip_validation", c_int32),
                ("cache_dir", c_char_p)]


class AttentionDesc(Structure):  # kvattn_attention_desc
    _fields_ = [("struct_size", c_uint32), ("version", c_uint32),
                ("num_qo_heads", c_int32), ("num_kv_heads", c_int32), ("head_dim", c_int32),
                ("q_dtype", DLDataType), ("kv_dtype", DLDataType), ("o_dtype", DLDataType),
                ("sm_scale", c_float), ("causal", c_int32), ("window_left", c_int32),
                ("logits_soft_cap", c_float), ("rope", c_int32), ("rope_theta", c_float),
                ("rope_scale", c_float), ("rope_llama31_factor", c_float),
                ("rope_llama31_low_freq_factor", c_float), ("rope_llama31_high_freq_factor", c_float),
                ("rope_llama31_original_max_pos", c_int32), ("alibi", c_int32),
                ("alibi_slopes", POINTER(c_float)), ("custom_mask", c_int32), ("kernel", c_int32),
                ("disable_split_kv", c_int32), ("fixed_split_size", c_int32)]


class Bounds(Structure):  # kvattn_bounds
    _fields_ = [("struct_size", c_uint32), ("max_batch", c_int64), ("max_qo_tokens", c_int64),
                ("max_kv_entries", c_int64)]


class Batch(Structure):  # kvattn_batch
    _fields_ = [("struct_size", c_uint32), ("format", c_int32), ("batch_size", c_int32),
                ("qo_indptr", POINTER(c_int32)), ("kv_indptr", POINTER(c_int32)),
                ("kv_indices", POINTER(c_int32)), ("kv_last_page_len", POINTER(c_int32)),
                ("page_size", c_int32), ("num_pages", c_int64), ("block_rows", c_int32),
                ("block_cols", c_int32), ("num_rows", c_int64), ("num_cols", c_int64)]


class KV(Structure):  # kvattn_kv
    _fields_ = [("struct_size", c_uint32), ("layout", c_int32), ("k", POINTER(DLTensor)),
                ("v", POINTER(DLTensor)), ("kv", POINTER(DLTensor)), ("indices", POINTER(DLTensor))]


class Workspace(Structure):  # kvattn_workspace
    _fields_ = [("device", c_void_p), ("device_bytes", c_size_t), ("host", c_void_p),
                ("host_bytes", c_size_t)]


def options_init(**fields):
    """KVATTN_OPTIONS_INIT with fields overridden."""
    o = Options(ctypes.sizeof(Options), KVATTN_VERSION_NUMBER, Backend.AUTO, 0, 0, 0, None)
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def desc_init():
    """KVATTN_ATTENTION_DESC_INIT: zeros (= library defaults) except window_left = -1."""
    d = AttentionDesc()
    d.struct_size = ctypes.sizeof(AttentionDesc)
    d.version = KVATTN_VERSION_NUMBER
    d.window_left = -1
    return d


def bounds_init(max_batch=0, max_qo_tokens=0, max_kv_entries=0):
    return Bounds(ctypes.sizeof(Bounds), max_batch, max_qo_tokens, max_kv_entries)


def batch_init():
    b = Batch()
    b.struct_size = ctypes.sizeof(Batch)
    return b


def kv_init(layout=LAYOUT_NHD):
    k = KV()
    k.struct_size = ctypes.sizeof(KV)
    k.layout = layout
    return k


# ----------------------------------------------------------------------------- errors


class Error(Exception):
    """A kvattn call failed. `.status` is a Status (name and code), `.detail` the library's
    kvattn_last_error() text naming the argument and the bad value."""

    def __init__(self, status, detail, function=None):
        self.status = Status(status)
        self.detail = detail
        self.function = function
        super().__init__("%s (%d): %s" % (self.status.name, int(self.status), detail))


# One subclass per status, so callers can catch what they mean. The argument errors are also
# ValueErrors / TypeErrors, as Python code expects of bad arguments.
class InvalidArgumentError(Error, ValueError): pass
class InvalidDtypeError(Error, TypeError): pass
class InvalidShapeError(Error, ValueError): pass
class InvalidStrideError(Error, ValueError): pass
class InvalidIndexError(Error, ValueError): pass
class DeviceMismatchError(Error, ValueError): pass
class InvalidUsageError(Error, RuntimeError): pass
class WorkspaceTooSmallError(Error, RuntimeError): pass
class BoundsExceededError(Error, ValueError): pass
class UnsupportedError(Error, NotImplementedError): pass
class BackendUnavailableError(Error, RuntimeError): pass
class OutOfMemoryError(Error, MemoryError): pass
class CudaError(Error, RuntimeError): pass
class CompileError(Error, RuntimeError): pass
class InternalError(Error, RuntimeError): pass


_ERROR_CLASS = {
    Status.INVALID_ARGUMENT: InvalidArgumentError, Status.INVALID_DTYPE: InvalidDtypeError,
    Status.INVALID_SHAPE: InvalidShapeError, Status.INVALID_STRIDE: InvalidStrideError,
    Status.INVALID_INDEX: InvalidIndexError, Status.DEVICE_MISMATCH: DeviceMismatchError,
    Status.INVALID_USAGE: InvalidUsageError, Status.WORKSPACE_TOO_SMALL: WorkspaceTooSmallError,
    Status.BOUNDS_EXCEEDED: BoundsExceededError, Status.UNSUPPORTED: UnsupportedError,
    Status.BACKEND_UNAVAILABLE: BackendUnavailableError, Status.OUT_OF_MEMORY: OutOfMemoryError,
    Status.CUDA: CudaError, Status.COMPILE: CompileError, Status.INTERNAL: InternalError,
}


def make_error(status, detail, function=None):
    try:
        status = Status(status)
    except ValueError:  # a status newer than this package: keep the code in the text
        return InternalError(Status.INTERNAL, "unknown kvattn status %d: %s" % (status, detail),
                             function)
    return _ERROR_CLASS.get(status, Error)(status, detail, function)


def raise_error(status, detail, function=None):
    """For checks done on the Python side: same exception types, same fields as the C errors."""
    raise make_error(status, detail, function)


# ----------------------------------------------------------------------------- finding the library

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_LIB_NAMES = ("libkvattn.so", "libkvattn.so.0", "libkvattn.dylib", "kvattn.dll")


def _candidates():
    """Where libkvattn is looked for, in order. Each entry: (path or name, why)."""
    env = os.environ.get("KVATTN_LIBRARY")
    if env:
        # Explicit wins and is the only candidate: a wrong path must fail, not fall through.
        return [(env, "KVATTN_LIBRARY")]
    out = []
    for name in _LIB_NAMES:  # bundled next to the package (wheels)
        out.append((os.path.join(_PKG_DIR, name), "next to the package"))
    repo = os.path.dirname(os.path.dirname(_PKG_DIR))  # python/kvattn -> repo root
    if os.path.exists(os.path.join(repo, "include", "kvattn.h")):  # run from a checkout
        for name in _LIB_NAMES[:2]:
            out.append((os.path.join(repo, "build", name), "the checkout's build/"))
    found = ctypes.util.find_library("kvattn")
    if found:
        out.append((found, "the system loader (find_library)"))
    out.append(("libkvattn.so.0", "the system loader"))
    out.append(("libkvattn.so", "the system loader"))
    return out


def _load():
    tried = []
    for path, why in _candidates():
        if os.sep in path and not os.path.exists(path):
            tried.append("%s (%s): no such file" % (path, why))
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            tried.append("%s (%s): %s" % (path, why, e))
    raise ImportError("kvattn: cannot load libkvattn. Build it (cmake -S . -B build && cmake --build "
                      "build) or set KVATTN_LIBRARY to its path. Tried:\n  " + "\n  ".join(tried))


lib, library_path = _load()

_status = c_int
_PROTOTYPES = {
    "kvattn_version_number": (ctypes.c_uint, []),
    "kvattn_version": (c_char_p, []),
    "kvattn_status_string": (c_char_p, [c_int]),
    "kvattn_last_error": (c_char_p, []),
    "kvattn_context_create": (_status, [POINTER(Options), POINTER(c_void_p)]),
    "kvattn_context_destroy": (_status, [c_void_p]),
    "kvattn_context_backend": (_status, [c_void_p, POINTER(c_int)]),
    "kvattn_context_info": (_status, [c_void_p, c_char_p, c_size_t]),
    "kvattn_workspace_size": (_status, [c_void_p, POINTER(AttentionDesc), POINTER(Bounds),
                                        POINTER(c_size_t), POINTER(c_size_t)]),
    "kvattn_workspace_alloc": (_status, [c_void_p, c_size_t, c_size_t, POINTER(Workspace)]),
    "kvattn_workspace_free": (_status, [c_void_p, POINTER(Workspace)]),
    "kvattn_attention_create": (_status, [c_void_p, POINTER(AttentionDesc), POINTER(Bounds),
                                          POINTER(c_void_p)]),
    "kvattn_attention_destroy": (_status, [c_void_p]),
    "kvattn_plan": (_status, [c_void_p, POINTER(Batch), POINTER(Workspace), c_void_p]),
    "kvattn_run": (_status, [c_void_p, POINTER(DLTensor), POINTER(KV), POINTER(DLTensor),
                             POINTER(DLTensor), POINTER(DLTensor), c_void_p]),
    "kvattn_merge_state": (_status, [c_void_p] + [POINTER(DLTensor)] * 6 + [c_void_p]),
    "kvattn_merge_states": (_status, [c_void_p] + [POINTER(DLTensor)] * 4 + [c_void_p]),
    "kvattn_append_paged_kv": (_status, [c_void_p] + [POINTER(DLTensor)] * 4
                               + [POINTER(KV), POINTER(DLTensor), c_void_p]),
    "kvattn_warmup": (_status, [POINTER(AttentionDesc), c_char_p, c_char_p, POINTER(c_int),
                                POINTER(c_double)]),
    "kvattn_cache_info": (_status, [c_char_p, c_char_p, c_size_t]),
}

# Functions the import itself needs; the others are checked when first called, so a library
# that lacks one (a partial build) still serves the rest and says clearly what is missing.
_REQUIRED = ("kvattn_version", "kvattn_status_string", "kvattn_last_error")
missing = []
for _name, (_res, _args) in _PROTOTYPES.items():
    try:
        _fn = getattr(lib, _name)
    except AttributeError:
        missing.append(_name)
        continue
    _fn.restype = _res
    _fn.argtypes = _args
if any(n in missing for n in _REQUIRED):
    raise ImportError("kvattn: %s lacks %s: it is not a kvattn library"
                      % (library_path, ", ".join(n for n in _REQUIRED if n in missing)))

library_version = lib.kvattn_version().decode()
if library_version != __version__:
    raise ImportError("kvattn: the Python package is version %s but %s is version %s; install "
                      "matching versions (or point KVATTN_LIBRARY at the right library)"
                      % (__version__, library_path, library_version))


def last_error():
    s = lib.kvattn_last_error()
    return s.decode(errors="replace") if s else ""


def check(status, function):
    """Raise the Error for a failed C call; `function` names it for the message."""
    if status != 0:
        detail = last_error() or lib.kvattn_status_string(status).decode()
        raise make_error(status, detail, function)


def call(name, *args):
    if name in missing:
        raise make_error(Status.UNSUPPORTED, "%s: this libkvattn (%s) does not export it"
                         % (name, library_path), name)
    check(getattr(lib, name)(*args), name)
