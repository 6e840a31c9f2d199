#!/usr/bin/env bash
# The learning-rate sweep behind configs/study_smollm2_long.yaml: short dense runs of SmolLM2-135M-Instruct with the
# study's dense recipe (read from the study file: alpaca rows 0..899, official prompt variants, cosine, ~3% warmup),
# one per lr, each scored by the recipe's own held-out split (eval_fraction of the training rows: not the study's eval documents). Prints one line
# per lr and merges them into benchmarks/results/study_smollm2_long/lr_sweep.json (a rerun lr replaces its entry; each
# entry carries its date and the load at its start, so one value can be added without rerunning the rest).
#   bash benchmarks/lr_sweep_smollm2.sh [LR ...]      (default 2e-5 5e-5 1e-4 2e-4 4e-4; ~2.7 min each on 2 idle cores, conversion included)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/get_smollm2.sh)
OUT=${OUT:-runs/lr_sweep_smollm2}
STEPS=${STEPS:-6}
LRS=("$@"); [ ${#LRS[@]} -gt 0 ] || LRS=(2e-5 5e-5 1e-4 2e-4 4e-4)
RESULT=benchmarks/results/study_smollm2_long/lr_sweep.json
# the study's own dense recipe (its base, then its overrides for cell dense-s1, seed included): no copy to drift
mapfile -t STUDY_RECIPE < <(.venv/bin/python -c 'import sys; from emoe_llm.study.spec import load_study
study = load_study(sys.argv[1]); print("\n".join([study.base, *study.cell("dense-s1").overrides]))' \
  configs/study_smollm2_long.yaml)
[ ${#STUDY_RECIPE[@]} -gt 1 ] || { echo "lr_sweep: could not read configs/study_smollm2_long.yaml" >&2; exit 2; }
mkdir -p "$OUT" "$(dirname "$RESULT")"
for lr in "${LRS[@]}"; do
  log="$OUT/lr$lr.log"
  rm -rf "$OUT/lr$lr"   # the sweep's own scratch run: each lr starts from the checkpoint, never resumes
  started=$(date -u +%FT%TZ); load=$(cut -d' ' -f1 /proc/loadavg)
  .venv/bin/emoe-llm train --config "${STUDY_RECIPE[@]}" output_dir="$OUT/lr$lr" resume=none \
    model.path="$MODEL" train.lr="$lr" train.max_steps="$STEPS" train.save_every_steps=0 train.eval_every_steps=0 \
    train.eval_max_batches=100 train.export=false logging.progress_bar=false > "$log" 2>&1 \
    || { echo "lr_sweep: the run at lr $lr failed, see $log" >&2; exit 1; }
  .venv/bin/python - "$RESULT" "$lr" "$OUT/lr$lr/metrics.jsonl" "$started" "$(nproc) cores, load $load at start" <<'PY'
import json, os, sys
path, lr, metrics, started, machine = sys.argv[1:]
# the run's own record (metrics.jsonl: one line per step, then the final_eval event), not its log's wording
events = [json.loads(line) for line in open(metrics)]
steps = [e for e in events if "loss" in e and "event" not in e]
final = [e for e in events if e.get("event") == "final_eval"]
if not steps or not final:
    sys.exit(f"lr_sweep: {metrics} has no step losses or no final_eval event")
run = {"lr": float(lr), "steps": steps[-1]["step"], "train_loss_first": round(steps[0]["loss"], 4),
       "train_loss_last": round(steps[-1]["loss"], 4), "eval_loss": round(final[-1]["eval_loss"], 4),
       "date": started, "machine": machine}
print(f"lr {lr}: train loss {run['train_loss_first']} -> {run['train_loss_last']}, held-out eval loss {run['eval_loss']}")
result = json.load(open(path)) if os.path.exists(path) else {"tokens_per_step": 2048, "runs": []}
result["runs"] = sorted([r for r in result["runs"] if r["lr"] != run["lr"]] + [run], key=lambda r: r["lr"])
with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
os.replace(path + ".tmp", path)
PY
done
echo "wrote $RESULT"
