#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The memory-quality frontier of one or more kvc-eval runs (prefill protocol).

Each run's Δppl is made relative to its own reference (Δppl / ppl_ref, in %), so runs over
different texts combine: a spec's point is the mean over the runs of its relative Δppl and of its
KV bytes per token, and its standard error is the runs' standard errors combined
(sqrt(Σ se²) / runs). A point is on the frontier when no other point has fewer or equal bytes
and a lower or equal Δppl, with one of the two strictly lower. The fidelity targets of issue 15
are checked against fp16's bytes per token (the `fp16` row, which every run must hold).

Usage: frontier.py OUT.png OUT.md RUN.csv [RUN.csv ...] [--name LABEL:SPEC ...]   (needs matplotlib)
  --name LABEL:SPEC   writes LABEL wherever SPEC occurs in a row's spec (table and plot), so a
                      long storage spec inside composites reads as one word
"""
import csv
import math
import sys

TARGETS = [(4.0, 1.0), (6.0, 3.0), (10.0, 10.0)]  # (x fewer bytes than fp16, within +% ppl)


def num(x):
    try:
        v = float(x)
        return v if math.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def load(paths):
    """{spec: [(bytes, rel %, se %)]} over the runs, and the reference spec of each run."""
    per_spec = {}
    for p in paths:
        rows = [r for r in csv.DictReader(open(p)) if not r["error"]]
        ref = rows[0]  # kvc-eval writes its reference first
        ppl_ref = num(ref["ppl_prefill"])
        if not ppl_ref:
            sys.exit(f"frontier.py: {p}: the reference row has no prefill perplexity")
        for r in rows[1:]:
            b, d, se = num(r["kv_bytes_per_token"]), num(r["dppl_prefill"]), num(r["dppl_prefill_se"])
            if b is None or d is None:
                continue
            per_spec.setdefault(r["spec"], []).append((b, 100 * d / ppl_ref, 100 * (se or 0) / ppl_ref))
    n = len(paths)
    points = {}
    for spec, v in per_spec.items():
        if len(v) != n:  # a spec missing from a run is left out, not averaged over fewer texts
            continue
        points[spec] = (sum(x[0] for x in v) / n, sum(x[1] for x in v) / n,
                        math.sqrt(sum(x[2] ** 2 for x in v)) / n)
    return points


def frontier(points):
    on = set()
    for s, (b, d, _) in points.items():
        dominated = any((b2 <= b and d2 <= d and (b2 < b or d2 < d)) for s2, (b2, d2, _) in points.items() if s2 != s)
        if not dominated:
            on.add(s)
    return on


def main(png, md, paths, names=()):
    points = load(paths)
    for label, spec in names:  # longest specs first, so a spec inside another is not cut apart
        points = {s.replace(spec, label): v for s, v in points.items()}
    if "fp16" not in points:
        sys.exit("frontier.py: every run must hold an fp16 row (the targets are relative to its bytes)")
    fp16 = points["fp16"][0]
    on = frontier(points)
    lines = ["| spec | KV bytes/token | x fewer than fp16 | Δppl % ± se | frontier | targets met |",
             "|---|---:|---:|---:|:-:|---|"]
    for s, (b, d, se) in sorted(points.items(), key=lambda kv: kv[1][0]):
        x = fp16 / b
        met = [f"{t:g}x/+{q:g}%" for t, q in TARGETS if x >= t and d <= q]
        lines.append(f"| `{s}` | {b:.0f} | {x:.2f} | {d:+.2f} ± {se:.2f} | {'yes' if s in on else ''} | "
                     f"{', '.join(met)} |")
    for t, q in TARGETS:
        best = [s for s, (b, d, _) in points.items() if fp16 / b >= t and d <= q]
        lines.append(f"\nTarget {t:g}x within +{q:g}%: " + (", ".join(f"`{s}`" for s in best) if best else "not met"))
    open(md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    # Labels on the frontier only once the plot is crowded (more than 12 points): the others are
    # in the table, and 30 overlapping labels hid the frontier's own.
    crowded = len(points) > 12
    for s, (b, d, se) in points.items():
        c = "tab:red" if s in on else "tab:gray"
        ax.errorbar(fp16 / b, d, yerr=se, fmt="o", color=c, ms=5 if s in on or not crowded else 3, capsize=2)
        if s in on or not crowded:
            ax.annotate(s, (fp16 / b, d), textcoords="offset points", xytext=(4, 3), fontsize=7, color=c)
    f = sorted((fp16 / points[s][0], points[s][1]) for s in on)
    ax.plot([p[0] for p in f], [p[1] for p in f], "-", color="tab:red", lw=1, label="frontier")
    # The target lines start at the lowest point, not at the axis' current limit: each line would
    # otherwise widen the limit the next one starts from.
    lo = min([0.0] + [d - se for _, d, se in points.values()])
    for t, q in TARGETS:
        ax.plot([t, t], [lo, q], ":", color="tab:green", lw=1)
        ax.plot([t, ax.get_xlim()[1]], [q, q], ":", color="tab:green", lw=1)
        ax.annotate(f"target {t:g}x, +{q:g}%", (t, q), textcoords="offset points", xytext=(3, -10), fontsize=7,
                    color="tab:green")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("compression: fp16 bytes per token / policy bytes per token (page pool)")
    ax.set_ylabel("Δ perplexity, % of the fp32 cache's (mean over texts)")
    ax.set_title(f"kvc, SmolLM2-135M: memory against quality ({len(paths)} runs"
                 + (", labels on the frontier only)" if crowded else ")"), fontsize=10)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylim(bottom=lo - 0.3)  # symlog's margin would otherwise give a decade of empty negative axis
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=130)


if __name__ == "__main__":
    args, names = [], []
    it = iter(sys.argv[1:])
    for a in it:
        if a == "--name":
            label, sep, spec = next(it, "").partition(":")
            if not sep or not label or not spec:
                sys.exit("frontier.py: --name takes LABEL:SPEC, e.g. --name 'K3:kivi(bits=3)'")
            names.append((label, spec))
        else:
            args.append(a)
    if len(args) < 3:
        sys.exit(__doc__)
    main(args[0], args[1], args[2:], sorted(names, key=lambda n: -len(n[1])))
