"""Markdown table of a bench/decode.py JSON result (for docs/perf.md).

    python3 bench/decode_table.py bench/results/decode-h100-*.json
"""
import json
import sys


def fmt(x, f="%.1f"):
    return "-" if x is None else f % x


def main(path):
    r = json.load(open(path))
    bw = r["copy_TBps"]
    print("%s, %s, copy bandwidth %.2f TB/s (read + write), FlashInfer %s" % (
        r["date"], r["device"], bw, r.get("flashinfer", "not run: " + r.get("flashinfer_error", "?")[:120])))
    print()
    has_tc = any("us" in e.get("kvattn_tc", {}) for e in r["workloads"].values())
    print("| workload | floor us | kvattn us | TB/s | of copy | FlashInfer best us (path) | FI / kvattn | " +
          ("kvattn tensor-core us | " if has_tc else "") + "Triton us |")
    print("|---|---|---|---|---|---|---|" + ("---|" if has_tc else "") + "---|")
    for key, e in r["workloads"].items():
        k = e.get("kvattn", {})
        floor = e["bytes"] / (bw * 1e12) * 1e6
        fis = [(e[c]["us"], c[-3:]) for c in ("flashinfer_tc1", "flashinfer_tc0") if "us" in e.get(c, {})]
        fi = min(fis) if fis else None
        tc = e.get("kvattn_tc", {}).get("us")
        tr = e.get("triton", {}).get("us")
        if "us" not in k:
            print("| %s | %.1f | error: %s |" % (key, floor, k.get("error", "?")[:60]))
            continue
        print("| %s | %.1f | %.1f | %.2f | %.0f%% | %s | %s | %s%s |" % (
            key, floor, k["us"], k["TBps"], 100 * k["frac_copy"],
            "%.1f (%s)" % fi if fi else "-", "%.2fx" % (fi[0] / k["us"]) if fi else "-",
            fmt(tc) + " | " if has_tc else "", fmt(tr)))
    sweeps = sorted({c for e in r["workloads"].values() for c in e if c.startswith("kvattn[")})
    if sweeps:
        print()
        print("| workload | kvattn (default) us | " + " | ".join(sweeps) + " |")
        print("|---|---|" + "---|" * len(sweeps))
        for key, e in r["workloads"].items():
            print("| %s | %s | %s |" % (key, fmt(e.get("kvattn", {}).get("us")),
                                       " | ".join(fmt(e.get(c, {}).get("us")) for c in sweeps)))


if __name__ == "__main__":
    main(sys.argv[1])
