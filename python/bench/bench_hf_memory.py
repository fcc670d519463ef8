# SPDX-License-Identifier: Apache-2.0
"""KV memory of a Hugging Face generation on SmolLM2-135M (the project's GGUF, fp32): transformers'
DynamicCache against kvc.hf.Cache(SPEC, model), measured from the caches and confirmed by the
process's RSS.

    python python/bench/bench_hf_memory.py [--prompt 2016] [--new 33] [--spec 'snapkv(ratio=0.75)+int4']

The prompt is the first PROMPT tokens of a real text (.cache/texts/kjv-genesis.txt, else the GPL-3);
generate() adds NEW greedy tokens (min_new_tokens = max_new_tokens); the last one is not fed back,
so the caches see PROMPT + NEW - 1 tokens: 2,016 + 32 = 2,048 by default. kvc.hf.Cache compresses
after the prompt's forward (after_prefill, one layer at a time), then appends the generated tokens
and after_decode_step keeps the budget at every step (snapkv's defaults: interval=1, slack=0, so the
cache keeps ratio of the tokens seen: 512 of 2,048 at the end).

Each configuration runs in its own subprocess (one torch thread), which reports:
  - cache bytes at the end: DynamicCache, the nbytes of its key/value tensors; kvc, the page pool's
    bytes_in_use (plus its page-table/positions metadata, listed apart);
  - RSS (VmRSS from /proc/self/status) after the model load, after the prompt's forward (read by a
    generate() streamer when the first generated token arrives) and after generation, each read
    raw and again after malloc_trim(0), which hands back to the OS the heap memory that the
    prompt's freed activations left behind (glibc keeps it otherwise, and it would be counted);
  - peak RSS (ru_maxrss) after the load, after the prompt and at the end (the load's own transient,
    dequantizing the GGUF, can set it for the whole process);
  - kvc's transient gathered copy: the float32 K/V that one layer's update returns, measured at the
    end by gathering each layer once (what the next decode step's attention would read).
"""
import argparse
import ctypes
import gc
import json
import os
import pathlib
import resource
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache/model/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [ROOT / ".cache/texts/kjv-genesis.txt", pathlib.Path("/usr/share/common-licenses/GPL-3")]


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


_libc = ctypes.CDLL("libc.so.6")


def rss_pair():
    """(raw RSS, RSS after gc and malloc_trim(0)) in bytes."""
    raw = rss_bytes()
    gc.collect()
    _libc.malloc_trim(0)
    return raw, rss_bytes()


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def prompt_ids(tokenizer, n):
    for path in TEXTS:
        if path.is_file():
            ids = tokenizer(path.read_text(), return_tensors="pt").input_ids[:, :n]
            if ids.shape[1] == n:
                return ids, path
    raise SystemExit(f"no text of {n} tokens among {[str(p) for p in TEXTS]}")


def child(args):
    import torch
    import transformers

    import kvc
    import kvc.hf

    torch.set_num_threads(1)
    model_path = pathlib.Path(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    ids, text = prompt_ids(tok, args.prompt)
    r = {"config": args.run, "text": str(text), "prompt": args.prompt, "new": args.new,
         "attn_implementation": model.config._attn_implementation, "kvc_isa": kvc.isa()}
    r["rss_load"], r["rss_load_trimmed"] = rss_pair()
    r["peak_rss_load"] = peak_rss()

    cache = (transformers.DynamicCache(config=model.config) if args.run == "dynamic"
             else kvc.hf.Cache(args.spec, model))

    class Probe:  # generate() calls put(prompt) before the prompt's forward, then put(token) per token
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first generated token: the prompt's forward is done
                r["rss_prefill"], r["rss_prefill_trimmed"] = rss_pair()
                r["peak_rss_prefill"] = peak_rss()
                if args.run == "kvc":
                    r["pool_bytes_after_prefill"] = cache.bytes_in_use()

        def end(self):
            pass

    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=args.new, min_new_tokens=args.new,
                             do_sample=False, streamer=Probe())
    r["generated"] = int(out.shape[1] - ids.shape[1])
    r["rss_end"], r["rss_end_trimmed"] = rss_pair()
    r["peak_rss_end"] = peak_rss()
    if args.run == "dynamic":
        r["cache_bytes"] = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        r["cache_dtype"] = str(cache.layers[0].keys.dtype)
        r["tokens_per_layer"] = int(cache.layers[0].keys.shape[-2])
    else:
        r["cache_bytes"] = cache.bytes_in_use()
        r["metadata_bytes"] = cache.kvc.metadata_bytes
        r["pool_bytes_allocated"] = cache.kvc.bytes_allocated
        r["pool_bytes_released"] = cache.kvc.bytes_released
        r["tokens_per_layer"] = cache._kept(0)
        r["seen"] = cache.get_seq_length()
        r["compressions"] = len(cache.reports)
        gathered = [cache._gather(layer, torch.device("cpu"), torch.float32) for layer in range(len(cache.layers))]
        r["gathered_bytes_per_layer"] = max(k.nbytes + v.nbytes for k, v in gathered)
        del gathered
        cache.close()
    print("RESULT " + json.dumps(r), flush=True)


def mib(b):
    return f"{b / 2**20:.1f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2016, help="prompt tokens (default 2016)")
    ap.add_argument("--new", type=int, default=33,
                    help="generated tokens (default 33: the last is not fed back, so the cache sees prompt + 32 = 2,048)")
    ap.add_argument("--spec", default="snapkv(ratio=0.75)+int4", help="kvc spec")
    ap.add_argument("--model", default=str(MODEL), help="GGUF file")
    ap.add_argument("--run", choices=["dynamic", "kvc"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        return child(args)

    res = {}
    for run in ["dynamic", "kvc"]:
        cmd = [sys.executable, __file__, "--run", run, "--prompt", str(args.prompt), "--new", str(args.new),
               "--spec", args.spec, "--model", args.model]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            sys.exit(f"{run} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
        res[run] = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps(res[run]), flush=True)

    d, k = res["dynamic"], res["kvc"]
    print(f"\nSmolLM2-135M fp32 ({d['attn_implementation']} attention), prompt {args.prompt} tokens of "
          f"{pathlib.Path(d['text']).name}, {args.new} generated: the caches saw {args.prompt + args.new - 1} "
          f"tokens; kvc spec '{args.spec}'")
    print(f"KV bytes at the end: DynamicCache {d['cache_bytes']} ({mib(d['cache_bytes'])}, {d['cache_dtype']}, "
          f"{d['tokens_per_layer']} tokens/layer); kvc pool bytes_in_use {k['cache_bytes']} "
          f"({mib(k['cache_bytes'])}, {k['tokens_per_layer']} of {k['seen']} tokens kept/layer; "
          f"+ metadata {mib(k['metadata_bytes'])}); kvc pool after the prompt {mib(k['pool_bytes_after_prefill'])}, "
          f"{k['compressions']} layer compressions")
    print(f"ratio kvc / DynamicCache: {k['cache_bytes'] / d['cache_bytes']:.4f} "
          f"(with kvc's metadata: {(k['cache_bytes'] + k['metadata_bytes']) / d['cache_bytes']:.4f})")
    print(f"kvc transient gathered copy (float32 K+V of one layer, at the end): {mib(k['gathered_bytes_per_layer'])}")
    print("RSS (raw / after malloc_trim):")
    for name, r in (("DynamicCache", d), ("kvc", k)):
        print(f"  {name:12s} after load {mib(r['rss_load'])} / {mib(r['rss_load_trimmed'])}; "
              f"growth after prompt {mib(r['rss_prefill'] - r['rss_load'])} / "
              f"{mib(r['rss_prefill_trimmed'] - r['rss_load_trimmed'])}; "
              f"growth after generation {mib(r['rss_end'] - r['rss_load'])} / "
              f"{mib(r['rss_end_trimmed'] - r['rss_load_trimmed'])}; "
              f"peak after load {mib(r['peak_rss_load'])}, at the end {mib(r['peak_rss_end'])} "
              f"(+{mib(r['peak_rss_end'] - r['peak_rss_load'])})")
    gd = d["rss_end_trimmed"] - d["rss_load_trimmed"]
    gk = k["rss_end_trimmed"] - k["rss_load_trimmed"]
    print(f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '(unset: glibc default, dynamic)')}")
    print(f"trimmed RSS growth: DynamicCache - kvc = {mib(gd - gk)} (KV bytes difference {mib(d['cache_bytes'] - k['cache_bytes'])})")


if __name__ == "__main__":
    main()
