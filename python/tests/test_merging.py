# SPDX-License-Identifier: Apache-2.0
"""Merging stages from Python (``policy+cam|d2o|kvmerger``): what the spec accepts and refuses,
the merged cache's attention against a float64 numpy softmax with each token's log-weight on its
logit, decode-time merging after H2O, and forks that merge as their source; MiniCache's layer
pairs (``minicache(...)`` and Cache.cross_layer_merge)."""
import numpy as np
import pytest

import kvc
from conftest import attention_reference, random_kv, snapshot

SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=16, num_q_heads=4)


def clustered_kv(rng, n, heads, dim, spread=0.15):
    """Keys near a few directions (so D2O and KVMerger find similar tokens), random values."""
    centres = rng.standard_normal((4, heads, dim))
    k = centres[rng.integers(0, 4, n)] + spread * rng.standard_normal((n, heads, dim))
    return k.astype(np.float32), rng.standard_normal((n, heads, dim)).astype(np.float32)


def drifting_kv(rng):
    """70 decode steps of (k, v, q): keys near copies of one key for 40 steps (D2O's threshold
    climbs near 1), then less similar (a fresh threshold would merge what the climbed one drops)."""
    base = rng.standard_normal((1, 2, 16))
    spread = np.where(np.arange(70) < 40, 0.05, 0.6)[:, None, None]
    k = (base + spread * rng.standard_normal((70, 2, 16))).astype(np.float32)
    v = rng.standard_normal((70, 2, 16)).astype(np.float32)
    return k, v, rng.standard_normal((70, 4, 16)).astype(np.float32)


def merged_reference(cache, seq, layer, q, scale):
    """Decode attention in float64 over each kv head's gathered rows, logit = scale q.k + lw."""
    hq, d = q.shape
    group = hq // cache.num_kv_heads
    out = np.empty((hq, d))
    for qh in range(hq):
        kh = qh // group
        k, v = cache.gather(seq, layer, kh)
        lw = cache.log_weights(seq, layer, kh).astype(np.float64)
        s = k.astype(np.float64) @ q[qh].astype(np.float64) * scale + lw
        p = np.exp(s - s.max())
        out[qh] = (p / p.sum()) @ v.astype(np.float64)
    return out


def test_merging_specs_and_their_errors():
    c = kvc.Cache("h2o(ratio=0.5)+d2o", **SHAPE)
    assert c.policy == "h2o(ratio=0.5)" and c.merging == "d2o" and c.storage == "fp32"
    assert c.log_weighted and c.observes == "attention"
    assert kvc.Cache("snapkv(ratio=0.5)+cam+fp16", **SHAPE).storage == "fp16"
    assert not kvc.Cache("snapkv(ratio=0.5)+cam", **SHAPE).log_weighted
    assert not kvc.Cache("snapkv(ratio=0.5)+kvmerger(mass=0)", **SHAPE).log_weighted
    plain = kvc.Cache("snapkv(ratio=0.5)", **SHAPE)
    assert plain.merging is None and not plain.log_weighted
    with pytest.raises(kvc.Error, match=r"merging stage 'd2o' needs an eviction policy before it, e\.g\. "
                                        r"\"snapkv\(ratio=0\.5\)\+d2o\""):
        kvc.Cache("d2o", **SHAPE)
    with pytest.raises(kvc.Error, match=r"two merging stages \('cam' and 'd2o'\)"):
        kvc.Cache("snapkv(ratio=0.5)+cam+d2o", **SHAPE)
    assert kvc.Cache("snapkv(ratio=0.5)+d2o+int8", **SHAPE).storage == "int8"
    with pytest.raises(kvc.Error, match=r"storage 'fp8' cannot hold merged tokens; expected fp16, fp32, int8, int4 "
                                        r"or kivi\(bits=2\|4\)"):
        kvc.Cache("snapkv(ratio=0.5)+d2o+fp8", **SHAPE)
    with pytest.raises(kvc.Error, match=r"'d2o': beta = 1, expected 0 <= beta < 1"):
        kvc.Cache("snapkv(ratio=0.5)+d2o(beta=1)", **SHAPE)
    with pytest.raises(kvc.Error, match=r"nor a merging stage \(cam, d2o, kvmerger\)"):
        kvc.Cache("snapkv(ratio=0.5)+d2p", **SHAPE)


@pytest.mark.parametrize("spec", ["h2o(ratio=0.5,recent=4,sinks=2)+d2o", "h2o(tokens=20,recent=2,sinks=1)+kvmerger(eps=0.3)",
                                  "tova(ratio=0.5)+d2o+fp16", "h2o(ratio=0.4,interval=4,slack=4,recent=2)+cam(span=3)",
                                  "h2o(ratio=0.5,recent=4,sinks=2)+d2o+int8", "tova(ratio=0.5)+cam(span=3)+int4(sinks=2)"])
def test_decode_time_merging_against_numpy(rng, spec):
    """A decode loop (append, attention, after_decode_step) over a merged cache (fp32, fp16, or
    int8 / int4 codes, whose gathered rows are the decoded codes): every step's
    output equals the float64 softmax over the gathered rows plus their log-weights, the streams
    stay within budget + slack, and (d2o, kvmerger) some tokens end up standing for several."""
    c = kvc.Cache(spec, **SHAPE)
    s = c.add_sequence()
    n = 90
    kv = [clustered_kv(rng, n, 2, 16) for _ in range(2)]
    scale = 0.25
    merged = False
    for t in range(n):
        for layer, (k, v) in enumerate(kv):
            c.append(s, layer, k[t:t + 1], v[t:t + 1])
            q = rng.standard_normal((4, 16)).astype(np.float32)
            out = c.attention(s, layer, q, scale=scale)
            np.testing.assert_allclose(out, merged_reference(c, s, layer, q, scale), rtol=2e-5, atol=2e-5)
            c.after_decode_step(s, layer)
            for h in range(2):
                lw = c.log_weights(s, layer, h)
                assert lw.shape == (c.length(s, layer, h),) and lw.dtype == np.float32
                merged |= bool((lw > 1e-3).any())
                assert np.all(np.diff(c.positions(s, layer, h)) > 0)
    assert c.length(s, 0, 0) < n  # compressed
    assert merged == c.log_weighted


def test_log_weights_without_merging_are_zero(rng):
    c = kvc.Cache("snapkv(ratio=0.5)+int8", **SHAPE)
    s = c.add_sequence()
    k, v = random_kv(rng, 30, 2, 16)
    c.append(s, 0, k, v)
    np.testing.assert_array_equal(c.log_weights(s, 0, 1), np.zeros(30, np.float32))
    with pytest.raises(kvc.Error, match=r"kvc.Cache.log_weights: head = 2, expected 0..1"):
        c.log_weights(s, 0, 2)
    with pytest.raises(kvc.Error, match=r"kvc.Cache.log_weights: layer = 5, expected 0..1"):
        c.log_weights(s, 5, 0)


def test_one_shot_merge_after_prefill_keeps_the_budget_and_refuses_a_bad_one(rng):
    c = kvc.Cache("knorm(tokens=12,sinks=0)+d2o", **SHAPE)
    s = c.add_sequence()
    k, v = clustered_kv(rng, 40, 2, 16)
    c.append(s, 0, k, v)
    before = snapshot(c, [s])
    with pytest.raises(kvc.Error, match=r"tokens = 12, expected <= the longest stream of layer 1 \(0 tokens\); "
                                        r"the cache is unchanged"):
        c.compress(s, 1)
    assert snapshot(c, [s]) == before
    r = c.after_prefill(s, 0)
    assert r.compressed and r.tokens_before == 80 and r.tokens_after == 24
    assert r.bytes_released > 0 and c.bytes_in_use() < before["bytes"]
    # knorm keeps the lowest key norms; what D2O merges into them leaves the kept positions alone.
    for h in range(2):
        norms = np.linalg.norm(k[:, h].astype(np.float64), axis=1)
        np.testing.assert_array_equal(c.positions(s, 0, h), np.sort(np.argsort(norms, kind="stable")[:12]))
    assert any((c.log_weights(s, 0, h) > 1e-3).any() for h in range(2))


def test_a_fork_merges_as_its_source(rng):
    """D2O's threshold is per sequence and layer: a fork carries its source's, so the two merge the
    same way on the same tokens (a fork starting from an unprimed threshold would not)."""
    c = kvc.Cache("h2o(tokens=16,recent=2,sinks=1)+d2o", **SHAPE)
    a = c.add_sequence()
    # Near copies of one key before the fork (the threshold climbs near 1), less similar keys
    # after it: a fresh threshold would merge the fork's first evicted token, the carried one drops it.
    k, v, qs = drifting_kv(rng)

    def step(seq, t):
        c.append(seq, 0, k[t:t + 1], v[t:t + 1])
        c.attention(seq, 0, qs[t])
        c.after_decode_step(seq, 0)

    for t in range(40):
        step(a, t)
    b = c.fork(a)
    for t in range(40, 70):
        step(a, t)
        step(b, t)
    for h in range(2):
        np.testing.assert_array_equal(c.positions(a, 0, h), c.positions(b, 0, h))
        np.testing.assert_array_equal(c.log_weights(a, 0, h), c.log_weights(b, 0, h))
        ka, va = c.gather(a, 0, h)
        kb, vb = c.gather(b, 0, h)
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)
    c.remove_sequence(a)
    assert c.contains(b) and not c.contains(a)


def test_a_shared_layer_merges_as_its_source(rng):
    """share_layer on a merging cache: layer 1 takes layer 0's merged tokens with their
    log-weights, H2O's statistics and D2O's threshold, so fed the same tokens afterwards the two
    layers merge alike. Before the share layer 1 saw dissimilar keys (a low threshold, other
    statistics): keeping any of its own state would show."""
    c = kvc.Cache("h2o(tokens=16,recent=2,sinks=1)+d2o", **SHAPE)
    assert c.can_share_layers
    s = c.add_sequence()
    k, v, qs = drifting_kv(rng)
    k1, v1 = random_kv(rng, 40, 2, 16)

    def step(layer, kk, vv, q):
        c.append(s, layer, kk[None], vv[None])
        c.attention(s, layer, q)
        c.after_decode_step(s, layer)

    for t in range(40):
        step(0, k[t], v[t], qs[t])
        step(1, k1[t], v1[t], qs[t][::-1].copy())
    assert any((c.log_weights(s, 0, h) > 1e-3).any() for h in range(2))
    total, own1 = c.bytes_in_use(), c.bytes_in_use(1)
    c.share_layer(s, 1, 0)
    assert c.bytes_in_use() == total - own1
    for t in range(40, 70):
        step(0, k[t], v[t], qs[t])
        step(1, k[t], v[t], qs[t])
    for h in range(2):
        np.testing.assert_array_equal(c.positions(s, 0, h), c.positions(s, 1, h))
        np.testing.assert_array_equal(c.log_weights(s, 0, h), c.log_weights(s, 1, h))
        for a, b in zip(c.gather(s, 0, h), c.gather(s, 1, h)):
            np.testing.assert_array_equal(a, b)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(c.attention(s, 0, q), c.attention(s, 1, q))


def test_minicache_merges_layer_pairs_and_frees_their_pages(rng):
    """minicache(start=0): after cross_layer_merge each token of the pair is either kept as it was
    (to fp16) in both layers, or merged: both layers' rows then share one direction and keep their
    own norms. Merged rows live once in the pool, and each layer attends as a float64 softmax over
    what it holds."""
    heads, dim, q_heads, n = 2, 16, 4, 64
    c = kvc.Cache("minicache(start=0)", num_layers=2, num_kv_heads=heads, head_dim=dim, num_q_heads=q_heads)
    assert c.isa == kvc.isa_variants()[0]
    s = c.add_sequence()
    k0, v0 = random_kv(rng, n, heads, dim)
    # Layer 1 close to layer 0 in direction, with other norms; a few tokens far off (retained).
    k1 = (1.7 * k0 + 0.05 * rng.standard_normal(k0.shape)).astype(np.float32)
    v1 = (1.2 * v0 + 0.05 * rng.standard_normal(v0.shape)).astype(np.float32)
    k1[::9] = rng.standard_normal(k1[::9].shape)  # far off: they set d_max, so the near ones fall under
    v1[::9] = rng.standard_normal(v1[::9].shape)  # the retention cut d_min + 0.05 (d_max - d_min)
    c.append(s, 0, k0, v0)
    c.append(s, 1, k1, v1)
    before = c.bytes_in_use()
    r = c.cross_layer_merge(s)
    assert r.merged > 0 and r.retained > 0 and 0 <= r.key_distance_median < 0.5
    assert c.bytes_in_use() < before
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    merged = 0
    for h in range(heads):
        rows = []
        for layer, (k, v) in enumerate(((k0, v0), (k1, v1))):
            pos = c.positions(s, layer, h)
            gk, gv = c.gather(s, layer, h)
            order = np.argsort(pos)
            assert (pos[order] == np.arange(n)).all()
            rows.append((gk[order].astype(np.float64), gv[order].astype(np.float64), k[:, h], v[:, h]))
        (ka, va, k0h, v0h), (kb, vb, k1h, v1h) = rows
        same = np.isclose(ka, k0h, rtol=1e-3, atol=1e-3).all(-1) & np.isclose(kb, k1h, rtol=1e-3, atol=1e-3).all(-1)
        for t in np.nonzero(~same)[0]:  # merged: one direction, each layer's norm
            np.testing.assert_allclose(unit(ka[t]), unit(kb[t]), atol=2e-3)
            np.testing.assert_allclose(unit(va[t]), unit(vb[t]), atol=2e-3)
            np.testing.assert_allclose(np.linalg.norm(ka[t]), np.linalg.norm(k0h[t]), rtol=2e-3)
            np.testing.assert_allclose(np.linalg.norm(kb[t]), np.linalg.norm(k1h[t]), rtol=2e-3)
            np.testing.assert_allclose(np.linalg.norm(vb[t]), np.linalg.norm(v1h[t]), rtol=2e-3)
        # The far tokens stay; the near ones (angular distance ~0.01, under the cut of ~0.03) merge.
        np.testing.assert_array_equal(~same, np.arange(n) % 9 != 0)
        merged += int((~same).sum())
    assert merged == r.merged
    q = rng.standard_normal((q_heads, dim)).astype(np.float32)
    for layer in range(2):
        held = [c.gather(s, layer, h) for h in range(heads)]
        ref = attention_reference(q, np.stack([x[0] for x in held], 1), np.stack([x[1] for x in held], 1))
        np.testing.assert_allclose(c.attention(s, layer, q), ref, rtol=1e-4, atol=1e-4)


def test_cross_layer_merge_is_refused_where_it_does_not_apply(rng):
    c = kvc.Cache("fp16", **SHAPE)
    s = c.add_sequence()
    with pytest.raises(kvc.Error, match=r"kvc.Cache.cross_layer_merge: spec = \"fp16\": storage 'fp16' merges nothing "
                                        r"across layers, expected minicache"):
        c.cross_layer_merge(s)
    with pytest.raises(kvc.Error, match=r"cross_layer_merge: seq = 7"):
        c.cross_layer_merge(7)
    with pytest.raises(kvc.Error, match=r"storage 'minicache' keeps every token .* takes no eviction or merging stage"):
        kvc.Cache("snapkv(ratio=0.5)+minicache", **SHAPE)
