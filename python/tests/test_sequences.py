# SPDX-License-Identifier: Apache-2.0
"""Sequences, append, gather, positions and fork against what was appended."""
import numpy as np
import pytest

import kvc
from conftest import random_kv


def test_append_stores_what_was_given(rng):
    c = kvc.Cache("fp32", num_layers=2, num_kv_heads=3, head_dim=8)
    s = c.add_sequence()
    k, v = random_kv(rng, 21, 3, 8)
    c.append(s, 1, k[:5], v[:5])
    c.append(s, 1, k[5:], v[5:])
    assert c.seen(s, 1) == 21 and c.seen(s, 0) == 0
    for h in range(3):
        assert c.length(s, 1, h) == 21
        np.testing.assert_array_equal(c.positions(s, 1, h), np.arange(21))
        gk, gv = c.gather(s, 1, h)
        np.testing.assert_array_equal(gk, k[:, h])
        np.testing.assert_array_equal(gv, v[:, h])
    assert c.tokens_held == 21 * 3


def test_explicit_positions(rng):
    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=1, head_dim=8)
    s = c.add_sequence()
    k, v = random_kv(rng, 4, 1, 8)
    pos = np.array([10, 11, 15, 40], np.int32)
    c.append(s, 0, k, v, positions=pos)
    np.testing.assert_array_equal(c.positions(s, 0, 0), pos)


def test_sequences_are_independent(rng):
    c = kvc.Cache("fp16", num_layers=1, num_kv_heads=2, head_dim=8)
    a, b = c.add_sequence(), c.add_sequence()
    assert a != b and c.contains(a) and c.contains(b)
    ka, va = random_kv(rng, 7, 2, 8)
    kb, vb = random_kv(rng, 30, 2, 8)
    c.append(a, 0, ka, va)
    c.append(b, 0, kb, vb)
    assert c.length(a, 0, 0) == 7 and c.length(b, 0, 1) == 30
    np.testing.assert_array_equal(c.gather(a, 0, 1)[0], ka[:, 1].astype(np.float16).astype(np.float32))
    before = c.bytes_in_use()
    c.remove_sequence(b)
    assert not c.contains(b) and c.contains(a)
    assert c.bytes_in_use() < before
    np.testing.assert_array_equal(c.gather(a, 0, 1)[0], ka[:, 1].astype(np.float16).astype(np.float32))


def test_fork_copies_then_diverges(rng):
    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=2, head_dim=8, page_size=4)
    s = c.add_sequence()
    k, v = random_kv(rng, 10, 2, 8)
    c.append(s, 0, k, v)
    bytes_before = c.bytes_in_use()
    f = c.fork(s)
    assert f != s and c.contains(f)
    assert c.bytes_in_use() == bytes_before  # pages are shared, not copied
    k2, v2 = random_kv(rng, 3, 2, 8)
    c.append(f, 0, k2, v2)
    assert c.length(s, 0, 0) == 10 and c.length(f, 0, 0) == 13
    np.testing.assert_array_equal(c.gather(f, 0, 0)[0], np.concatenate([k[:, 0], k2[:, 0]]))
    np.testing.assert_array_equal(c.gather(s, 0, 0)[0], k[:, 0])
    c.remove_sequence(s)
    np.testing.assert_array_equal(c.gather(f, 0, 1)[1], np.concatenate([v[:, 1], v2[:, 1]]))


def test_fork_compresses_on_its_sources_steps(rng):
    """A fork keeps its source's decode step counters: with interval 10
    and slack 20, fed the same tokens, a fork taken between two due steps compresses on the same
    steps and keeps the same positions (beam search: kvc.hf forks a beam that continues twice)."""
    c = kvc.Cache("knorm(ratio=0.5,interval=10,slack=20)+fp32", num_layers=2, num_kv_heads=2, head_dim=8)
    s = c.add_sequence()
    k, v = random_kv(rng, 300, 2, 8)

    def step(seq, i):
        for layer in range(2):
            c.append(seq, layer, k[i:i + 1], v[i:i + 1])
            c.after_decode_step(seq, layer)

    for i in range(237):
        step(s, i)
    f = c.fork(s)
    for i in range(237, 300):
        step(s, i)
        step(f, i)
        for layer in range(2):
            for h in range(2):
                np.testing.assert_array_equal(c.positions(f, layer, h), c.positions(s, layer, h))


def test_every_storage_and_policy_name_builds():
    """Every name the registries list makes a cache (with a budget for policies), except cake,
    which the binding names as unsupported."""
    for st in kvc.storages():
        spec = {"mikv": "mikv(hbits=8,lbits=4)"}.get(st, st)
        assert kvc.Cache(spec, num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4).storage
    inner = {"chunkkv": "chunkkv(snapkv,ratio=0.5)", "rkv": "rkv(snapkv,ratio=0.5)", "vnorm": "vnorm(tova,ratio=0.5)"}
    for p in kvc.policies():
        spec = inner.get(p, f"{p}(ratio=0.5)")
        if p == "cake":
            with pytest.raises(kvc.Error, match=p):
                kvc.Cache(spec, num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4)
            continue
        c = kvc.Cache(spec + "+int8", num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4, rope_theta=1e4)
        assert c.policy == spec and c.storage == "int8"
        assert c.observes in ("nothing", "query_window", "attention", "query_stats")
