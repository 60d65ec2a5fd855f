#!/usr/bin/env python3
"""kvattn's CPU fast path against PyTorch's CPU scaled_dot_product_attention, same shapes, same machine.

kvattn is timed through its CLI (`kvattn bench decode|prefill --backend cpu --json FILE`): the median
of --iters runs of kvattn_run over a paged cache (page_size 16, pages in a random order, plan excluded).
PyTorch gets dense, contiguous [batch, heads, tokens, head_dim] tensors (the easiest case for it) and
is timed the same way (median of --iters calls after one warm-up), with torch.set_num_threads equal to
kvattn's thread count. Each workload is measured in --rounds rounds, kvattn and PyTorch alternating,
and the best round's median is kept for each: on a machine shared with other work, the best round is
the one least disturbed, and alternating gives both sides the same chances. Two PyTorch variants: `enable_gqa=True` (the same 8 KV heads kvattn reads), and
the KV heads expanded to 32 beforehand (outside the timing: PyTorch's fastest path, 4x the KV bytes).

Shapes: Llama-3.1-8B attention heads (32 query heads, 8 KV heads, head_dim 128), sizes that run in
seconds on a 2-core machine. Causal prefill has qo_len == kv_len, where PyTorch's top-left causal mask
and kvattn's bottom-right one agree.

Usage: python3 bench/cpu_vs_torch.py [--kvattn build/kvattn] [--threads N] [--iters N] [--rounds N]
         [--json bench/results/cpu_vs_torch.json] [--quick]
Prints a markdown table (for docs/perf.md) and writes the JSON.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128

# (op, batch, kv_len, qo_len)
WORKLOADS = [
    ("decode", 1, 4096, 1),
    ("decode", 16, 4096, 1),
    ("decode", 64, 1024, 1),
    ("decode", 1, 32768, 1),
    ("prefill", 1, 512, 512),
    ("prefill", 1, 2048, 2048),
    ("prefill", 4, 1024, 1024),
]
QUICK = [("decode", 16, 4096, 1), ("prefill", 1, 512, 512)]


def find_cli(given):
    if given:
        return given
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in sorted(os.listdir(root)):
        p = os.path.join(root, d, "kvattn")
        if d.startswith("build") and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    sys.exit("cpu_vs_torch: no kvattn CLI found under build*/; build it or pass --kvattn PATH")


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache",
                             "Hypervisor vendor"):
                info[k.strip()] = v.strip()
        flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16") if f" {f} " in out]
        info["flags"] = " ".join(flags)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def run_kvattn(cli, op, batch, kv_len, qo_len, dtype, threads, iters):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [cli, "bench", op, "--backend", "cpu", "--batch", str(batch), "--kv-len", str(kv_len),
           "--qo-heads", str(HEADS_Q), "--kv-heads", str(HEADS_KV), "--head-dim", str(HEAD_DIM),
           "--dtype", dtype, "--threads", str(threads), "--iters", str(iters), "--json", path]
    if op == "prefill":
        cmd += ["--qo-len", str(qo_len), "--causal"]
    try:
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        with open(path) as f:
            return json.load(f)
    except subprocess.CalledProcessError as e:
        sys.exit(f"cpu_vs_torch: {' '.join(cmd)} failed ({e.returncode}):\n{e.stderr}")
    finally:
        os.unlink(path)


def time_torch(torch, batch, kv_len, qo_len, dtype, iters, expand):
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, HEADS_Q, qo_len, HEAD_DIM, generator=g).to(dt)
    k = torch.randn(batch, HEADS_KV, kv_len, HEAD_DIM, generator=g).to(dt)
    v = torch.randn(batch, HEADS_KV, kv_len, HEAD_DIM, generator=g).to(dt)
    causal = qo_len > 1
    if expand:  # outside the timing: PyTorch's best case
        k = k.repeat_interleave(HEADS_Q // HEADS_KV, dim=1).contiguous()
        v = v.repeat_interleave(HEADS_Q // HEADS_KV, dim=1).contiguous()
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    with torch.inference_mode():
        fn()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvattn", help="path of the kvattn CLI (default: build*/kvattn)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best median is kept")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--quick", action="store_true", help="two workloads only")
    ap.add_argument("--json", default=None, help="results file (default bench/results/cpu_vs_torch-<date>.json)")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("cpu_vs_torch: PyTorch is not installed (pip install torch)")
    torch.set_num_threads(args.threads)
    cli = find_cli(args.kvattn)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for dtype in args.dtypes.split(","):
        for op, batch, kv_len, qo_len in (QUICK if args.quick else WORKLOADS):
            kv, t_gqa, t_exp = None, float("inf"), float("inf")
            for _ in range(args.rounds):
                k = run_kvattn(cli, op, batch, kv_len, qo_len, dtype, args.threads, args.iters)
                if kv is None or k["run_us"] < kv["run_us"]:
                    kv = k
                t_gqa = min(t_gqa, time_torch(torch, batch, kv_len, qo_len, dtype, args.iters, expand=False))
                t_exp = min(t_exp, time_torch(torch, batch, kv_len, qo_len, dtype, args.iters, expand=True))
            row = {"op": op, "batch": batch, "kv_len": kv_len, "qo_len": qo_len, "dtype": dtype,
                   "kvattn_us": kv["run_us"], "kvattn_gb_per_s": kv["gb_per_s"], "kvattn_tflop_per_s": kv["tflop_per_s"],
                   "flops": kv["flops"], "bytes": kv["bytes"],
                   "torch_gqa_us": t_gqa, "torch_expanded_us": t_exp}
            rows.append(row)
            print(f"{op:8s} b={batch:<3d} kv={kv_len:<6d} qo={qo_len:<5d} {dtype:5s} kvattn {kv['run_us'] / 1e3:9.2f} ms"
                  f"  torch(gqa) {t_gqa / 1e3:9.2f} ms  torch(expanded) {t_exp / 1e3:9.2f} ms", flush=True)

    print(f"\n{when}, {machine().get('Model name', '?')}, {args.threads} threads, torch {torch.__version__}, "
          f"kvattn {kv['version']} ({cli})\n")
    print("| workload | dtype | kvattn | GB/s | GFLOP/s | torch SDPA (enable_gqa) | torch SDPA (KV expanded) | speed-up vs best torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = (f"decode b={r['batch']}, kv {r['kv_len']}" if r["op"] == "decode"
                else f"prefill causal {r['batch']} x {r['qo_len']}")
        best = min(r["torch_gqa_us"], r["torch_expanded_us"])
        print(f"| {name} | {r['dtype']} | {r['kvattn_us'] / 1e3:.2f} ms | {r['kvattn_gb_per_s']:.1f} | "
              f"{r['kvattn_tflop_per_s'] * 1e3:.1f} | {r['torch_gqa_us'] / 1e3:.2f} ms | {r['torch_expanded_us'] / 1e3:.2f} ms | "
              f"{best / r['kvattn_us']:.2f}x |")

    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"cpu_vs_torch-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"tool": "bench/cpu_vs_torch.py", "date": when, "machine": machine(), "threads": args.threads,
                   "iters": args.iters, "rounds": args.rounds, "statistic": "best round's median", "torch": torch.__version__, "kvattn_cli": cli, "rows": rows}, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
