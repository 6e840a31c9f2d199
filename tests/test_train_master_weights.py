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


class _CountingSlice:
    """safetensors' slice object, counting the bytes its reads return."""

    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        out = self.inner[index]
        self.counter[0] += out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("world", [2, 3, 8])
def test_each_rank_reads_only_its_partition(tmp_path, world):
    """ZeRO-3 partitions are flat ranges of ceil(numel / world) elements (the last one padded): every rank's read
    is exactly its range of the stored tensor, and the bytes a rank reads are about 1/world of the checkpoint (its
    rows, plus at most one partial row at each end of each tensor)."""
    import math

    from safetensors import safe_open
    from safetensors.torch import save_file

    from emoe_llm.train.master_weights import read_flat_range

    gen = torch.Generator().manual_seed(0)
    tensors = {"embed": torch.randn(1000, 64, generator=gen), "mlp": torch.randn(352, 64, generator=gen),
               "norm": torch.randn(64, generator=gen), "odd": torch.randn(7, 5, 3, generator=gen)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    total = sum(t.numel() * 4 for t in tensors.values())
    with safe_open(str(path), "pt") as f:
        for rank in range(world):
            read = [0]
            for name, full in tensors.items():
                part = math.ceil(full.numel() / world)
                start = rank * part
                n = max(0, min(part, full.numel() - start))
                stored = _CountingSlice(f.get_slice(name), read)
                got = read_flat_range(stored, stored.get_shape(), start, n)
                assert torch.equal(got, full.reshape(-1)[start:start + n]), (name, rank)
            rows_overhead = sum(2 * 4 * math.prod(t.shape[1:]) for t in tensors.values())
            assert read[0] <= total / world + rows_overhead, (rank, read[0], total / world)
            assert read[0] < 0.6 * total  # far from the whole checkpoint on every rank
