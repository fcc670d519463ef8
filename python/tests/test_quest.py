# SPDX-License-Identifier: Apache-2.0
"""The storage quest(budget=, sinks=, recent=, dense=): Quest's query-aware page reads, against a
numpy re-implementation of its choice (per kv head: the first and last pages, then the pages with
the highest bound max_g q_g+ . max(K) + q_g- . min(K), earlier page first on ties) and a float64
softmax over the chosen pages' tokens."""
import numpy as np
import pytest

import kvc
from conftest import attention_reference, random_kv


def quest_reference(q, k, v, page, budget, sinks=1, recent=1):
    """k, v: [n, H, D] as the cache holds them; q: [Hq, D]."""
    hq, d = q.shape
    n, h, _ = k.shape
    group = hq // h
    out = np.empty((hq, d))
    pages = -(-n // page)
    take = budget // page
    for kh in range(h):
        qg = np.asarray(q[kh * group:(kh + 1) * group], np.float64)
        if pages <= take:
            chosen = list(range(pages))
        else:
            bound = np.empty(pages)
            for p in range(pages):
                rows = np.asarray(k[p * page:(p + 1) * page, kh, :], np.float64)
                lo, hi = rows.min(axis=0), rows.max(axis=0)
                bound[p] = max(np.maximum(qq * lo, qq * hi).sum() for qq in qg)
            middle = list(range(sinks, pages - recent))
            middle.sort(key=lambda p: (-bound[p], p))
            chosen = sorted(list(range(sinks)) + middle[:take - sinks - recent] + list(range(pages - recent, pages)))
        tokens = [t for p in chosen for t in range(p * page, min(n, (p + 1) * page))]
        out[kh * group:(kh + 1) * group] = attention_reference(qg, k[tokens, kh:kh + 1, :], v[tokens, kh:kh + 1, :])
    return out


@pytest.mark.parametrize("heads,q_heads,dim,n,budget", [(2, 4, 32, 300, 64), (1, 3, 16, 129, 48), (3, 3, 64, 500, 128)])
def test_quest_reads_the_pages_its_bounds_choose(rng, heads, q_heads, dim, n, budget):
    c = kvc.Cache(f"quest(budget={budget},dense=0)", num_layers=1, num_kv_heads=heads, head_dim=dim,
                  num_q_heads=q_heads, page_size=16)
    s = c.add_sequence()
    k, v = random_kv(rng, n, heads, dim)
    k[:, :, ::3] += rng.standard_normal((n, heads, 1)).astype(np.float32)  # pages then differ in reach
    c.append(s, 0, k, v)
    q = rng.standard_normal((q_heads, dim)).astype(np.float32)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    got = c.attention(s, 0, q)
    np.testing.assert_allclose(got, quest_reference(q, k16, v16, 16, budget), rtol=2e-4, atol=2e-4)
    # A sparse read is not the full read: the reference over every token differs.
    assert not np.allclose(got, attention_reference(q, k16, v16), rtol=1e-3, atol=1e-3)


def test_quest_dense_layers_and_fp16_bytes(rng):
    c = kvc.Cache("quest(budget=32,dense=1)", num_layers=2, num_kv_heads=2, head_dim=32, num_q_heads=4)
    f = kvc.Cache("fp16", num_layers=2, num_kv_heads=2, head_dim=32, num_q_heads=4)
    s, t = c.add_sequence(), f.add_sequence()
    for layer in range(2):
        k, v = random_kv(rng, 200, 2, 32)
        c.append(s, layer, k, v)
        f.append(t, layer, k, v)
    q = rng.standard_normal((4, 32)).astype(np.float32)
    np.testing.assert_array_equal(c.attention(s, 0, q), f.attention(t, 0, q))  # layer 0 reads every page
    assert not np.allclose(c.attention(s, 1, q), f.attention(t, 1, q), rtol=1e-3, atol=1e-3)
    assert c.bytes_in_use() == f.bytes_in_use()  # Quest saves reads, not memory


def test_quest_bad_spec_names_the_argument():
    with pytest.raises(kvc.Error, match="budget = 8, expected >= \\(sinks \\+ recent\\) x page_size = 32"):
        kvc.Cache("quest(budget=8)", num_layers=1, num_kv_heads=1, head_dim=16)
