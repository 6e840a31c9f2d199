#!/usr/bin/env bash
# The learning-rate sweep behind configs/study_smollm2_long.yaml: short dense runs of SmolLM2-135M-Instruct with the
# study's dense recipe (read from the study file: alpaca rows 0..899, official prompt variants, cosine, ~3% warmup),
# one per lr, each scored by the recipe's own held-out split (eval_fraction of the training rows: not the study's eval documents). Prints one line
# per lr and writes benchmarks/results/study_smollm2_long/lr_sweep.json.
#   bash benchmarks/lr_sweep_smollm2.sh [LR ...]      (default 2e-5 5e-5 1e-4; ~2.7 min each on 2 idle cores, conversion included)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/get_smollm2.sh)
OUT=${OUT:-runs/lr_sweep_smollm2}
STEPS=${STEPS:-6}
LRS=("$@"); [ ${#LRS[@]} -gt 0 ] || LRS=(2e-5 5e-5 1e-4)
RESULT=benchmarks/results/study_smollm2_long/lr_sweep.json
# the study's own dense recipe (its base, then its overrides for cell dense-s1, seed included): no copy to drift
mapfile -t STUDY_RECIPE < <(.venv/bin/python -c 'import sys; from emoe_llm.study.spec import load_study
study = load_study(sys.argv[1]); print("\n".join([study.base, *study.cell("dense-s1").overrides]))' \
  configs/study_smollm2_long.yaml)
[ ${#STUDY_RECIPE[@]} -gt 1 ] || { echo "lr_sweep: could not read configs/study_smollm2_long.yaml" >&2; exit 2; }
mkdir -p "$OUT" "$(dirname "$RESULT")"
echo "{\"date\": \"$(date -u +%FT%TZ)\", \"machine\": \"$(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg) at start\", \"steps\": $STEPS, \"tokens_per_step\": 2048, \"runs\": [" > "$RESULT.tmp"
sep=""
for lr in "${LRS[@]}"; do
  log="$OUT/lr$lr.log"
  .venv/bin/emoe-llm train --config "${STUDY_RECIPE[@]}" output_dir="$OUT/lr$lr" resume=none \
    model.path="$MODEL" train.lr="$lr" train.max_steps="$STEPS" train.save_every_steps=0 train.eval_every_steps=0 \
    train.eval_max_batches=100 train.export=false logging.progress_bar=false > "$log" 2>&1
  loss=$(grep -o 'final eval loss [0-9.]*' "$log" | awk '{print $4}')
  first=$(grep -o 'step 1/[0-9]* loss [0-9.]*' "$log" | awk '{print $4}')
  last=$(grep -o "step $STEPS/[0-9]* loss [0-9.]*" "$log" | awk '{print $4}')
  echo "lr $lr: train loss $first -> $last, held-out eval loss $loss"
  echo "$sep{\"lr\": $lr, \"train_loss_first\": $first, \"train_loss_last\": $last, \"eval_loss\": $loss}" >> "$RESULT.tmp"
  sep=","
done
echo "]}" >> "$RESULT.tmp"
mv "$RESULT.tmp" "$RESULT"
echo "wrote $RESULT"
