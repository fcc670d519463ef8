#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Per-text kvc-eval CSVs rebuilt from the tables of docs/results.md, for frontier.py.

kvc-eval's CSVs live in the session that ran them; the tables in docs/results.md are what stays.
This reads every table preceded by the line `<!-- frontier: TAG -->` (TAG names a protocol, e.g.
`4k`), takes from each row the spec (the first backticked text of its first cell), the pool bytes
per token (the header cell with "bytes/token measured", else the first with "bytes/token") and
each text's "Δppl ± se" (header cells "Genesis Δppl" and "Jargon Δppl"), and writes one CSV per
text with the reference row first, as kvc-eval does. A spec met twice keeps its first row (later
tables repeat rows "from" earlier ones); the repeats are listed on stderr.

Usage: results_csv.py RESULTS.md TAG OUT_PREFIX genesis=9.704 jargon=20.269
  writes OUT_PREFIX-genesis.csv and OUT_PREFIX-jargon.csv (text=reference perplexity; the
  reference is the fp32 cache of the tables' protocol)
"""
import csv
import re
import sys

COLUMNS = ["spec", "kv_bytes_per_token", "ppl_prefill", "dppl_prefill", "dppl_prefill_se", "error"]


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def delta(cell):
    """'+0.144 ± 0.045' (or bold, '**-0.110 ± 0.060**') -> (0.144, 0.045); a cell without a number -> None."""
    m = re.match(r"^\s*([+-]?[0-9.]+)\s*(?:±\s*([0-9.]+))?", cell.replace("−", "-").replace("*", ""))
    return (float(m.group(1)), float(m.group(2) or 0)) if m else None


def tables(lines, tag):
    """Yields (header cells, [row cells]) for each table marked with TAG."""
    marker = f"<!-- frontier: {tag} -->"
    i = 0
    while i < len(lines):
        if lines[i].strip() != marker:
            i += 1
            continue
        i += 1
        while i < len(lines) and not lines[i].startswith("|"):
            i += 1
        if i + 1 >= len(lines):
            sys.exit(f"results_csv.py: line {i}: a '{marker}' with no table after it")
        header, rows = cells(lines[i]), []
        i += 2  # the header and its |---| line
        while i < len(lines) and lines[i].startswith("|"):
            rows.append(cells(lines[i]))
            i += 1
        yield header, rows


def column(header, *needles, prefer=None):
    hits = [j for j, h in enumerate(header) if all(n in h for n in needles)]
    if prefer:
        hits = [j for j in hits if prefer in header[j]] or hits
    if not hits:
        sys.exit(f"results_csv.py: a marked table has no column with {needles}: {header}")
    return hits[0]


def main(md, tag, prefix, refs):
    lines = open(md, encoding="utf-8").read().splitlines()
    out = {text: {} for text in refs}
    repeats, partial = [], []
    seen = set()
    found = 0
    for header, rows in tables(lines, tag):
        found += 1
        b = column(header, "bytes/token", prefer="measured")
        cols = {text: column(header, text.capitalize() + " Δppl") for text in refs}
        for r in rows:
            m = re.search(r"`([^`]+)`", r[0])
            spec = m.group(1) if m else r[0]
            if spec in seen:
                repeats.append(spec)
                continue
            seen.add(spec)
            nbytes = float(r[b].replace(",", ""))
            got = {text: delta(r[j]) for text, j in cols.items()}
            for text, d in got.items():
                if d is not None:
                    out[text][spec] = (nbytes, d)
            if any(d is None for d in got.values()) and any(d is not None for d in got.values()):
                partial.append(spec)
    if not found:
        sys.exit(f"results_csv.py: {md} has no table marked '<!-- frontier: {tag} -->'")
    for text, ref in refs.items():
        with open(f"{prefix}-{text}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerow(["fp32", "", ref, 0, 0, ""])
            for spec, (nbytes, (d, se)) in out[text].items():
                w.writerow([spec, nbytes, round(ref + d, 6), d, se, ""])
    print(f"results_csv.py: {found} tables, {len(out[next(iter(refs))])} specs", file=sys.stderr)
    if repeats:
        print("results_csv.py: repeated specs, first row kept: " + "; ".join(repeats), file=sys.stderr)
    if partial:
        print("results_csv.py: measured on some texts only (frontier.py needs every text): " + "; ".join(partial),
              file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    refs = {}
    for a in sys.argv[4:]:
        text, sep, ppl = a.partition("=")
        if not sep:
            sys.exit(f"results_csv.py: '{a}': expected TEXT=PPL, e.g. genesis=9.704")
        refs[text] = float(ppl)
    main(sys.argv[1], sys.argv[2], sys.argv[3], refs)
