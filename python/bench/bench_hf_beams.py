# SPDX-License-Identifier: Apache-2.0
"""KV bytes of beam search on SmolLM2-135M (the project's GGUF, fp32): transformers' DynamicCache
against kvc.hf.Cache(SPEC, model) for each SPEC, same prompt, same generate() arguments.

    python python/bench/bench_hf_beams.py [--prompt 256] [--new 32] [--beams 4] [--specs 'fp32;int8;...']

generate() expands the prompt to one row per beam; at each step it calls reorder_cache, which kvc.hf
turns into forks (pages shared until written) and removals. DynamicCache's bytes are its tensors'
nbytes at the end; kvc's are the page pool's bytes_in_use. Also printed: whether the generated ids
equal DynamicCache's, the rows held and the tokens held summed over rows (what one copy per row
would store)."""
import argparse

import torch

from _model import ROOT, load


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / ".cache/model/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--specs", default="fp32;int8;snapkv(ratio=0.5)+int8")
    a = p.parse_args()
    import kvc.hf
    import transformers

    model, tok = load(a.model)
    ids = tok((ROOT / "README.md").read_text(), return_tensors="pt").input_ids[:, :a.prompt]
    run = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, num_beams=a.beams)
    dyn = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        ref = model.generate(ids, cache=dyn, **run)
    dyn_bytes = sum(t.nbytes for layer in dyn.layers for t in (layer.keys, layer.values))
    print(f"prompt {ids.shape[1]} tokens, {a.new} new, {a.beams} beams: DynamicCache {dyn_bytes} B")
    for spec in a.specs.split(";"):
        cache = kvc.hf.Cache(spec, model)
        with torch.no_grad():
            out = model.generate(ids, cache=cache, **run)
        cache.close()
        pool = cache.bytes_in_use()
        print(f"{spec}: pool {pool} B = {pool / dyn_bytes:.3f} of DynamicCache; rows {len(cache.seqs)}, tokens held "
              f"over rows {cache.kvc.tokens_held}; ids equal DynamicCache's: {out.tolist() == ref.tolist()}")


if __name__ == "__main__":
    main()
