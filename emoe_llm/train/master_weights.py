"""``model.load_dtype: float32``: start ZeRO-3's fp32 master weights from the checkpoint's stored values.

With bf16 training the model is built in bf16 under ``zero.Init`` (no rank ever holds fp32 weights), and DeepSpeed
creates each rank's fp32 master partition from those bf16 values, so full fine-tuning starts from weights rounded to
bf16's 8 mantissa bits (Llama-2 is released in fp16, 11 bits). The official EMoE code loads fp32 and keeps an fp32
master copy. Here, after ``deepspeed.initialize``, every rank reads its own slice of each trainable tensor from the
safetensors files (memory-mapped, one tensor at a time) and writes it into its fp32 master partition; the bf16
compute copy is already the rounding of the same value. A resumed run then restores its own master weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _tensor_files(checkpoint: Path) -> dict[str, Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return {k: checkpoint / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = checkpoint / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"model.load_dtype=float32 needs safetensors weights in {checkpoint}")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


@torch.no_grad()
def load_fp32_master(engine, checkpoint: str | Path) -> int:
    """Overwrite this rank's fp32 master partition of every trainable ZeRO-3 parameter with the checkpoint's values
    (cast to fp32). Local (no collective). Returns the number of tensors set."""
    from safetensors import safe_open

    files = _tensor_files(Path(checkpoint))
    model = getattr(engine, "module", engine)
    done = 0
    for name, param in model.named_parameters():
        if not param.requires_grad or not hasattr(param, "ds_id") or name not in files:
            continue
        optimizer = param._z3_optimizer
        master, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        start = optimizer._get_param_partition_rank(param) * param.partition_numel()
        with safe_open(str(files[name]), "pt") as f:
            value = f.get_tensor(name).reshape(-1)
        if value.numel() != param.ds_numel:
            raise ValueError(f"{checkpoint}: {name} has {value.numel()} elements, the model's parameter {param.ds_numel}")
        n = max(0, min(master.numel(), value.numel() - start))
        master[:n].copy_(value[start:start + n].to(master.dtype))
        done += 1
    return done
