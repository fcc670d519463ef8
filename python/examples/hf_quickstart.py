# SPDX-License-Identifier: Apache-2.0
"""kvc under Hugging Face transformers: SmolLM2-135M-Instruct (the project's GGUF, loaded by
transformers) generating with its KV cache held and compressed by kvc, then a kvpress-like
one-shot compression of a context before a question. Needs torch, transformers, gguf, accelerate.

    python examples/hf_quickstart.py [MODEL.gguf]    # default: .cache/model/ of the checkout (scripts/fetch-model)
"""
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvc

path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                    pathlib.Path(__file__).resolve().parents[2] / ".cache/model/SmolLM2-135M-Instruct.Q4_1.gguf")
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

# 1. generate() with a kvc cache: SnapKV keeps half the prompt, KIVI stores it in 2 bits.
prompt = tok("KV-cache compression lets a language model keep long contexts in less memory by", return_tensors="pt")
cache = kvc.hf.Cache("snapkv(ratio=0.5)+kivi(bits=2)", model)    # the model, not only its config: SnapKV reads queries
out = model.generate(**prompt, cache=cache, max_new_tokens=12, do_sample=False)   # older transformers: past_key_values=
print(repr(tok.decode(out[0, prompt.input_ids.shape[1]:])))
print(cache, "| pool bytes:", cache.bytes_in_use())
cache.close()                                                      # removes the query hooks

# 2. Compress a context once, then ask about it: the question is not compressed (kvpress's pipeline).
context = tok("The meeting moved from Tuesday to Thursday at 3 pm, in room 12 instead of room 4. " * 4,
              return_tensors="pt").input_ids
question = tok(" Question: which room is the meeting in? Answer: room", return_tensors="pt").input_ids
with kvc.hf.press(model, "snapkv(ratio=0.5)") as cache:
    with torch.no_grad():
        model(context, cache=cache)
print(f"context: {cache.get_seq_length()} tokens seen, {cache.kvc.length(cache.seq, 0, 0)} kept per stream")
out = model.generate(torch.cat([context, question], 1), cache=cache, max_new_tokens=4, do_sample=False)
print("answer:", repr(tok.decode(out[0, context.shape[1] + question.shape[1]:])))
