# SPDX-License-Identifier: Apache-2.0
"""The low-rank storages (pca, palu, think, xkv: include/kvc/runtime/lowrank_storages.hpp and
xkv_storage.hpp) from Python, each against a float64 numpy reference written here from the
papers' formulas:

  pca    the top-r eigenvectors of the fitting append's second moment XᵀX/n (Loki, Eigen
         Attention; centered with center=1; the sink rows' directions first with sinks=m),
         coefficients c = Uᵀ(x − μ) stored in the coef type, rows rebuilt as μ + U c;
  palu   the top-r left singular vectors of each head's rows of W_k / W_v, keys pre-RoPE;
  think  ThinK's channel score ‖Q[:, d]‖·‖K[:, d]‖ over the window's query heads of a GQA group
         and every stored key, floor(ratio·D) lowest channels pruned (values: ‖(A V)[:, d]‖);
  xkv    the truncated SVD of a group's keys (values) side by side, [n, layers·heads·D], one latent
         per token stored in the latent type.

Tolerances: a stored coefficient is rounded to the coef type. The references round their own
coefficients the same way (fp16 rounding is odd-symmetric, so U·fp16(Uᵀx) does not depend on the
basis's signs); what remains is kvc computing c in float32 with a float32 basis, which can move a
coefficient to the neighbouring fp16 value: at most 2^-10·|c| each, so a row element moves by at
most a few ulps of the largest coefficient (ROW_ULPS below), plus float32 round-off (1e-5 of the
rows' scale). Attention tolerances follow from those row errors through the softmax (att_tol).
"""
import numpy as np
import pytest

import kvc
from conftest import attention_reference, snapshot

ROW_ULPS = 4  # fp16 ulps of the largest coefficient a rebuilt element may differ by (see the docstring)


def rope_reference(x, positions, theta=10000.0, inverse=False):
    """Rotate-half RoPE (Llama) in float64: x [n, H, D] rotated at positions [n] (or back with inverse)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    inv_freq = theta ** (-2.0 * np.arange(d // 2) / d)
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :] * (-1.0 if inverse else 1.0)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def spectral_rows(rng, n, width, decay=0.85, scale=4.0):
    """n rows of `width` values with a decaying spectrum (singular values scale·decay^j on random
    orthonormal directions): low-rank enough that a wrong rank shows, float32."""
    basis, _ = np.linalg.qr(rng.standard_normal((width, width)))
    z = rng.standard_normal((n, width)) * (scale * decay ** np.arange(width))
    return (z @ basis.T).astype(np.float32)


def lowrank_kv(rng, n, heads, dim):
    k = np.stack([spectral_rows(rng, n, dim) for _ in range(heads)], axis=1)
    v = np.stack([spectral_rows(rng, n, dim, decay=0.9) for _ in range(heads)], axis=1)
    return k, v


def fp16(x):
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def top_eigvecs(x, r, center=False):
    """[D, r]: the top-r eigenvectors of (x − μ)ᵀ(x − μ)/n, float64, and μ."""
    x = np.asarray(x, np.float64)
    mu = x.mean(0) if center else np.zeros(x.shape[1])
    xc = x - mu
    w, u = np.linalg.eigh(xc.T @ xc / len(x))
    return u[:, np.argsort(w)[::-1][:r]], mu


def rebuild(x, u, mu, coef):
    """μ + U·round(Uᵀ(x − μ)) with the coefficients rounded to `coef`, and the largest |c|."""
    c = (np.asarray(x, np.float64) - mu) @ u
    cr = fp16(c) if coef == "fp16" else c
    return mu + cr @ u.T, np.abs(c).max()


def row_tol(cmax, coef, scale):
    ulp = 2.0 ** -10 * cmax if coef == "fp16" else 0.0
    return ROW_ULPS * ulp + 1e-5 * scale


def att_tol(q, k_tol, v_tol, v_max, dim):
    """Δout ≤ 2·max|v|·Δlogit + Δv with Δlogit ≤ scale·‖q‖·‖Δk‖ (‖Δk‖ ≤ sqrt(D)·k_tol), plus float32 round-off."""
    dlogit = np.linalg.norm(q, axis=-1).max() * k_tol  # scale = 1/sqrt(D) cancels sqrt(D)
    return 2 * v_max * dlogit + v_tol + 1e-5


def gathered(c, seq, layer):
    """[n, H, D] K and V of a layer as kvc gathers them."""
    ks, vs = zip(*(c.gather(seq, layer, h) for h in range(c.num_kv_heads)))
    return np.stack(ks, 1), np.stack(vs, 1)


# ---- pca ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,heads,q_heads,coef,center", [
    (64, 2, 8, "fp16", 0), (128, 2, 4, "fp16", 0), (64, 1, 4, "fp32", 1), (128, 4, 8, "fp32", 0)])
def test_pca_gather_and_attention_equal_the_numpy_reconstruction(rng, dim, heads, q_heads, coef, center):
    n, rank, vrank = 96, 16, 24
    c = kvc.Cache(f"pca(rank={rank},vrank={vrank},center={center},coef={coef})", num_layers=2, num_kv_heads=heads,
                  head_dim=dim, num_q_heads=q_heads)
    assert c.query_window == 0 and not c.pre_rope_keys and not c.can_rewind
    s = c.add_sequence()
    k, v = lowrank_kv(rng, n, heads, dim)
    c.append(s, 1, k, v)  # layer 1 first: each layer fits its own bases on its first append
    kk, vv = gathered(c, s, 1)
    khat, vhat = np.empty(k.shape), np.empty(v.shape)
    for h in range(heads):
        uk, mk = top_eigvecs(k[:, h], rank, center)
        uv, mv = top_eigvecs(v[:, h], vrank, center)
        khat[:, h], ck = rebuild(k[:, h], uk, mk, coef)
        vhat[:, h], cv = rebuild(v[:, h], uv, mv, coef)
        np.testing.assert_allclose(kk[:, h], khat[:, h], rtol=0, atol=row_tol(ck, coef, 4.0))
        np.testing.assert_allclose(vv[:, h], vhat[:, h], rtol=0, atol=row_tol(cv, coef, 4.0))
    # The rank matters: the rows are not reproduced whole (what a pass-through would give).
    assert not np.allclose(kk, k, rtol=0, atol=row_tol(ck, coef, 4.0))
    q = rng.standard_normal((q_heads, dim)).astype(np.float32) * 0.5
    out = c.attention(s, 1, q)
    ktol, vtol = row_tol(ck, coef, 4.0), row_tol(cv, coef, 4.0)
    np.testing.assert_allclose(out, attention_reference(q, khat, vhat), rtol=0,
                               atol=att_tol(q, ktol, vtol, np.abs(vhat).max(), dim))
    # Decode tokens are projected on the prompt's bases (never refitted).
    k1, v1 = lowrank_kv(rng, 3, heads, dim)
    c.append(s, 1, k1, v1)
    kk, _ = gathered(c, s, 1)
    assert kk.shape[0] == n + 3
    for h in range(heads):
        uk, mk = top_eigvecs(k[:, h], rank, center)
        ref, ck1 = rebuild(k1[:, h], uk, mk, coef)
        np.testing.assert_allclose(kk[n:, h], ref, rtol=0, atol=row_tol(max(ck, ck1), coef, 4.0))


def test_pca_sinks_are_rebuilt_exactly(rng):
    n, dim, rank, m = 64, 64, 8, 2
    c = kvc.Cache(f"pca(rank={rank},sinks={m},coef=fp32)", num_layers=1, num_kv_heads=1, head_dim=dim)
    s = c.add_sequence()
    k, v = lowrank_kv(rng, n, 1, dim)
    k[:m] *= 5  # sinks far from the bulk
    c.append(s, 0, k, v)
    kk, _ = gathered(c, s, 0)
    # The basis: the sink rows Gram-Schmidt'ed, then the leading eigenvectors of the covariance
    # with their span projected out (pca.hpp's exact_rows), rank directions in all.
    x = k[:, 0].astype(np.float64)
    qm, _ = np.linalg.qr(x[:m].T)  # [D, m]: span of the sink rows
    p = np.eye(dim) - qm @ qm.T
    w, e = np.linalg.eigh(p @ (x.T @ x / n) @ p)
    basis = np.concatenate([qm, e[:, np.argsort(w)[::-1][:rank - m]]], axis=1)
    ref = x @ basis @ basis.T
    np.testing.assert_allclose(kk[:, 0], ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(kk[:m, 0], x[:m], rtol=0, atol=1e-4)


def test_pca_pre_rope_rotates_the_rebuilt_keys(rng):
    n, dim, heads, rank = 80, 64, 2, 12
    c = kvc.Cache(f"pca(rank={rank},pre_rope=1,coef=fp32)", num_layers=1, num_kv_heads=heads, head_dim=dim,
                  num_q_heads=4, rope_theta=10000.0)
    assert c.pre_rope_keys
    s = c.add_sequence()
    k, v = lowrank_kv(rng, n, heads, dim)  # before RoPE, as pre_rope_keys asks
    c.append(s, 0, k, v)
    kk, _ = gathered(c, s, 0)
    khat = np.stack([rebuild(k[:, h], top_eigvecs(k[:, h], rank)[0], 0.0, "fp32")[0] for h in range(heads)], 1)
    np.testing.assert_allclose(kk, rope_reference(khat, np.arange(n)), rtol=0, atol=1e-4)


def test_pca_with_a_policy_and_quantized_coefficients(rng):
    n, dim, heads, q_heads = 64, 64, 2, 4
    c = kvc.Cache("snapkv(ratio=0.5,window=8)+pca(rank=16,coef=int8)", num_layers=1, num_kv_heads=heads,
                  head_dim=dim, num_q_heads=q_heads)
    s = c.add_sequence()
    k, v = lowrank_kv(rng, n, heads, dim)
    c.append(s, 0, k, v)
    c.after_prefill(s, 0, queries=rng.standard_normal((8, q_heads, dim)).astype(np.float32))
    kk, vv = gathered(c, s, 0)
    assert kk.shape[0] == n // 2
    kref, vref, tol = np.empty(kk.shape), np.empty(vv.shape), {}
    for h in range(heads):
        pos = c.positions(s, 0, h)  # what the policy kept; the bases were fitted on every prompt row
        kref[:, h], ck = rebuild(k[pos, h], top_eigvecs(k[:, h], 16)[0], 0.0, "fp32")
        vref[:, h], cv = rebuild(v[pos, h], top_eigvecs(v[:, h], 16)[0], 0.0, "fp32")
        # int8 with a scale per token row (absmax/127): each coefficient within half a step of the
        # largest, an element within sqrt(r) = 4 of those (U's rows have norm <= 1).
        tol["k"], tol["v"] = max(tol.get("k", 0), 4 * ck / 254), max(tol.get("v", 0), 4 * cv / 254)
    np.testing.assert_allclose(kk, kref, rtol=0, atol=tol["k"])
    np.testing.assert_allclose(vv, vref, rtol=0, atol=tol["v"])
    q = rng.standard_normal((q_heads, dim)).astype(np.float32) * 0.5
    np.testing.assert_allclose(c.attention(s, 0, q), attention_reference(q, kref, vref), rtol=0,
                               atol=att_tol(q, tol["k"], tol["v"], np.abs(vref).max(), dim))


def test_pca_bytes_fall_below_fp16(rng):
    n, dim, heads = 128, 64, 2
    k, v = lowrank_kv(rng, n, heads, dim)
    caches = {spec: kvc.Cache(spec, num_layers=1, num_kv_heads=heads, head_dim=dim)
              for spec in ("fp16", "pca(rank=16)", "pca(rank=16,coef=int8)")}
    for c in caches.values():
        c.append(c.add_sequence(), 0, k, v)
    # Coefficient rows of rank + vrank = 32 fp16 values against 2·64: a quarter of the pages.
    assert caches["pca(rank=16)"].bytes_in_use() < 0.3 * caches["fp16"].bytes_in_use()
    assert caches["pca(rank=16,coef=int8)"].bytes_in_use() < caches["pca(rank=16)"].bytes_in_use()


def test_pca_refusals_leave_the_cache_unchanged(rng):
    c = kvc.Cache("pca(rank=16)", num_layers=1, num_kv_heads=2, head_dim=64, num_q_heads=4)
    s = c.add_sequence()
    k, v = lowrank_kv(rng, 10, 2, 64)
    before = snapshot(c, [s])
    with pytest.raises(kvc.Error, match=r"n = 10 tokens in the first append.*max\(rank, vrank\) = 16"):
        c.append(s, 0, k, v)
    assert snapshot(c, [s]) == before
    with pytest.raises(kvc.Error, match="query_window = 0"):  # pca needs no window
        c.observe_window(s, 0, np.zeros((1, 4, 64), np.float32))
    assert snapshot(c, [s]) == before


# ---- palu -----------------------------------------------------------------------------------------

def test_palu_bases_are_the_weights_singular_vectors(rng):
    layers, heads, dim, hidden, rank, n = 2, 2, 32, 48, 6, 20
    wk = np.stack([spectral_rows(rng, heads * dim, hidden) for _ in range(layers)])  # [L, H·D, hidden]
    wv = np.stack([spectral_rows(rng, heads * dim, hidden) for _ in range(layers)])
    c = kvc.Cache(f"palu(rank={rank},coef=fp32)", num_layers=layers, num_kv_heads=heads, head_dim=dim,
                  rope_theta=10000.0, weights=(wk, wv))
    assert c.pre_rope_keys
    s = c.add_sequence()
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    for layer in range(layers):
        k = (x @ wk[layer].T).reshape(n, heads, dim).astype(np.float32)  # the model's pre-RoPE keys
        v = (x @ wv[layer].T).reshape(n, heads, dim).astype(np.float32)
        c.append(s, layer, k, v)
        kk, vv = gathered(c, s, layer)
        khat, vhat = np.empty(k.shape), np.empty(v.shape)
        for h in range(heads):
            uk = np.linalg.svd(wk[layer, h * dim:(h + 1) * dim].astype(np.float64))[0][:, :rank]
            uv = np.linalg.svd(wv[layer, h * dim:(h + 1) * dim].astype(np.float64))[0][:, :rank]
            khat[:, h] = k[:, h] @ uk @ uk.T
            vhat[:, h] = v[:, h] @ uv @ uv.T
        scale = np.abs(k).max()
        np.testing.assert_allclose(kk, rope_reference(khat, np.arange(n)), rtol=0, atol=1e-5 * scale * 10)
        np.testing.assert_allclose(vv, vhat, rtol=0, atol=1e-5 * np.abs(v).max() * 10)


def test_palu_needs_the_weights():
    with pytest.raises(kvc.Error, match=r"palu.*W_k and W_v.*weights = None.*weights=\(wk, wv\)"):
        kvc.Cache("palu(rank=8)", num_layers=1, num_kv_heads=1, head_dim=32, rope_theta=1e4)
    w = np.zeros((1, 32, 16), np.float32)
    with pytest.raises(kvc.Error, match="only palu takes"):
        kvc.Cache("pca(rank=8)", num_layers=1, num_kv_heads=1, head_dim=32, weights=(w, w))
    with pytest.raises(kvc.Error, match=r"weights\[0\] \(W_k\) has shape \(1, 32, 16\).*num_kv_heads\*head_dim=64"):
        kvc.Cache("palu(rank=8)", num_layers=1, num_kv_heads=2, head_dim=32, rope_theta=1e4, weights=(w, w))
    with pytest.raises(kvc.Error, match=r"weights\[1\] \(W_v\) has dtype float64"):
        kvc.Cache("palu(rank=8)", num_layers=1, num_kv_heads=1, head_dim=32, rope_theta=1e4,
                  weights=(w, w.astype(np.float64)))


# ---- think ----------------------------------------------------------------------------------------

def channel_keys(rng, n, heads, dim):
    """Keys whose channels differ in scale (so ThinK's scores have no ties), and values."""
    k = rng.standard_normal((n, heads, dim)) * rng.uniform(0.2, 2.0, (1, heads, dim))
    return k.astype(np.float32), rng.standard_normal((n, heads, dim)).astype(np.float32)


def think_kept(scores, ratio, dim):
    pruned = int(np.floor(ratio * dim + 1e-9))
    return np.sort(np.argsort(-scores, kind="stable")[:max(1, dim - pruned)])


@pytest.mark.parametrize("dim,heads,q_heads,coef", [(64, 2, 8, "fp32"), (128, 2, 4, "fp16"), (64, 4, 4, "fp16")])
def test_think_prunes_the_lowest_scoring_key_channels(rng, dim, heads, q_heads, coef):
    n, window, ratio = 64, 8, 0.5
    c = kvc.Cache(f"think(ratio={ratio},window={window},coef={coef})", num_layers=2, num_kv_heads=heads,
                  head_dim=dim, num_q_heads=q_heads)
    assert c.query_window == window
    s = c.add_sequence()
    k, v = channel_keys(rng, n, heads, dim)
    c.append(s, 0, k, v)
    c.append(s, 1, k, v)
    whole = fp16(k) if coef == "fp16" else k.astype(np.float64)  # what the staged pages hold
    np.testing.assert_array_equal(gathered(c, s, 0)[0], whole)  # before the window: whole
    q = rng.standard_normal((window, q_heads, dim)).astype(np.float32)
    fp16_before = kvc.Cache("fp16", num_layers=2, num_kv_heads=heads, head_dim=dim)
    t = fp16_before.add_sequence()
    fp16_before.append(t, 0, k, v)
    fp16_before.append(t, 1, k, v)
    c.observe_window(s, 0, q)
    kk, vv = gathered(c, s, 0)
    g = q_heads // heads
    kref = np.zeros_like(whole)
    for h in range(heads):
        qg = q[:, h * g:(h + 1) * g].reshape(-1, dim).astype(np.float64)
        score = np.linalg.norm(qg, axis=0) * np.linalg.norm(whole[:, h], axis=0)  # ‖Q[:,d]‖·‖K[:,d]‖
        kept = think_kept(score, ratio, dim)
        kref[:, h, kept] = whole[:, h, kept]
        assert len(kept) == dim - int(ratio * dim)
    np.testing.assert_array_equal(kk, kref)  # kept channels exact, pruned ones 0
    np.testing.assert_array_equal(vv, fp16(v) if coef == "fp16" else v)  # vratio=0: values whole
    np.testing.assert_array_equal(gathered(c, s, 1)[0], whole)  # layer 1 not observed yet
    qd = rng.standard_normal((q_heads, dim)).astype(np.float32)
    vref = fp16(v) if coef == "fp16" else v
    np.testing.assert_allclose(c.attention(s, 0, qd), attention_reference(qd, kref, vref), rtol=0, atol=1e-4)
    # A second window for the layer changes nothing (the channels are the cache's).
    c.observe_window(s, 0, -q)
    np.testing.assert_array_equal(gathered(c, s, 0)[0], kref)
    c.observe_window(s, 1, q[-3:])  # fewer queries than the window: allowed
    if coef == "fp16":  # half the key channels: 3/4 of the fp16 pages
        assert c.bytes_in_use() < fp16_before.bytes_in_use()
    # Tokens after the fit are stored pruned.
    k1, v1 = channel_keys(rng, 1, heads, dim)
    c.append(s, 0, k1, v1)
    last = gathered(c, s, 0)[0][-1]
    assert np.count_nonzero(last, axis=-1).tolist() == [dim - int(ratio * dim)] * heads


def test_think_value_channels(rng):
    n, dim, heads, q_heads, window = 40, 32, 2, 4, 6
    c = kvc.Cache(f"think(ratio=0.25,vratio=0.5,window={window},coef=fp32)", num_layers=1, num_kv_heads=heads,
                  head_dim=dim, num_q_heads=q_heads)
    s = c.add_sequence()
    k, v = channel_keys(rng, n, heads, dim)
    v *= rng.uniform(0.2, 2.0, (1, heads, dim)).astype(np.float32)
    c.append(s, 0, k, v)
    q = rng.standard_normal((window, q_heads, dim)).astype(np.float32)
    c.observe_window(s, 0, q)
    _, vv = gathered(c, s, 0)
    g = q_heads // heads
    qpos = np.arange(n - window, n)
    for h in range(heads):
        # ‖(A V)[:, d]‖ over the window: A = softmax(QKᵀ/sqrt(D)), query i sees keys at positions <= n - window + i.
        o2 = np.zeros(dim)
        for i in range(window):
            for j in range(g):
                logits = k[:, h].astype(np.float64) @ q[i, h * g + j] / np.sqrt(dim)
                logits[np.arange(n) > qpos[i]] = -np.inf
                p = np.exp(logits - logits.max())
                o2 += (p / p.sum() @ v[:, h]) ** 2
        kept = think_kept(np.sqrt(o2), 0.5, dim)
        ref = np.zeros((n, dim))
        ref[:, kept] = v[:, h, kept]
        np.testing.assert_array_equal(vv[:, h], ref)


def test_think_refusals_leave_the_cache_unchanged(rng):
    c = kvc.Cache("think(ratio=0.5,window=4)", num_layers=2, num_kv_heads=2, head_dim=32, num_q_heads=4)
    s = c.add_sequence()
    k, v = channel_keys(rng, 12, 2, 32)
    for layer in range(2):
        c.append(s, layer, k, v)
    before = snapshot(c, [s])
    good = np.ones((4, 4, 32), np.float32)
    bad = [  # (seq, layer, q, the words the message must contain)
        (s, 0, np.ones((4, 4 * 32), np.float32), ["q", "dimensions", "(n, num_q_heads=4, head_dim=32)"]),
        (s, 0, np.ones((4, 2, 32), np.float32), ["q", "shape (4, 2, 32)", "num_q_heads=4"]),
        (s, 0, np.ones((4, 4, 16), np.float32), ["q", "head_dim=32"]),
        (s, 0, good.astype(np.float64), ["q", "float64", "float32"]),
        (s, 0, np.ones((4, 4, 64), np.float32)[:, :, ::2], ["q", "C-contiguous"]),
        (s, 0, np.ones((5, 4, 32), np.float32), ["q has 5 queries", "1..query_window = 4"]),
        (s, 0, np.ones((0, 4, 32), np.float32), ["q has 0 queries", "1..query_window = 4"]),
        (s, 0, np.full((4, 4, 32), np.nan, np.float32), ["q[0] = nan", "finite"]),
        (s, 2, good, ["layer = 2", "0..1"]),
        (s + 7, 0, good, [f"seq = {s + 7}", "add_sequence"]),
    ]
    for seq, layer, q, words in bad:
        with pytest.raises(kvc.Error) as e:
            c.observe_window(seq, layer, q)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
        assert snapshot(c, [s]) == before, words
    c.observe_window(s, 0, good)  # still usable
    assert snapshot(c, [s]) != before


# ---- xkv ------------------------------------------------------------------------------------------

def group_rows(rng, n, group, heads, dim):
    """Keys (values) of `group` layers sharing one spectrum across the group: [group, n, H, D]."""
    w = group * heads * dim
    x = spectral_rows(rng, n, w, decay=0.95).reshape(n, group, heads, dim)
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3))


def xkv_reference(x, r, latent):
    """The truncated SVD reconstruction of a group [G, n, H, D] as rows side by side (layer-major,
    then head), latents rounded to `latent`; and the largest latent."""
    g, n, h, d = x.shape
    rows = np.asarray(x, np.float64).transpose(1, 0, 2, 3).reshape(n, g * h * d)
    u, _ = top_eigvecs(rows, r)  # XᵀX's eigenvectors: X's right singular vectors
    rec, amax = rebuild(rows, u, 0.0, latent)
    return rec.reshape(n, g, h, d).transpose(1, 0, 2, 3), amax


@pytest.mark.parametrize("latent,layers,heads,q_heads,dim", [("fp16", 4, 2, 4, 64), ("fp32", 3, 1, 2, 128)])
def test_xkv_gather_equals_the_group_svd(rng, latent, layers, heads, q_heads, dim):
    n, group, rank, vrank = 64, 2, 24, 32
    c = kvc.Cache(f"xkv(group={group},rank={rank},vrank={vrank},pre_rope=0,coef={latent})", num_layers=layers,
                  num_kv_heads=heads, head_dim=dim, num_q_heads=q_heads)
    assert c.query_window == 1 and not c.pre_rope_keys
    s = c.add_sequence()
    k = np.concatenate([group_rows(rng, n, group, heads, dim) for _ in range((layers + 1) // group)])
    v = np.concatenate([group_rows(rng, n, group, heads, dim) for _ in range((layers + 1) // group)])
    for layer in range(layers):
        c.append(s, layer, k[layer], v[layer])
    fp16_cache = kvc.Cache("fp16", num_layers=layers, num_kv_heads=heads, head_dim=dim)
    t = fp16_cache.add_sequence()
    for layer in range(layers):
        fp16_cache.append(t, layer, k[layer], v[layer])
    stored = (lambda x: fp16(x)) if latent == "fp16" else (lambda x: np.asarray(x, np.float64))  # whole pages
    q1 = np.zeros((1, q_heads, dim), np.float32)  # xkv does not read the query
    c.observe_window(s, 0, q1)
    np.testing.assert_array_equal(gathered(c, s, 0)[0], stored(k[0]))  # layer 1 not observed: still whole
    c.observe_window(s, 1, q1)  # the group is complete: it moves to latents
    khat, ka = xkv_reference(stored(k[:group]), rank, latent)
    vhat, va = xkv_reference(stored(v[:group]), vrank, latent)
    for i in range(group):
        kk, vv = gathered(c, s, i)
        np.testing.assert_allclose(kk, khat[i], rtol=0, atol=row_tol(ka, latent, 4.0))
        np.testing.assert_allclose(vv, vhat[i], rtol=0, atol=row_tol(va, latent, 4.0))
        assert not np.allclose(kk, stored(k[i]), rtol=0, atol=row_tol(ka, latent, 4.0))  # it is low rank
    np.testing.assert_array_equal(gathered(c, s, 2)[0], stored(k[2]))  # the next group is not moved
    q = rng.standard_normal((q_heads, dim)).astype(np.float32) * 0.3
    np.testing.assert_allclose(c.attention(s, 1, q), attention_reference(q, khat[1], vhat[1]), rtol=0,
                               atol=att_tol(q, row_tol(ka, latent, 4.0), row_tol(va, latent, 4.0),
                                            np.abs(vhat).max(), dim))
    # Tokens after the move stay whole (a tail), after the latent rows.
    k1 = rng.standard_normal((1, heads, dim)).astype(np.float32)
    c.append(s, 0, k1, k1)
    kk, _ = gathered(c, s, 0)
    assert kk.shape[0] == n + 1
    np.testing.assert_array_equal(kk[-1], stored(k1[0]))
    for layer in range(2, layers):
        c.observe_window(s, layer, q1)
    assert c.bytes_in_use() < fp16_cache.bytes_in_use()


def test_xkv_pre_rope_fits_keys_before_rope(rng):
    n, dim, heads, rank = 48, 32, 2, 16
    c = kvc.Cache(f"xkv(group=2,rank={rank},coef=fp32)", num_layers=2, num_kv_heads=heads, head_dim=dim,
                  num_q_heads=2, rope_theta=10000.0)
    assert c.pre_rope_keys
    s = c.add_sequence()
    k, v = group_rows(rng, n, 2, heads, dim), group_rows(rng, n, 2, heads, dim)
    for layer in range(2):
        c.append(s, layer, k[layer], v[layer])
        c.observe_window(s, layer, np.zeros((1, 2, dim), np.float32))
    khat, _ = xkv_reference(k, rank, "fp32")
    for layer in range(2):
        np.testing.assert_allclose(gathered(c, s, layer)[0], rope_reference(khat[layer], np.arange(n)),
                                   rtol=0, atol=1e-4)


def test_xkv_refusals_leave_the_cache_unchanged(rng):
    # An eviction that keeps different tokens per head: xkv shares one latent per token, so it refuses the move.
    c = kvc.Cache("snapkv(ratio=0.5,window=4)+xkv(group=2,rank=8,pre_rope=0)", num_layers=2, num_kv_heads=2,
                  head_dim=16, num_q_heads=2)
    s = c.add_sequence()
    q1 = np.zeros((1, 2, 16), np.float32)
    for layer in range(2):
        k = rng.standard_normal((32, 2, 16)).astype(np.float32)
        c.append(s, layer, k, k)
        c.after_prefill(s, layer, queries=rng.standard_normal((4, 2, 16)).astype(np.float32))
    c.observe_window(s, 0, q1)
    before = snapshot(c, [s])
    with pytest.raises(kvc.Error, match="expected every layer and kv head of group 0 to hold the same tokens"):
        c.observe_window(s, 1, q1)
    assert snapshot(c, [s]) == before
    with pytest.raises(kvc.Error, match=r"q has 2 queries, expected 1..query_window = 1"):
        c.observe_window(s, 1, np.zeros((2, 2, 16), np.float32))
    assert snapshot(c, [s]) == before


@pytest.mark.parametrize("spec,words", [
    ("pca(rank=0)", ["rank = 0", "1..64"]),
    ("pca(rank=65)", ["rank = 65", "1..64"]),
    ("pca(rank=8,sinks=9)", ["sinks = 9", "0..min(rank, vrank) = 8"]),
    ("pca(rank=8,pre_rope=1)", ["pre_rope = 1", "RoPE"]),
    ("pca(rank=8,coef=xkv)", ["coef = xkv", "not xkv"]),
    ("pca(rank=8,depth=2)", ["depth"]),
    ("think(ratio=1)", ["ratio = 1", "0 <= ratio < 1"]),
    ("think(ratio=0.5,window=0)", ["window = 0", "at least 1"]),
    ("think(ratio=0.5,coef=int8)", ["coef = int8", "fp16 or fp32"]),
    ("xkv(group=5,rank=8,pre_rope=0)", ["group = 5", "1..num_layers = 4"]),
    ("xkv(group=2,rank=8)", ["pre_rope = 1", "RoPE"]),
    ("xkv(group=4,rank=600,pre_rope=0)", ["rank = 600", "512"]),
])
def test_bad_lowrank_specs_name_the_argument(spec, words):
    with pytest.raises(kvc.Error) as e:
        kvc.Cache(spec, num_layers=4, num_kv_heads=2, head_dim=64)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_lowrank_storages_are_listed_and_run_the_baseline_kernels(monkeypatch):
    monkeypatch.delenv("KVC_ISA", raising=False)
    assert {"pca", "palu", "think", "xkv"} <= set(kvc.storages())
    # Registered in the module's baseline configuration only (python/CMakeLists.txt says why).
    for spec in ("pca(rank=8)", "think(ratio=0.5)", "xkv(group=1,rank=8,pre_rope=0)"):
        assert kvc.Cache(spec, num_layers=1, num_kv_heads=1, head_dim=32).isa == kvc.isa()
