#!/usr/bin/env python3
"""What a decode launch's streaming part would take under other ways of sharing its tiles, with each CTA
streaming at the rate a trace measured for it (KVATTN_DECODE_TRACE; bench/decode_trace.py).

    python3 bench/decode_balance_sim.py bench/results/logs/decode-trace-h200-20261203T1935-tr-b64-L4096.txt

Measured since (docs/perf.md, sixth session): the split by rate, built with the kernel's own traced rates as
weights, gained nothing (b64 x 4096 254.7 vs 253.8 us): the rates are not fixed, the fast SMs win a shared
bandwidth. A model, not a measurement: a CTA's rate is taken as fixed (it is not when the fast SMs get more work
and DRAM saturates: --dram-tbs caps the result at the bytes over that read rate), every extra item costs
--item-us of that CTA's time (the epilogue and the merge that a cut adds), and:
  equal      every CTA the same tiles (kvattn today): the slowest CTA ends the launch
  by rate    each CTA's tiles in proportion to its rate (a split weighted by SM speed)
  stealing   each CTA first runs a static part (a fraction of the equal share), then pops pieces of
             --piece tiles from a shared queue until it is empty (the greedy order of a global atomic)
"""
import argparse
import heapq
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_trace import TILES, clock_ghz, read_trace, streaming_rates, working  # noqa: E402


def load(path):
    """Each CTA's streaming rate (tiles per us) and the tiles they stream, from a trace."""
    work = working(read_trace(path)[1])
    rated = streaming_rates(work, clock_ghz(work)[0])
    if not rated:
        raise SystemExit("no CTA with 8 tiles or more in the trace")
    return [r for _, r in rated], sum(c[TILES] - 1 for c, _ in rated)


def stealing(rates, tiles, static_frac, piece, item_us):
    n = len(rates)
    share = tiles / n
    static = static_frac * share
    pool = tiles - static * n
    pieces = int(pool // piece) + (1 if pool % piece else 0)
    # each CTA's clock after its static part (one item), then greedy pops
    heap = [(static / r + item_us, i) for i, r in enumerate(rates)]
    heapq.heapify(heap)
    end = 0.0
    left = pool
    for _ in range(pieces):
        t, i = heapq.heappop(heap)
        size = min(piece, left)
        left -= size
        t += size / rates[i] + item_us
        end = max(end, t)
        heapq.heappush(heap, (t, i))
    return max(end, max(t for t, _ in heap))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--item-us", type=float, default=1.0, help="cost of one more item on a CTA, us")
    ap.add_argument("--tile-kb", type=float, default=32.0, help="K+V bytes of one tile, KB (64 tokens x 128 x bf16 x 2)")
    ap.add_argument("--dram-tbs", type=float, default=4.6, help="DRAM read rate that caps any split, TB/s")
    a = ap.parse_args()
    rates, tiles = load(a.trace)
    n = len(rates)
    floor = tiles * a.tile_kb * 1024 / (a.dram_tbs * 1e12) * 1e6
    equal = max((tiles / n) / r for r in rates)
    by_rate = tiles / sum(rates)
    print(f"{n} CTAs, {tiles} tiles after each CTA's first; DRAM floor at {a.dram_tbs} TB/s: {floor:.1f} us")
    print(f"equal split: {equal:.1f} us; split by rate: {max(by_rate, floor):.1f} us ({by_rate:.1f} uncapped)")
    print(f"\nwork stealing (item cost {a.item_us} us), us, capped at the DRAM floor:")
    fracs = [0.5, 0.7, 0.8, 0.9]
    print("| piece (tiles) | " + " | ".join(f"static {f:.0%}" for f in fracs) + " |")
    print("|---|" + "---|" * len(fracs))
    for piece in [2, 4, 8, 16, 32]:
        row = [max(floor, stealing(rates, tiles, f, piece, a.item_us)) for f in fracs]
        print(f"| {piece} | " + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
    main()
