# SPDX-License-Identifier: Apache-2.0
"""Python call overhead of one decode step's attention, as a fraction of the same call from C++.

Both sides run Cache.attention's C++ code on the same cache and query: the Python side calls
`cache.attention(seq, layer, q)` n times from a Python loop (argument checks, the GIL released and
re-taken, a fresh numpy result each call); the C++ side is `cache._bench_decode(seq, layer, q, n)`,
the same call n times in a C++ loop. Repetitions alternate which side runs first; the overhead
printed is the median of the paired ratios python / C++ - 1, so machine noise that hits both
sides of a pair cancels. Ratios only: absolute times depend on the machine.

    python bench/bench_overhead.py [--tokens 4096] [--spec fp16] [--reps 21] [--calls 50]
"""
import argparse
import statistics
import time

import numpy as np

import kvc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="context length (default 4096)")
    ap.add_argument("--spec", default="fp16", help="cache spec (default fp16)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=21, help="paired repetitions (default 21)")
    ap.add_argument("--calls", type=int, default=50, help="calls per repetition and side (default 50)")
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    c = kvc.Cache(a.spec, num_layers=1, num_kv_heads=a.kv_heads, head_dim=a.head_dim, num_q_heads=a.q_heads)
    s = c.add_sequence()
    shape = (a.tokens, a.kv_heads, a.head_dim)
    c.append(s, 0, rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
    q = rng.standard_normal((a.q_heads, a.head_dim), dtype=np.float32)

    def python_side():
        t0 = time.perf_counter()
        for _ in range(a.calls):
            c.attention(s, 0, q)
        return time.perf_counter() - t0

    def cpp_side():
        t0 = time.perf_counter()
        c._bench_decode(s, 0, q, a.calls)
        return time.perf_counter() - t0

    python_side(), cpp_side()  # warm up: pages touched, caches filled
    ratios = []
    for r in range(a.reps):
        if r % 2:
            cpp, py = cpp_side(), python_side()
        else:
            py, cpp = python_side(), cpp_side()
        ratios.append(py / cpp - 1.0)
    ratios.sort()
    print(f"kvc Python overhead per decode attention call: {a.spec}, {a.tokens} tokens, "
          f"{a.q_heads} q heads / {a.kv_heads} kv heads x {a.head_dim}, the cache runs {c.isa} (module baseline {kvc.isa()})")
    print(f"  median (python / C++ - 1) over {a.reps} paired repetitions of {a.calls} calls: "
          f"{100 * statistics.median(ratios):+.2f}%  (min {100 * ratios[0]:+.2f}%, max {100 * ratios[-1]:+.2f}%)")


if __name__ == "__main__":
    main()
