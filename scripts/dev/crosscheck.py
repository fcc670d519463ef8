#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Developer cross-check of examples/llama against independent Python implementations.

  1. dequantization: every ggml block type, random blocks decoded by the `gguf` package vs
     the engine's quants.hpp (through scripts/dev/quant_check.cpp);
  2. tokenizer: token ids from Hugging Face `transformers` (tokenizer rebuilt from the GGUF)
     vs `kvc-llama --tokenize` on the evaluation texts;
  3. logits: `transformers` LlamaForCausalLM loaded from the same GGUF (weights dequantized
     to float32 by the `gguf` package) vs `kvc-llama --logits-out`, same token ids.

Needs: python3 -m pip install gguf torch transformers   (CPU is enough; ~3 GB with CUDA wheels)
Usage: scripts/dev/crosscheck.py --bin BUILD_DIR [--model FILE] [--texts DIR] [--tokens N]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def check_dequant(tmp):
    import gguf
    from gguf import GGMLQuantizationType as Q
    rng = np.random.default_rng(0)
    types = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    # Q8_K is an intermediate format for dot products; the gguf package does not decode it.
    fixture = os.path.join(tmp, "quant_fixture.bin")
    with open(fixture, "wb") as f:
        for name in types:
            qt = Q[name]
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qt]
            nblocks = 64
            raw = rng.integers(0, 256, size=(nblocks, block_bytes), dtype=np.uint8)
            # Keep fp16 scale fields finite: overwrite them with small random halves.
            def put_half(col, lo=0.001, hi=0.1):
                h = rng.uniform(lo, hi, size=nblocks).astype(np.float16).view(np.uint8).reshape(nblocks, 2)
                raw[:, col:col + 2] = h
            if name in ("F16",):
                raw = rng.normal(size=nblocks * block_bytes // 2).astype(np.float16).view(np.uint8).reshape(nblocks, block_bytes)
            elif name == "BF16":
                x = rng.normal(size=nblocks * block_bytes // 2).astype(np.float32).view(np.uint32) >> 16
                raw = x.astype(np.uint16).view(np.uint8).reshape(nblocks, block_bytes)
            elif name in ("Q4_0", "Q5_0", "Q8_0"):
                put_half(0)
            elif name in ("Q4_1", "Q5_1"):
                put_half(0); put_half(2)
            elif name == "Q2_K":
                put_half(80); put_half(82)
            elif name == "Q3_K":
                put_half(108)
            elif name in ("Q4_K", "Q5_K"):
                put_half(0); put_half(2)
            elif name == "Q6_K":
                put_half(208)
            elif name == "Q8_K":
                raw[:, 0:4] = rng.uniform(0.001, 0.1, size=nblocks).astype(np.float32).view(np.uint8).reshape(nblocks, 4)
            data = raw.reshape(-1)
            n = nblocks * block_elems
            ref = gguf.quants.dequantize(data, qt).astype(np.float32).reshape(-1)
            assert ref.size == n, (name, ref.size, n)
            f.write(np.array([int(qt), n, data.size], dtype=np.uint64).tobytes())
            f.write(data.tobytes())
            f.write(ref.tobytes())
    exe = os.path.join(tmp, "quant_check")
    subprocess.run(["g++", "-std=c++17", "-O1", "-I", os.path.join(ROOT, "examples", "llama"),
                    os.path.join(ROOT, "scripts", "dev", "quant_check.cpp"), "-o", exe], check=True)
    out = subprocess.run([exe, fixture], check=False, capture_output=True, text=True)
    print(out.stdout, end="")
    return out.returncode == 0


def hf_dir(model):
    return os.path.dirname(os.path.abspath(model)), os.path.basename(model)


def hf_smollm_tokenizer(model):
    """The Hugging Face `tokenizers` pipeline that GGUF's pre-tokenizer name 'smollm' stands
    for: Digits(individual_digits) then ByteLevel, on a BPE model with the file's vocabulary
    and merges."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    r = gguf.GGUFReader(model)
    pre = r.fields["tokenizer.ggml.pre"].contents()
    assert pre == "smollm", f"this check knows the 'smollm' pre-tokenizer, the file says {pre!r}"
    vocab = {t: i for i, t in enumerate(r.fields["tokenizer.ggml.tokens"].contents())}
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    return tk


def check_tokenizer(kvc_llama, model, texts):
    from transformers import AutoTokenizer
    d, name = hf_dir(model)
    tf = AutoTokenizer.from_pretrained(d, gguf_file=name)
    tk = hf_smollm_tokenizer(model)
    ok = True

    def compare(label, ref, mine):
        same = ref == mine
        first = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), min(len(ref), len(mine)))
        print(f"  {label}: {len(ref)} tokens vs kvc-llama {len(mine)}: "
              f"{'IDENTICAL' if same else f'first difference at {first}: {ref[first:first+4]} vs {mine[first:first+4]}'}")
        return same

    for path in texts:
        text = open(path, encoding="utf-8").read()
        mine = [int(x) for x in subprocess.run([kvc_llama, "--model", model, "--tokenize", path], check=True,
                                               capture_output=True, text=True).stdout.split()]
        print(f"tokenizer {os.path.basename(path)}:")
        ok = compare("tokenizers, Digits+ByteLevel (what 'smollm' names)", tk.encode(text).ids, mine) and ok
        # transformers' GGUF converter ignores tokenizer.ggml.pre (plain ByteLevel, no digit
        # split), so it differs around digits; informational only.
        compare("transformers GGUF conversion (ignores the pre-tokenizer name)", tf.encode(text, add_special_tokens=False), mine)
        ok = ok and tk.decode(mine) == text
    return ok, tf


def check_logits(kvc_llama, model, tok, text_path, n_tokens, tmp):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    d, name = hf_dir(model)
    ids = [int(x) for x in subprocess.run([kvc_llama, "--model", model, "--tokenize", text_path], check=True,
                                          capture_output=True, text=True).stdout.split()][:n_tokens]
    ids_file = os.path.join(tmp, "ids.txt")
    with open(ids_file, "w") as f:
        f.write(" ".join(map(str, ids)))
    out = os.path.join(tmp, "logits.bin")
    subprocess.run([kvc_llama, "--model", model, "--cache", "dense", "--prompt-ids", ids_file, "--logits-out", out],
                   check=True, capture_output=True)
    mine = np.fromfile(out, dtype=np.float32)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    mine = mine.reshape(-1, ref.shape[1])
    if mine.shape != ref.shape:
        print(f"logits: shape mismatch {mine.shape} vs {ref.shape}")
        return False
    diff = np.abs(mine - ref)
    top1 = (mine.argmax(1) == ref.argmax(1)).mean()

    def nll(lg):
        lg = lg[:-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        return float(np.mean(lse - lg[np.arange(len(lg)), ids[1:]]))
    print(f"logits ({len(ids)} tokens of {os.path.basename(text_path)}): max |diff| {diff.max():.4g}, "
          f"mean |diff| {diff.mean():.3g}, logit range {ref.min():.1f}..{ref.max():.1f}, top-1 agreement {top1*100:.2f}%, "
          f"ppl transformers {np.exp(nll(ref)):.3f} vs kvc-llama {np.exp(nll(mine)):.3f}")
    return top1 > 0.99 and diff.max() < 0.05 * (ref.max() - ref.min())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="folder holding kvc-llama")
    ap.add_argument("--model", default=os.path.join(ROOT, ".cache", "model", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--texts", default=os.path.join(ROOT, ".cache", "texts"))
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    kvc_llama = os.path.join(a.bin, "kvc-llama")
    texts = [os.path.join(a.texts, t) for t in ("gpl3.txt", "kjv-genesis.txt")]
    with tempfile.TemporaryDirectory() as tmp:
        results = {"dequant": check_dequant(tmp)}
        results["tokenizer"], tok = check_tokenizer(kvc_llama, a.model, texts)
        results["logits"] = all([check_logits(kvc_llama, a.model, tok, t, a.tokens, tmp) for t in texts])
    for k, v in results.items():
        print(f"{k}: {'PASS' if v else 'FAIL'}")
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
