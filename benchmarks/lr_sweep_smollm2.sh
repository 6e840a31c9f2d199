#!/usr/bin/env bash
# The learning-rate sweep behind configs/study_smollm2_long.yaml: short dense runs of SmolLM2-135M-Instruct with the
# study's recipe (alpaca rows 0..899, official prompt variants, cosine, ~3% warmup), one per lr, each scored by the
# recipe's own held-out split (eval_fraction of the training rows: not the study's eval documents). Prints one line
# per lr and writes benchmarks/results/study_smollm2_long/lr_sweep.json.
#   bash benchmarks/lr_sweep_smollm2.sh [LR ...]      (default 2e-5 5e-5 1e-4; ~1.5 min each on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/get_smollm2.sh)
OUT=${OUT:-runs/lr_sweep_smollm2}
STEPS=${STEPS:-6}
LRS=("$@"); [ ${#LRS[@]} -gt 0 ] || LRS=(2e-5 5e-5 1e-4)
RESULT=benchmarks/results/study_smollm2_long/lr_sweep.json
mkdir -p "$OUT" "$(dirname "$RESULT")"
echo "{\"date\": \"$(date -u +%FT%TZ)\", \"machine\": \"$(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg) at start\", \"steps\": $STEPS, \"tokens_per_step\": 2048, \"runs\": [" > "$RESULT.tmp"
sep=""
for lr in "${LRS[@]}"; do
  log="$OUT/lr$lr.log"
  .venv/bin/emoe-llm train --config configs/tiny_cpu.yaml output_dir="$OUT/lr$lr" resume=none seed=1 \
    model.path="$MODEL" model.build_tiny_if_missing=false model.mode=dense \
    data.template=alpaca data.template_variation=official \
    'data.sources=[{path: data/instruct/alpaca_en_demo.json, max_rows: 900}]' \
    train.lr="$lr" train.max_steps="$STEPS" train.warmup_ratio=0.03 train.min_lr_ratio=0.0 \
    train.save_every_steps=0 train.eval_every_steps=0 train.eval_max_batches=100 train.export=false \
    logging.tensorboard=false logging.progress_bar=false > "$log" 2>&1
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
