# SPDX-License-Identifier: Apache-2.0
"""Sequences, append, gather, positions, fork, rewind and share_layer against what was appended."""
import numpy as np
import pytest

import kvc
from conftest import random_kv, storage_spec


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
    """Every name the registries list makes a cache (with a budget for policies)."""
    for st in kvc.storages():
        spec, kwargs = storage_spec(st, 2, 2, 64)
        assert kvc.Cache(spec, num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4, **kwargs).storage
    inner = {"chunkkv": "chunkkv(snapkv,ratio=0.5)", "rkv": "rkv(snapkv,ratio=0.5)", "vnorm": "vnorm(tova,ratio=0.5)"}
    for p in kvc.policies():
        spec = inner.get(p, f"{p}(ratio=0.5)")
        c = kvc.Cache(spec + "+int8", num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4, rope_theta=1e4)
        assert c.policy == spec and c.storage == "int8"
        assert c.observes in ("nothing", "query_window", "attention", "query_stats")


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8", "kivi(bits=2)", "quest(budget=32)"])
def test_rewind_is_as_if_the_tokens_never_came(rng, storage):
    """rewind(seq, n) after 70 tokens leaves what a twin that saw 45 holds (every storage here
    stores a token alike whatever follows it while 70 < KIVI's window), and both grow alike."""
    c = kvc.Cache(storage, num_layers=2, num_kv_heads=2, head_dim=32)
    twin = kvc.Cache(storage, num_layers=2, num_kv_heads=2, head_dim=32)
    assert c.can_rewind
    s, t = c.add_sequence(), twin.add_sequence()
    k, v = random_kv(rng, 80, 2, 32)
    for layer in range(2):
        c.append(s, layer, k[:70], v[:70])
        twin.append(t, layer, k[:45], v[:45])
    before = c.bytes_in_use()
    c.rewind(s, 45)
    assert c.bytes_in_use() <= before
    for layer in range(2):
        assert c.seen(s, layer) == 45
        c.append(s, layer, k[70:], v[70:])
        twin.append(t, layer, k[70:], v[70:])
        for h in range(2):
            np.testing.assert_array_equal(c.positions(s, layer, h), twin.positions(t, layer, h))
            for a, b in zip(c.gather(s, layer, h), twin.gather(t, layer, h)):
                np.testing.assert_array_equal(a, b)
        q = rng.standard_normal((2, 32)).astype(np.float32)  # quest reads pages by their key bounds
        np.testing.assert_array_equal(c.attention(s, layer, q), twin.attention(t, layer, q))
    assert c.bytes_in_use() == twin.bytes_in_use()


def test_rewind_refuses_and_changes_nothing(rng):
    c = kvc.Cache("int8", num_layers=2, num_kv_heads=2, head_dim=16)
    a, b = c.add_sequence(), c.add_sequence()
    k, v = random_kv(rng, 30, 2, 16)
    for layer in range(2):
        c.append(a, layer, k, v)
        c.append(b, layer, k[:10], v[:10])
    state = [c.gather(s, 1, 1)[0].copy() for s in (a, b)]
    with pytest.raises(kvc.Error, match=r"n = 31, expected 0\.\.30"):
        c.rewind(a, 31)
    with pytest.raises(kvc.Error, match=r"n = 20, expected 0\.\.10 \(the tokens layer 0 of seq"):
        c.rewind([a, b], 20)  # b has seen 10: neither row changes
    with pytest.raises(kvc.Error, match="seq = 99"):
        c.rewind([a, 99], 5)
    assert c.seen(a, 0) == 30 and c.seen(b, 1) == 10
    for s, before in zip((a, b), state):
        np.testing.assert_array_equal(c.gather(s, 1, 1)[0], before)
    c.rewind([a, b], 4)
    assert [c.length(s, layer, h) for s in (a, b) for layer in range(2) for h in range(2)] == [4] * 8
    # Storages that cannot: a merging stage (a merged token may hold members of any position).
    m = kvc.Cache("h2o(ratio=0.5)+cam+fp16", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    assert not m.can_rewind
    s = m.add_sequence()
    m.append(s, 0, k, v)
    with pytest.raises(kvc.Error, match="with a merging stage .* cannot rewind"):
        m.rewind(s, 10)
    assert m.seen(s, 0) == 30 and m.length(s, 0, 0) == 30


def test_rewind_drops_the_observers_statistics_of_the_forgotten_tokens(rng):
    """H2O's accumulated attention follows the rewind: a cache rewound from 60 to 40 tokens and fed
    the same next tokens as a twin that saw 40 compresses the same way, as long as no query of the
    dropped tokens was observed (their attention to older tokens is not un-added)."""
    spec = "h2o(ratio=0.5,interval=4,slack=0)+fp32"
    c = kvc.Cache(spec, num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    twin = kvc.Cache(spec, num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    k, v = random_kv(rng, 80, 2, 16)
    q = rng.standard_normal((80, 4, 16)).astype(np.float32)
    s, t = c.add_sequence(), twin.add_sequence()
    for i in range(40):
        for cache, seq in ((c, s), (twin, t)):
            cache.append(seq, 0, k[i:i + 1], v[i:i + 1])
            cache.attention(seq, 0, q[i])
    c.append(s, 0, k[40:60], v[40:60])  # a draft, appended without attending: then rejected
    c.rewind(s, 40)
    for i in range(40, 80):
        for cache, seq in ((c, s), (twin, t)):
            cache.append(seq, 0, k[i:i + 1], v[i:i + 1])
            cache.attention(seq, 0, q[i])
            cache.after_decode_step(seq, 0)
        for h in range(2):
            np.testing.assert_array_equal(c.positions(s, 0, h), twin.positions(t, 0, h))
    assert c.length(s, 0, 0) < 80 - 20  # it did compress


def test_rewind_after_an_observed_draft_keeps_the_observer_in_step(rng):
    """A draft whose queries were observed: rewind drops the statistics of its tokens (without
    it the observer would hold 60 tokens' sums for a 41-token stream and refuse the next step)."""
    c = kvc.Cache("h2o(ratio=0.5,interval=4,slack=0)+int8", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    k, v = random_kv(rng, 80, 2, 16)
    q = rng.standard_normal((80, 4, 16)).astype(np.float32)
    s = c.add_sequence()
    for i in range(60):
        c.append(s, 0, k[i:i + 1], v[i:i + 1])
        c.attention(s, 0, q[i])
    c.rewind(s, 40)
    for i in range(40, 80):
        c.append(s, 0, k[i:i + 1], v[i:i + 1])
        c.attention(s, 0, q[i])
        c.after_decode_step(s, 0)
    assert c.seen(s, 0) == 80
    for h in range(2):
        pos = c.positions(s, 0, h)
        assert 0 < len(pos) < 60 and pos[-1] == 79 and len(set(pos)) == len(pos)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8", "kivi(bits=2)", "gear(bits=4)", "quest(budget=32)"])
def test_share_layer_holds_the_source_by_reference(rng, storage):
    """After share_layer(s, 2, 0), layer 2 holds what a twin whose layer 2 was given layer 0's
    tokens holds (rows, positions, attention, bit for bit), its own pages are freed and nothing is
    allocated; later writes to either layer copy the shared pages, so each grows like its twin."""
    kw = dict(num_layers=3, num_kv_heads=2, head_dim=32, page_size=16)
    c, twin = kvc.Cache(storage, **kw), kvc.Cache(storage, **kw)
    assert c.can_share_layers
    s, t = c.add_sequence(), twin.add_sequence()
    k, v = random_kv(rng, 150, 2, 32)
    for layer, (a, b) in enumerate(((0, 70), (70, 90), (90, 150))):
        c.append(s, layer, k[a:b], v[a:b])
    for layer, (a, b) in enumerate(((0, 70), (70, 90), (0, 70))):  # the twin's layer 2: layer 0's tokens
        twin.append(t, layer, k[a:b], v[a:b])
    total, own2, allocated = c.bytes_in_use(), c.bytes_in_use(2), c.bytes_allocated
    c.share_layer(s, 2, 0)
    assert c.bytes_in_use() == total - own2 and c.bytes_in_use(2) == 0
    assert c.bytes_allocated == allocated
    assert c.bytes_in_use() < twin.bytes_in_use()
    q = rng.standard_normal((2, 32)).astype(np.float32)

    def same(layer):
        assert c.seen(s, layer) == twin.seen(t, layer)
        for h in range(2):
            np.testing.assert_array_equal(c.positions(s, layer, h), twin.positions(t, layer, h))
            for a, b in zip(c.gather(s, layer, h), twin.gather(t, layer, h)):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c.attention(s, layer, q), twin.attention(t, layer, q))

    for layer in range(3):
        same(layer)
    k2, v2 = random_kv(rng, 40, 2, 32)
    for cache, seq in ((c, s), (twin, t)):
        for i in range(0, 40, 7):  # short appends write into the shared partial pages
            cache.append(seq, 2, k2[i:i + 7], v2[i:i + 7])
            cache.append(seq, 0, k2[i:i + 3], v2[i:i + 3])
    for layer in range(3):
        same(layer)
    c.remove_sequence(s)
    assert c.bytes_in_use() == 0


def test_share_layer_carries_the_observers_statistics(rng):
    """H2O scores a shared layer's tokens by the source's accumulated attention: a cache whose layer
    1 takes layer 0's tokens and then decodes compresses layer 1 as a twin whose layer 1 saw layer
    0's tokens and queries all along. No sinks and a short recent window, so the accumulated
    attention of the shared tokens decides what stays."""
    spec = "h2o(ratio=0.5,recent=4,sinks=0,interval=4,slack=0)+fp32"
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=16, num_q_heads=4)
    c, twin = kvc.Cache(spec, **kw), kvc.Cache(spec, **kw)
    k, v = random_kv(rng, 120, 2, 16)
    q = rng.standard_normal((120, 4, 16)).astype(np.float32)
    s, t = c.add_sequence(), twin.add_sequence()
    for i in range(50):
        for cache, seq, layer, j in ((c, s, 0, i), (c, s, 1, 60 + i % 40), (twin, t, 0, i), (twin, t, 1, i)):
            cache.append(seq, layer, k[j:j + 1], v[j:j + 1])
            cache.attention(seq, layer, q[j])
    c.share_layer(s, 1, 0)
    for i in range(50, 100):
        for cache, seq in ((c, s), (twin, t)):
            cache.append(seq, 1, k[i:i + 1], v[i:i + 1])
            cache.attention(seq, 1, q[i])
            cache.after_decode_step(seq, 1)
    assert c.length(s, 1, 0) < 80  # it did compress
    for h in range(2):
        np.testing.assert_array_equal(c.positions(s, 1, h), twin.positions(t, 1, h))
        np.testing.assert_array_equal(c.gather(s, 1, h)[1], twin.gather(t, 1, h)[1])
        np.testing.assert_array_equal(c.positions(s, 0, h), np.arange(50))  # the source is untouched


def test_share_layer_refuses_and_changes_nothing(rng):
    c = kvc.Cache("int8", num_layers=2, num_kv_heads=2, head_dim=16)
    s = c.add_sequence()
    k, v = random_kv(rng, 30, 2, 16)
    c.append(s, 0, k, v)
    c.append(s, 1, k[:9], v[:9])
    before = (c.bytes_in_use(), c.gather(s, 1, 1)[0].copy())
    with pytest.raises(kvc.Error, match=r"source = 1, expected 0\.\.1 and not layer = 1"):
        c.share_layer(s, 1, 1)
    with pytest.raises(kvc.Error, match=r"source = 2"):
        c.share_layer(s, 1, 2)
    with pytest.raises(kvc.Error, match=r"layer = -1"):
        c.share_layer(s, -1, 0)
    with pytest.raises(kvc.Error, match="seq = 99"):
        c.share_layer(99, 1, 0)
    assert c.bytes_in_use() == before[0] and c.seen(s, 1) == 9
    np.testing.assert_array_equal(c.gather(s, 1, 1)[0], before[1])
    m = kvc.Cache("mikv", num_layers=2, num_kv_heads=2, head_dim=16, num_q_heads=4)
    assert not m.can_share_layers
    s = m.add_sequence()
    m.append(s, 0, k, v)
    with pytest.raises(kvc.Error, match="storage 'mikv' cannot share layers"):
        m.share_layer(s, 1, 0)
    assert m.seen(s, 1) == 0 and m.length(s, 0, 0) == 30
