#!/usr/bin/env python3
"""Each SM's decode streaming rate from a traced launch (KVATTN_DECODE_TRACE; bench/decode_trace.py), beside the
rates the SM rate probe measured (KVATTN_DECODE_SM_RATES_PRINT=1 output of src/gpu_sm_rate.c), and the weights a
trace implies, as a KVATTN_DECODE_SM_WEIGHTS list.

    python3 bench/sm_rates.py TRACE [--probe NAME=FILE ...] [--weights-out FILE]

For each probe: the correlation of its per-SM rates with the trace's, the spread of each (max / median), and how
many of the trace's fast SMs (>= 1.08x the median) are among the probe's fastest of the same count.
"""
import argparse
import os
import re
import statistics as st
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_trace import SM, clock_ghz, read_trace, streaming_rates, working  # noqa: E402


def trace_rates(path):
    work = working(read_trace(path)[1])
    rated = streaming_rates(work, clock_ghz(work)[0])
    by_sm = {}
    for c, r in rated:
        by_sm.setdefault(c[SM], []).append(r)
    return {s: st.mean(v) for s, v in by_sm.items()}


def probe_rates(path):
    out = {}
    for line in open(path):
        m = re.search(r"SM rate: SM\s+(\d+)\s+([\d.]+) GB/s", line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


def corr(a, b):
    ma, mb = st.mean(a), st.mean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return num / den if den else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--probe", action="append", default=[], help="NAME=FILE with the probe's printed rates")
    ap.add_argument("--weights-out", help="write the trace's weights (rate / median) here, ':'-separated")
    ap.add_argument("--sms", type=int, default=0, help="SMs of the device (default: the largest id seen + 1)")
    a = ap.parse_args()
    tr = trace_rates(a.trace)
    if not tr:
        raise SystemExit("no rated CTA in the trace")
    med = st.median(tr.values())
    fast = sorted(s for s, r in tr.items() if r >= 1.08 * med)
    print(f"trace: {len(tr)} SMs rated, max / median {max(tr.values()) / med:.3f}, "
          f"{len(fast)} at >= 1.08x: {fast}")
    for spec in a.probe:
        name, path = spec.split("=", 1)
        pr = probe_rates(path)
        common = sorted(set(pr) & set(tr))
        if len(common) < 3:
            print(f"probe {name}: {len(pr)} SMs, too few in common")
            continue
        pm = st.median(pr[s] for s in common)
        top = set(sorted(common, key=lambda s: -pr[s])[:len(fast)]) if fast else set()
        print(f"probe {name}: corr {corr([pr[s] for s in common], [tr[s] for s in common]):+.3f}, "
              f"max / median {max(pr[s] for s in common) / pm:.3f}, fast SMs found {len(top & set(fast))} of "
              f"{len(fast)}")
    if a.weights_out:
        n = a.sms or max(tr) + 1
        w = [tr.get(s, med) / med for s in range(n)]
        with open(a.weights_out, "w") as f:
            f.write(":".join(f"{x:.3f}" for x in w))
        print(f"weights for {n} SMs written to {a.weights_out}")


if __name__ == "__main__":
    main()
