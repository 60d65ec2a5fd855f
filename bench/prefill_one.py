"""Run one prefill workload through kvattn a few times (for Nsight Compute or a quick timing).

    python3 bench/prefill_one.py --batch 4 --len 4096 --format ragged|paged16|paged1 [--full] [--reps N]
        [--flashinfer fa2|fa3]
Prints the median time and TFLOP/s of the calls (CUDA events); with --flashinfer, of FlashInfer's kernel
on the same problem instead (for a side-by-side profile).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prefill  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--len", type=int, default=4096)
    ap.add_argument("--qo", type=int, default=0, help="query tokens per request (default: --len)")
    ap.add_argument("--format", default="ragged")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flashinfer", metavar="BACKEND", help="run FlashInfer (fa2 or fa3) instead of kvattn")
    a = ap.parse_args()
    qo = a.qo or a.len
    w = prefill.Workload("one", [qo] * a.batch, [a.len] * a.batch, not a.full)
    P = 16 if a.format == "paged16" else 1
    t = w.tensors(P)
    if a.flashinfer:
        fn, _ = prefill.run_flashinfer(w, t, a.format, P, a.flashinfer)
    else:
        fn, _ = prefill.run_kvattn(w, t, a.format, P)
    ms = prefill.median_ms(fn, warmup=1, reps=a.reps)
    print("prefill_one %s%s b%d qo%d kv%d %s: %.3f ms, %.0f TFLOP/s" %
          ("flashinfer-%s " % a.flashinfer if a.flashinfer else "", a.format, a.batch, qo, a.len,
           "full" if a.full else "causal", ms, w.flops / (ms * 1e-3) / 1e12))


if __name__ == "__main__":
    main()
