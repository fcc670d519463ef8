#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Paired comparison of kvc-eval rows: how much a variant changes perplexity against a base row
on the same scored tokens (prefill protocol, or the stream protocol with --protocol stream), from
the per-token NLLs kvc-eval keeps in its journal (PREFIX.journal).

    paired.py JOURNAL [JOURNAL ...] --pair 'VARIANT vs BASE' [--pair ...] [--block 16] [--protocol prefill|stream]

For each text (journal) and pair: d_i = NLL_variant(i) - NLL_base(i) over the scored tokens;
the change is exp(mean d) - 1 (relative perplexity, %), its standard error from batch means of
`block` consecutive tokens (neighbouring tokens share one compressed cache, so single tokens
are not independent; kvc-eval's own ± uses the same blocks against the reference). The last
column averages the texts' changes, with the standard error of that mean. Pairing removes the
noise both rows share (the text's difficulty), which the ± of each row against the reference
does not: two rows within each other's ± can still differ clearly here.
Prints a Markdown table."""
import argparse
import math
import sys


# Where a journal line (kvc_eval.cpp, journal_line) keeps each protocol's per-token NLLs.
NLL_FIELD = {"prefill": 11, "stream": 18}


def read_journal(path, protocol="prefill"):
    """spec -> list of per-token NLLs of the protocol."""
    rows = {}
    with open(path) as f:
        for n, line in enumerate(f):
            if n == 0:
                continue  # the header line
            f_ = line.rstrip("\n").split("\t")
            if len(f_) < 25:
                continue  # a line cut short by an interruption
            rows[f_[0]] = [float(x) for x in f_[NLL_FIELD[protocol]].split()]
    return rows


def paired(a, b, block):
    if len(a) != len(b) or not a:
        return math.nan, math.nan
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    k = len(d) // block
    if k < 2:
        return math.exp(mean) - 1, math.nan
    means = [sum(d[j * block:(j + 1) * block]) / block for j in range(k)]
    mu = sum(means) / k
    var = sum((m - mu) ** 2 for m in means) / (k - 1)
    se = math.sqrt(var / k)
    return math.exp(mean) - 1, math.exp(mean) * se  # delta method: d(e^m)/dm = e^m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("journals", nargs="+")
    ap.add_argument("--pair", action="append", required=True, help="'VARIANT vs BASE' (specs as in the journal)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--protocol", choices=sorted(NLL_FIELD), default="prefill")
    o = ap.parse_args()
    texts = [(p, read_journal(p, o.protocol)) for p in o.journals]
    head = "| variant | base | " + " | ".join(p.rsplit("/", 1)[-1].replace(".journal", "") for p, _ in texts)
    print(head + " | mean |")
    print("|---|---|" + "---:|" * (len(texts) + 1))
    for pair in o.pair:
        if " vs " not in pair:
            sys.exit(f"paired.py: --pair {pair!r}, expected 'VARIANT vs BASE'")
        var, base = (x.strip() for x in pair.split(" vs ", 1))
        cells, vals, ses = [], [], []
        for path, rows in texts:
            if var not in rows or base not in rows:
                missing = var if var not in rows else base
                sys.exit(f"paired.py: {path} has no row {missing!r}; rows: {', '.join(rows)}")
            c, se = paired(rows[var], rows[base], o.block)
            cells.append(f"{100 * c:+.2f} ± {100 * se:.2f}%")
            vals.append(c)
            ses.append(se)
        m = sum(vals) / len(vals)
        mse = math.sqrt(sum(s * s for s in ses)) / len(ses)
        print(f"| `{var}` | `{base}` | " + " | ".join(cells) + f" | {100 * m:+.2f} ± {100 * mse:.2f}% |")


if __name__ == "__main__":
    main()
