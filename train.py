"""Fine-tune a dense or EMoE Llama with DeepSpeed ZeRO-3 (the recipe is emoe_llm/train/recipe.py).

    deepspeed --num_gpus 8 train.py --ds_config ds_configs/z3.json --config configs/llama2_7b_emoe.yaml
    torchrun --nproc_per_node 8 train.py --ds_config ds_configs/z3.json --config configs/llama2_7b_emoe.yaml
    deepspeed --num_gpus 2 train.py --config configs/tiny_cpu.yaml train.max_steps=20   # CPU, 2 gloo ranks

Trailing key=value arguments override the recipe (dots for nesting): train.lr=1e-5 model.mode=dense resume=none
"""

from emoe_llm.cli import exit_after
from emoe_llm.train.recipe import cli

if __name__ == "__main__":
    exit_after(cli())
