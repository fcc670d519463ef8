#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# kvc-eval's needle tasks (single, multikey, multivalue) are built as documented: checked from
# --dump-needles, independently of kvc-eval's own code: K needle sentences per trial with distinct
# numbers, the keys the task says (distinct for multikey, one for multivalue), the question naming
# the asked key, the asked needle at its depth of the prose (up to the line break it moves to), and
# the CSV's by-depth counts summing to its totals. Usage: eval_needles.sh KVC_EVAL TEXT.
# Exit 77 (skipped) without the model.
set -euo pipefail
eval_bin="$1" text="$2"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
for task in single multikey multivalue; do
  args=(--text "$text" --policies fp16 --reference fp16 --protocols needle --needle-context 160 --needle-seeds 2
        --needle-depth-count 4 --needle-task "$task" --needle-keys 3 --needle-max-new 1 --threads 1 --no-plot --quiet)
  if ! "$eval_bin" "${args[@]}" --out "$dir/$task" --dump-needles "$dir/$task.jsonl" > /dev/null 2> "$dir/$task.err"; then
    if grep -q "model not found\|KVC_MODEL=" "$dir/$task.err"; then cat "$dir/$task.err"; exit 77; fi
    cat "$dir/$task.err"; exit 1
  fi
  python3 - "$task" "$dir/$task.jsonl" "$dir/$task.csv" <<'PY'
import csv, json, re, sys
task, dump, table = sys.argv[1:]
k = 1 if task == "single" else 3
trials = [json.loads(l) for l in open(dump)]
assert len(trials) == 2 * 4, f"{len(trials)} trials, expected 2 seeds x 4 depths"
depths = sorted({t["depth"] for t in trials})
want = [(2 * i + 1) / 8 for i in range(4)]
assert all(abs(a - b) < 1e-5 for a, b in zip(depths, want)), f"depths {depths}, expected {want}"
pat = {"single": r"The secret number is (\d{5})\. Remember it\.\n",
       "multikey": r"The secret number of the ([a-z]+ [a-z]+) is (\d{5})\.\n",
       "multivalue": r"One of the secret numbers of the ([a-z]+ [a-z]+) is (\d{5})\.\n"}[task]
for t in trials:
    text = t["text"]
    found = list(re.finditer(pat, text))
    assert len(found) == k, f"{len(found)} needles in a {task} trial, expected {k}"
    numbers = [m.groups()[-1] for m in found]
    assert len(set(numbers)) == k, f"numbers repeat: {numbers}"
    q = text.rsplit("\n\n", 1)[1]
    if task == "single":
        asked = found[0]
        assert t["answers"] == numbers and "What is the secret number" in q
    elif task == "multikey":
        keys = [m.group(1) for m in found]
        assert len(set(keys)) == k, f"keys repeat: {keys}"
        assert len(t["answers"]) == 1 and t["answers"][0] in numbers
        asked = found[numbers.index(t["answers"][0])]
        assert f"secret number of the {asked.group(1)} mentioned" in q, q
    else:
        keys = {m.group(1) for m in found}
        assert len(keys) == 1, f"multivalue keys {keys}"
        assert sorted(t["answers"]) == sorted(numbers), (t["answers"], numbers)
        assert f"secret numbers of the {keys.pop()} mentioned" in q, q
        asked = found[numbers.index(t["answers"][0])]
    # The asked needle's place in the prose without the needles and the question.
    prose_len = len(text) - len(q) - 2 - sum(len(m.group(0)) for m in found)
    before = asked.start() - sum(len(m.group(0)) for m in found if m.start() < asked.start())
    at = t["depth"] * prose_len
    line = max(len(l) for l in text.split("\n")) + 1
    assert at - 1 <= before <= at + line, f"needle at {before} of {prose_len} chars, depth {t['depth']}"
    assert text[before + sum(len(m.group(0)) for m in found if m.start() < asked.start()) - 1] == "\n" or before == 0
rows = list(csv.DictReader(open(table)))
assert len(rows) == 1, rows
r = rows[0]
cells = [c.split("/") for c in r["needle_by_depth"].split()]
assert len(cells) == 4, r["needle_by_depth"]
hits, n = sum(int(h) for h, _ in cells), sum(int(m) for _, m in cells)
per = 2 * (k if task == "multivalue" else 1)
assert all(int(m) == per for _, m in cells), f"{r['needle_by_depth']}: expected {per} per depth"
assert n == int(r["needle_n"]) and abs(hits / n - float(r["needle_acc"])) < 1e-9, (r["needle_by_depth"], r["needle_acc"])
print(f"eval_needles: {task}: {len(trials)} trials as documented, {hits}/{n} found")
PY
done
if "$eval_bin" --text "$text" --policies fp16 --protocols needle --needle-task multi --no-plot > /dev/null 2> "$dir/bad.err"; then
  echo "an unknown --needle-task was accepted"; exit 1
fi
grep -q "expected single, multikey or multivalue" "$dir/bad.err" || { cat "$dir/bad.err"; exit 1; }
