#!/usr/bin/env bash
# The paper's Fig. 1 protocol on Permuted Fashion-MNIST (docs/results.md, docs/science.md):
# MLP 784-256-256-256-10, 5 tasks x 2000 iterations, batch 64, SGD.
#  1. MetaGrad's predictors with prediction diagnostics, 3 seeds (experiments/science.py),
#  2. each baseline's strength tuned on the validation split (seed 0),
#  3. all baselines with the tuned strengths, 3 seeds, on the test split.
# Usage: bash experiments/reproduce_fig1.sh [LR] [OUT]   (about an hour on 2 CPU cores)
set -euo pipefail
LR=${1:-0.03}
OUT=${2:-runs/fig1-lr$LR}
ROOT=${ROOT:-../shared/data}
# --preset fig1: Permuted Fashion-MNIST, 5 tasks x 2000 steps, batch 64, SGD, seeds 0 1 2
# (lightning_metagrad/benchmark/config.py); here with denser curves.
BENCH=".venv/bin/metagrad-benchmark --preset fig1 --root $ROOT --lr $LR
  --eval-every 100 --eval-samples 1000"
mkdir -p "$OUT"
.venv/bin/python experiments/science.py --preset fig1 --root "$ROOT" --lr "$LR" \
  --seeds 0 1 2 --output "$OUT/science" | tee "$OUT/science.txt"
for s in 1 10 100; do
  $BENCH --methods ewc online-ewc --strength ewc=$((s * 10)) --strength online-ewc=$((s * 10)) \
    --seeds 0 --eval-split val --output-dir "$OUT/tune-ewc-$s"
  $BENCH --methods si mas --strength si=$(python3 -c "print($s/10)") \
    --strength mas=$(python3 -c "print($s/10)") --seeds 0 --eval-split val \
    --output-dir "$OUT/tune-si-$s"
done
BEST=$(python3 - "$OUT" <<'PY'
import json, pathlib, sys
best = {}
for path in pathlib.Path(sys.argv[1]).glob("tune-*/results.json"):
    r = json.loads(path.read_text())
    strengths = dict(r["config"]["strengths"])
    for m, e in r["methods"].items():
        if m not in best or e["acc"] > best[m][1]:
            best[m] = (strengths[m], e["acc"])
print(" ".join(f"--strength {m}={v}" for m, (v, _) in sorted(best.items())))
PY
)
echo "tuned on validation: $BEST" | tee "$OUT/tuned.txt"
$BENCH --methods naive joint ewc online-ewc si mas $BEST --seeds 0 1 2 --output-dir "$OUT/final"
