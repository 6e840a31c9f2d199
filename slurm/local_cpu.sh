#!/bin/bash
# The tiny CPU recipe through the same Slurm path as the GPU jobs: 2 nodes x 1 CPU process (gloo), ZeRO-3, a tiny
# Llama built on the fly, converted to EMoE (skipped once it verifies), preemptible + requeueable. CI runs it on a
# local 2-node Slurm cluster (tools/slurm_local.sh); on a real CPU partition it is a 2-minute smoke test.
#
#   sbatch slurm/local_cpu.sh                              # 2 nodes x 1 process
#   sbatch --nodes=1 slurm/local_cpu.sh                    # counts come from the allocation only
#   NPROC_PER_NODE=2 sbatch --nodes=1 slurm/local_cpu.sh   # 2 processes on one node
#   sbatch slurm/local_cpu.sh train.max_steps=40           # trailing key=value args override the recipe
#   scancel --batch --signal=USR1 <jobid>                  # checkpoint now, requeue, resume
#
#SBATCH --job-name=emoe-tiny-cpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts NPROC_PER_NODE workers
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60             # 60 s before the time limit: checkpoint, requeue, resume (slurm/common.sh)
#SBATCH --requeue
#SBATCH --open-mode=append             # a requeued attempt appends to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- what to train (environment overrides: OUTPUT_DIR=runs/x sbatch slurm/local_cpu.sh)
MODEL=${MODEL:-runs/slurm_tiny/dense}          # built below when missing (tiny demo model, random weights)
EMOE_MODEL=${EMOE_MODEL:-runs/slurm_tiny/emoe} # converted with the recipe's emoe: settings
RECIPE=${RECIPE:-configs/tiny_cpu.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/z3.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/slurm_tiny/train}
export MODEL EMOE_MODEL RECIPE DS_CONFIG

# shellcheck source=slurm/common.sh
source "${EMOE_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$MODEL/config.json" ]; then
  emoe_log "building the tiny dense Llama at $MODEL"
  "$PYTHON" -c 'import sys; from emoe_llm.tiny import save_tiny_checkpoint as s
s(sys.argv[1], tokenizer_dir="data/tokenizers/tiny_llama3_style", seed=0)' "$MODEL"
fi
emoe_convert "$MODEL" "$EMOE_MODEL" "$@"                  # N, k, layers, seed, method: the recipe's emoe: section
emoe_snapshot "$RECIPE" "$DS_CONFIG" output_dir="$OUTPUT_DIR" model.path="$EMOE_MODEL" resume=auto "$@"

# One task per node; each runs torchrun with NPROC_PER_NODE workers; node rank = SLURM_NODEID (expanded per node).
# shellcheck disable=SC2016
emoe_run srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=1 \
  bash -c 'trap "" USR1; exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" train.py "$@"' torchrun \
  --ds_config "$DS_CONFIG" --config "$RECIPE" output_dir="$OUTPUT_DIR" model.path="$EMOE_MODEL" resume=auto "$@"
