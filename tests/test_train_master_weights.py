"""model.load_dtype: float32 -- with bf16 ZeRO-3 full fine-tuning the fp32 master weights start from the checkpoint's
stored fp32 values (as the official code's fp32 master copy), not from their bf16 rounding. One gloo rank, real
DeepSpeed ZeRO-3, setup only (no bf16 training step: bf16 matmuls are very slow on CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file

from emoe_llm.train import recipe
from emoe_llm.train.config import ConfigError

from test_train_recipe import recipe_config, single_rank  # noqa: F401  (module-scoped gloo group + tiny model)


def _masters(env, out, *overrides) -> dict[str, torch.Tensor]:
    ds = json.loads(json.dumps(env["ds"]))
    ds["bf16"] = {"enabled": True}
    # train.precision=bf16: keep the JSON's bf16 on this CPU machine (auto would resolve it to fp32)
    run, _ = recipe.setup(recipe_config(env, out, "train.precision=bf16", *overrides), ds)
    try:
        return {n: safe_get_full_fp32_param(p).detach().cpu().clone()
                for n, p in run.engine.module.named_parameters() if p.requires_grad}
    finally:
        recipe.close(run, "done")


def test_float32_load_starts_master_weights_from_the_stored_values(single_rank, tmp_path):  # noqa: F811
    env = single_rank
    stored = load_file(str(env["model"] / "model.safetensors"))
    key = "model.layers.2.mlp.gate_proj.weight"
    assert stored[key].dtype == torch.float32 and not torch.equal(stored[key], stored[key].bfloat16().float())
    exact = _masters(env, tmp_path / "fp32", "model.load_dtype=float32")
    rounded = _masters(env, tmp_path / "auto")
    for name, value in exact.items():
        if name in stored:
            assert torch.equal(value.reshape(stored[name].shape), stored[name]), name
    assert torch.equal(rounded[key].reshape(stored[key].shape), stored[key].bfloat16().float())


def test_float32_load_is_for_full_fine_tuning(single_rank, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="model.load_dtype=float32 sets the fp32 master weights"):
        recipe_config(single_rank, tmp_path, "model.load_dtype=float32", "lora.enabled=true")
    with pytest.raises(ConfigError, match="model.load_dtype must be auto|float32"):
        recipe_config(single_rank, tmp_path, "model.load_dtype=fp64")
