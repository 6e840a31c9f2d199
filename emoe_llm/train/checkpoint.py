"""Checkpoints of a ZeRO-3 run and the final consolidated HF export.

Layout under ``output_dir``:

    checkpoints/step_00000120/        DeepSpeed save_checkpoint (sharded params + optimizer + scheduler, per rank)
        trainer_state.json            step, epoch, data position, world size, ... -- written LAST: a checkpoint
                                      without it is incomplete (killed mid-save) and never resumed from
        rng_state_rank{r}.pt          each rank's python / numpy / torch RNG state
        config.yaml                   the resolved recipe
    final/                            consolidated safetensors + config.json (with the 'emoe' block) + tokenizer
    COMPLETED                         written by rank 0 only after final/ is complete

Resume needs the same data-parallel world size (a DeepSpeed ZeRO limitation); ``find_resume_checkpoint`` checks it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ..fileio import atomic_write_text

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """``output_dir/checkpoints/step_00000120``: the one place checkpoint paths are built."""
    return checkpoint_dir(output_dir) / step_tag(step)


def list_checkpoints(output_dir: str | os.PathLike, *, complete_only: bool = True) -> list[Path]:
    """Checkpoint dirs sorted by step (oldest first)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and STEP_DIR.match(p.name) and (not complete_only or (p / STATE_FILE).is_file()):
            out.append(p)
    return sorted(out, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def read_trainer_state(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt} is not a complete checkpoint of this recipe (killed while saving?)"
        )
    return json.loads(path.read_text())


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike, *, world_size: int) -> Path | None:
    """resume: 'auto' -> the latest complete checkpoint in output_dir (or None); 'none' -> None; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        ckpt = ckpts[-1] if ckpts else None
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"resume: checkpoint dir '{resume}' does not exist")
    if ckpt is None:
        return None
    state = read_trainer_state(ckpt)
    if state.get("world_size") != world_size:
        raise RuntimeError(
            f"{ckpt} was saved with {state.get('world_size')} ranks but this run has {world_size}: DeepSpeed ZeRO "
            f"optimizer shards only load at the same data-parallel world size. Relaunch with {state.get('world_size')} "
            f"ranks, or start a new run (resume=none, model.path=<an exported final/ dir>)"
        )
    return ckpt


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, output_dir, *, step: int, trainer_state: dict, config_yaml: str, rank: int) -> Path:
    """Collective: every rank must call it. Returns the checkpoint dir."""
    path = checkpoint_path(output_dir, step)
    if rank == 0 and path.exists():  # a half-written dir from a killed run at the same step
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"trainer_state": trainer_state})
    torch.save(rng_state(), path / f"rng_state_rank{dist.get_rank()}.pt")
    dist.barrier()
    if rank == 0:
        (path / "config.yaml").write_text(config_yaml)
        _write_json_atomic(path / STATE_FILE, trainer_state)
    dist.barrier()
    return path


def load_checkpoint(engine, ckpt: Path) -> dict:
    """Collective. Restores module / optimizer / scheduler (DeepSpeed) and this rank's RNG; returns trainer_state."""
    state = read_trainer_state(ckpt)
    load_path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    rng_file = ckpt / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def rotate_checkpoints(output_dir, keep_last: int) -> list[Path]:
    """Rank 0: delete the oldest complete checkpoints beyond ``keep_last`` (and incomplete ones older than those)."""
    if keep_last <= 0:
        return []
    complete = list_checkpoints(output_dir)
    removed = []
    for p in complete[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if complete[-keep_last:]:
        oldest_kept = int(STEP_DIR.match(complete[-keep_last:][0].name).group(1))
        for p in list_checkpoints(output_dir, complete_only=False):
            if not (p / STATE_FILE).is_file() and int(STEP_DIR.match(p.name).group(1)) < oldest_kept:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------------------------------
# Final export: streaming gather of ZeRO-3 partitions into safetensors shards on rank 0


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"bad shard size '{size}' (expected e.g. '5GB', '500MB')")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[m.group(2)])


def _export_tensors(model, *, lora_merge: bool):
    """Yield (hf_key, module_of_params, [params], fn(gathered params)->tensor) in state-dict order.

    Handles plain HF models and peft LoRA models (merging W + scale * B @ A when ``lora_merge``)."""
    peft_prefix = "base_model.model."
    is_peft = hasattr(model, "peft_config")
    modules = dict(model.named_modules())
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        key = name[len(peft_prefix):] if is_peft and name.startswith(peft_prefix) else name
        if ".lora_" in key:
            continue  # merged into the base weight below (or saved by the adapter export)
        key = key.replace(".base_layer.", ".")
        owner_name = name.rsplit(".", 1)[0].replace(".base_layer", "") if ".base_layer." in name else None
        owner = modules.get(owner_name) if owner_name else None
        if owner is not None and lora_merge and hasattr(owner, "lora_A") and name.endswith("base_layer.weight"):
            adapters = [a for a in owner.lora_A.keys()]
            extra = []
            for a in adapters:
                extra += [owner.lora_A[a].weight, owner.lora_B[a].weight]

            def merge(tensors, owner=owner, adapters=adapters):
                w = tensors[0].float()
                for i, a in enumerate(adapters):
                    A, B = tensors[1 + 2 * i].float(), tensors[2 + 2 * i].float()
                    w = w + (B @ A) * owner.scaling[a]
                return w.to(tensors[0].dtype)

            yield key, [param] + extra, merge
        else:
            yield key, [param], lambda t: t[0]


@torch.no_grad()
def export_hf(engine_or_model, out_dir, *, config, tokenizer, rank: int, max_shard_size="5GB",
              lora_merge: bool = True, dtype: torch.dtype | None = None) -> Path | None:
    """Collective. Gather every (ZeRO-3 partitioned) tensor one at a time and write HF safetensors shards on rank 0
    into ``out_dir`` (via a temp dir + rename). Rank 0 holds at most one shard in memory.

    ``config`` is the HF config to save (with its 'emoe' block); ``tokenizer`` is saved beside it."""
    import deepspeed
    from safetensors.torch import save_file

    model = getattr(engine_or_model, "module", engine_or_model)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    limit = _parse_size(max_shard_size)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards: list[dict] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0
    weight_map: dict[str, str] = {}
    total_bytes = 0
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())

    def flush():
        nonlocal current, current_bytes
        if current:
            shards.append(current)
            idx = len(shards)
            save_file(current, str(tmp / f"shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
            shards[-1] = list(current.keys())
            current, current_bytes = {}, 0

    tied_out = bool(getattr(config, "tie_word_embeddings", False))
    for key, params, fn in _export_tensors(model, lora_merge=lora_merge):
        if tied_out and key == "lm_head.weight":
            continue
        if zero3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                tensor = fn([p.data for p in params]).detach().to("cpu", copy=True) if rank == 0 else None
        else:
            tensor = fn([p.data for p in params]).detach().to("cpu", copy=True) if rank == 0 else None
        if rank != 0:
            continue
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > limit:
            flush()
        current[key] = tensor
        current_bytes += nbytes
        total_bytes += nbytes
    # persistent buffers (none in Llama, but keep other architectures complete)
    persistent = set(model.state_dict().keys())
    if rank == 0:
        for name, buf in model.named_buffers():
            if name in persistent and buf is not None:
                key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
                current[key] = buf.detach().cpu().contiguous()
        flush()
        n = len(shards)
        for i, keys in enumerate(shards, 1):
            final_name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / final_name)
            for k in keys:
                weight_map[k] = final_name
        if n > 1:
            _write_json_atomic(tmp / "model.safetensors.index.json",
                               {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + f".old-{int(time.time())}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None


@torch.no_grad()
def export_lora_adapter(engine_or_model, out_dir, *, rank: int) -> Path | None:
    """Collective. Write the peft adapter (adapter_config.json + adapter_model.safetensors, peft's key names) so it
    can be loaded with ``PeftModel.from_pretrained(base, out_dir)`` on the converted base checkpoint."""
    import deepspeed
    from safetensors.torch import save_file

    model = getattr(engine_or_model, "module", engine_or_model)
    if not hasattr(model, "peft_config"):
        return None
    out_dir = Path(out_dir)
    tensors = {}
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            continue
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                t = p.data.detach().to("cpu", copy=True) if rank == 0 else None
        else:
            t = p.data.detach().to("cpu", copy=True) if rank == 0 else None
        if rank == 0:
            tensors[name.replace(".default.", ".")] = t.contiguous()  # peft drops the adapter name on save
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp-export")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None
