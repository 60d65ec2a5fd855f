"""Loading the library, versions, statuses, errors and contexts."""

import ctypes
import os
import shutil
import subprocess

import pytest

import kvattn
from kvattn import _lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_version_matches_the_library():
    assert kvattn.__version__ == kvattn.library_version
    assert _lib.lib.kvattn_version_number() == _lib.KVATTN_VERSION_NUMBER
    assert os.path.exists(kvattn.library_path) or "/" not in kvattn.library_path


def test_every_status_has_the_c_name():
    for s in kvattn.Status:
        name = kvattn.status_string(s)
        expected = "KVATTN_SUCCESS" if s == 0 else "KVATTN_ERROR_" + s.name
        assert name == expected


def test_error_classes_carry_status_and_detail():
    e = _lib.make_error(kvattn.Status.INVALID_INDEX, "kv_indptr[1]=3 < kv_indptr[0]=4")
    assert isinstance(e, kvattn.InvalidIndexError) and isinstance(e, kvattn.Error)
    assert isinstance(e, ValueError)
    assert e.status is kvattn.Status.INVALID_INDEX and e.status == 5
    assert e.status.name == "INVALID_INDEX"
    assert e.detail == "kv_indptr[1]=3 < kv_indptr[0]=4"
    assert "INVALID_INDEX (5)" in str(e)


@pytest.mark.parametrize("name,expected", [("cpu", kvattn.Backend.CPU),
                                           ("reference", kvattn.Backend.REFERENCE)])
def test_context_backends(name, expected):
    with kvattn.Context(name) as ctx:
        assert ctx.backend == expected
        assert not ctx.is_cuda
        assert isinstance(ctx.info(), str) and ctx.info()
        assert ctx.resolve_stream(123) is None  # the CPU ignores streams


def test_auto_context_says_what_it_got():
    ctx = kvattn.Context("auto")
    assert ctx.backend in (kvattn.Backend.CPU, kvattn.Backend.CUDA)
    assert "backend" in ctx.info()


def test_closed_context_is_invalid_usage():
    ctx = kvattn.Context("cpu")
    ctx.close()
    ctx.close()  # twice is fine
    with pytest.raises(kvattn.InvalidUsageError):
        ctx.info()


def test_unknown_backend_name():
    with pytest.raises(kvattn.InvalidArgumentError) as ei:
        kvattn.Context("tpu")
    assert "tpu" in ei.value.detail


def test_cuda_context_without_gpu_is_a_clear_error():
    if kvattn.Context("auto").backend == kvattn.Backend.CUDA:
        pytest.skip("a GPU is present")
    with pytest.raises(kvattn.BackendUnavailableError) as ei:
        kvattn.Context("cuda")
    assert ei.value.detail  # says why (no driver, no device, ...)


def test_shared_contexts_are_reused():
    assert kvattn.shared_context("cpu") is kvattn.shared_context("cpu")
    assert kvattn.default_context() is kvattn.shared_context("cpu")


def test_last_error_after_failure_and_success():
    import gc
    with pytest.raises(kvattn.Error) as ei:
        kvattn.Context("cpu", num_threads=-5)
    assert "num_threads" in ei.value.detail and "-5" in ei.value.detail
    # kvattn_last_error() is thread-local and any kvattn call resets it, destructors of collected
    # objects included: so Error.detail is captured at the failure, and here the collector is held
    # off to read the C text straight after a failing call.
    gc.disable()
    try:
        opt = _lib.options_init(num_threads=-5)
        handle = ctypes.c_void_p()
        st = _lib.lib.kvattn_context_create(ctypes.byref(opt), ctypes.byref(handle))
        assert st == kvattn.Status.INVALID_ARGUMENT
        assert kvattn.last_error() == ei.value.detail
        kvattn.Context("cpu").info()
        assert kvattn.last_error() == ""
    finally:
        gc.enable()


def test_library_lookup_order_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("KVATTN_LIBRARY", "/nonexistent/libkvattn.so")
    assert _lib._candidates() == [("/nonexistent/libkvattn.so", "KVATTN_LIBRARY")]
    monkeypatch.delenv("KVATTN_LIBRARY")
    whys = [why for _, why in _lib._candidates()]
    assert whys[0] == "next to the package"
    assert whys.index("the checkout's build/") < whys.index("the system loader")


def test_a_bad_library_path_fails_the_import_clearly(tmp_path):
    code = "import kvattn"
    env = dict(os.environ, KVATTN_LIBRARY=str(tmp_path / "missing.so"),
               PYTHONPATH=os.path.join(REPO, "python"))
    r = subprocess.run([os.sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "cannot load libkvattn" in r.stderr and "missing.so" in r.stderr


# --------------------------------------------------------------------------- ABI: ctypes vs C

_STRUCTS = {
    "DLTensor": (_lib.DLTensor, "DLTensor"),
    "DLDevice": (_lib.DLDevice, "DLDevice"),
    "DLDataType": (_lib.DLDataType, "DLDataType"),
    "kvattn_options": (_lib.Options, "kvattn_options"),
    "kvattn_attention_desc": (_lib.AttentionDesc, "kvattn_attention_desc"),
    "kvattn_bounds": (_lib.Bounds, "kvattn_bounds"),
    "kvattn_batch": (_lib.Batch, "kvattn_batch"),
    "kvattn_kv": (_lib.KV, "kvattn_kv"),
    "kvattn_workspace": (_lib.Workspace, "kvattn_workspace"),
}


def test_ctypes_structs_match_the_c_header(tmp_path):
    """Compile a C program printing sizeof/offsetof of every mirrored struct and compare."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or not os.path.exists(os.path.join(REPO, "include", "kvattn.h")):
        pytest.skip("no C compiler or no include/kvattn.h")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "kvattn.h"', "int main(void) {"]
    expected = []
    for label, (cls, cname) in _STRUCTS.items():
        lines.append('printf("%%zu\\n", sizeof(%s));' % cname)
        expected.append(ctypes.sizeof(cls))
        for fname, _ in cls._fields_:
            lines.append('printf("%%zu\\n", offsetof(%s, %s));' % (cname, fname))
            expected.append(getattr(cls, fname).offset)
    lines += ["return 0;", "}"]
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "abi"
    subprocess.run([cc, "-std=c11", "-I", os.path.join(REPO, "include"), str(src), "-o", str(exe)],
                   check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert got == expected


def test_struct_size_fields_come_from_ctypes():
    assert _lib.options_init().struct_size == ctypes.sizeof(_lib.Options)
    assert _lib.desc_init().struct_size == ctypes.sizeof(_lib.AttentionDesc)
    assert _lib.desc_init().window_left == -1
    assert _lib.bounds_init().struct_size == ctypes.sizeof(_lib.Bounds)
    assert _lib.batch_init().struct_size == ctypes.sizeof(_lib.Batch)
    assert _lib.kv_init().struct_size == ctypes.sizeof(_lib.KV)


def test_warmup_fills_the_cache_then_hits_it(tmp_path):
    """Compile the decode kernels for sm_90a without a GPU (NVRTC only), then find them cached."""
    try:
        n, secs = kvattn.warmup(8, 2, 64, arch="sm_90a", q_data_type="float16", cache_dir=tmp_path)
    except (kvattn.BackendUnavailableError, kvattn.CompileError) as e:
        pytest.skip("no NVRTC here: %s" % e.detail)
    assert n >= 1
    n2, secs2 = kvattn.warmup(8, 2, 64, arch="sm_90a", q_data_type="float16", cache_dir=tmp_path)
    assert n2 == n and secs2 <= secs
    info = kvattn.cache_info(tmp_path)
    assert str(tmp_path) in info and "entries" in info


def test_warmup_unknown_arch_is_an_error(tmp_path):
    # the architecture is checked before NVRTC is loaded: the same answer with or without NVRTC
    with pytest.raises(kvattn.Error) as ei:
        kvattn.warmup(8, 2, 64, arch="sm_12", cache_dir=tmp_path)
    assert ei.value.status == kvattn.Status.UNSUPPORTED
    assert "sm_12" in ei.value.detail
    with pytest.raises(kvattn.Error) as ei:
        kvattn.warmup(8, 2, 64, arch="compute_90", cache_dir=tmp_path)
    assert ei.value.status == kvattn.Status.INVALID_ARGUMENT
    assert "compute_90" in ei.value.detail
