"""What a checkpoint must share with the run that resumes it, checked before any process group exists.

A ZeRO-3 checkpoint holds flat partitions: DeepSpeed loads them into any model whose flattened size happens to fit
(another conversion of the same model, other permuted layers) and fails with a tensor-size traceback on the rest.
So every checkpoint records the identity of its run in ``trainer_state.json`` (``recipe_identity``): the model's
shape, the EMoE conversion it trained (N, permuted layers, clustering seed and method), the mode and the LoRA
settings. A resume compares it with the identity of the run about to start and refuses a difference with one line
naming both values -- before any rank loads weights, converts to the universal format, or touches the run dir.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import ConfigError, RecipeConfig, resolve_batch

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
CONVERSION_KEYS = {"n_experts": "emoe.n_experts", "permuted_layers": "emoe.permute_layers", "seed": "emoe.seed",
                   "method": "emoe.method"}


def _read_hf_config(model_dir: Path) -> dict | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def model_identity(cfg: RecipeConfig, model_dir: Path) -> dict:
    """{recipe key: value} of a run of ``cfg`` that trains the model in ``model_dir`` (the one actually loaded)."""
    from ..convert.prepare import existing_key

    out = {"model.mode": cfg.model.mode, "lora.enabled": cfg.lora.enabled}
    hf = _read_hf_config(model_dir) or {}
    out.update({f"config.json {k}": hf[k] for k in SHAPE_KEYS if k in hf})
    conversion = existing_key(model_dir)
    if conversion:
        out.update({CONVERSION_KEYS[k]: v for k, v in conversion.items()})
    if cfg.lora.enabled:
        out.update({"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
                    "lora.target_modules": sorted(cfg.lora.target_modules), "lora.quantize": cfg.lora.quantize})
    return json.loads(json.dumps(out))  # the form it has after a trip through trainer_state.json


def planned_identity(cfg: RecipeConfig) -> dict:
    """The identity of the run ``cfg`` is about to start, from the files alone: the model it will load is model.path,
    or -- a dense model.path with an emoe: section -- the conversion ``prepare_model_path`` makes (or reuses) in
    output_dir/converted."""
    from ..convert.errors import ConversionError
    from ..convert.prepare import conversion_key, existing_key, key_differences

    src = Path(cfg.model.path)
    if cfg.emoe is None or existing_key(src) is not None or not (src / "config.json").is_file():
        return model_identity(cfg, src)
    e = cfg.emoe
    converted = Path(cfg.output_dir) / "converted"
    try:
        want = conversion_key(src, n_experts=e.n_experts, layers=e.layers, permute_layers=e.permute_layers,
                              seed=e.seed, method=e.method)
    except (ConversionError, ValueError, KeyError):
        return model_identity(cfg, src)  # check_runnable reports it
    have = existing_key(converted)
    if have is None or key_differences(have, want, permute_layers_given=e.permute_layers is not None):
        have = want  # converted afresh; else reused as it is
    out = model_identity(cfg, src)  # the shape is the source's (a conversion keeps it)
    out.update({CONVERSION_KEYS[k]: v for k, v in have.items()})
    return json.loads(json.dumps(out))


def saved_identity(ckpt: Path, state: dict) -> dict | None:
    """The identity a checkpoint was saved with; for a checkpoint older than ``recipe_identity``, planned from its
    config.yaml (as far as the model it names still exists)."""
    if state.get("recipe_identity"):
        return state["recipe_identity"]
    from .config import load_config

    try:
        return planned_identity(load_config(ckpt / "config.yaml"))
    except (ConfigError, OSError):
        return None


def identity_differences(saved: dict, now: dict) -> list[str]:
    """["emoe.n_experts: checkpoint 16, this run 8", ...] over the keys both sides know."""
    return [f"{key}: checkpoint {_show(saved[key])}, this run {_show(now[key])}"
            for key in saved if key in now and saved[key] != now[key]]


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def missing_rank_files(ckpt: Path, world: int) -> list[str]:
    """The per-rank files of a DeepSpeed checkpoint saved by ``world`` ranks that are not there."""
    names = [p.name for p in ckpt.iterdir()]
    missing = []
    for r in range(world):
        for kind, prefix in (("model_states", ""), ("optim_states", r"(\w+_)?")):  # bf16_zero_pp_rank_... too
            if not any(re.match(rf"^{prefix}zero_pp_rank_{r}_mp_rank_\d+_{kind}\.pt$", n) for n in names):
                missing.append(f"zero_pp_rank_{r}_mp_rank_00_{kind}.pt (rank {r})")
    return missing


def check_resume(ckpt: Path, state: dict, cfg: RecipeConfig, *, world: int) -> None:
    """Refuse (ConfigError, one line) a resume of ``ckpt`` by this run that could not continue it: another model,
    conversion, mode or LoRA setup; per-rank files missing; a global batch that differs or does not divide at this
    world size. ``cfg`` already carries the saved global batch when the recipe leaves it free (elastic resume)."""
    saved_world = int(state.get("world_size", world))
    missing = missing_rank_files(ckpt, saved_world)
    if missing:
        raise ConfigError(f"resume: {ckpt} is incomplete: {', '.join(missing)} missing (saved by {saved_world} "
                          f"ranks); resume from another checkpoint (resume=PATH) or start a new output_dir")
    saved = saved_identity(ckpt, state)
    if saved is not None:
        diffs = identity_differences(saved, planned_identity(cfg))
        if diffs:
            raise ConfigError(f"resume: {ckpt} was trained with another recipe ({'; '.join(diffs)}); resume with "
                              f"the checkpoint's settings, or start a new output_dir")
    try:
        _, _, global_bs = resolve_batch(cfg, world)
    except ConfigError as e:
        raise ConfigError(f"resume: {ckpt} at world size {world}: {e}") from None
    if state.get("global_batch_size") not in (None, global_bs):
        raise ConfigError(f"resume: {ckpt}: train.global_batch_size: checkpoint {state['global_batch_size']}, this "
                          f"run {global_bs} (at world size {world}); the data position and LR schedule need the saved "
                          f"one (set train.global_batch_size={state['global_batch_size']} or leave it 0)")
