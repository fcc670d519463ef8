#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# kvc-eval --resume: a run whose journal was cut after two rows (and in the middle of a third)
# and then resumed writes the same CSV figures as an uninterrupted run; a journal written with
# other settings is refused. Usage: eval_resume.sh KVC_EVAL TEXT. Exit 77 (skipped) without the model.
set -euo pipefail
eval_bin="$1" text="$2"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
# The needle rows carry their by-depth counts through the journal (the CSV's last column).
args=(--text "$text" --policies "fp16;int8;kivi(bits=2)" --protocols prefill,stream,needle --context 48 --score 32
      --windows 2 --decode-tokens 2 --stream-tokens 48 --needle-context 64 --needle-seeds 1 --needle-depth-count 2
      --needle-task multikey --needle-keys 2 --needle-max-new 2 --threads 1 --no-plot --quiet)
if ! "$eval_bin" "${args[@]}" --out "$dir/full" > /dev/null 2> "$dir/full.err"; then
  if grep -q "model not found\|KVC_MODEL=" "$dir/full.err"; then cat "$dir/full.err"; exit 77; fi
  cat "$dir/full.err"; exit 1
fi
[[ $(wc -l < "$dir/full.journal") -eq 5 ]] || { echo "expected a header and 4 rows in the journal"; exit 1; }
head -3 "$dir/full.journal" > "$dir/cut.journal"
sed -n 4p "$dir/full.journal" | head -c 120 >> "$dir/cut.journal"  # the line the interruption cut
"$eval_bin" "${args[@]}" --out "$dir/cut" --resume > /dev/null 2> "$dir/cut.err"
grep -q -- "--resume: 2 finished rows" "$dir/cut.err" || { cat "$dir/cut.err"; echo "expected 2 rows reused"; exit 1; }
# Every column but the timings (prefill/decode/stream tok/s, compress_ms: 16-19) must be equal.
if ! diff <(cut -d, -f1-15,20- "$dir/full.csv") <(cut -d, -f1-15,20- "$dir/cut.csv"); then
  echo "the resumed CSV differs from the uninterrupted one"; exit 1
fi
if "$eval_bin" "${args[@]}" --context 40 --out "$dir/cut" --resume > /dev/null 2> "$dir/bad.err"; then
  echo "a journal with other settings was accepted"; exit 1
fi
grep -q "written with other settings" "$dir/bad.err" || { cat "$dir/bad.err"; exit 1; }
echo "eval_resume: resumed run equals the uninterrupted one"
