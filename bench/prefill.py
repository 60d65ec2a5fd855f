"""Side-by-side prefill / append benchmark: kvattn vs FlashInfer (fa2 and fa3 backends) vs PyTorch
SDPA (flash and cuDNN back ends, dense), in one run on one GPU.

Workloads (Llama-3.1-8B attention: 32 query heads, 8 KV heads, head_dim 128, bf16): causal and
full 16x1024, 4x4096, 1x16384 over paged KV (page 16 and page 1) and ragged KV; append of 128 and
512 query tokens onto caches of 4k-16k tokens. TFLOP/s counts the visible (query, key) pairs
exactly (causal: bottom-right aligned, about half), 4 * heads * head_dim FLOPs each; the fraction
is of the bf16 matrix-product rate measured in the same run.

Timing: CUDA events around each call after warm-up, the median of repeats; each timed call is
preceded by nothing else (the inputs of these shapes exceed L2 many times over or are
compute-bound). Each peer's output is compared with kvattn's (relative error) so a wrong fast
number shows.

Usage: KVATTN_LIBRARY=build/libkvattn.so python3 bench/prefill.py [--out DIR] [--quick]
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

HQ, HK, D = 32, 8, 128
DT = torch.bfloat16


def median_ms(fn, warmup=3, reps=15, calls=1):
    """Median over reps of the event-timed time of `calls` back-to-back calls, per call. calls 1: one call
    between the events, so the host's time to enqueue it (the Python wrapper, argument checks) counts;
    calls > 1: the queue stays ahead of the GPU and the figure is the kernels' own throughput."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    times.sort()
    return times[len(times) // 2]


def host_us(fn, n=200):
    """Host time per call (microseconds) of `fn` on a problem small enough that the GPU keeps up: what
    the wrapper costs the caller's thread."""
    import time
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def bf16_ceiling():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DT)
    b = torch.randn(n, n, device="cuda", dtype=DT)
    ms = median_ms(lambda: torch.mm(a, b), warmup=3, reps=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def visible_pairs(qo, kv, causal):
    if not causal:
        return qo * kv
    # row r (0-based) sees kv - qo + r + 1 keys, clamped to [0, kv]
    total = 0
    for r in range(qo):
        total += max(0, min(kv, kv - qo + r + 1))
    return total


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Workload:
    def __init__(self, name, qo_lens, kv_lens, causal):
        self.name, self.qo_lens, self.kv_lens, self.causal = name, qo_lens, kv_lens, causal
        self.pairs = sum(visible_pairs(q, k, causal) for q, k in zip(qo_lens, kv_lens))
        self.flops = 4.0 * HQ * D * self.pairs

    def tensors(self, page_size, seed=0):
        """q [tokens, HQ, D]; ragged k/v [kv_tokens, HK, D]; paged caches [pages, P, HK, D] holding
        the same keys; index arrays."""
        g = torch.Generator(device="cuda").manual_seed(seed)
        dev = "cuda"
        qo_indptr = [0]
        kv_indptr = [0]
        for q, k in zip(self.qo_lens, self.kv_lens):
            qo_indptr.append(qo_indptr[-1] + q)
            kv_indptr.append(kv_indptr[-1] + k)
        q = torch.randn(qo_indptr[-1], HQ, D, device=dev, dtype=DT, generator=g)
        k = torch.randn(kv_indptr[-1], HK, D, device=dev, dtype=DT, generator=g)
        v = torch.randn(kv_indptr[-1], HK, D, device=dev, dtype=DT, generator=g)
        P = page_size
        pages_per = [(k_ + P - 1) // P for k_ in self.kv_lens]
        page_indptr = [0]
        for n in pages_per:
            page_indptr.append(page_indptr[-1] + n)
        npages = page_indptr[-1]
        kc = torch.zeros(npages, P, HK, D, device=dev, dtype=DT)
        vc = torch.zeros(npages, P, HK, D, device=dev, dtype=DT)
        last = []
        for i, kl in enumerate(self.kv_lens):
            n = pages_per[i]
            pad = n * P - kl
            src_k = torch.cat([k[kv_indptr[i]:kv_indptr[i + 1]], k.new_zeros(pad, HK, D)])
            src_v = torch.cat([v[kv_indptr[i]:kv_indptr[i + 1]], v.new_zeros(pad, HK, D)])
            kc[page_indptr[i]:page_indptr[i + 1]] = src_k.view(n, P, HK, D)
            vc[page_indptr[i]:page_indptr[i + 1]] = src_v.view(n, P, HK, D)
            last.append(kl - (n - 1) * P if n else 1)
        i32 = dict(dtype=torch.int32, device=dev)
        return dict(q=q, k=k, v=v, kc=kc, vc=vc,
                    qo_indptr=torch.tensor(qo_indptr, **i32), kv_indptr=torch.tensor(kv_indptr, **i32),
                    page_indptr=torch.tensor(page_indptr, **i32),
                    page_indices=torch.arange(npages, **i32), last=torch.tensor(last, **i32))


def run_kvattn(w, t, fmt, P, **plan_args):
    import kvattn
    if fmt == "ragged":
        wr = kvattn.BatchPrefillWithRaggedKVCacheWrapper("cuda", "NHD")
        wr.plan(t["qo_indptr"], t["kv_indptr"], HQ, HK, D, causal=w.causal, q_data_type=DT, kv_data_type=DT,
                **plan_args)
        out = torch.empty_like(t["q"])
        fn = lambda: wr.run(t["q"], t["k"], t["v"], out=out)
    else:
        wr = kvattn.BatchPrefillWithPagedKVCacheWrapper("cuda", "NHD")
        wr.plan(t["qo_indptr"], t["page_indptr"], t["page_indices"], t["last"], HQ, HK, D, P, causal=w.causal,
                q_data_type=DT, kv_data_type=DT, **plan_args)
        out = torch.empty_like(t["q"])
        fn = lambda: wr.run(t["q"], (t["kc"], t["vc"]), out=out)
    fn()
    torch.cuda.synchronize()
    return fn, out


def run_flashinfer(w, t, fmt, P, backend):
    import flashinfer
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    if fmt == "ragged":
        wr = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
        wr.plan(t["qo_indptr"], t["kv_indptr"], HQ, HK, D, causal=w.causal, q_data_type=DT, kv_data_type=DT)
        fn = lambda: wr.run(t["q"], t["k"], t["v"])
    else:
        wr = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
        wr.plan(t["qo_indptr"], t["page_indptr"], t["page_indices"], t["last"], HQ, HK, D, P, causal=w.causal,
                q_data_type=DT, kv_data_type=DT)
        fn = lambda: wr.run(t["q"], (t["kc"], t["vc"]))
    out = fn()
    torch.cuda.synchronize()
    return fn, out


def run_sdpa(w, t, backend):
    """Dense SDPA over equal-length batches (qo == kv), KV heads repeated to 32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b, L = len(w.qo_lens), w.qo_lens[0]
    q = t["q"].view(b, L, HQ, D).transpose(1, 2).contiguous()
    k = t["k"].view(b, L, HK, D).repeat_interleave(HQ // HK, dim=2).transpose(1, 2).contiguous()
    v = t["v"].view(b, L, HK, D).repeat_interleave(HQ // HK, dim=2).transpose(1, 2).contiguous()
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def fn():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=w.causal)
    out = fn().transpose(1, 2).reshape(-1, HQ, D)
    torch.cuda.synchronize()
    return fn, out


# kernel shapes the sweep tries, one change at a time from the default (KV tile 64, 4 warps of the
# 128-row query tile, scale folded into the exponent): (KV tile, warps, fold)
SWEEP = ((64, 4, 0), (32, 4, 1), (64, 8, 1), (128, 8, 1))


def with_env(env, fn):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def workloads(quick):
    # most important first: a run cut short by its time limit keeps these
    rows = []
    for b, L in ((16, 1024), (4, 4096), (1, 16384)):
        rows.append(Workload("causal %dx%d" % (b, L), [L] * b, [L] * b, True))
    for qo in (128, 512):
        rows.append(Workload("append %d onto 4k-16k" % qo, [qo] * 4, [4096, 8192, 12288, 16384], True))
    for b, L in ((16, 1024), (4, 4096), (1, 16384)):
        rows.append(Workload("full %dx%d" % (b, L), [L] * b, [L] * b, False))
    if quick:
        rows = [r for r in rows if "16x1024" in r.name or "append 128" in r.name]
    return rows


def markdown(res):
    """The docs/perf.md table of a results dict: TFLOP/s per subject, kvattn's fraction of the bf16
    ceiling and its ratio to each peer."""
    names = ("kvattn", "fi_fa2", "fi_fa3", "sdpa_flash", "sdpa_cudnn")
    lines = ["| workload | format | kvattn | FI fa2 | FI fa3 | SDPA flash | SDPA cuDNN | kvattn / ceiling "
             "| vs fa2 | vs fa3 | 8 back-to-back: kvattn / FI fa2 / ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in res["rows"].items():
        wl, fmt = key.split(" | ")
        cells = []
        for n in names:
            e = row.get(n, {})
            cells.append("%.0f" % e["TFLOPs"] if "TFLOPs" in e else ("err" if "error" in e else "-"))
        k = row.get("kvattn", {})
        frac = "%.0f%%" % (100 * k["frac_ceiling"]) if "frac_ceiling" in k else "-"
        r2 = "%.2f" % k["ratio_vs_fi_fa2"] if "ratio_vs_fi_fa2" in k else "-"
        r3 = "%.2f" % k["ratio_vs_fi_fa3"] if "ratio_vs_fi_fa3" in k else "-"
        f2 = row.get("fi_fa2", {})
        b2b = ("%.0f / %.0f / %.3f" % (k["TFLOPs_b2b8"], f2["TFLOPs_b2b8"], k["ratio_b2b8_vs_fi_fa2"])
               if "ratio_b2b8_vs_fi_fa2" in k else "-")
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (wl, fmt, " | ".join(cells), frac, r2, r3, b2b))
    return "\n".join(lines)


def warmup_peers(backends=("fa2", "fa3")):
    """Make FlashInfer compile (JIT) its prefill modules (fa2 and fa3 by default) on a tiny problem of
    the benchmark's shape, so a device call can overlap that compile with other work."""
    w = Workload("warmup", [64, 64], [64, 64], True)
    t = w.tensors(16)
    for backend in backends:
        for causal in (True, False):
            w.causal = causal
            for fmt, P in (("paged16", 16), ("ragged", 1)):
                t0 = time.time()
                try:
                    run_flashinfer(w, t, fmt, P, backend)
                    print("flashinfer %s %s causal=%d ready (%.0f s)" % (backend, fmt, causal, time.time() - t0),
                          flush=True)
                except Exception as e:  # noqa: BLE001
                    print("flashinfer %s %s: %s: %s" % (backend, fmt, type(e).__name__, str(e)[:300]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time kvattn's kernel-shape variants")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a results file and exit")
    ap.add_argument("--warmup-peers", action="store_true", help="only make FlashInfer compile its kernels")
    ap.add_argument("--fi-backends", default="fa2,fa3", help="FlashInfer backends to time (those compiled)")
    args = ap.parse_args()
    if args.warmup_peers:
        warmup_peers([b for b in args.fi_backends.split(",") if b])
        return
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)))
        return
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    try:
        import flashinfer
        res["flashinfer"] = flashinfer.__version__
    except Exception as e:  # noqa: BLE001
        res["flashinfer"] = "unavailable: %r" % (e,)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, "prefill-%s.json" % stamp)
    ceil = bf16_ceiling()
    res["bf16_mm_TFLOPs"] = ceil
    print("device %s, bf16 matmul ceiling %.0f TFLOP/s, flashinfer %s" % (res["device"], ceil, res["flashinfer"]),
          flush=True)
    for w in workloads(args.quick):
        equal = all(q == k for q, k in zip(w.qo_lens, w.kv_lens))
        for fmt, P in (("paged16", 16), ("paged1", 1), ("ragged", 1)):
            key = "%s | %s" % (w.name, fmt)
            row = {"TFLOP": w.flops / 1e12}
            t = w.tensors(P)
            ref = None
            subjects = [("kvattn", lambda: run_kvattn(w, t, fmt, P))]
            for tile, warps, fold in SWEEP if args.sweep and fmt != "paged1" and w.causal else ():
                subjects.append(("kvattn_kt%d_w%d_f%d" % (tile, warps, fold),
                                 lambda tile=tile, warps=warps, fold=fold: with_env(
                                     {"KVATTN_PREFILL_KV_TILE": str(tile), "KVATTN_PREFILL_WARPS128": str(warps),
                                      "KVATTN_PREFILL_FOLD": str(fold)},
                                     lambda: run_kvattn(w, t, fmt, P))))
            if args.sweep and w.name.startswith("append") and fmt == "paged16":
                # split-KV: off, and coarser chunks than the default 256 tokens
                subjects.append(("kvattn_nosplit", lambda: run_kvattn(w, t, fmt, P, disable_split_kv=True)))
                for mc in (1024, 4096):
                    subjects.append(("kvattn_minchunk%d" % mc, lambda mc=mc: with_env(
                        {"KVATTN_PREFILL_MIN_CHUNK": str(mc)}, lambda: run_kvattn(w, t, fmt, P))))
            if not args.no_peers:
                for be in [b for b in args.fi_backends.split(",") if b]:
                    subjects.append(("fi_" + be, lambda be=be: run_flashinfer(w, t, fmt, P, be)))
                if equal and fmt == "ragged":
                    subjects += [("sdpa_flash", lambda: run_sdpa(w, t, "flash")),
                                 ("sdpa_cudnn", lambda: run_sdpa(w, t, "cudnn"))]
            for name, make in subjects:
                try:
                    fn, out = make()
                    ms = median_ms(fn)
                    tf = w.flops / (ms * 1e-3) / 1e12
                    entry = {"ms": ms, "TFLOPs": tf, "frac_ceiling": tf / ceil}
                    # the kernels' own throughput: 8 calls back to back per timed sample, so the host's
                    # time to enqueue a call (each wrapper's Python) is off the clock for every subject
                    ms8 = median_ms(fn, warmup=1, reps=7, calls=8)
                    entry.update({"ms_b2b8": ms8, "TFLOPs_b2b8": w.flops / (ms8 * 1e-3) / 1e12})
                    if ref is None:
                        ref = out
                    else:
                        entry["relerr_vs_kvattn"] = rel(out, ref)
                    row[name] = entry
                except Exception as e:  # noqa: BLE001
                    row[name] = {"error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")}
                    if name == "kvattn":
                        traceback.print_exc()
                torch.cuda.synchronize()
            if "TFLOPs" in row.get("kvattn", {}):
                for name in ("fi_fa2", "fi_fa3", "sdpa_flash", "sdpa_cudnn"):
                    if "TFLOPs" in row.get(name, {}):
                        row["kvattn"]["ratio_vs_" + name] = row["kvattn"]["TFLOPs"] / row[name]["TFLOPs"]
                        row["kvattn"]["ratio_b2b8_vs_" + name] = row["kvattn"]["TFLOPs_b2b8"] / row[name]["TFLOPs_b2b8"]
            res["rows"][key] = row
            with open(path, "w") as f:  # after every row: a run cut short keeps what it measured
                json.dump(res, f, indent=1)
            del t
            torch.cuda.empty_cache()
            cells = []
            for name in row:
                if name == "TFLOP":
                    continue
                e = row.get(name)
                if e is None:
                    continue
                cells.append("%s %s" % (name, "%.0f" % e["TFLOPs"] if "TFLOPs" in e else "ERR"))
            print("%-34s %s" % (key, "  ".join(cells)), flush=True)
    print("wrote", path)
    # the table, last
    print("\n%-34s %8s %8s %8s %8s %8s %6s %7s %7s" % ("workload | format", "kvattn", "fi_fa2", "fi_fa3", "sdpa_fl",
                                                       "sdpa_cu", "ceil%", "vs fa2", "b2b8"))
    for key, row in res["rows"].items():
        def tf(n):
            e = row.get(n, {})
            return "%8.0f" % e["TFLOPs"] if "TFLOPs" in e else "%8s" % ("err" if "error" in e else "-")
        k = row.get("kvattn", {})
        frac = "%5.0f%%" % (100 * k["frac_ceiling"]) if "frac_ceiling" in k else "     -"
        r2 = "%7.2f" % k["ratio_vs_fi_fa2"] if "ratio_vs_fi_fa2" in k else "      -"
        r8 = "%7.3f" % k["ratio_b2b8_vs_fi_fa2"] if "ratio_b2b8_vs_fi_fa2" in k else "      -"
        print("%-34s %s %s %s %s %s %s %s %s" % (key, tf("kvattn"), tf("fi_fa2"), tf("fi_fa3"), tf("sdpa_flash"),
                                                 tf("sdpa_cudnn"), frac, r2, r8))


if __name__ == "__main__":
    main()
