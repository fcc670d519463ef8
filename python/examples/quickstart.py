# SPDX-License-Identifier: Apache-2.0
"""kvc from Python in one page: a SnapKV-compressed, KIVI-quantized cache fed with random K/V
(in a model these are each layer's rotated keys, values and queries), one-shot compression after
the prompt, decode steps, the kept positions and the page pool's bytes.

    python examples/quickstart.py
"""
import numpy as np

import kvc

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, PROMPT = 4, 2, 8, 64, 512
rng = np.random.default_rng(0)


def rand(*shape):
    return rng.standard_normal(shape, dtype=np.float32)


cache = kvc.Cache("snapkv(ratio=0.75,window=32)+kivi(bits=2)", num_layers=LAYERS, num_kv_heads=KV_HEADS,
                  head_dim=HEAD_DIM, num_q_heads=Q_HEADS)
print(cache, "| policy observes:", cache.observes, "| window:", cache.window)
seq = cache.add_sequence()

# Prefill: every layer's K/V [tokens, kv_heads, head_dim], then SnapKV scores the prompt with the
# last `window` queries [n, q_heads, head_dim] and keeps a quarter of each stream.
for layer in range(LAYERS):
    cache.append(seq, layer, rand(PROMPT, KV_HEADS, HEAD_DIM), rand(PROMPT, KV_HEADS, HEAD_DIM))
full = cache.bytes_in_use()
for layer in range(LAYERS):
    report = cache.after_prefill(seq, layer, queries=rand(cache.window, Q_HEADS, HEAD_DIM))
    print(f"layer {layer}: {report.tokens_before} -> {report.tokens_after} tokens, "
          f"{report.bytes_released} pool bytes released")
print(f"pool bytes in use: {full} after the prompt, {cache.bytes_in_use()} after compression")

# Decode: append the new token, attend (GQA: q_heads query heads over kv_heads streams).
for step in range(8):
    for layer in range(LAYERS):
        cache.append(seq, layer, rand(1, KV_HEADS, HEAD_DIM), rand(1, KV_HEADS, HEAD_DIM))
        out = cache.attention(seq, layer, rand(Q_HEADS, HEAD_DIM))  # [q_heads, head_dim], numpy float32

print("output of the last step:", out.shape, out.dtype)
print("layer 0, head 0 keeps positions", cache.positions(seq, 0, 0)[:12], "...", cache.positions(seq, 0, 0)[-4:])
print("tokens held:", cache.tokens_held, "| pool bytes:", cache.bytes_in_use(), "| bytes of layer 0:",
      cache.bytes_in_use(0))

try:
    cache.append(seq, 0, rand(1, KV_HEADS + 1, HEAD_DIM), rand(1, KV_HEADS + 1, HEAD_DIM))
except kvc.Error as e:  # a ValueError naming the argument; the cache is unchanged
    print("kvc.Error:", e)
