# SPDX-License-Identifier: Apache-2.0
"""Kernels run with the GIL released, and the cache's lock keeps concurrent Python threads correct."""
import threading
import time

import numpy as np

import kvc
from conftest import attention_reference, random_kv


def test_attention_releases_the_gil(rng):
    """While one thread is inside a long C++ loop of attention calls, another keeps running Python.
    With the GIL held the main loop would stall for the whole call (about a second)."""
    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=4, head_dim=64, num_q_heads=8)
    s = c.add_sequence()
    c.append(s, 0, *random_kv(rng, 4096, 4, 64))
    q = rng.standard_normal((8, 64)).astype(np.float32)
    t0 = time.perf_counter()
    c._bench_decode(s, 0, q, 20)
    per_call = (time.perf_counter() - t0) / 20
    n = max(20, int(1.0 / per_call))  # about a second

    done = threading.Event()
    started = threading.Event()

    def work():
        started.set()
        c._bench_decode(s, 0, q, n)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    last, longest_gap, ticks = time.perf_counter(), 0.0, 0
    t_start = last
    while not done.is_set():
        now = time.perf_counter()
        longest_gap = max(longest_gap, now - last)
        last = now
        ticks += 1
    t.join()
    total = time.perf_counter() - t_start
    assert total > 0.3, "the call was too short to tell"
    assert longest_gap < 0.5 * total, f"the main thread stalled {longest_gap:.3f} s of {total:.3f} s"


def test_concurrent_threads_on_one_cache(rng):
    """Appends to distinct sequences and attention from several threads at once: every result
    equals the single-threaded reference."""
    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    data = {}
    for _ in range(4):
        s = c.add_sequence()
        data[s] = random_kv(rng, 200, 2, 16)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    errors = []

    def work(s):
        k, v = data[s]
        try:
            for lo in range(0, 200, 10):
                c.append(s, 0, k[lo:lo + 10], v[lo:lo + 10])
                out = c.attention(s, 0, q)
                np.testing.assert_allclose(out, attention_reference(q, k[:lo + 10], v[:lo + 10]), rtol=1e-5, atol=1e-5)
        except Exception as e:  # reported below: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
