"""Every shipped recipe and DeepSpeed JSON parses, validates, and fills to a consistent batch layout."""

import json
from pathlib import Path

import pytest

from emoe_llm.train.config import ConfigError, fill_ds_config, load_config, load_ds_config, resolve_batch

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("study_"))  # study files: tests/test_study.py
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_shipped_files_exist():
    names = {p.name for p in RECIPES}
    for required in ("tiny_cpu.yaml", "llama2_7b_emoe.yaml", "llama30b_emoe.yaml", "llama2_7b_dense.yaml",
                     "llama30b_dense.yaml"):
        assert required in names
    assert {p.name for p in DS_CONFIGS} >= {"z3.json", "z3_offload.json", "z2.json"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    cfg = load_config(path)  # one tree: the data section is validated too (by the data package's rules)
    assert cfg.output_dir and cfg.model.path and cfg.data.sources
    assert cfg.model.mode in ("dense", "emoe")
    # the paper recipes: alpaca, 3 epochs, global batch 128, seq 512, cosine, 3% warmup
    if path.name.startswith("llama"):
        assert cfg.train.epochs == 3 and cfg.train.global_batch_size == 128
        assert cfg.data.max_seq_len == 512 and cfg.train.lr_scheduler == "cosine"
        # the paper's EMoE settings: 7B N=64 k=16 layers 28,30; 30B N=256 k=64
        assert (cfg.emoe.n_experts, cfg.emoe.top_k) == ((256, 64) if "30b" in path.name else (64, 16))
        assert cfg.train.warmup_ratio == pytest.approx(0.03)
        assert cfg.train.lr == pytest.approx(3e-4 if cfg.lora.enabled else 2e-5)
        for world in (8, 16, 32):
            micro, accum, global_bs = resolve_batch(cfg, world)
            assert micro * accum * world == global_bs == 128


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_fills_from_recipe(path):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml")
    ds = fill_ds_config(load_ds_config(path), cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"]
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm
    assert "auto" not in json.dumps(ds)
    assert ds["bf16"]["enabled"] is True
    if ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_dense_baselines_mirror_emoe_recipes():
    """A baseline differs from its EMoE recipe only in mode and output_dir (apples to apples)."""
    for emoe in [p for p in RECIPES if "_emoe" in p.name]:
        dense = emoe.with_name(emoe.name.replace("_emoe", "_dense" if "lora" not in emoe.name else ""))
        if "lora" in emoe.name:
            dense = emoe.with_name(emoe.name.replace("_emoe_lora", "_lora"))
        assert dense.exists(), f"no dense baseline for {emoe.name}"
        a, b = load_config(emoe), load_config(dense)
        assert a.model.mode == "emoe" and b.model.mode == "dense"
        a.model.mode = b.model.mode
        a.output_dir = b.output_dir
        assert a == b, f"{emoe.name} and {dense.name} differ beyond mode/output_dir"


def test_ds_config_rejects_conflicting_batch(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml")
    ds = load_ds_config(REPO / "ds_configs" / "z3.json")
    ds["train_batch_size"] = 64
    with pytest.raises(ConfigError, match="train_batch_size=64"):
        fill_ds_config(ds, cfg, world_size=2)
    ds = load_ds_config(REPO / "ds_configs" / "z3.json")
    ds["optimizer"] = {"type": "AdamW"}
    with pytest.raises(ConfigError, match="optimizer"):
        fill_ds_config(ds, cfg, world_size=2)
