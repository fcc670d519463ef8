#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpora of tests/fuzz (spec, gguf, tokenizer). Small by design (each corpus
well under 1 MB): the fuzzers grow their own working corpora under build/fuzz; what is committed is
these seeds plus minimised crash reproducers (named crash-*). Rerun after changing it:

    python3 tests/fuzz/make_corpus.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(corpus, name, data):
    d = os.path.join(HERE, "corpus", corpus)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# ---- spec ----
SPECS = [
    "snapkv(ratio=0.5)", "snapkv(ratio=0.25,window=32,kernel=5,pool=max,agg=mean,sinks=4)",
    "pyramidkv(tokens=128,beta=20)", "cake(ratio=0.5,tau1=1,tau2=1)", "finch(ratio=0.3,window=16)",
    "noncausal_attention(ratio=0.5,chunk=64)", "simlayerkv(ratio=0.1,lazy_threshold=0.5)",
    "h2o(tokens=64,recent=8)", "tova(ratio=0.5,share_heads=0)", "scissorhands(ratio=0.5,history=16)",
    "a2sf(ratio=0.5,forgetting=0.8)", "knorm(ratio=0.5,alloc=ada,alpha_safeguard=0.3)",
    "keydiff(ratio=0.5,alloc=pyramid)", "random(ratio=0.5,seed=3)", "lagkv(ratio=0.5,lag=64)",
    "curdkv(ratio=0.5)", "leverage(ratio=0.5,jitter=1e-6,unrotate=0)", "expected_attention(ratio=0.5)",
    "qfilters(ratio=0.5,calibration=16)", "chunkkv(snapkv(window=32),chunk_length=10,ratio=0.5)",
    "rkv(knorm,ratio=0.5,lambda=0.1)", "vnorm(tova,ratio=0.75)", "vnorm(chunkkv(snapkv),ratio=0.5)",
    "fp16", "fp32()", "bf16", "kivi(bits=2,group=32,residual=128)", "int4(fast=1)+snapkv(ratio=0.5)",
    "snapkv(rato=0.5)", "snapkv(ratio=+0.5,interval=2,slack=-0)", "knorm(ratio=5e-1,sinks=1e1)",
    # the holes closed in issue 16: out-of-range numbers, non-finite values, deep nesting
    "kivi(bits=1e10)", "snapkv(ratio=0.5,sinks=-inf)", "snapkv(ratio=-nan)", "x(a=1e999)",
    "a(" * 40 + ")" * 40, "snapkv(tokens=3e9)", "x(a=+-1)",
]
for i, s in enumerate(SPECS):
    write("spec", f"seed-{i:02d}", s)


# ---- gguf ----
class W:
    def __init__(self, n_tensors, n_kv, version=3):
        self.b = bytearray(b"GGUF") + struct.pack("<IQQ", version, n_tensors, n_kv)

    def s(self, x):
        x = x.encode() if isinstance(x, str) else x
        self.b += struct.pack("<Q", len(x)) + x
        return self

    def kv(self, key, t, fmt=None, v=None):
        self.s(key)
        self.b += struct.pack("<I", t)
        if fmt:
            self.b += struct.pack("<" + fmt, v)
        return self

    def kv_str(self, key, v):
        self.kv(key, 8)
        return self.s(v)

    def kv_arr(self, key, et, items, fmt=None):
        self.kv(key, 9)
        self.b += struct.pack("<IQ", et, len(items))
        for x in items:
            if fmt:
                self.b += struct.pack("<" + fmt, x)
            else:
                self.s(x)
        return self

    def tensor(self, name, dims, ggml_type, offset):
        self.s(name)
        self.b += struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        self.b += struct.pack("<IQ", ggml_type, offset)
        return self

    def data(self, n, align=32):
        while len(self.b) % align:
            self.b += b"\0"
        self.b += bytes((i * 7 + 1) & 0xFF for i in range(n))
        return self


def byte_symbols():
    out, n = [], 0
    for b in range(256):
        printable = 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
        out.append(chr(b) if printable else chr(256 + n))
        n += 0 if printable else 1
    return out


def tiny_llama(n_layer=1, d=32, ff=32, vocab_extra=("<|im_start|>", "<|im_end|>"), all_bytes=False):
    """A complete (tiny) Llama: hyper-parameters, a byte-level vocabulary, every tensor in F32/Q8_0.
    Without all_bytes the vocabulary has a handful of byte symbols only: seeds stay a few KB, which
    keeps the fuzzer's mutations (and its exec/s) fast; the vocabulary seed below has all 256."""
    syms = byte_symbols() if all_bytes else list("Ġthe")
    toks = syms + ["Ġt", "he", "Ġthe"] + list(vocab_extra)
    kinds = [1] * (len(toks) - len(vocab_extra)) + [3] * len(vocab_extra)
    merges = ["Ġ t", "h e", "Ġt he"]
    names = [("token_embd.weight", [d, len(toks)], 8), ("output_norm.weight", [d], 0)]
    for l in range(n_layer):
        p = f"blk.{l}."
        names += [(p + "attn_norm.weight", [d], 0), (p + "ffn_norm.weight", [d], 0),
                  (p + "attn_q.weight", [d, d], 8), (p + "attn_k.weight", [d, d // 2], 8),
                  (p + "attn_v.weight", [d, d // 2], 8), (p + "attn_output.weight", [d, d], 8),
                  (p + "ffn_gate.weight", [d, ff], 8), (p + "ffn_up.weight", [d, ff], 8),
                  (p + "ffn_down.weight", [ff, d], 8)]
    w = W(len(names), 15)
    w.kv_str("general.architecture", "llama").kv("general.alignment", 4, "I", 32)
    w.kv("llama.embedding_length", 4, "I", d).kv("llama.feed_forward_length", 4, "I", ff)
    w.kv("llama.block_count", 4, "I", n_layer).kv("llama.attention.head_count", 4, "I", 4)
    w.kv("llama.attention.head_count_kv", 4, "I", 2).kv("llama.context_length", 4, "I", 256)
    w.kv("llama.rope.freq_base", 6, "f", 10000.0).kv("llama.attention.layer_norm_rms_epsilon", 6, "f", 1e-5)
    w.kv_str("tokenizer.ggml.model", "gpt2").kv_str("tokenizer.ggml.pre", "smollm")
    w.kv_arr("tokenizer.ggml.tokens", 8, toks).kv_arr("tokenizer.ggml.token_type", 5, kinds, "i")
    w.kv_arr("tokenizer.ggml.merges", 8, merges)
    off, sizes = 0, []
    for name, dims, t in names:
        n = 1
        for x in dims:
            n *= x
        nbytes = n * 4 if t == 0 else n // 32 * 34
        w.tensor(name, dims, t, off)
        sizes.append(nbytes)
        off += (nbytes + 31) // 32 * 32
    return w, off


w, total = tiny_llama()
write("gguf", "seed-tiny-llama", bytes(w.data(total).b))
# The vocabulary alone (every byte symbol), for the tokenizer built from the file.
w = W(0, 6).kv_str("general.architecture", "llama").kv_str("tokenizer.ggml.model", "gpt2")
toks = byte_symbols() + ["Ġt", "he", "Ġthe", "<|im_start|>"]
w.kv_arr("tokenizer.ggml.tokens", 8, toks).kv_arr("tokenizer.ggml.token_type", 5, [1] * (len(toks) - 1) + [3], "i")
w.kv_arr("tokenizer.ggml.merges", 8, ["Ġ t", "h e", "Ġt he"]).kv("tokenizer.ggml.bos_token_id", 4, "I", 0)
write("gguf", "seed-vocab", bytes(w.b))
# One tensor of each quantised type the reader knows (a single block each).
blocks = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
          9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292)}
w = W(len(blocks), 1).kv("general.alignment", 4, "I", 32)
off = 0
for t, (elems, nbytes) in blocks.items():
    w.tensor(f"t{t}", [elems], t, off)
    off += (nbytes + 31) // 32 * 32
write("gguf", "seed-all-types", bytes(w.data(off).b))
# Metadata of every value type, nested arrays, version 2.
w = W(0, 13, version=2)
for t, fmt, v in [(0, "B", 7), (1, "b", -7), (2, "H", 700), (3, "h", -700), (4, "I", 70000), (5, "i", -70000),
                  (6, "f", 1.5), (7, "B", 1), (10, "Q", 1 << 40), (11, "q", -(1 << 40)), (12, "d", 2.5)]:
    w.kv(f"k{t}", t, fmt, v)
w.kv_str("k8", "text")
w.kv("k9", 9)
w.b += struct.pack("<IQ", 9, 2)
for _ in range(2):
    w.b += struct.pack("<IQ", 4, 2) + struct.pack("<II", 1, 2)
write("gguf", "seed-all-values", bytes(w.b))
# Hostile headers, each refused with a message since issue 16 (were: UB, huge allocation or a crash).
write("gguf", "crash-negative-alignment", bytes(W(0, 1).kv("general.alignment", 5, "i", -32).b))
write("gguf", "crash-zero-dim", bytes(W(1, 0).tensor("t", [0, 4], 0, 0).data(64).b))
w = W(0, 1).kv("a", 9)
w.b += struct.pack("<IQ", 0, 1 << 40)
write("gguf", "crash-huge-array", bytes(w.b))
write("gguf", "crash-elements-overflow", bytes(W(1, 0).tensor("t", [1 << 32, 1 << 32, 16], 0, 0).data(64).b))
write("gguf", "crash-offset-overflow", bytes(W(1, 0).tensor("t", [8], 0, (1 << 64) - 32).data(64).b))
w = W(0, 1).kv("a", 8)
w.b += struct.pack("<Q", 1000) + b"short"
write("gguf", "crash-long-string", bytes(w.b))
key = b"llama.block_count"
w2, total2 = tiny_llama()
w2.b = w2.b.replace(key + struct.pack("<II", 4, 1), key + struct.pack("<IQ", 10, (1 << 32) + 1))
write("gguf", "crash-int64-block-count", bytes(w2.data(total2).b))

# ---- tokenizer (first byte: bit 0 digit-splitting pre-tokenizer, bit 1 parse control tokens) ----
TEXTS = ["Hello world", "the theater is in the thing", "12345 + 678 = 91023", "  spaces   and\ttabs\n\nnewlines ",
         "<|im_start|>user\nhi<|im_end|>", "<|im_start|><|im_end|><|endoftext|>", "don't we'll they're I'm",
         "naïve café – 東京 🙂 ١٢٣", "\x00\x01\x02\x7f", "<|im_sta", "''''''''"]
for i, t in enumerate(TEXTS):
    for mode in range(4):
        write("tokenizer", f"seed-{i:02d}-{mode}", bytes([mode]) + t.encode())
write("tokenizer", "seed-invalid-utf8", bytes([3]) + b"\xff\xfe\xc3\x28\xe2\x82\xf0\x9f\x98 ok")

# ---- lowrank (fuzz_lowrank.cpp: the first byte mod 4 is the family pca / palu / think / xkv, the
# rest shapes, arguments and operations; random bytes reach every operation) ----
import random

_r = random.Random(20261206)
for fam, name in enumerate(["pca", "palu", "think", "xkv"]):
    for i in range(6):
        b = bytearray(_r.getrandbits(8) for _ in range(700))
        b[0] = fam
        write("lowrank", f"seed-{name}-{i}", bytes(b))
