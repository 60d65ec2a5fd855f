"""Borrowing tensors through DLPack: what C sees for NumPy arrays and views, old producers,
read-only data, dtype names."""

import numpy as np
import pytest

import kvattn
from kvattn import _lib, _tensor


def test_compact_array():
    a = np.zeros((3, 4, 5), dtype=np.float32)
    b = _tensor.borrow(a, "a")
    t = b.tensor
    assert b.shape == (3, 4, 5) and b.dtype == "float32" and b.device == (_lib.kDLCPU, 0)
    assert t.data + t.byte_offset == a.ctypes.data
    if t.strides:  # NumPy may give compact strides or NULL
        assert [t.strides[i] for i in range(3)] == [20, 5, 1]


def test_strided_view_keeps_strides_and_offset():
    base = np.zeros((6, 8, 10), dtype=np.float16)
    view = base[1:5:2, :, 3:7]
    b = _tensor.borrow(view, "view")
    t = b.tensor
    assert b.shape == (2, 8, 4) and b.dtype == "float16"
    assert [t.strides[i] for i in range(3)] == [160, 10, 1]
    assert t.data + t.byte_offset == view.ctypes.data


class OldProducer:
    """A producer from before DLPack 1.0: __dlpack__ takes only `stream` and returns a 'dltensor'
    capsule (as NumPy < 2.1 and PyTorch < 2.6 did)."""

    def __init__(self, a):
        self.a = a
        self.calls = []

    def __dlpack__(self, stream=None):
        self.calls.append(stream)
        return self.a.__dlpack__()  # NumPy's default is the unversioned capsule

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_old_producer_falls_back_to_the_unversioned_capsule():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = OldProducer(a)
    b = _tensor.borrow(p, "x")
    assert p.calls == [None]
    assert b.shape == (3, 4) and b.dtype == "float32" and not b.read_only
    assert b.tensor.data + b.tensor.byte_offset == a.ctypes.data


NUMPY_VERSIONED_DLPACK = np.lib.NumpyVersion(np.__version__) >= "2.1.0"


@pytest.mark.skipif(not NUMPY_VERSIONED_DLPACK, reason="NumPy < 2.1 exports no versioned capsule")
def test_versioned_capsule_reports_read_only():
    a = np.zeros((2, 2), dtype=np.float32)
    a.flags.writeable = False
    b = _tensor.borrow(a, "x")
    assert b.read_only
    with pytest.raises(kvattn.InvalidArgumentError) as ei:
        _tensor.borrow(a, "out", writable=True)
    assert "read-only" in ei.value.detail and "out" in ei.value.detail


def test_object_without_dlpack_is_invalid_argument():
    with pytest.raises(kvattn.InvalidArgumentError) as ei:
        _tensor.borrow([1.0, 2.0], "q")
    assert "q" in ei.value.detail and "__dlpack__" in ei.value.detail




class OldProducerCapsule:
    def __init__(self, cap):
        self.cap = cap

    def __dlpack__(self, stream=None):
        return self.cap


def test_capsule_is_left_for_its_own_destructor():
    # We never rename the capsule ("used_dltensor"): its destructor frees the producer's tensor.
    a = np.zeros(3, np.float32)
    cap = a.__dlpack__()
    _tensor.borrow(OldProducerCapsule(cap), "x")
    assert _tensor._pyapi.PyCapsule_IsValid(cap, b"dltensor") == 1


@pytest.mark.parametrize("spec,name", [("float16", "float16"), ("half", "float16"),
                                       (np.float32, "float32"), (np.dtype("float64"), "float64"),
                                       ("bf16", "bfloat16"), ("e4m3", "float8_e4m3fn"),
                                       (_lib.DLDataType(_lib.kDLBfloat, 16, 1), "bfloat16")])
def test_dtype_names(spec, name):
    assert _tensor.dtype_name(spec) == name


def test_unknown_dtype_name():
    with pytest.raises(kvattn.InvalidDtypeError):
        _tensor.dl_dtype("float128")


def test_host_index_arrays():
    assert _tensor.host_int32([0, 2, 5], "indptr").dtype == np.int32
    a = np.array([0, 1, 2], dtype=np.int32)
    assert _tensor.host_int32(a, "indptr") is a  # int32 and contiguous: no copy
    assert _tensor.host_int32(np.array([0, 3], np.int64), "indptr").tolist() == [0, 3]
    with pytest.raises(kvattn.InvalidIndexError):
        _tensor.host_int32(np.array([0, 2**31], np.int64), "indptr")
    with pytest.raises(kvattn.InvalidDtypeError) as ei:
        _tensor.host_int32(np.array([0.0, 1.0]), "kv_indptr")
    assert "kv_indptr" in ei.value.detail and "float64" in ei.value.detail
    with pytest.raises(kvattn.InvalidShapeError):
        _tensor.host_int32(np.zeros((2, 2), np.int32), "indptr")


def test_empty_output_follows_numpy():
    out = _tensor.empty(np.zeros(1, np.float32), (2, 3), "float16")
    assert isinstance(out, np.ndarray) and out.dtype == np.float16 and out.shape == (2, 3)
    with pytest.raises(kvattn.InvalidDtypeError) as ei:
        _tensor.empty(np.zeros(1, np.float32), (2,), "bfloat16")
    assert "NumPy has no bfloat16" in ei.value.detail


@pytest.mark.skipif(NUMPY_VERSIONED_DLPACK, reason="only NumPy < 2.1 refuses read-only arrays")
def test_old_numpy_read_only_array_gets_a_clear_message():
    a = np.zeros((2, 2), dtype=np.float32)
    a.flags.writeable = False
    with pytest.raises(kvattn.InvalidArgumentError) as ei:
        _tensor.borrow(a, "q")
    assert "read-only NumPy array" in ei.value.detail and "np.array(x)" in ei.value.detail
