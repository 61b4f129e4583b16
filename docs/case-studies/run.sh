#!/usr/bin/env bash
# Runs every case study of docs/tutorial.md and writes the reports next to this script:
# one HTML and one JSON report per case and method, and the two comparisons.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${PROMPT_SALIENCE_BIN:-target/release/prompt-salience}
out=docs/case-studies
cs=prompts/case-studies
methods="grad_l2 grad_dot_input integrated_gradients leave_one_out ablation_surrogate"
run() { # name file extra-args...
  local name=$1 file=$2; shift 2
  for m in $methods; do
    "$bin" compute "$file" --method "$m" --format json -o "$out/$name.$m.json" "$@" 2>/dev/null
  done
  "$bin" compute "$file" --format html -o "$out/$name.html" "$@" 2>/dev/null
}
run menu-few-shot $cs/menu-few-shot.prompt.md
run menu-few-shot-plain $cs/menu-few-shot.prompt.md --no-contrast
run principles-first $cs/principles-first.prompt.md
run principles-last $cs/principles-last.prompt.md
run math-chain-of-thought $cs/math-chain-of-thought.prompt.md --target "Answer: 7"
# The shipped examples too: the benchmark the default method is chosen by.
for f in prompts/*.prompt.md; do
  name=example-$(basename "$f" .prompt.md)
  for m in $methods; do
    "$bin" compute "$f" --method "$m" --format json -o "$out/$name.$m.json" 2>/dev/null
  done
done
"$bin" compare $cs/principles-first.prompt.md $cs/principles-last.prompt.md -o $out/principles.compare.html 2>/dev/null
"$bin" compare $cs/model-comparison.prompt.md --model smollm2-135m-instruct --model gemma-3-270m -o $out/models.compare.html 2>/dev/null
"$bin" compare $cs/model-comparison.prompt.md --model smollm2-135m-instruct --model gemma-3-270m --format json -o $out/models.compare.json 2>/dev/null
# The table of the tutorial: faithfulness at 20 % per case and method.
python3 - "$out" <<'PY'
import json, glob, os, sys
out = sys.argv[1]
rows = []
for f in sorted(glob.glob(os.path.join(out, "*.*.json"))):
    name = os.path.basename(f)
    if name.count(".") != 2 or "compare" in name:
        continue
    case, method, _ = name.split(".")
    r = json.load(open(f))
    fa = r.get("faithfulness")
    if not fa:
        continue
    n = fa["segments"]
    k = max(1, min(n - 1, int(0.2 * n + 0.5)))  # the point the verdict is judged at
    p = next(q for q in fa["points"] if q["deleted"] == k)
    ag = fa.get("agreement")
    rho = f"{ag['spearman']:+.2f}" if ag else "—"
    rows.append((case, method, r["seconds"], fa["verdict"], p["deleted"], n, fa["level"], p["top_drop"], p["random_mean"], p["random_sd"], rho))
with open(os.path.join(out, "faithfulness.md"), "w") as md:
    md.write("| case | method | seconds | verdict | deleted (20 %) | top: drop in F | random: drop in F | ρ with leave-one-out |\n|---|---|---|---|---|---|---|---|\n")
    for c, m, s, v, k, n, lvl, top, mean, sd, rho in rows:
        md.write(f"| {c} | {m} | {s:.1f} | {v} | {k} of {n} {lvl}s | {top:+.2f} | {mean:+.2f} ± {sd:.2f} | {rho} |\n")
    # Per method over every case: how often its map passes its own check.
    md.write("\n| method | faithful | inconclusive | not faithful | cases |\n|---|---|---|---|---|\n")
    for m in sorted({r[1] for r in rows}):
        vs = [r[3] for r in rows if r[1] == m]
        md.write(f"| {m} | {vs.count('faithful')} | {vs.count('inconclusive')} | {vs.count('not faithful')} | {len(vs)} |\n")
print(open(os.path.join(out, "faithfulness.md")).read())
PY
