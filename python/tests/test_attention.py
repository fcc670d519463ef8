# SPDX-License-Identifier: Apache-2.0
"""Decode attention through the binding against a float64 numpy softmax attention with GQA."""
import numpy as np
import pytest

import kvc
from conftest import attention_reference, random_kv

SHAPES = [  # layers, kv heads, head_dim, q heads, tokens, page size
    (1, 1, 8, 1, 1, 16),
    (2, 2, 16, 4, 37, 16),
    (1, 4, 64, 8, 300, 16),
    (3, 2, 32, 2, 64, 8),
    (1, 1, 128, 7, 129, 32),
]


@pytest.mark.parametrize("layers,heads,dim,q_heads,n,page", SHAPES)
def test_fp32_attention_matches_numpy(rng, layers, heads, dim, q_heads, n, page):
    c = kvc.Cache("fp32", num_layers=layers, num_kv_heads=heads, head_dim=dim, num_q_heads=q_heads, page_size=page)
    s = c.add_sequence()
    kv = [random_kv(rng, n, heads, dim) for _ in range(layers)]
    for layer, (k, v) in enumerate(kv):
        cut = n // 3  # two appends per layer: the pages must join up
        c.append(s, layer, k[:cut], v[:cut])
        c.append(s, layer, k[cut:], v[cut:])
    for layer, (k, v) in enumerate(kv):
        q = rng.standard_normal((q_heads, dim)).astype(np.float32)
        out = c.attention(s, layer, q)
        assert out.dtype == np.float32 and out.shape == (q_heads, dim)
        np.testing.assert_allclose(out, attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_scale_argument(rng):
    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=4)
    s = c.add_sequence()
    k, v = random_kv(rng, 50, 2, 16)
    c.append(s, 0, k, v)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(c.attention(s, 0, q, scale=0.7), attention_reference(q, k, v, 0.7), rtol=1e-5, atol=1e-5)


def test_fp16_attention_matches_rounded_reference(rng):
    c = kvc.Cache("fp16", num_layers=1, num_kv_heads=2, head_dim=32, num_q_heads=4)
    s = c.add_sequence()
    k, v = random_kv(rng, 100, 2, 32)
    c.append(s, 0, k, v)
    q = rng.standard_normal((4, 32)).astype(np.float32)
    ref = attention_reference(q, k.astype(np.float16), v.astype(np.float16))
    np.testing.assert_allclose(c.attention(s, 0, q), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("spec", ["int8", "int4", "kivi(bits=2,residual=32)", "kivi(bits=3,group=64,residual=64)",
                                  "nuq(bits=2,residual=32)", "fp8"])
def test_quantized_attention_matches_its_dequantized_contents(rng, spec):
    """The fused quantized kernel against numpy attention over what the cache holds (gather
    dequantizes), which must be the appended K/V up to the codec's error."""
    c = kvc.Cache(spec, num_layers=1, num_kv_heads=2, head_dim=64, num_q_heads=4)
    s = c.add_sequence()
    k, v = random_kv(rng, 200, 2, 64)
    c.append(s, 0, k, v)
    held = [c.gather(s, 0, h) for h in range(2)]
    kh = np.stack([h[0] for h in held], axis=1)
    vh = np.stack([h[1] for h in held], axis=1)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    out = c.attention(s, 0, q)
    np.testing.assert_allclose(out, attention_reference(q, kh, vh), rtol=1e-3, atol=1e-3)
    # What the cache holds is the appended K/V up to the codec's error (2 bits: 4 levels per group).
    for held_x, x in ((kh, k), (vh, v)):
        assert np.corrcoef(held_x.ravel(), x.ravel())[0, 1] > 0.85


def test_attention_after_eviction_reads_only_kept_tokens(rng):
    c = kvc.Cache("knorm(ratio=0.5,sinks=0)", num_layers=1, num_kv_heads=2, head_dim=16, num_q_heads=2)
    s = c.add_sequence()
    k, v = random_kv(rng, 64, 2, 16)
    c.append(s, 0, k, v)
    c.after_prefill(s, 0)
    q = rng.standard_normal((2, 16)).astype(np.float32)
    out = c.attention(s, 0, q)
    for h in range(2):
        kept = c.positions(s, 0, h)
        ref = attention_reference(q[h:h + 1], k[kept, h:h + 1], v[kept, h:h + 1])
        np.testing.assert_allclose(out[h:h + 1], ref, rtol=1e-5, atol=1e-5)


def test_dlpack_and_buffer_inputs(rng):
    """Objects that expose only __dlpack__, or only the buffer protocol, are read like numpy arrays."""

    class DLPackOnly:
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, *args, **kwargs):
            return self._a.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=2, head_dim=8, num_q_heads=2)
    s = c.add_sequence()
    k, v = random_kv(rng, 10, 2, 8)
    c.append(s, 0, DLPackOnly(k), memoryview(v))
    q = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(c.attention(s, 0, DLPackOnly(q)), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(c.gather(s, 0, 1)[1], v[:, 1])
