# SPDX-License-Identifier: Apache-2.0
"""The compressor's phases through the binding, against what each policy must keep where that is
computable independently (K-norm's ranking, StreamingLLM's sinks and recent tokens, the budget
arithmetic), and the pool's byte figures around eviction."""
import math

import numpy as np
import pytest

import kvc
from conftest import random_kv


def keep_count(n, ratio):
    return math.floor(n * (1.0 - ratio) + 1e-9)


@pytest.mark.parametrize("n,ratio", [(40, 0.5), (100, 0.25), (33, 0.75)])
def test_knorm_keeps_lowest_key_norms(rng, n, ratio):
    c = kvc.Cache(f"knorm(ratio={ratio},sinks=0)", num_layers=2, num_kv_heads=3, head_dim=16)
    s = c.add_sequence()
    kv = [random_kv(rng, n, 3, 16) for _ in range(2)]
    for layer, (k, v) in enumerate(kv):
        c.append(s, layer, k, v)
    for layer, (k, v) in enumerate(kv):
        r = c.after_prefill(s, layer)
        assert r.compressed and r.tokens_before == 3 * n
        assert r.tokens_after == 3 * keep_count(n, ratio)
        for h in range(3):
            norms = np.linalg.norm(k[:, h].astype(np.float64), axis=1)
            expected = np.sort(np.argsort(norms, kind="stable")[:keep_count(n, ratio)])
            np.testing.assert_array_equal(c.positions(s, layer, h), expected)
            gk, gv = c.gather(s, layer, h)
            np.testing.assert_array_equal(gk, k[expected, h])
            np.testing.assert_array_equal(gv, v[expected, h])


def test_streaming_llm_keeps_sinks_and_recent(rng):
    c = kvc.Cache("streaming_llm(tokens=20,sinks=4)", num_layers=1, num_kv_heads=2, head_dim=8)
    s = c.add_sequence()
    k, v = random_kv(rng, 50, 2, 8)
    c.append(s, 0, k, v)
    c.after_prefill(s, 0)
    expected = np.concatenate([np.arange(4), np.arange(50 - 16, 50)])
    for h in range(2):
        np.testing.assert_array_equal(c.positions(s, 0, h), expected)


def test_decode_steps_hold_the_budget(rng):
    """after_decode_step keeps a stream at its token budget, and the kept positions are always
    the sinks plus the newest tokens (StreamingLLM) as the sequence grows."""
    c = kvc.Cache("streaming_llm(tokens=12,sinks=2)", num_layers=1, num_kv_heads=1, head_dim=8)
    s = c.add_sequence()
    k, v = random_kv(rng, 40, 1, 8)
    c.append(s, 0, k[:12], v[:12])
    for t in range(12, 40):
        c.append(s, 0, k[t:t + 1], v[t:t + 1])
        r = c.after_decode_step(s, 0)
        assert r.compressed and r.tokens_after == 12
        expected = np.concatenate([np.arange(2), np.arange(t + 1 - 10, t + 1)])
        np.testing.assert_array_equal(c.positions(s, 0, 0), expected)
        np.testing.assert_array_equal(c.gather(s, 0, 0)[0], k[expected, 0])
    assert c.seen(s, 0) == 40


def test_after_chunk_budget_of_tokens_seen(rng):
    c = kvc.Cache("knorm(ratio=0.5,sinks=0)", num_layers=1, num_kv_heads=1, head_dim=8)
    s = c.add_sequence()
    k, v = random_kv(rng, 60, 1, 8)
    for lo in range(0, 60, 20):
        c.append(s, 0, k[lo:lo + 20], v[lo:lo + 20])
        c.after_chunk(s, 0)
        assert c.length(s, 0, 0) == keep_count(lo + 20, 0.5)


def test_snapkv_window_properties(rng):
    """SnapKV keeps its budget, its observation window (the last `window` tokens) and its sinks."""
    w = 8
    c = kvc.Cache(f"snapkv(ratio=0.5,window={w},sinks=4)", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    assert c.observes == "query_window" and c.window == w
    s = c.add_sequence()
    n = 100
    k, v = random_kv(rng, n, 2, 16)
    c.append(s, 0, k, v)
    queries = rng.standard_normal((w, 4, 16)).astype(np.float32)
    r = c.after_prefill(s, 0, queries)
    assert r.tokens_after == 2 * keep_count(n, 0.5)
    for h in range(2):
        p = c.positions(s, 0, h)
        assert len(p) == keep_count(n, 0.5)
        assert np.all(np.diff(p) > 0)
        assert set(range(4)) <= set(p.tolist()) and set(range(n - w, n)) <= set(p.tolist())


def test_h2o_is_fed_by_attention(rng):
    """H2O observes decode attention: attention() feeds it, and a decode step then evicts to the
    budget, keeping the recent window and the sinks."""
    c = kvc.Cache("h2o(tokens=16,recent=4,sinks=2)", num_layers=1, num_kv_heads=2, head_dim=8, num_q_heads=4)
    assert c.observes == "attention"
    s = c.add_sequence()
    k, v = random_kv(rng, 30, 2, 8)
    c.append(s, 0, k, v)
    for _ in range(3):
        c.attention(s, 0, rng.standard_normal((4, 8)).astype(np.float32))
    r = c.after_decode_step(s, 0)
    assert r.compressed and r.tokens_after == 2 * 16
    for h in range(2):
        p = set(c.positions(s, 0, h).tolist())
        assert len(p) == 16 and {0, 1, 26, 27, 28, 29} <= p


def test_compress_is_strict(rng):
    c = kvc.Cache("knorm(tokens=50)", num_layers=1, num_kv_heads=1, head_dim=8)
    s = c.add_sequence()
    k, v = random_kv(rng, 20, 1, 8)
    c.append(s, 0, k, v)
    assert not c.after_prefill(s, 0).compressed  # the budget covers the stream: nothing to do
    with pytest.raises(kvc.Error, match="tokens = 50"):
        c.compress(s, 0)
    assert c.length(s, 0, 0) == 20


def test_bytes_follow_the_pages(rng):
    """The pool's figures: fp32 pages of page_size tokens x head_dim x (K and V) per stream, rising
    with appends and falling by what eviction released."""
    page, dim, heads = 8, 16, 2
    page_bytes = 2 * 4 * page * dim
    c = kvc.Cache("knorm(ratio=0.75,sinks=0)+fp32", num_layers=2, num_kv_heads=heads, head_dim=dim, page_size=page)
    assert c.bytes_in_use() == 0
    s = c.add_sequence()
    k, v = random_kv(rng, 64, heads, dim)
    seen = []
    for t in range(0, 64, 5):
        c.append(s, 0, k[t:t + 5], v[t:t + 5])
        n = min(t + 5, 64)
        assert c.bytes_in_use(0) == heads * math.ceil(n / page) * page_bytes
        seen.append(c.bytes_in_use())
    assert seen == sorted(seen) and seen[0] < seen[-1]
    c.append(s, 1, k, v)
    assert c.bytes_in_use() == c.bytes_in_use(0) + c.bytes_in_use(1)
    assert c.bytes_allocated - c.bytes_released == c.bytes_in_use()
    before = c.bytes_in_use()
    r = c.after_prefill(s, 0)
    kept = keep_count(64, 0.75)
    assert c.bytes_in_use(0) == heads * math.ceil(kept / page) * page_bytes
    assert before - c.bytes_in_use() == r.bytes_released - r.bytes_allocated > 0
    assert c.tokens_held == heads * kept + heads * 64
    assert c.metadata_bytes > 0


def snapkv_reference_scores(k, queries, kernel=5):
    """SnapKV's scores of one kv-head in float64, from the paper's recipe: the window queries
    (the last n positions) attend causally to every key, their softmax is averaged over the
    window, avg-pooled along the tokens (kernel, zero padding, count_include_pad) and averaged
    over the query heads of the group. k: [n, D]; queries: [w, G, D]. Returns the prefix scores."""
    n, d = k.shape
    w, g, _ = queries.shape
    prefix = n - w
    per_head = np.zeros((g, prefix))
    for qh in range(g):
        acc = np.zeros(prefix)
        for i in range(w):
            pos = prefix + i
            s = k[:pos + 1] @ queries[i, qh] / np.sqrt(d)
            p = np.exp(s - s.max())
            p /= p.sum()
            acc += p[:prefix]
        acc /= w
        padded = np.concatenate([np.zeros(kernel // 2), acc, np.zeros(kernel // 2)])
        per_head[qh] = np.convolve(padded, np.ones(kernel) / kernel, mode="valid")[:prefix]
    return per_head.mean(axis=0)


def test_snapkv_keeps_the_reference_top_scores(rng):
    """The kept prompt tokens are those of highest SnapKV score by the numpy reference: every kept
    (unprotected) token scores at least as much as every evicted one."""
    n, w, sinks, heads, q_heads, dim = 120, 8, 4, 2, 4, 16
    c = kvc.Cache(f"snapkv(ratio=0.6,window={w},sinks={sinks})", num_layers=1, num_kv_heads=heads, head_dim=dim,
                  num_q_heads=q_heads)
    s = c.add_sequence()
    k, v = random_kv(rng, n, heads, dim)
    c.append(s, 0, k, v)
    queries = rng.standard_normal((w, q_heads, dim)).astype(np.float32)
    c.after_prefill(s, 0, queries)
    group = q_heads // heads
    for h in range(heads):
        kept = set(c.positions(s, 0, h).tolist())
        assert len(kept) == keep_count(n, 0.6)
        assert set(range(sinks)) <= kept and set(range(n - w, n)) <= kept
        score = snapkv_reference_scores(k[:, h].astype(np.float64),
                                        queries[:, h * group:(h + 1) * group].astype(np.float64))
        candidates = range(sinks, n - w)
        kept_scores = [score[j] for j in candidates if j in kept]
        evicted_scores = [score[j] for j in candidates if j not in kept]
        assert kept_scores and evicted_scores
        assert min(kept_scores) >= max(evicted_scores) - 1e-6


def cake_reference_preference(k, queries, group, tau1=1.0, tau2=1.0):
    """CAKE's layer preference in float64, from its definition (kvc/evict/cake.hpp): per query
    head, the window queries (the last positions) attend causally to every key; H is the entropy
    of their mean attention over the tokens, V the variance over the window of each token's
    attention, summed over the tokens; both averaged over query heads; P = H^(1/tau1) V^(1/tau2).
    k: [n, H, D]; queries: [w, Hq, D]."""
    n, heads, d = k.shape
    w, hq, _ = queries.shape
    big_h = big_v = 0.0
    for qh in range(hq):
        kk = k[:, qh // group].astype(np.float64)
        probs = np.zeros((w, n))
        for i in range(w):
            pos = n - w + i
            s = kk[:pos + 1] @ queries[i, qh].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            probs[i, :pos + 1] = p / p.sum()
        m = probs.mean(0)
        big_h -= (m[m > 0] * np.log(m[m > 0])).sum()
        big_v += np.maximum(0.0, (probs ** 2).mean(0) - m ** 2).sum()
    return (big_h / hq) ** (1 / tau1) * (big_v / hq) ** (1 / tau2)


def test_cake_splits_the_budget_over_layers_by_preference(rng):
    """cake(ratio=0.6): cake_allocate gives each layer a budget by its preference (the layers'
    budgets rank as the float64 preferences do, and sum to the spec's budget over the layers);
    within a layer every head keeps that many tokens, the SnapKV top scores of the numpy reference."""
    layers, n, w, sinks, heads, q_heads, dim = 3, 120, 8, 4, 2, 4, 16
    c = kvc.Cache(f"cake(ratio=0.6,window={w},sinks={sinks})", num_layers=layers, num_kv_heads=heads, head_dim=dim,
                  num_q_heads=q_heads)
    s = c.add_sequence()
    group = q_heads // heads
    keys, windows = [], []
    for layer, sharp in enumerate((1.0, 4.0, 0.3)):  # attention near uniform at 0.3, peaked at 4
        k, v = random_kv(rng, n, heads, dim)
        k = (k * sharp).astype(np.float32)
        c.append(s, layer, k, v)
        keys.append(k)
        windows.append(rng.standard_normal((w, q_heads, dim)).astype(np.float32))
    assert c.cake
    with pytest.raises(kvc.Error, match=r"policy 'cake' splits the budget over layers .* expected "
                                        rf"cache.cake_allocate\(seq = {s}, windows\)"):
        c.after_prefill(s, 0, windows[0])
    with pytest.raises(kvc.Error, match=r"windows has 2 entries, expected one query window per layer \(3\)"):
        c.cake_allocate(s, windows[:2])
    c.cake_allocate(s, windows)
    budgets, ranked = [], 0
    for layer in range(layers):
        c.after_prefill(s, layer, windows[layer])
        counts = {len(c.positions(s, layer, h)) for h in range(heads)}
        assert len(counts) == 1
        budgets.append(counts.pop())
        for h in range(heads):
            kept = set(c.positions(s, layer, h).tolist())
            assert set(range(sinks)) <= kept and set(range(n - w, n)) <= kept
            score = snapkv_reference_scores(keys[layer][:, h].astype(np.float64),
                                            windows[layer][:, h * group:(h + 1) * group].astype(np.float64))
            kept_scores = [score[j] for j in range(sinks, n - w) if j in kept]
            evicted_scores = [score[j] for j in range(sinks, n - w) if j not in kept]
            assert evicted_scores
            if kept_scores:  # a layer at its floor (sinks and window) keeps no other token
                ranked += 1
                assert min(kept_scores) >= max(evicted_scores) - 1e-6
    assert ranked > 0
    pref = [cake_reference_preference(keys[l], windows[l], group) for l in range(layers)]
    assert len(set(budgets)) == layers, budgets  # a uniform split would test nothing
    assert np.argsort(budgets).tolist() == np.argsort(pref).tolist(), (budgets, pref)
    assert abs(sum(budgets) - layers * keep_count(n, 0.6)) <= layers
    # The budgets are the sequence's own: another one is refused until its own cake_allocate.
    t = c.add_sequence()
    for layer in range(layers):
        c.append(t, layer, keys[layer], keys[layer])
    with pytest.raises(kvc.Error, match=rf"cache.cake_allocate\(seq = {t}, windows\)"):
        c.after_prefill(t, 0, windows[0])
    f = c.fork(s)  # a fork takes its source's budgets: no refusal, and nothing more to evict
    for layer in range(layers):
        assert not c.after_prefill(f, layer, windows[layer]).compressed


def test_cake_allocate_needs_a_cake_policy():
    assert kvc.Cache("chunkkv(cake,ratio=0.5)", num_layers=1, num_kv_heads=1, head_dim=16).cake  # cake inside
    c = kvc.Cache("snapkv(ratio=0.5)", num_layers=1, num_kv_heads=1, head_dim=16)
    assert not c.cake
    s = c.add_sequence()
    with pytest.raises(kvc.Error, match=r"kvc.Cache.cake_allocate: spec = \"snapkv\(ratio=0.5\)\" has no cake policy"):
        c.cake_allocate(s, [np.zeros((4, 1, 16), np.float32)])
