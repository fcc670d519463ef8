#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Plots a kvc-eval CSV: quality against KV bytes per token, one line per policy family
(a family is a spec with its budget left open), one panel per protocol.
Usage: plot.py RESULTS.csv OUT.png   (needs matplotlib: python3 -m pip install matplotlib)"""
import csv
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def num(x):
    try:
        v = float(x)
        return v if math.isfinite(v) else None
    except ValueError:
        return None


def main(src, dst):
    rows = [r for r in csv.DictReader(open(src)) if not r["error"]]
    panels = [("kv_bytes_per_token", "dppl_prefill", "Δ perplexity, prefill then compress"),
              ("kv_bytes_per_token_stream", "dppl_stream", "Δ perplexity, compress while decoding"),
              ("kv_bytes_per_token", "needle_acc", "needle retrieval accuracy")]
    panels = [p for p in panels if any(num(r[p[1]]) is not None for r in rows)]
    if not panels:
        sys.exit("plot.py: nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    families = list(dict.fromkeys(r["family"] for r in rows))
    colors = plt.get_cmap("tab20").colors  # more families than the default 10-colour cycle
    for ax, (xk, yk, title) in zip(axes[0], panels):
        for fam in families:
            pts = sorted((num(r[xk]), num(r[yk])) for r in rows if r["family"] == fam
                         and num(r[xk]) is not None and num(r[yk]) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            i = families.index(fam)
            ax.plot(xs, ys, marker="os^D"[i % 4], color=colors[i % len(colors)], label=fam)
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes per token (kvc page pool)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"plot.py: wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
