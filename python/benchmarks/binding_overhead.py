"""What the Python binding adds per call: plan() and run() host time through ctypes + DLPack,
against the kernel's own time (CUDA events) on a GPU, or a tiny problem on the CPU.

    KVATTN_LIBRARY=build/libkvattn.so PYTHONPATH=python python3 python/benchmarks/binding_overhead.py
"""

import json
import statistics
import sys
import time

import numpy as np

import kvattn


def median_us(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def page_tables(batch, kv_len, page_size):
    pages = -(-kv_len // page_size)
    kv_indptr = np.arange(batch + 1, dtype=np.int32) * pages
    kv_indices = np.random.default_rng(0).permutation(batch * pages).astype(np.int32)
    last = np.full(batch, (kv_len - 1) % page_size + 1, np.int32)
    return kv_indptr, kv_indices, last, batch * pages


def c_run_only(w, q, cache, out):
    """kvattn_run alone, on tensors borrowed once: the C library's own host cost per call."""
    import ctypes
    from kvattn import _lib, _tensor
    s = w.context.resolve_stream(None, (q,))
    keep = [_tensor.borrow(x, n, s, same_stream=True)
            for n, x in (("q", q), ("kv", cache), ("idx", w._plan["indices"]), ("out", out))]
    kvs = _lib.kv_init(_lib.LAYOUT_NHD)
    kvs.kv, kvs.indices = keep[1].ptr, keep[2].ptr
    args = (w._attn, keep[0].ptr, ctypes.byref(kvs), None, keep[3].ptr, None, ctypes.c_void_p(s))
    fn = _lib.lib.kvattn_run
    return lambda: (fn(*args), keep)


def c_plan_only(w, kv_indptr, last, page_size):
    """kvattn_plan alone, on a batch struct built once."""
    import ctypes
    from kvattn import _lib, _tensor
    b = _lib.batch_init()
    b.format, b.batch_size, b.page_size = _lib.FORMAT_PAGED, len(kv_indptr) - 1, page_size
    b.kv_indptr, b.kv_last_page_len = _tensor.int32_ptr(kv_indptr), _tensor.int32_ptr(last)
    s = w.context.resolve_stream(None, ())
    args = (w._attn, ctypes.byref(b), ctypes.byref(w._ws), s)
    fn = _lib.lib.kvattn_plan
    return lambda: fn(*args)


def main():
    result = {"kvattn": kvattn.__version__}
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        torch, cuda = None, False
    qo_heads, kv_heads, dim, ps = 32, 8, 128, 16
    if cuda:
        ctx = kvattn.Context("cuda")
        result["device"] = torch.cuda.get_device_name()
        for batch in (1, 64, 256):
            kv_len = 4096 if batch < 256 else 2048
            kv_indptr, kv_indices, last, pages = page_tables(batch, kv_len, ps)
            cache = torch.randn(pages, 2, ps, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
            q = torch.randn(batch, qo_heads, dim, device="cuda", dtype=torch.bfloat16)
            out = torch.empty_like(q)
            idx = torch.from_numpy(kv_indices).cuda()
            w = kvattn.BatchDecodeWithPagedKVCacheWrapper(ctx)
            plan = lambda: w.plan(kv_indptr, idx, last, qo_heads, kv_heads, dim, ps,  # noqa: E731
                                  q_data_type=torch.bfloat16)
            plan()
            w.run(q, cache, out=out)
            torch.cuda.synchronize()
            plan_us = median_us(plan, 200)
            torch.cuda.synchronize()
            run_us = median_us(lambda: w.run(q, cache, out=out), 200)  # host time, launches async
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(100):
                w.run(q, cache, out=out)
            end.record()
            end.synchronize()
            c_run_us = median_us(c_run_only(w, q, cache, out), 200)
            c_plan_us = median_us(c_plan_only(w, kv_indptr, last, ps), 200)
            result["decode_b%d_kv%d" % (batch, kv_len)] = {
                "plan_host_us": round(plan_us, 1), "run_host_us": round(run_us, 1),
                "c_run_host_us": round(c_run_us, 1), "c_plan_host_us": round(c_plan_us, 1),
                "run_gpu_us_back_to_back": round(1e3 * start.elapsed_time(end) / 100, 1)}
    ctx = kvattn.Context("cpu")
    kv_indptr, kv_indices, last, pages = page_tables(1, 16, ps)
    k = np.random.randn(pages, ps, kv_heads, 64).astype(np.float32)
    q = np.random.randn(1, qo_heads, 64).astype(np.float32)
    out = np.empty_like(q)
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper(ctx)
    w.plan(kv_indptr, kv_indices, last, qo_heads, kv_heads, 64, ps, q_data_type="float32")
    result["cpu_tiny_decode"] = {
        "plan_host_us": round(median_us(lambda: w.plan(kv_indptr, kv_indices, last, qo_heads, kv_heads,
                                                       64, ps, q_data_type="float32"), 500), 1),
        "run_host_us": round(median_us(lambda: w.run(q, (k, k), out=out), 500), 1)}
    kv_indptr, kv_indices, last, pages = page_tables(256, 2048, ps)
    w.plan(kv_indptr, kv_indices, last, qo_heads, kv_heads, 64, ps, q_data_type="float32")
    result["cpu_plan_b256_host_us"] = round(median_us(
        lambda: w.plan(kv_indptr, kv_indices, last, qo_heads, kv_heads, 64, ps,
                       q_data_type="float32"), 200), 1)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
