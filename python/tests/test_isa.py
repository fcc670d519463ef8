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
    for spec in ("fp16", "int4", "kivi(bits=2)", "quest(budget=64)"):
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
