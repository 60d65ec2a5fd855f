"""Same-process A/B of prefill knobs (environment variables read when an attention is created): every
workload timed under the default and under each configuration, alternating, for several rounds, with
FlashInfer (fa2) on the same problems when it is importable. One process, so the order of the runs,
not the Python start-up, decides what shares the GPU's state.

    python3 bench/prefill_ab.py --configs "KVATTN_PREFILL_ROWSUM_MMA=1" [--rounds 2] [--reps 9] [--no-flashinfer]
        [--calls 8] [--work 32x512,16x1024c:paged16] [--only TEXT] [--host]
A configuration is "NAME=V[,NAME=V...]"; several are separated by spaces. Prints one line per timing
(TFLOP/s) and a table of medians over the rounds last.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prefill  # noqa: E402

WORK = [  # (label, batch, length, causal, format)
    ("full 16x1024 ragged", 16, 1024, False, "ragged"),
    ("full 4x4096 ragged", 4, 4096, False, "ragged"),
    ("full 1x16384 ragged", 1, 16384, False, "ragged"),
    ("full 4x4096 paged16", 4, 4096, False, "paged16"),
    ("causal 16x1024 ragged", 16, 1024, True, "ragged"),
    ("causal 4x4096 ragged", 4, 4096, True, "ragged"),
    ("causal 4x4096 paged16", 4, 4096, True, "paged16"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="", help="configurations besides the default (none: the default alone)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--calls", type=int, default=1, help="back-to-back calls per timed sample (bench/prefill.py median_ms)")
    ap.add_argument("--only", default=None, help="workloads whose label contains this")
    ap.add_argument("--host", action="store_true", help="first, the host time per run() call of each contender")
    ap.add_argument("--work", default=None,
                    help="workloads instead of the built-in list: BxL[c][:FORMAT],... e.g. 32x512,16x1024c:paged16 "
                         "(c: causal; FORMAT ragged (default), paged16, paged1)")
    a = ap.parse_args()
    configs = [("default", {})] + [(c, dict(kv.split("=", 1) for kv in c.split(","))) for c in a.configs.split()]
    fi = not a.no_flashinfer
    if fi:
        try:
            import flashinfer  # noqa: F401
        except Exception as e:  # noqa: BLE001
            print("flashinfer not importable: %s" % e)
            fi = False
    work = WORK
    if a.work:
        work = []
        for spec in a.work.split(","):
            shape, _, fmt = spec.partition(":")
            causal = shape.endswith("c")
            b, L = (int(x) for x in shape.rstrip("c").split("x"))
            fmt = fmt or "ragged"
            work.append(("%s %dx%d %s" % ("causal" if causal else "full", b, L, fmt), b, L, causal, fmt))
    work = [w for w in work if a.only is None or a.only in w[0]]
    if a.host:  # a small problem (the GPU keeps up): the wrappers' own cost per call
        w = prefill.Workload("host", [128] * 2, [128] * 2, False)
        t = w.tensors(1)
        for name, env in list(configs) + ([("flashinfer fa2", None)] if fi else []):
            if env is None:
                fn, _ = prefill.run_flashinfer(w, t, "ragged", 1, "fa2")
            else:
                fn, _ = prefill.with_env(env, lambda: prefill.run_kvattn(w, t, "ragged", 1))
            print("host time per run() call, %-36s %6.1f us" % (name, prefill.host_us(fn)), flush=True)
        del t
    res = {}
    for r in range(a.rounds):
        for label, b, L, causal, fmt in work:
            w = prefill.Workload(label, [L] * b, [L] * b, causal)
            P = 16 if fmt == "paged16" else 1
            t = w.tensors(P)
            subjects = list(configs) + ([("flashinfer fa2", None)] if fi and r == 0 else [])
            for name, env in subjects:
                if env is None:
                    fn, _ = prefill.run_flashinfer(w, t, fmt, P, "fa2")
                else:
                    fn, _ = prefill.with_env(env, lambda: prefill.run_kvattn(w, t, fmt, P))
                ms = prefill.median_ms(fn, warmup=2, reps=a.reps, calls=a.calls)
                tf = w.flops / (ms * 1e-3) / 1e12
                res.setdefault(label, {}).setdefault(name, []).append(tf)
                print("round %d  %-24s %-36s %7.3f ms %5.0f TFLOP/s" % (r, label, name, ms, tf), flush=True)
            del t
    names = [n for n, _ in configs] + (["flashinfer fa2"] if fi else [])
    print("\n| workload | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("(%d call%s per timed sample)" % (a.calls, "s" if a.calls > 1 else ""))
    for label, *_ in work:
        cells = ["%.0f" % statistics.median(res[label][n]) if n in res.get(label, {}) else "-" for n in names]
        print("| %s | %s |" % (label, " | ".join(cells)))


if __name__ == "__main__":
    main()
