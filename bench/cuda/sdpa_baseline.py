#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""PyTorch scaled-dot-product-attention decode on the shapes of bench_cuda_decode (32 query heads,
8 kv heads, head_dim 128, fp16, 4k-128k tokens, batch 1-64), timed with CUDA events (median of 50
calls after 5 warm-ups), for the issue's "fp16 at least as fast as PyTorch's SDPA" comparison.
K/V are dense [batch, 8, ctx, 128] (SDPA has no paged input) and GQA goes through enable_gqa
(PyTorch >= 2.5) or, failing that, repeat_interleave outside the timed region.
First run on an H200 on 2026-12-04 (bench/results/cuda_sdpa.json, docs/cuda.md). On the GPU machine:
    python3 bench/cuda/sdpa_baseline.py > bench/results/cuda_sdpa.json
"""
import json
import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128


def time_call(fn, reps=50, warmup=5):
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    stop = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for a, b in zip(start, stop):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(start, stop))
    return ts[len(ts) // 2]


def main():
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "runs": []}
    for ctx in (4096, 32768, 131072):
        for batch in (1, 16, 64):
            kv_bytes = 2 * batch * HKV * ctx * D * 2
            if kv_bytes > 20 * 2**30:
                continue
            q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.float16)
            k = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.float16)
            v = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.float16)
            try:
                fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                fn()
                mode = "enable_gqa"
            except TypeError:
                k2 = k.repeat_interleave(HQ // HKV, dim=1)
                v2 = v.repeat_interleave(HQ // HKV, dim=1)
                fn = lambda: F.scaled_dot_product_attention(q, k2, v2)
                mode = "repeat_interleave"
            t = time_call(fn)
            out["runs"].append({"ctx": ctx, "batch": batch, "seconds": t, "GBps": kv_bytes / t / 1e9, "gqa": mode})
            del q, k, v
            torch.cuda.empty_cache()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
