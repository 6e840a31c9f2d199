#!/bin/bash
# Llama-2-7B -> EMoE (the recipe's emoe: section), full fine-tune with DeepSpeed ZeRO-3 on 1-2 nodes x 8 GPUs.
#
#   MODEL=/models/Llama-2-7b-hf sbatch slurm/llama7b.sh                 # 1 node x 8 GPUs (the #SBATCH lines)
#   MODEL=/models/Llama-2-7b-hf sbatch --nodes=2 slurm/llama7b.sh       # node/GPU counts: #SBATCH or sbatch flags only
#   sbatch slurm/llama7b.sh 'data.sources=[{path: /data/my_sft.jsonl}]' train.lr=1e-5   # recipe overrides
#   RECIPE=configs/llama2_7b_dense.yaml OUTPUT_DIR=runs/llama2_7b_dense sbatch slurm/llama7b.sh   # dense baseline
#   scancel --batch --signal=USR1 <jobid>      # checkpoint now, requeue, resume     touch $OUTPUT_DIR/STOP: just stop
# Logs: ./emoe-llama7b-<jobid>.out (appended by requeued attempts); checkpoints, final/ export, metrics.jsonl and the
# run snapshot: $OUTPUT_DIR. Resuming is automatic (resume=auto): sbatch the same command again. See docs/slurm.md.
#
#SBATCH --job-name=emoe-llama7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts one worker per GPU
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600            # 10 min before the time limit: checkpoint, requeue, resume (slurm/common.sh)
#SBATCH --requeue
#SBATCH --open-mode=append             # a requeued attempt appends to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- what to train (environment overrides: MODEL=... OUTPUT_DIR=... sbatch slurm/llama7b.sh)
MODEL=${MODEL:-}                                          # the dense HF checkpoint (not needed once converted)
EMOE_MODEL=${EMOE_MODEL:-checkpoints/llama2-7b-emoe64}    # converted once, then reused when it verifies
RECIPE=${RECIPE:-configs/llama2_7b_emoe.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/z3.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/llama2_7b_emoe}
CONVERT_ARGS=${CONVERT_ARGS:---device cuda}               # k-means on the GPU of the first node
export MODEL EMOE_MODEL RECIPE DS_CONFIG

# shellcheck source=slurm/common.sh
source "${EMOE_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
emoe_convert "$MODEL" "$EMOE_MODEL" "$@"                  # N, k, layers, seed, method: the recipe's emoe: section
emoe_snapshot "$RECIPE" "$DS_CONFIG" output_dir="$OUTPUT_DIR" model.path="$EMOE_MODEL" resume=auto "$@"

# One task per node; each runs torchrun with NPROC_PER_NODE workers; node rank = SLURM_NODEID (expanded per node).
# shellcheck disable=SC2016
emoe_run srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=1 \
  bash -c 'trap "" USR1; exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" train.py "$@"' torchrun \
  --ds_config "$DS_CONFIG" --config "$RECIPE" output_dir="$OUTPUT_DIR" model.path="$EMOE_MODEL" resume=auto "$@"
