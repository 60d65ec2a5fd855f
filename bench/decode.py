"""Batch decode, side by side in one run on one GPU: kvattn (through its Python binding on PyTorch
CUDA tensors), FlashInfer (its CUDA-core and tensor-core decode), a Triton split-KV decode after
SGLang's algorithm (bench/triton_decode.py), and the device's measured copy bandwidth.

Timing (see the device's METHOD.md): each contender's calls are captured in a CUDA graph (R calls
over KV caches rotated so the working set is far beyond L2), replayed after warm-up, timed with
CUDA events; the median over replays, divided by R, is the time of one call. A contender whose
call cannot be captured is timed in a plain loop of events instead (the row says so).
Every contender's output is first checked against a float32 PyTorch reference.

Bytes moved (the floor's numerator): K and V of every visible token once, q read, out written.

    python3 bench/decode.py [--json FILE] [--quick] [--only NAME] [--no-flashinfer]
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

L2_ROTATE_BYTES = 400 << 20  # working set of one graph replay: far beyond the 50 MB L2


def log(*a):
    print(*a, flush=True)


def copy_bandwidth(nbytes=2 << 30, reps=20):
    """Device-to-device copy, counting bytes read + written (as the anchors do)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    del a, b
    return 2 * nbytes / np.median(ts) / 1e12


def skewed_lengths(batch, rng, max_len=32768, total=131503):
    """Heavy-tailed (Pareto) lengths with the anchors' shape: max 32k, ~131.5k tokens over 64."""
    x = (rng.pareto(1.1, size=batch) + 1.0) * 300.0
    x = np.minimum(x, max_len)
    x[int(rng.integers(batch))] = max_len
    x = x * (total / x.sum())
    x = np.clip(np.round(x), 1, max_len).astype(np.int64)
    x[np.argmax(x)] = max_len
    return x


WORKLOADS = [
    # name, batch, lengths, qo_heads, kv_heads, page sizes. Ordered by what a run cut short by its
    # deadline should still have measured.
    ("b64_Lskewed", 64, "skewed", 32, 8, (16, 1)),
    ("b1_L4096", 1, 4096, 32, 8, (16, 1)),
    ("b64_L4096", 64, 4096, 32, 8, (16, 1)),
    ("b16_L4096", 16, 4096, 32, 8, (16, 1)),
    ("b256_L2048", 256, 2048, 32, 8, (16, 1)),
    ("b128_L4096", 128, 4096, 32, 8, (16, 1)),
    ("b16_L16384", 16, 16384, 32, 8, (16, 1)),
    ("b64_L1024", 64, 1024, 32, 8, (16, 1)),
    ("b64_L4096_h64x8", 64, 4096, 64, 8, (16,)),
    ("b64_L4096_mha32", 64, 4096, 32, 32, (16,)),
]
HEAD_DIM = 128
LAYOUT = "NHD"  # --layout: the cache's layout, NHD [page, token, head, dim] or HND [page, head, token, dim]


class Problem:
    def __init__(self, name, batch, lengths, qo_heads, kv_heads, page, rng):
        self.name, self.batch, self.qo, self.kv, self.page = name, batch, qo_heads, kv_heads, page
        self.d = HEAD_DIM
        if lengths == "skewed":
            self.lens = skewed_lengths(batch, rng)
        else:
            self.lens = np.full(batch, lengths, dtype=np.int64)
        pages = (self.lens + page - 1) // page
        self.indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        self.last = (self.lens - (pages - 1) * page).astype(np.int32)
        self.num_pages = int(self.indptr[-1])
        self.kv_bytes = int(self.lens.sum()) * self.kv * self.d * 2 * 2
        self.bytes = self.kv_bytes + 2 * batch * qo_heads * self.d * 2
        # caches rotated so one replay's working set is far beyond L2
        self.copies = max(1, min(16, math.ceil(L2_ROTATE_BYTES / self.kv_bytes)))
        shape = (self.num_pages, page, kv_heads, self.d) if LAYOUT == "NHD" else (self.num_pages, kv_heads, page, self.d)
        self.k = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(self.copies)]
        self.v = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(self.copies)]
        self.q = [torch.randn(batch, qo_heads, self.d, dtype=torch.bfloat16, device="cuda")
                  for _ in range(self.copies)]
        self.indices = torch.arange(self.num_pages, dtype=torch.int32, device="cuda")
        self.indptr_d = torch.from_numpy(self.indptr).cuda()
        self.last_d = torch.from_numpy(self.last).cuda()
        self.lens_d = torch.from_numpy(self.lens.astype(np.int32)).cuda()

    def reference(self, copy=0):
        """float32 attention of copy `copy` (q_i over request i's tokens)."""
        out = torch.empty(self.batch, self.qo, self.d, dtype=torch.float32, device="cuda")
        k, v, q = self.k[copy], self.v[copy], self.q[copy]
        if LAYOUT == "HND":  # the reference reads token-major pages
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        g = self.qo // self.kv
        for i in range(self.batch):
            n = int(self.lens[i])
            pg = self.indices[self.indptr[i]:self.indptr[i + 1]].long()
            ki = k[pg].reshape(-1, self.kv, self.d)[:n].float()  # [n, kv, d]
            vi = v[pg].reshape(-1, self.kv, self.d)[:n].float()
            qi = q[i].float().reshape(self.kv, g, self.d)
            s = torch.einsum("hgd,nhd->hgn", qi, ki) / math.sqrt(self.d)
            p = torch.softmax(s, dim=-1)
            out[i] = torch.einsum("hgn,nhd->hgd", p, vi).reshape(self.qo, self.d)
        return out

    def free(self):
        self.k = self.v = self.q = None


def rel_err(out, ref):
    out = out.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def time_calls(call, copies, reps_target=64, replays=20, warm=3):
    """Median time of one call: a CUDA graph of R calls over the rotated copies, replayed."""
    r = max(copies, (reps_target // copies) * copies)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(copies):  # warm-up outside capture (JIT, lazy init)
                call(i)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(r):
                call(i % copies)
        for _ in range(warm):
            g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e-3 / r)
        del g
        return float(np.median(ts)), "graph"
    except Exception as e:  # not capturable: events around a plain loop
        torch.cuda.synchronize()
        log("    (graph capture failed: %s; timing a plain loop)" % str(e).splitlines()[0][:200])
        for i in range(copies):
            call(i)
        torch.cuda.synchronize()
        ts = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(r):
                call(i % copies)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e-3 / r)
        return float(np.median(ts)), "loop"


def bench_kvattn(P, kvattn, tc=False):
    w = kvattn.BatchDecodeWithPagedKVCacheWrapper("cuda", LAYOUT, use_tensor_cores=tc)
    w.plan(P.indptr, P.indices, P.last, P.qo, P.kv, P.d, P.page, q_data_type="bfloat16",
           kv_data_type="bfloat16")
    out = torch.empty(P.batch, P.qo, P.d, dtype=torch.bfloat16, device="cuda")
    outs = [torch.empty_like(out) for _ in range(P.copies)]
    w.run(P.q[0], (P.k[0], P.v[0]), out=out)
    torch.cuda.synchronize()
    err = rel_err(out, P.ref)
    t, how = time_calls(lambda i: w.run(P.q[i], (P.k[i], P.v[i]), out=outs[i]), P.copies)
    return {"us": t * 1e6, "relerr": err, "timing": how}


def with_env(cfg, fn):
    """Run fn under a configuration "t<0 CUDA-core|1 tensor-core>s<stages>c<ctas per SM>m<min chunk>
    i<item cost>p<0|1 tensor-core loader: 0 earlier, 1 ids staged in shared memory>n<min chunk when
    the batch is too small for min_chunk per CTA; 0 = min_chunk>e<0|1 refill before an item's merge>
    g<0|1 programmatic dependent launch>w<0|1 the narrow (32-bit offset) tensor-core loader>a<0|1 the
    planner in whole kernel tiles>h<0|128|256 L2 prefetch size hint of the tensor-core K/V copies>f<tiles
    prefetched into L2 before the PDL wait>"
    (any part optional), read by kvattn when an attention is created. Or "@NAME=VALUE": that one environment
    variable (VALUE "@FILE": the file's text), e.g. "@KVATTN_DECODE_MIN_CHUNK=512"."""
    import re
    if cfg.startswith("@"):
        name, value = cfg[1:].split("=", 1)
        if value.startswith("@"):
            value = open(value[1:]).read().strip()
        saved = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved
    keys = {"s": ("KVATTN_DECODE_STAGES", "KVATTN_DECODE_TC_STAGES"), "c": ("KVATTN_DECODE_CTAS_PER_SM",),
            "m": ("KVATTN_DECODE_MIN_CHUNK",), "i": ("KVATTN_DECODE_ITEM_COST",), "t": ("KVATTN_DECODE_PATH",),
            "p": ("KVATTN_DECODE_PIPE",), "n": ("KVATTN_DECODE_MIN_CHUNK_SMALL",),
            "e": ("KVATTN_DECODE_EARLY_REFILL",), "g": ("KVATTN_DECODE_PDL",), "w": ("KVATTN_DECODE_NARROW",),
            "a": ("KVATTN_DECODE_TILE_PLAN",), "h": ("KVATTN_DECODE_L2_PREFETCH",),
            "f": ("KVATTN_DECODE_EARLY_PREFETCH",)}
    saved = {k: os.environ.get(k) for ks in keys.values() for k in ks}
    try:
        for letter, value in re.findall(r"([scmitpnegwahf])(\d+)", cfg):
            for k in keys[letter]:
                os.environ[k] = ({"0": "cc", "1": "tc"}[value] if letter == "t" else value)
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_flashinfer(P, fi, tc, workspace):
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, LAYOUT, use_tensor_cores=tc)
    w.plan(P.indptr_d, P.indices, P.last_d, P.qo, P.kv, P.d, P.page, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16)
    out = w.run(P.q[0], (P.k[0], P.v[0]))
    torch.cuda.synchronize()
    err = rel_err(out, P.ref)
    outs = [torch.empty_like(out) for _ in range(P.copies)]
    t, how = time_calls(lambda i: w.run(P.q[i], (P.k[i], P.v[i]), out=outs[i]), P.copies)
    return {"us": t * 1e6, "relerr": err, "timing": how}


def bench_triton(P, TritonDecode):
    td = TritonDecode(P.qo, P.kv, P.d, P.page, splits=8)
    td.plan(P.indptr_d, P.indices, P.lens_d)
    out = torch.empty(P.batch, P.qo, P.d, dtype=torch.bfloat16, device="cuda")
    td.run(P.q[0], P.k[0], P.v[0], out)
    torch.cuda.synchronize()
    err = rel_err(out, P.ref)
    outs = [torch.empty_like(out) for _ in range(P.copies)]
    t, how = time_calls(lambda i: td.run(P.q[i], P.k[i], P.v[i], outs[i]), P.copies)
    return {"us": t * 1e6, "relerr": err, "timing": how}


def warmup_peers():
    """Compile FlashInfer's decode modules (CUDA-core and tensor-core, bf16, head_dim 128) on a tiny
    problem, so that a later benchmark run in the same machine finds them in its JIT cache. Started in
    the background by scripts/gpu-check.sh while the tests run."""
    import flashinfer as fi
    ws = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    indptr = torch.tensor([0, 4, 8], dtype=torch.int32, device="cuda")
    indices = torch.arange(8, dtype=torch.int32, device="cuda")
    last = torch.tensor([16, 16], dtype=torch.int32, device="cuda")
    k = torch.randn(8, 16, 8, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(2, 32, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    for tc in (False, True):
        t0 = time.time()
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        w.plan(indptr, indices, last, 32, 8, HEAD_DIM, 16, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        w.run(q, (k, v))
        torch.cuda.synchronize()
        log("flashinfer decode tc=%d ready (%.0f s)" % (tc, time.time() - t0))


def main():
    if "--warmup-peers" in sys.argv:
        return warmup_peers()
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="page 16 only, fewer workloads")
    ap.add_argument("--only", default=None, help="workloads, comma-separated: a full name, or a substring of names")
    ap.add_argument("--pages", default=None, help="page sizes to run, e.g. 1 or 1,16 (default: each workload's)")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--tc", action="store_true", help="also kvattn's tensor-core path (the prefill kernel)")
    ap.add_argument("--sweep", default=None, help="extra kvattn configurations, e.g. s8c1,s3c3,m128")
    ap.add_argument("--layout", default="NHD", choices=("NHD", "HND"),
                    help="the KV cache layout (HND: each page's head contiguous; Triton takes NHD only)")
    args = ap.parse_args()
    global LAYOUT
    LAYOUT = args.layout
    if LAYOUT == "HND":
        args.no_triton = True

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    props = torch.cuda.get_device_properties(0)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "head_dim": HEAD_DIM, "dtype": "bfloat16", "layout": LAYOUT, "workloads": {}}
    import kvattn
    result["kvattn"] = kvattn.__version__ if hasattr(kvattn, "__version__") else "?"
    fi = None
    if not args.no_flashinfer:
        try:
            os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/fi_ws")
            import flashinfer as fi
            result["flashinfer"] = fi.__version__
        except Exception as e:
            result["flashinfer_error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
            log("FlashInfer cannot be imported: " + result["flashinfer_error"])
            fi = None
    TritonDecode = None
    if not args.no_triton:
        from triton_decode import TritonDecode
    bw = copy_bandwidth()
    result["copy_TBps"] = bw
    log("device %s, copy bandwidth %.3f TB/s (read+write)" % (props.name, bw))
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda") if fi else None  # FlashInfer wants zeros

    rows = []
    names = [w[0] for w in WORKLOADS]
    for name, batch, lens, qo, kv, pages in WORKLOADS:
        # a full workload name selects that one; any other text, the names containing it
        if args.only and not any(o == name or (o not in names and o in name) for o in args.only.split(",")):
            continue
        if args.quick and name not in ("b1_L4096", "b16_L4096", "b64_L4096", "b64_Lskewed", "b256_L2048"):
            continue
        for page in (pages[:1] if args.quick else pages):
            if args.pages and str(page) not in args.pages.split(","):
                continue
            key = "%s_p%d" % (name, page)
            t0 = time.time()
            P = Problem(name, batch, lens, qo, kv, page, rng)
            P.ref = P.reference()
            entry = {"batch": batch, "qo_heads": qo, "kv_heads": kv, "page_size": page,
                     "kv_tokens": int(P.lens.sum()), "max_len": int(P.lens.max()), "bytes": P.bytes,
                     "copies": P.copies}
            contenders = [("kvattn", lambda: bench_kvattn(P, kvattn))]
            for cfg in (args.sweep.split(",") if args.sweep else []):
                contenders.append(("kvattn[%s]" % cfg, lambda cfg=cfg: with_env(cfg, lambda: bench_kvattn(P, kvattn))))
            if args.tc:
                contenders.append(("kvattn_tc", lambda: bench_kvattn(P, kvattn, True)))
            if fi is not None:
                contenders.append(("flashinfer_tc1", lambda: bench_flashinfer(P, fi, True, workspace)))
                if qo == 32 and kv == 8:
                    contenders.append(("flashinfer_tc0", lambda: bench_flashinfer(P, fi, False, workspace)))
            if TritonDecode is not None:
                contenders.append(("triton", lambda: bench_triton(P, TritonDecode)))
            for cname, fn in contenders:
                try:
                    r = fn()
                    r["TBps"] = P.bytes / (r["us"] * 1e-6) / 1e12
                    r["frac_copy"] = r["TBps"] / bw
                except Exception as e:
                    r = {"error": "".join(traceback.format_exception_only(type(e), e)).strip()[:500]}
                    log("  %s %s: %s" % (key, cname, r["error"]))
                entry[cname] = r
                torch.cuda.synchronize()
            fis = [entry[c]["us"] for c in ("flashinfer_tc1", "flashinfer_tc0") if c in entry and "us" in entry[c]]
            if fis and "us" in entry["kvattn"]:
                entry["flashinfer_best_us"] = min(fis)
                entry["kvattn_vs_flashinfer"] = min(fis) / entry["kvattn"]["us"]  # > 1: kvattn faster
            result["workloads"][key] = entry
            line = "%-22s" % key
            for cname in [c for c, _ in contenders]:
                r = entry.get(cname)
                if r and "us" in r:
                    line += "  %s %8.1f us %5.2f TB/s err %.1e" % (cname, r["us"], r["TBps"], r["relerr"])
            log(line + "  (%.0fs)" % (time.time() - t0))
            P.free()
            del P
            torch.cuda.empty_cache()
            if args.json:  # after every row: a run cut short keeps what it measured
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    # the summary table, last
    log("\n| workload | kvattn us | TB/s | of copy | FlashInfer best us | kvattn speedup | Triton us | err |")
    log("|---|---|---|---|---|---|---|---|")
    for key, e in result["workloads"].items():
        k = e.get("kvattn", {})
        t = e.get("triton", {})
        if "us" not in k:
            log("| %s | error: %s |" % (key, k.get("error", "?")[:80]))
            continue
        log("| %s | %.1f | %.2f | %.0f%% | %s | %s | %s | %.1e |" % (
            key, k["us"], k["TBps"], 100 * k["frac_copy"],
            "%.1f" % e["flashinfer_best_us"] if "flashinfer_best_us" in e else "-",
            "%.2fx" % e["kvattn_vs_flashinfer"] if "kvattn_vs_flashinfer" in e else "-",
            "%.1f" % t["us"] if "us" in t else "-", k["relerr"]))


if __name__ == "__main__":
    main()
