"""Run by tests/test_emoe_zero3.py under `deepspeed --num_gpus 2` (two CPU ranks, gloo).

Loads a converted tiny EMoE checkpoint under zero.Init (parameters partitioned across the ranks), takes one SGD step
with ZeRO-3 on a per-rank batch, and writes each rank's loss plus the gathered updated parameters, so the test can
compare them with a single-process reference.
"""

import argparse
import json
import os
import sys

import deepspeed
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from emoe_llm.emoe import EMoEMLP, enable_emoe, pop_expert_load
from emoe_llm.train.shm import release_deepspeed_shm

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--batches", required=True)  # .pt-free: a json list of token id lists per rank
parser.add_argument("--out", required=True)
parser.add_argument("--checkpointing", action="store_true")
parser.add_argument("--local_rank", type=int, default=-1)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
release_deepspeed_shm()  # DeepSpeed's CPU comm op leaves a /dev/shm segment per rank otherwise
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
ds_config = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
    "gradient_clipping": 0.0,
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1000,
}
keep_alive = HfDeepSpeedConfig(ds_config)  # must exist before from_pretrained so zero.Init partitions at load
model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
# Partitioned at load: no rank holds the full weights.
partitioned = all(getattr(p, "ds_numel", None) is not None and p.numel() == 0 for p in model.parameters())
enable_emoe(model)
if args.checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
engine.train()

ids = torch.tensor(json.load(open(args.batches))[rank])
loss = engine(input_ids=ids, labels=ids).loss
engine.backward(loss)
engine.step()
load = {str(k): v.tolist() for k, v in pop_expert_load(engine.module).items()}

params = {}
for name, p in engine.module.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        params[name] = p.detach().clone()
if rank == 0:
    save_file(params, os.path.join(args.out, "params.safetensors"))
with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump({"loss": loss.item(), "world": world, "partitioned": partitioned, "load": load,
               "emoe_layers": [m.layer_idx for m in engine.module.modules() if isinstance(m, EMoEMLP)]}, f)
# Leave together, then skip the interpreter's teardown: tearing down gloo (destroy_process_group, or the destructors
# at exit) while the peer does the same aborted a rank with "terminate called without an active exception" about once
# in 25 runs, after every file above was written. os._exit runs no destructors.
torch.distributed.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
