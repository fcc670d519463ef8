# SPDX-License-Identifier: Apache-2.0
"""The instruction set a cache's kernels run: the best configuration the module carries that this
CPU runs (AVX2 and AVX-512 variants beside the module's baseline build), KVC_ISA forcing another;
every configuration agrees with a float64 reference."""
import platform

import numpy as np
import pytest

import kvc
from conftest import attention_reference, random_kv


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_a_cache_runs_the_best_configuration_this_cpu_runs(monkeypatch):
    monkeypatch.delenv("KVC_ISA", raising=False)
    variants = kvc.isa_variants()
    assert variants, "no ISA configuration runs here"
    # Merged caches too (a merging stage's log-weighted pages): they come from the same variants.
    for spec in ("fp16", "int4", "kivi(bits=2)", "quest(budget=64)", "knorm(tokens=8)+d2o", "knorm(tokens=8)+kvmerger+fp32"):
        assert kvc.Cache(spec, num_layers=1, num_kv_heads=2, head_dim=64).isa == variants[0]
    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or flags is None:
        pytest.skip("the variants are x86-64 only")
    # The module's own build is the baseline (no -march); the variants carry AVX2 and AVX-512.
    if {"avx2", "fma", "f16c"} <= flags:
        assert any("avx2" in v or "avx512" in v for v in variants), variants
        assert "avx2" in variants[0] or "avx512" in variants[0], variants
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"} <= flags:
        assert "avx512" in variants[0], variants


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_every_configuration_agrees_with_the_reference(rng, monkeypatch, storage):
    heads, dim, q_heads, n = 2, 64, 8, 300
    k, v = random_kv(rng, n, heads, dim)
    if storage == "fp16":  # what the pages hold
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    q = rng.standard_normal((q_heads, dim)).astype(np.float32)
    ref = attention_reference(q, k, v)
    for isa in kvc.isa_variants():
        monkeypatch.setenv("KVC_ISA", isa)
        c = kvc.Cache(storage, num_layers=1, num_kv_heads=heads, head_dim=dim, num_q_heads=q_heads)
        assert c.isa == isa
        s = c.add_sequence()
        c.append(s, 0, k, v)
        np.testing.assert_allclose(c.attention(s, 0, q), ref, rtol=1e-5, atol=1e-5, err_msg=isa)


def test_an_unknown_configuration_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("KVC_ISA", "isa_nonexistent")
    with pytest.raises(kvc.Error, match=r"isa_nonexistent.*expected one of"):
        kvc.Cache("fp16", num_layers=1, num_kv_heads=1, head_dim=16)


@pytest.mark.parametrize("spec", ["knorm(tokens=12,sinks=0)+d2o", "knorm(tokens=12,sinks=0)+kvmerger(eps=0)+fp32"])
def test_merged_caches_merge_alike_in_every_configuration(rng, monkeypatch, spec):
    """The merging stage acts on the pages of whichever configuration built the cache: every
    configuration keeps the same tokens with the same log-weights, and its attention (the
    log-weight on each logit) agrees with a float64 softmax over what it holds."""
    heads, dim, q_heads, n = 2, 16, 4, 40
    centres = rng.standard_normal((4, heads, dim))  # keys near a few directions: tokens merge
    k = (centres[rng.integers(0, 4, n)] + 0.15 * rng.standard_normal((n, heads, dim))).astype(np.float32)
    v = rng.standard_normal((n, heads, dim)).astype(np.float32)
    q = rng.standard_normal((q_heads, dim)).astype(np.float32)
    held = []
    for isa in kvc.isa_variants():
        monkeypatch.setenv("KVC_ISA", isa)
        c = kvc.Cache(spec, num_layers=1, num_kv_heads=heads, head_dim=dim, num_q_heads=q_heads)
        assert c.isa == isa
        s = c.add_sequence()
        c.append(s, 0, k, v)
        assert c.after_prefill(s, 0).tokens_after == 2 * 12
        lw = [c.log_weights(s, 0, h) for h in range(heads)]
        assert any((w > 1e-3).any() for w in lw), "nothing merged: the log-weights would test nothing"
        ref = np.empty((q_heads, dim))
        for qh in range(q_heads):
            kh = qh // (q_heads // heads)
            kk, vv = c.gather(s, 0, kh)
            logit = kk.astype(np.float64) @ q[qh].astype(np.float64) / np.sqrt(dim) + lw[kh]
            p = np.exp(logit - logit.max())
            ref[qh] = (p / p.sum()) @ vv.astype(np.float64)
        np.testing.assert_allclose(c.attention(s, 0, q), ref, rtol=1e-5, atol=1e-5, err_msg=isa)
        held.append(([c.positions(s, 0, h) for h in range(heads)], lw, [c.gather(s, 0, h) for h in range(heads)]))
    for pos, lw, kv in held[1:]:
        for h in range(heads):
            np.testing.assert_array_equal(pos[h], held[0][0][h])
            np.testing.assert_array_equal(lw[h], held[0][1][h])
            np.testing.assert_array_equal(kv[h][0], held[0][2][h][0])
            np.testing.assert_array_equal(kv[h][1], held[0][2][h][1])


def test_layers_runs_the_best_configuration_that_knows_every_part(rng, monkeypatch):
    """layers(BASE, lA=STORAGE): each layer's part attends as a float64 softmax over what it holds;
    the configuration is the best one that registered every part (pca only in the baseline)."""
    monkeypatch.delenv("KVC_ISA", raising=False)
    heads, dim, q_heads, n = 2, 32, 4, 70
    c = kvc.Cache("layers(fp16, l1=int8)", num_layers=2, num_kv_heads=heads, head_dim=dim, num_q_heads=q_heads)
    assert c.isa == kvc.isa_variants()[0]
    s = c.add_sequence()
    q = rng.standard_normal((q_heads, dim)).astype(np.float32)
    for layer in range(2):
        k, v = random_kv(rng, n, heads, dim)
        c.append(s, layer, k, v)
        held = [c.gather(s, layer, h) for h in range(heads)]
        ref = attention_reference(q, np.stack([x[0] for x in held], 1), np.stack([x[1] for x in held], 1))
        np.testing.assert_allclose(c.attention(s, layer, q), ref, rtol=1e-5, atol=1e-5)
    assert c.bytes_in_use(1) < c.bytes_in_use(0)  # int8 codes against fp16 pages, read from the pools
    assert c.bytes_in_use() == c.bytes_in_use(0) + c.bytes_in_use(1)
    lr = kvc.Cache("layers(fp16, l1=pca(rank=8))", num_layers=2, num_kv_heads=heads, head_dim=dim)
    assert lr.isa == kvc.isa()  # the low-rank storages are registered in the module's baseline only
    with pytest.raises(kvc.Error, match=r"l5"):
        kvc.Cache("layers(fp16, l5=int8)", num_layers=2, num_kv_heads=heads, head_dim=dim)
