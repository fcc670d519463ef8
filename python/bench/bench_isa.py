# SPDX-License-Identifier: Apache-2.0
"""Decode attention of one spec in every ISA configuration the module carries, as a speed-up over
the module's baseline build (SSE2 on x86-64).

One cache per configuration (KVC_ISA names it), the same tokens and query in each; per repetition
every configuration runs `--calls` calls of `cache._bench_decode` (the C++ loop, so Python's call
overhead is out of the figure), in an order that rotates between repetitions. The figure printed
per configuration is the median over repetitions of baseline time / its time, taken in the same
repetition, so machine noise common to a repetition cancels. Ratios only.

    python bench/bench_isa.py [--spec "snapkv(ratio=0.5)+d2o"] [--tokens 4096] [--reps 15] [--calls 20]
"""
import argparse
import os
import statistics
import time

import numpy as np

import kvc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="snapkv(ratio=0.5)+d2o", help="cache spec (default: a merged cache)")
    ap.add_argument("--tokens", type=int, default=4096, help="context length (default 4096)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15, help="repetitions (default 15)")
    ap.add_argument("--calls", type=int, default=20, help="calls per repetition and configuration (default 20)")
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    shape = (a.tokens, a.kv_heads, a.head_dim)
    k, v = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    q = rng.standard_normal((a.q_heads, a.head_dim), dtype=np.float32)
    base = kvc.isa()  # the module's own build
    caches = {}
    for isa in [base] + [i for i in kvc.isa_variants() if i != base]:
        os.environ["KVC_ISA"] = isa
        c = kvc.Cache(a.spec, num_layers=1, num_kv_heads=a.kv_heads, head_dim=a.head_dim, num_q_heads=a.q_heads)
        s = c.add_sequence()
        c.append(s, 0, k, v)
        caches[isa] = (c, s)
    os.environ.pop("KVC_ISA")

    def run(isa):
        c, s = caches[isa]
        t0 = time.perf_counter()
        c._bench_decode(s, 0, q, a.calls)
        return time.perf_counter() - t0

    names = list(caches)
    for n in names:
        run(n)  # warm up
    speedup = {n: [] for n in names}
    for r in range(a.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        t = {n: run(n) for n in order}
        for n in names:
            speedup[n].append(t[base] / t[n])
    print(f"decode attention, {a.spec}, {a.tokens} tokens, {a.q_heads} q heads / {a.kv_heads} kv heads x {a.head_dim}: "
          f"speed-up over the baseline {base}, median of {a.reps} repetitions of {a.calls} calls")
    for n in names:
        x = sorted(speedup[n])
        print(f"  {n:24s} {statistics.median(x):6.2f}x  (min {x[0]:.2f}, max {x[-1]:.2f})")


if __name__ == "__main__":
    main()
