#!/usr/bin/env python3
"""Read a decode launch's per-CTA phase trace (KVATTN_DECODE_TRACE=file; kernels/decode_paged.cu,
DECODE_TRACE) and print where the launch's time goes.

    KVATTN_DECODE_TRACE=/tmp/t.txt kvattn bench decode --batch 1 --kv-len 4096
    python3 bench/decode_trace.py /tmp/t.txt [--mhz 1980]

Each CTA's thread 0 wrote %globaltimer (ns) at entry and exit and clock64 at: entry, after the
programmatic-launch wait (the kernel before it has completed), when its first K/V tile had landed,
at its last item's end (before the partial state is written), after publishing a split piece (the
atomic), after merging a split (the CTA that completed it), and at exit. Cycles become ns at the SM
clock: --mhz, else each CTA's own clock64 / globaltimer ratio over its life (the median of them).
Times on the launch's axis are ns after the earliest CTA entry.
"""
import argparse
import statistics as st


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def row(name, xs, unit="ns"):
    if not xs:
        print(f"| {name} | - | - | - | - | 0 |")
        return
    print(f"| {name} | {pct(xs, 0.5):.0f} | {pct(xs, 0.1):.0f} | {pct(xs, 0.9):.0f} | {max(xs):.0f} | {len(xs)} |")


# the words of a CTA's line (kernels/decode_paged.cu, TR_*)
GT0, GT1, CE, CW, CF, CL, CP, CM, CX, SM, TILES, ITEMS = range(12)


def read_trace(path):
    """(header line, [12 words per CTA])"""
    ctas, header = [], ""
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                header = line.strip()
                continue
            w = [int(x) for x in line.split()]
            if len(w) in (12, 13):  # 13: the sixth session's weighted-list builds added the list run
                ctas.append(w[:12])
    return header, ctas


def working(ctas):
    """The CTAs that had work (they passed the wait and exited)."""
    return [c for c in ctas if c[CW] != 0 and c[CX] != 0]


def clock_ghz(work, mhz=0.0):
    """(SM clock in GHz, how it was found): given, else each CTA's clock64 / globaltimer over its life."""
    if mhz > 0:
        return mhz / 1000.0, "given"
    ratios = [(c[CX] - c[CE]) / (c[GT1] - c[GT0]) for c in work if c[GT1] - c[GT0] >= 2000]
    if not ratios:
        return 1.98, "assumed"
    return st.median(ratios), f"median clock64/globaltimer of {len(ratios)} CTAs"


def streaming_rates(work, ghz, min_tiles=8):
    """[(CTA, tiles per us after its first tile)] for the CTAs with at least min_tiles tiles."""
    return [(c, (c[TILES] - 1) / ((c[CL] - c[CF]) / ghz / 1000.0)) for c in work
            if c[CF] and c[CL] > c[CF] and c[TILES] >= min_tiles]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--mhz", type=float, default=0.0, help="SM clock in MHz (default: from the trace)")
    a = ap.parse_args()
    header, ctas = read_trace(a.trace)
    work = working(ctas)
    print(header)
    print(f"CTAs: {len(ctas)}, with work: {len(work)}, without: {len(ctas) - len(work)}")
    if not work:
        return
    ghz, how = clock_ghz(work, a.mhz)
    print(f"SM clock {ghz * 1000:.0f} MHz ({how})")
    ns = lambda cyc: cyc / ghz
    t0 = min(c[GT0] for c in ctas)

    def at(c, word):  # a clock64 mark on the launch's axis
        return c[GT0] - t0 + ns(c[word] - c[CE])

    print("\n| phase (per CTA) | median ns | p10 | p90 | max | CTAs |")
    print("|---|---|---|---|---|---|")
    row("entry, on the launch's axis", [c[GT0] - t0 for c in work])
    row("entry -> the wait returned (PDL)", [ns(c[CW] - c[CE]) for c in work])
    row("wait -> first K/V tile landed", [ns(c[CF] - c[CW]) for c in work if c[CF]])
    row("first tile -> last item's end", [ns(c[CL] - c[CF]) for c in work if c[CF] and c[CL]])
    pub = [c for c in work if c[CP]]
    row("item end -> piece published (write, fence, atomic)", [ns(c[CP] - c[CL]) for c in pub])
    mer = [c for c in work if c[CM]]
    row("published -> merge done (merging CTAs)", [ns(c[CM] - c[CP]) for c in mer])
    row("last mark -> exit", [ns(c[CX] - max(c[CL], c[CP], c[CM])) for c in work])
    row("exit, on the launch's axis", [c[GT1] - t0 for c in work])
    waited = [at(c, CW) for c in work]
    exits = [c[GT1] - t0 for c in work]
    print(f"\ntiles per CTA: median {st.median([c[TILES] for c in work]):.0f}, max {max(c[TILES] for c in work)}; "
          f"items per CTA: median {st.median([c[ITEMS] for c in work]):.0f}; merging CTAs: {len(mer)}; SMs used: "
          f"{len(set(c[SM] for c in work))}")
    print(f"launch: first entry 0, entries spread {max(c[GT0] for c in ctas) - t0} ns; first wait return "
          f"{min(waited):.0f} ns, last {max(waited):.0f}; exits: first {min(exits)} ns, median {st.median(exits):.0f}, "
          f"last {max(exits)} ns")
    print(f"from the first wait return to the last exit: {max(exits) - min(waited):.0f} ns "
          f"(the launch's own time once the kernel before it has completed)")
    per_tile = [ns(c[CL] - c[CF]) / max(1, c[TILES] - 1) for c in work if c[CF] and c[CL] and c[TILES] > 1]
    if per_tile:
        print(f"per tile after the first (tiles > 1): median {st.median(per_tile):.0f} ns")
    # the balance across SMs: each CTA's streaming rate (tiles after the first per us); with an equal
    # split the launch ends with its slowest CTA, with a split by rate when sum(tiles) / sum(rates)
    rated = streaming_rates(work, ghz)
    if rated:
        by_sm = {}
        for c, r in rated:
            by_sm.setdefault(c[SM], []).append(r)
        sm_rate = {sm: st.mean(v) for sm, v in by_sm.items()}
        med = st.median(sm_rate.values())
        fast = sorted(sm for sm, r in sm_rate.items() if r > 1.1 * med)
        slow = sorted(sm for sm, r in sm_rate.items() if r < 0.9 * med)
        now = max(ns(c[CL] - c[CF]) for c, _ in rated) / 1000.0
        balanced = sum(c[TILES] - 1 for c, _ in rated) / sum(r for _, r in rated)
        print(f"SM rates (tiles/us per CTA): median {med:.3f}; {len(fast)} SMs above 1.1x ({', '.join(map(str, fast))}), "
              f"{len(slow)} below 0.9x")
        # a model with fixed rates: measured in the sixth session, a split weighted by these rates gained nothing
        # (the fast SMs win a shared bandwidth; given more tiles, the others slow down: docs/perf.md)
        print(f"streaming part: {now:.1f} us (the slowest CTA); split by rate, if the rates were fixed: "
              f"{balanced:.1f} us ({100 * (balanced / now - 1):+.1f}%; not reached when tried)")


if __name__ == "__main__":
    main()
