# SPDX-License-Identifier: Apache-2.0
"""Every rejected input: kvc.Error (a ValueError) whose message names the argument, and a cache
exactly as it was before the call."""
import numpy as np
import pytest

import kvc
from conftest import random_kv, snapshot, storage_spec

L, H, D, HQ = 2, 2, 8, 4


@pytest.fixture
def filled(rng):
    """A cache with a policy and two sequences holding tokens, and its state."""
    c = kvc.Cache("snapkv(ratio=0.5,window=4)+fp32", num_layers=L, num_kv_heads=H, head_dim=D, num_q_heads=HQ,
                  page_size=4)
    seqs = [c.add_sequence(), c.add_sequence()]
    for s in seqs:
        for layer in range(L):
            k, v = random_kv(rng, 10, H, D)
            c.append(s, layer, k, v)
    return c, seqs


def f32(*shape):
    return np.ones(shape, np.float32)


APPEND = [  # k, v, positions, the words the message must contain
    (f32(3, H * D), f32(3, H, D), None, ["k", "dimensions", "(n, num_kv_heads=2, head_dim=8)"]),
    (np.ones((3, H, D)), f32(3, H, D), None, ["k", "float64", "float32"]),
    (f32(3, H + 1, D), f32(3, H + 1, D), None, ["k", "shape (3, 3, 8)", "num_kv_heads=2"]),
    (f32(3, H, D + 1), f32(3, H, D), None, ["k", "head_dim=8"]),
    (f32(3, H, D), f32(4, H, D), None, ["v", "shape (4, 2, 8)", "n=3"]),
    (f32(3, H, D), np.ones((3, H, D), np.float16), None, ["v", "float16"]),
    (np.ones((3, H, 2 * D), np.float32)[:, :, ::2], f32(3, H, D), None, ["k", "C-contiguous"]),
    (f32(3, H, D), f32(3, H, D), np.arange(3, dtype=np.int64), ["positions", "int64", "int32"]),
    (f32(3, H, D), f32(3, H, D), np.arange(2, dtype=np.int32), ["positions", "shape (2,)", "n=3"]),
]


@pytest.mark.parametrize("k,v,positions,words", APPEND)
def test_append_rejects_bad_arrays(filled, k, v, positions, words):
    c, seqs = filled
    before = snapshot(c, seqs)
    with pytest.raises(kvc.Error) as e:
        c.append(seqs[0], 0, k, v, positions=positions)
    for w in words:
        assert w in str(e.value)
    assert "kvc.Cache.append" in str(e.value)
    assert snapshot(c, seqs) == before


def test_append_rejects_non_finite_values(filled):
    c, seqs = filled
    before = snapshot(c, seqs)
    k = f32(3, H, D)
    k[1, 1, 1] = np.nan
    with pytest.raises(kvc.Error, match="(?i)finite|nan"):
        c.append(seqs[0], 0, k, f32(3, H, D))
    assert snapshot(c, seqs) == before


def test_append_rejects_bad_layer(filled):
    c, seqs = filled
    before = snapshot(c, seqs)
    with pytest.raises(kvc.Error, match="layer"):
        c.append(seqs[0], L, f32(1, H, D), f32(1, H, D))
    assert snapshot(c, seqs) == before


def test_error_is_a_value_error():
    assert issubclass(kvc.Error, ValueError) and issubclass(kvc.OutOfMemory, kvc.Error)
    assert kvc.Error.__module__ == "kvc"


UNKNOWN_SEQ = [
    ("append", lambda c: c.append(99, 0, f32(1, H, D), f32(1, H, D))),
    ("attention", lambda c: c.attention(99, 0, f32(HQ, D))),
    ("positions", lambda c: c.positions(99, 0, 0)),
    ("length", lambda c: c.length(99, 0, 0)),
    ("seen", lambda c: c.seen(99, 0)),
    ("gather", lambda c: c.gather(99, 0, 0)),
    ("fork", lambda c: c.fork(99)),
    ("remove_sequence", lambda c: c.remove_sequence(99)),
    ("compress", lambda c: c.after_prefill(99, 0, f32(4, HQ, D))),
]


@pytest.mark.parametrize("name,call", UNKNOWN_SEQ, ids=[n for n, _ in UNKNOWN_SEQ])
def test_unknown_sequence(filled, name, call):
    c, seqs = filled
    before = snapshot(c, seqs)
    with pytest.raises(kvc.Error, match=f"kvc.Cache.{name}: seq = 99"):
        call(c)
    assert snapshot(c, seqs) == before


def test_removed_sequence_is_unknown(filled):
    c, seqs = filled
    c.remove_sequence(seqs[1])
    with pytest.raises(kvc.Error, match="seq = "):
        c.positions(seqs[1], 0, 0)


ATTENTION = [
    (f32(HQ + 1, D), ["q", "shape (5, 8)", "num_q_heads=4"]),
    (f32(HQ, D + 1), ["q", "head_dim=8"]),
    (f32(1, HQ, D), ["q", "3 dimensions"]),
    (np.ones((HQ, D)), ["q", "float64"]),
    (np.ones((HQ, D), np.int32), ["q", "int32", "float32"]),
]


@pytest.mark.parametrize("q,words", ATTENTION)
def test_attention_rejects_bad_queries(filled, q, words):
    c, seqs = filled
    before = snapshot(c, seqs)
    with pytest.raises(kvc.Error) as e:
        c.attention(seqs[0], 0, q)
    for w in words:
        assert w in str(e.value)
    assert snapshot(c, seqs) == before


def test_attention_rejects_bad_layer(filled):
    c, seqs = filled
    with pytest.raises(kvc.Error, match="layer"):
        c.attention(seqs[0], L + 3, f32(HQ, D))


PHASES = ["after_prefill", "after_chunk", "after_decode_step", "compress"]


@pytest.mark.parametrize("phase", PHASES)
def test_phases_reject_bad_windows(filled, phase):
    c, seqs = filled
    before = snapshot(c, seqs)
    call = getattr(c, phase)
    with pytest.raises(kvc.Error, match="queries = None"):
        call(seqs[0], 0)
    with pytest.raises(kvc.Error, match=r"queries has shape \(4, 3, 8\)"):
        call(seqs[0], 0, f32(4, HQ - 1, D))
    with pytest.raises(kvc.Error, match="queries has dtype float64"):
        call(seqs[0], 0, np.ones((4, HQ, D)))
    with pytest.raises(kvc.Error, match="query_positions has dtype int64"):
        call(seqs[0], 0, f32(4, HQ, D), np.arange(4))
    with pytest.raises(kvc.Error, match="query_positions given without queries"):
        call(seqs[0], 0, None, np.arange(4, dtype=np.int32))
    assert snapshot(c, seqs) == before


def test_phase_without_policy(rng):
    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=1, head_dim=8)
    s = c.add_sequence()
    c.append(s, 0, *random_kv(rng, 5, 1, 8))
    before = snapshot(c, [s])
    with pytest.raises(kvc.Error, match="no eviction policy"):
        c.after_prefill(s, 0)
    assert snapshot(c, [s]) == before


SPECS = [
    ("snapkv(ratio=0.5", "parse_spec"),
    ("snapkv(ratio=0.5)+foo", "'foo' is neither a storage"),
    ("int8+fp16", "two storages"),
    ("knorm(ratio=0.5)+tova(ratio=0.5)", "two eviction policies"),
    ("snapkv(ratio=1.5)", "ratio = 1.5"),
    ("snapkv(rato=0.5)", "rato"),
    ("snapkv", "needs a budget"),
    ("kivi(bits=5)", "bits"),
    ("expected_attention(ratio=0.5)", "rope_theta = None"),
]


@pytest.mark.parametrize("spec,words", SPECS)
def test_malformed_specs(spec, words):
    with pytest.raises(kvc.Error) as e:
        kvc.Cache(spec, num_layers=1, num_kv_heads=2, head_dim=64)
    assert words in str(e.value)


def test_bad_head_counts():
    with pytest.raises(kvc.Error, match="num_q_heads = 3"):
        kvc.Cache("fp32", num_layers=1, num_kv_heads=2, head_dim=8, num_q_heads=3)
    with pytest.raises(kvc.Error, match="head_dim|page_size"):
        kvc.Cache("fp32", num_layers=1, num_kv_heads=2, head_dim=8, page_size=3)


def test_fork_on_a_storage_that_cannot_share(rng):
    for st in kvc.storages():
        spec, kwargs = storage_spec(st, 1, 1, 64)
        c = kvc.Cache(spec, num_layers=1, num_kv_heads=1, head_dim=64, **kwargs)
        s = c.add_sequence()
        c.append(s, 0, *random_kv(rng, 40, 1, 64))
        before = snapshot(c, [s, s + 1])
        try:
            f = c.fork(s)
        except kvc.Error as e:
            assert "cannot share" in str(e) and st in str(e)
            assert snapshot(c, [s, s + 1]) == before
        else:
            assert c.positions(f, 0, 0).tolist() == c.positions(s, 0, 0).tolist()


def test_out_of_pages(rng):
    c = kvc.Cache("fp32", num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, max_pages=2)
    s = c.add_sequence()
    c.append(s, 0, *random_kv(rng, 8, 1, 8))
    before = snapshot(c, [s])
    with pytest.raises(kvc.OutOfMemory):
        c.append(s, 0, *random_kv(rng, 1, 1, 8))
    assert snapshot(c, [s]) == before


def test_kvc_hf_without_torch_says_what_it_needs():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
            "import kvc\n"
            "try:\n    kvc.hf\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kvc.hf needs torch and transformers" in r.stdout and "torch is not installed" in r.stdout
