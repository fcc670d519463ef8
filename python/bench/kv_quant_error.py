# SPDX-License-Identifier: Apache-2.0
"""Where does 2-bit KIVI break on SmolLM2-135M? (issue 15: "find out why on this model: key and
value error per layer and head, which layers break".)

Runs the model (transformers, the project's GGUF, fp32, one thread) on the first --tokens tokens
of each text and captures, per layer: the queries and keys after RoPE, the keys before RoPE (a hook
on k_proj) and the values. Each is quantized as kvc's codecs do (kvc/quant/kivi.hpp, int2 per
token), here in float64 with the same asymmetric min/max rule (scale = (max - min) / (2^b - 1),
zero = min, codes rounded to nearest):

- kivi2 keys:  per channel, over groups of 32 tokens;  kivi2 values: per token, groups of 32 channels
- int2 keys:   per token and head, over the head's D channels
- pre-RoPE:    keys quantized per channel before RoPE, rotated after (KVQuant's pre-RoPE keys)
- sinks:       as kivi2, with the first 4 tokens kept exact
- K2V4:        kivi2 keys with 4-bit values (per token, groups of 32 channels)

The newest --residual tokens (KIVI's window, 128) stay exact. Reported per (layer, kv head): the
relative Frobenius error of the keys and values, and per layer the relative error of the attention
output ||O - Ô|| / ||O|| of the last --queries queries (causal, GQA) with the keys only, the values
only, and both quantized, which is what reaches the next layer.

    OMP_NUM_THREADS=1 python python/bench/kv_quant_error.py [--tokens 2048] [--csv out.csv] [TEXT ...]
"""
import argparse
import csv
import time

import numpy as np
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from _model import ROOT, add_common_args, load, token_ids



def quant(x, bits, axis_groups):
    """Asymmetric min/max quantization of x (float64) over the groups axis_groups(x) yields.
    axis_groups: 'channel32' (per channel over 32-token groups), 'token32' (per token over
    32-channel groups) or 'token' (per token over all channels)."""
    levels = 2 ** bits - 1
    t, d = x.shape
    y = np.empty_like(x)
    if axis_groups == "channel32":
        blocks = [(slice(a, min(a + 32, t)), slice(0, d), 0) for a in range(0, t, 32)]
    elif axis_groups == "token32":
        blocks = [(slice(0, t), slice(a, min(a + 32, d)), 1) for a in range(0, d, 32)]
    else:
        blocks = [(slice(0, t), slice(0, d), 1)]
    for rs, cs, ax in blocks:
        b = x[rs, cs]
        lo, hi = b.min(axis=ax, keepdims=True), b.max(axis=ax, keepdims=True)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        y[rs, cs] = np.clip(np.rint((b - lo) / scale), 0, levels) * scale + lo
    return y


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def capture(model, ids):
    """Per layer: q_post [Hq, T, D], k_pre / k_post / v [Hkv, T, D], and (cos, sin) of the positions."""
    cfg = model.config
    hkv, hq = cfg.num_key_value_heads, cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    qs, ks = {}, {}

    def hook(store, i, h):
        def f(_mod, _inp, out):
            store[i] = out[0].detach().view(-1, h, d).transpose(0, 1).double()
        return f

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(qs, i, hq)))
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(ks, i, hkv)))
    cache = transformers.DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float64), pos)
    finally:
        for h in handles:
            h.remove()
    cos, sin = cos.double(), sin.double()
    out = []
    for i in range(len(model.model.layers)):
        q_post, _ = apply_rotary_pos_emb(qs[i].unsqueeze(0), qs[i].unsqueeze(0), cos, sin)
        out.append({"q": q_post[0].numpy(), "k_pre": ks[i].numpy(),
                    "k_post": cache.layers[i].keys[0].double().numpy(), "v": cache.layers[i].values[0].double().numpy(),
                    "cos": cos, "sin": sin})
    return out


def rotate(k_pre, cos, sin):
    k = torch.from_numpy(k_pre).unsqueeze(0)
    _, kr = apply_rotary_pos_emb(k, k, cos, sin)
    return kr[0].numpy()


def attention_probs(q, k, nq):
    """Causal softmax probabilities of the last nq queries, GQA: q [Hq, T, D], k [Hkv, T, D] ->
    [Hq, nq, T]."""
    hq, t, d = q.shape
    g = hq // k.shape[0]
    p = np.empty((hq, nq, t))
    mask = np.arange(t)[None, :] > np.arange(t - nq, t)[:, None]
    for h in range(hq):
        s = q[h, t - nq:] / np.sqrt(d) @ k[h // g].T  # [nq, T]
        s[mask] = -np.inf
        e = np.exp(s - s.max(axis=1, keepdims=True))
        p[h] = e / e.sum(axis=1, keepdims=True)
    return p


def attention(q, k, v, nq):
    """Causal attention of the last nq queries, GQA: q [Hq, T, D], k/v [Hkv, T, D] -> [Hq, nq, D]."""
    g = q.shape[0] // k.shape[0]
    p = attention_probs(q, k, nq)
    return np.stack([p[h] @ v[h // g] for h in range(q.shape[0])])


def keep_recent(x, xq, residual, sinks=0):
    y = xq.copy()
    if residual:
        y[-residual:] = x[-residual:]
    if sinks:
        y[:sinks] = x[:sinks]
    return y


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, ROOT / "bench/results/kivi2-error.csv")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--residual", type=int, default=128)
    args = p.parse_args()
    model, tok = load(args.model)
    rows = []
    for name, ids in token_ids(tok, args.texts, args.tokens):
        t0 = time.time()
        layers = capture(model, ids)
        print(f"{name}: {ids.shape[1]} tokens, forward in {time.time() - t0:.0f} s")
        for li, L in enumerate(layers):
            hkv = L["k_post"].shape[0]
            kq = {m: np.empty_like(L["k_post"]) for m in ("kivi2", "int2", "pre_rope", "sinks")}
            vq = np.empty_like(L["v"])
            for h in range(hkv):
                k, v, kp = L["k_post"][h], L["v"][h], L["k_pre"][h]
                R = args.residual
                kq["kivi2"][h] = keep_recent(k, quant(k, 2, "channel32"), R)
                kq["int2"][h] = keep_recent(k, quant(k, 2, "token"), R)
                kq["sinks"][h] = keep_recent(k, quant(k, 2, "channel32"), R, sinks=4)
                vq[h] = keep_recent(v, quant(v, 2, "token32"), R)
            kq["pre_rope"] = rotate(np.stack([keep_recent(L["k_pre"][h], quant(L["k_pre"][h], 2, "channel32"),
                                                          args.residual) for h in range(hkv)]), L["cos"], L["sin"])
            o = attention(L["q"], L["k_post"], L["v"], args.queries)
            row = {"text": name, "layer": li}
            for m in kq:
                row[f"k_err_{m}"] = round(rel(L["k_post"], kq[m]), 4)
                row[f"out_err_k_{m}"] = round(rel(o, attention(L["q"], kq[m], L["v"], args.queries)), 4)
            row["v_err_kivi2"] = round(rel(L["v"], vq), 4)
            row["out_err_v_kivi2"] = round(rel(o, attention(L["q"], L["k_post"], vq, args.queries)), 4)
            row["out_err_kv_kivi2"] = round(rel(o, attention(L["q"], kq["kivi2"], vq, args.queries)), 4)
            kps = kq["pre_rope"].copy()
            kps[:, :4] = L["k_post"][:, :4]  # 4 sinks exact, per kv head
            row["out_err_k_pre_rope_sinks"] = round(rel(o, attention(L["q"], kps, L["v"], args.queries)), 4)
            row["out_err_kv_pre_rope_sinks"] = round(rel(o, attention(L["q"], kps, vq, args.queries)), 4)
            # Values at 4 bits beside 2-bit keys (K2V4): how much of the output error the values carry.
            v4 = np.stack([keep_recent(L["v"][h], quant(L["v"][h], 4, "token32"), args.residual) for h in range(hkv)])
            row["out_err_kv_k2v4"] = round(rel(o, attention(L["q"], kq["kivi2"], v4, args.queries)), 4)
            # Where the attention mass sits: the first token (a sink) and the exact residual window.
            s = attention_mass(L["q"], L["k_post"], args.queries, args.residual)
            row["mass_token0"], row["mass_residual"] = round(s[0], 4), round(s[1], 4)
            rows.append(row)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    cols = ["k_err_kivi2", "k_err_pre_rope", "v_err_kivi2", "out_err_k_kivi2", "out_err_k_int2", "out_err_k_pre_rope",
            "out_err_k_sinks", "out_err_k_pre_rope_sinks", "out_err_v_kivi2", "out_err_kv_kivi2",
            "out_err_kv_pre_rope_sinks", "out_err_kv_k2v4", "mass_token0",
            "mass_residual"]
    print("| layer | " + " | ".join(cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    nl = max(r["layer"] for r in rows) + 1
    for li in range(nl):
        rs = [r for r in rows if r["layer"] == li]
        print(f"| {li} | " + " | ".join(f"{np.mean([r[c] for r in rs]):.3f}" for c in cols) + " |")
    print(f"| mean | " + " | ".join(f"{np.mean([r[c] for r in rows]):.3f}" for c in cols) + " |")
    print(f"wrote {args.csv}")


def attention_mass(q, k, nq, residual):
    """Mean attention probability of the last nq queries on token 0 and on the last `residual` tokens."""
    p = attention_probs(q, k, nq)
    return float(p[:, :, 0].mean()), float(p[:, :, -residual:].sum(axis=2).mean())


if __name__ == "__main__":
    main()
