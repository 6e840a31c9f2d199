"""``python -m emoe_llm.train.probe`` = the recipe, plus ``run/export_probe.pt`` written just before the export: the
trained ZeRO-3 model's logits on two rows, in its training mode and dense (k = N), so the exported ``final/`` can be
checked against the model that was trained (``emoe-llm demo`` and the tests do). ``train.py`` does not write it.
"""

from __future__ import annotations

import torch

from ..cli import exit_after
from ..emoe import emoe_modules
from . import recipe


# max |logit difference| between the ZeRO-3 model and the exported one, computed on the same device in the run's
# dtype: fp32 agrees to rounding; 16-bit logits carry 8 (bf16) or 11 (fp16) mantissa bits, so logits of magnitude ~10
# differ by a few 1e-2 when the two models reduce in another order (ZeRO-3's gathered vs plain weights, kernels).
LOGIT_TOLERANCE = {"torch.float32": 1e-3, "torch.float16": 2e-2, "torch.bfloat16": 1e-1}


def to_cpu(batch: dict) -> dict:
    """A collated batch on the CPU: tensors copied, everything else (the flash-attn path's ``max_length_q/k`` ints)
    kept as it is."""
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in batch.items()}


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def export_probe(run: recipe.Run) -> dict:
    """Collective. {"inputs", "logits" (as trained), "dense_logits" (every expert on), "device", "dtype"} on two
    held-out rows (or two training rows when there is no held-out split)."""
    ds = run.eval_ds if run.eval_ds is not None else run.train_ds
    inputs = recipe.model_inputs(run.collator([ds[i] for i in range(min(2, len(ds)))]), run.device)
    engine = run.engine
    engine.eval()
    logits = engine(**inputs, use_cache=False).logits.float().cpu()
    mods = list(emoe_modules(engine.module))
    saved = [m.top_k for m in mods]
    for m in mods:
        m.top_k = m.n_experts  # k == N is exactly the dense MLP
    dense = engine(**inputs, use_cache=False).logits.float().cpu() if mods else logits
    for m, k in zip(mods, saved):
        m.top_k = k
    engine.train()
    return {"inputs": to_cpu(inputs), "logits": logits, "dense_logits": dense, "device": str(run.device),
            "dtype": str(run.dtype)}


def main(argv=None) -> int:
    """recipe.main with the probe written between fit and finish."""
    args = recipe.parse_args(argv)
    cfg, ds_config = recipe.load_recipe(args)
    if recipe.nothing_to_do(cfg):
        return 0
    run, state = recipe.setup(cfg, ds_config, local_rank=args.local_rank)
    outcome = recipe.fit(run, state)
    if outcome == "done":
        probe = export_probe(run)
        if run.rank == 0:
            torch.save(probe, run.output_dir / "run" / "export_probe.pt")
        recipe.finish(run, state)
    return recipe.close(run, outcome)


if __name__ == "__main__":
    exit_after(recipe.cli(entry=main))
