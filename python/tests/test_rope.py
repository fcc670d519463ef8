# SPDX-License-Identifier: Apache-2.0
"""What needs the model's RoPE: storages that keep keys before it (pre_rope=1), against a numpy
RoPE, and Expected Attention's query statistics (observe_queries)."""
import math

import numpy as np
import pytest

import kvc
from conftest import attention_reference, random_kv, snapshot


def rope_reference(x, positions, theta=10000.0):
    """Rotate-half RoPE (Llama) in float64: x [n, H, D] rotated at positions [n]."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    inv_freq = theta ** (-2.0 * np.arange(d // 2) / d)
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_pre_rope_storage_rotates_keys_on_read(rng):
    c = kvc.Cache("int8(pre_rope=1)", num_layers=1, num_kv_heads=2, head_dim=32, num_q_heads=4, rope_theta=10000.0)
    assert c.pre_rope_keys
    s = c.add_sequence()
    k, v = random_kv(rng, 80, 2, 32)  # un-rotated keys, as a pre-RoPE storage wants them
    c.append(s, 0, k, v)
    q = rng.standard_normal((4, 32)).astype(np.float32)
    out = c.attention(s, 0, q)
    ref = attention_reference(q, rope_reference(k, np.arange(80)), v)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-2)
    # The rotation matters: the same keys unrotated give an answer outside that tolerance.
    assert np.abs(out - attention_reference(q, k, v)).max() > 0.1


def test_pre_rope_storage_needs_the_rope():
    with pytest.raises(kvc.Error, match="rope"):
        kvc.Cache("int8(pre_rope=1)", num_layers=1, num_kv_heads=2, head_dim=32)


def test_bad_rope_arguments():
    with pytest.raises(kvc.Error, match="rope_style = 'neox'"):
        kvc.Cache("fp32", num_layers=1, num_kv_heads=1, head_dim=8, rope_theta=1e4, rope_style="neox")
    with pytest.raises(kvc.Error, match="rope_theta = -1"):
        kvc.Cache("fp32", num_layers=1, num_kv_heads=1, head_dim=8, rope_theta=-1.0)
    with pytest.raises(kvc.Error, match="rotary_dim = 3"):
        kvc.Cache("fp32", num_layers=1, num_kv_heads=1, head_dim=8, rope_theta=1e4, rotary_dim=3)


def test_expected_attention_needs_the_rope():
    with pytest.raises(kvc.Error, match="rope_theta = None"):
        kvc.Cache("expected_attention(ratio=0.5)", num_layers=1, num_kv_heads=2, head_dim=16)


def test_expected_attention_with_query_statistics(rng):
    layers, heads, q_heads, dim, n = 2, 2, 4, 16, 60
    c = kvc.Cache("expected_attention(ratio=0.5)", num_layers=layers, num_kv_heads=heads, head_dim=dim,
                  num_q_heads=q_heads, rope_theta=10000.0)
    assert c.observes == "query_stats"
    s = c.add_sequence()
    for layer in range(layers):
        k, v = random_kv(rng, n, heads, dim)
        c.append(s, layer, k, v)
        c.observe_queries(layer, rng.standard_normal((n, q_heads, dim)).astype(np.float32))
    for layer in range(layers):
        r = c.after_prefill(s, layer)
        keep = math.floor(n * 0.5 + 1e-9)
        assert r.compressed and r.tokens_after == heads * keep
        for h in range(heads):
            p = c.positions(s, layer, h)
            assert len(p) == keep and np.all(np.diff(p) > 0) and set(range(4)) <= set(p.tolist())


def test_observe_queries_rejections(rng):
    c = kvc.Cache("expected_attention(ratio=0.5)", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4,
                  rope_theta=10000.0)
    s = c.add_sequence()
    c.append(s, 0, *random_kv(rng, 10, 2, 16))
    before = snapshot(c, [s])
    with pytest.raises(kvc.Error, match=r"kvc.Cache.observe_queries: q has shape \(3, 2, 16\)"):
        c.observe_queries(0, np.ones((3, 2, 16), np.float32))
    with pytest.raises(kvc.Error, match="q has dtype float64"):
        c.observe_queries(0, np.ones((3, 4, 16)))
    with pytest.raises(kvc.Error, match="layer = 1"):
        c.observe_queries(1, np.ones((3, 4, 16), np.float32))
    assert snapshot(c, [s]) == before
    plain = kvc.Cache("fp32", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    with pytest.raises(kvc.Error, match="no policy observing query statistics"):
        plain.observe_queries(0, np.ones((3, 4, 16), np.float32))
