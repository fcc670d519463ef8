# SPDX-License-Identifier: Apache-2.0
"""Wall time of transformers' generate() on SmolLM2-135M (the project's GGUF) with DynamicCache and
with kvc.hf caches: a 512-token prompt of random ids and 32 greedy tokens, one torch thread, best of
3. What kvc.hf costs over DynamicCache: the append, and the gathered (dequantized) copy per step.

    python python/bench/bench_hf.py [MODEL.gguf]
"""
import pathlib
import sys
import time

import torch
import transformers

import kvc

path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                    pathlib.Path(__file__).resolve().parents[2] / ".cache/model/SmolLM2-135M-Instruct.Q4_1.gguf")
torch.set_num_threads(1)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
ids = torch.randint(100, 20000, (1, 512))


def best_of_3(make):
    best = float("inf")
    for _ in range(3):
        cache = make()
        t0 = time.perf_counter()
        model.generate(ids, cache=cache, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        best = min(best, time.perf_counter() - t0)
    return best


base = best_of_3(lambda: transformers.DynamicCache(config=model.config))
print(f"DynamicCache: {base:.2f} s")
for spec in ["fp32", "snapkv(ratio=0.5)+kivi(bits=2)"]:
    s = best_of_3(lambda: kvc.hf.Cache(spec, model))
    print(f"kvc.hf.Cache('{spec}'): {s:.2f} s ({100 * (s / base - 1):+.0f}%)")
