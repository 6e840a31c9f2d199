"""Run by tests/test_train_zero3.py under ``deepspeed --num_gpus 2``: the recipe with the export probe
(``python -m emoe_llm.train.probe``), plus fault injection by monkeypatching the recipe (no hooks in the package):

    --nan-at-step N     rank 0's loss is NaN in the N-th optimizer step of this launch
    --raise-at-step N   rank --raise-on-rank (default 1) raises a RuntimeError in its N-th optimizer step
"""

import argparse

import torch.distributed as dist

from emoe_llm.cli import exit_after
from emoe_llm.train import probe, recipe


def inject_nan_at(step: int) -> None:
    real_step, real_ce = recipe.train_step, recipe.token_ce_sum
    calls = 0

    def nan_ce(logits, labels):
        return real_ce(logits, labels) * float("nan")

    def train_step(engine, micro_batches, **kwargs):
        nonlocal calls
        calls += 1
        if calls == step and dist.get_rank() == 0:
            recipe.token_ce_sum = nan_ce
        try:
            return real_step(engine, micro_batches, **kwargs)
        finally:
            recipe.token_ce_sum = real_ce

    recipe.train_step = train_step


def raise_at(step: int, rank: int) -> None:
    real_step = recipe.train_step
    calls = 0

    def train_step(engine, micro_batches, **kwargs):
        nonlocal calls
        calls += 1
        if calls == step and dist.get_rank() == rank:
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")
        return real_step(engine, micro_batches, **kwargs)

    recipe.train_step = train_step


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nan-at-step", type=int, default=0)
    parser.add_argument("--raise-at-step", type=int, default=0)
    parser.add_argument("--raise-on-rank", type=int, default=1)
    faults, rest = parser.parse_known_args()
    if faults.nan_at_step:
        inject_nan_at(faults.nan_at_step)
    if faults.raise_at_step:
        raise_at(faults.raise_at_step, faults.raise_on_rank)
    exit_after(recipe.cli(rest, entry=probe.main))
