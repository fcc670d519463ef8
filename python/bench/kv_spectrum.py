# SPDX-License-Identifier: Apache-2.0
"""How low-rank are SmolLM2-135M's keys and values? (issue 12: whether a per-(layer, kv head) PCA
basis, kvc/lowrank/, can work on this model, head_dim D = 64, 30 layers, 3 kv heads.)

Runs the model (transformers, the project's GGUF, fp32, one thread) on the first --tokens tokens
of each text and captures, per (layer, kv head), three T x D matrices:

- k_pre:  keys before RoPE (a forward hook on k_proj's output),
- k_post: keys after RoPE (the DynamicCache after the forward),
- v:      values (the cache; v_proj's output, no rotation).

For each matrix X (rows = tokens): singular values of X (uncentered, as `fit_basis`'s default,
the truncated SVD of X) and of X - mean (centered); the energy E(r) = sum_{i<=r} s_i^2 / sum s_i^2
and the smallest r reaching 90 / 95 / 99% of it. Held out: the basis (top-r right singular
vectors) is fitted on the first half of the tokens and the relative reconstruction error
||X2 - X2 U U^T|| / ||X2|| (Frobenius; centered: the first half's mean subtracted and added back)
is measured on the second half at r = 8, 16, 32, which is what a prompt-fitted basis faces at
decode time.

Prints the tables, writes one CSV row per (text, layer, kv head, stream) and a PNG of the energy
curves (median and spread over (text, layer, head)).

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/matplotlib python python/bench/kv_spectrum.py \
        [--model M.gguf] [--tokens 2048] [--csv out.csv] [--png out.png] [TEXT ...]
"""
import argparse
import csv
import pathlib
import time

import numpy as np
import torch
import transformers

from _model import ROOT, add_common_args, load, token_ids

STREAMS = ("k_pre", "k_post", "v")
LABEL = {"k_pre": "keys, pre-RoPE", "k_post": "keys, post-RoPE (cache)", "v": "values"}
ENERGIES = (0.90, 0.95, 0.99)
RANKS = (8, 16, 32)


def capture(model, ids):
    """{stream: array [layers, kv_heads, T, D]} for one token sequence (batch 1)."""
    cfg = model.config
    hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pre = {}

    def hook(i):
        def f(_mod, _inp, out):
            pre[i] = out[0].detach().view(-1, hkv, d).transpose(0, 1).double().numpy()
        return f

    handles = [layer.self_attn.k_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    cache = transformers.DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    n = len(model.model.layers)
    return {
        "k_pre": np.stack([pre[i] for i in range(n)]),
        "k_post": np.stack([cache.layers[i].keys[0].double().numpy() for i in range(n)]),
        "v": np.stack([cache.layers[i].values[0].double().numpy() for i in range(n)]),
    }


def energy_curve(x, center):
    """E(r) for r = 0..D (E(0) = 0)."""
    if center:
        x = x - x.mean(axis=0)
    s2 = np.linalg.svd(x, compute_uv=False) ** 2
    return np.concatenate([[0.0], np.cumsum(s2) / s2.sum()])


def rank_for(curve, e):
    return int(np.argmax(curve >= e - 1e-12))


def heldout_error(x, r, center, denom_centered=False):
    """||X2 - proj(X2)|| / ||X2||, the basis (and mean) from the first half X1. With denom_centered the
    denominator is ||X2 - mean(X2)||: the error against the part of the keys that varies over tokens
    (a constant key offset adds the same q.mu to every score and cancels in the softmax)."""
    h = x.shape[0] // 2
    a, b = x[:h], x[h:]
    mu = a.mean(axis=0) if center else np.zeros(x.shape[1])
    _, _, vt = np.linalg.svd(a - mu, full_matrices=False)
    u = vt[:r].T  # D x r
    bc = b - mu
    denom = np.linalg.norm(b - b.mean(axis=0)) if denom_centered else np.linalg.norm(b)
    return float(np.linalg.norm(bc - bc @ u @ u.T) / denom)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, ROOT / "bench/results/lowrank-spectrum.csv")
    p.add_argument("--png", default=str(ROOT / "docs/lowrank-spectrum.png"))
    args = p.parse_args()
    model, tok = load(args.model)

    rows = []
    curves = {(s, c): [] for s in STREAMS for c in (False, True)}
    for name, ids in token_ids(tok, args.texts, args.tokens):
        t0 = time.time()
        kv = capture(model, ids)
        print(f"{name}: {ids.shape[1]} tokens (first id {int(ids[0, 0])}), forward in {time.time() - t0:.0f} s")
        for s in STREAMS:
            nl, nh, _, d = kv[s].shape
            for li in range(nl):
                for hi in range(nh):
                    x = kv[s][li, hi]
                    row = {"text": name, "tokens": x.shape[0], "layer": li, "kv_head": hi, "stream": s, "D": d}
                    for c in (False, True):
                        tag = "c" if c else "u"
                        cur = energy_curve(x, c)
                        curves[(s, c)].append(cur)
                        for e in ENERGIES:
                            row[f"r{round(100 * e)}_{tag}"] = rank_for(cur, e)
                        for r in RANKS:
                            row[f"heldout_err_r{r}_{tag}"] = round(heldout_error(x, r, c), 5)
                        for r in RANKS:
                            row[f"energy_r{r}_{tag}"] = round(float(cur[r]), 5)
                        if c:
                            for r in RANKS:
                                row[f"heldout_err_r{r}_c_vs_centered_norm"] = round(heldout_error(x, r, c, True), 5)
                    rows.append(row)

    pathlib.Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv} ({len(rows)} rows)")

    def med(sel, key):
        return float(np.median([r[key] for r in sel]))

    nl = max(r["layer"] for r in rows) + 1
    for tag, what in (("u", "uncentered"), ("c", "centered")):
        print(f"\nRank for 90/95/99% energy ({what}), per layer: median over kv heads and texts")
        print("layer | " + " | ".join(f"{s} r90 r95 r99" for s in STREAMS))
        for li in range(nl):
            cells = []
            for s in STREAMS:
                sel = [r for r in rows if r["layer"] == li and r["stream"] == s]
                cells.append(" ".join(f"{med(sel, f'r{round(100 * e)}_{tag}'):4.1f}" for e in ENERGIES))
            print(f"{li:5d} | " + " | ".join(cells))
        print(f"\nOverall ({what}), over all (text, layer, kv head): median [p10, p90] of the rank; "
              f"held-out error (basis from first half, error on second half): median [p10, p90]")
        for s in STREAMS:
            sel = [r for r in rows if r["stream"] == s]
            parts = []
            for e in ENERGIES:
                v = [r[f"r{round(100 * e)}_{tag}"] for r in sel]
                parts.append(f"r{round(100 * e)} {np.median(v):.1f} [{np.percentile(v, 10):.0f}, {np.percentile(v, 90):.0f}]")
            for rr in RANKS:
                v = [r[f"heldout_err_r{rr}_{tag}"] for r in sel]
                parts.append(f"err@{rr} {np.median(v):.3f} [{np.percentile(v, 10):.3f}, {np.percentile(v, 90):.3f}]")
            if tag == "c":
                for rr in RANKS:
                    v = [r[f"heldout_err_r{rr}_c_vs_centered_norm"] for r in sel]
                    parts.append(f"err/||X2-mean||@{rr} {np.median(v):.3f} [{np.percentile(v, 10):.3f}, {np.percentile(v, 90):.3f}]")
            print(f"  {s:7s} " + "  ".join(parts))
        for name in sorted({r["text"] for r in rows}):
            print(f"  per text {name}: " + "  ".join(
                f"{s} r95 {med([r for r in rows if r['stream'] == s and r['text'] == name], f'r95_{tag}'):.1f}"
                f" err@16 {med([r for r in rows if r['stream'] == s and r['text'] == name], f'heldout_err_r16_{tag}'):.3f}"
                for s in STREAMS))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not found: no plot")
        return
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), sharex=True)
    rr = np.arange(65)
    for j, s in enumerate(STREAMS):
        cu = np.array(curves[(s, False)])
        cc = np.array(curves[(s, True)])
        for i, (ax, f) in enumerate(((axes[0, j], lambda c: c), (axes[1, j], lambda c: np.maximum(1 - c, 1e-6)))):
            y = f(cu)
            ax.fill_between(rr, y.min(0), y.max(0), color="C0", alpha=0.15, lw=0, label="min-max")
            ax.fill_between(rr, np.percentile(y, 10, 0), np.percentile(y, 90, 0), color="C0", alpha=0.35, lw=0,
                            label="p10-p90")
            ax.plot(rr, np.median(y, 0), color="C0", lw=1.6, label="median, uncentered")
            ax.plot(rr, np.median(f(cc), 0), color="C3", lw=1.2, ls="--", label="median, centered")
            for r in RANKS:
                ax.axvline(r, color="0.6", lw=0.6, ls=":")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(LABEL[s])
                ax.set_ylim(0.3, 1.005)
                for e in ENERGIES:
                    ax.axhline(e, color="0.6", lw=0.6, ls=":")
            else:
                ax.set_yscale("log")
                ax.set_ylim(1e-4, 1)
                ax.set_xlabel("r (of D = 64)")
        axes[0, 0].set_ylabel("cumulative energy E(r)")
        axes[1, 0].set_ylabel("residual energy 1 - E(r)")
    axes[0, 0].legend(loc="lower right", fontsize=8)
    n = len(curves[("v", False)])
    fig.suptitle(f"SmolLM2-135M KV spectrum: {n} (text, layer, kv head) matrices of "
                 f"{rows[0]['tokens']} tokens x 64; bands over all of them (uncentered)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
