#!/bin/bash
# LLaMA-30B -> EMoE (the recipe's emoe: section), full fine-tune with DeepSpeed ZeRO-3 on 4 nodes x 8 GPUs.
#
#   MODEL=/models/llama-30b sbatch slurm/llama30b.sh                    # 4 nodes x 8 GPUs (the #SBATCH lines)
#   MODEL=/models/llama-30b sbatch --nodes=8 slurm/llama30b.sh          # node/GPU counts: #SBATCH or sbatch flags only
#   DS_CONFIG=ds_configs/z3_offload.json sbatch slurm/llama30b.sh       # 40 GB GPUs: optimizer state on the CPU
#   sbatch slurm/llama30b.sh 'data.sources=[{path: /data/my_sft.jsonl}]' train.lr=1e-5   # recipe overrides
#   scancel --batch --signal=USR1 <jobid>      # checkpoint now, requeue, resume     touch $OUTPUT_DIR/STOP: just stop
# Logs: ./emoe-llama30b-<jobid>.out (appended by requeued attempts); checkpoints, final/ export, metrics.jsonl and the
# run snapshot: $OUTPUT_DIR. Resuming is automatic (resume=auto) at the same node x GPU count. See docs/slurm.md.
#
#SBATCH --job-name=emoe-llama30b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts one worker per GPU
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900            # 15 min before the time limit: checkpoint (a 30B ZeRO-3 save takes minutes),
#SBATCH --requeue                      #   requeue, resume (slurm/common.sh)
#SBATCH --open-mode=append             # a requeued attempt appends to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- what to train (environment overrides: MODEL=... OUTPUT_DIR=... sbatch slurm/llama30b.sh)
MODEL=${MODEL:-}                                          # the dense HF checkpoint (not needed once converted)
EMOE_MODEL=${EMOE_MODEL:-checkpoints/llama-30b-emoe256}   # converted once, then reused when it verifies
RECIPE=${RECIPE:-configs/llama30b_emoe.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/z3.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/llama30b_emoe}
# k-means on the GPU of the first node; --skip-copied: re-reading 2 x 65 GB on every requeue is not worth it
CONVERT_ARGS=${CONVERT_ARGS:---device cuda --skip-copied}
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
