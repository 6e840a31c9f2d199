"""``model.load_dtype: float32``: start ZeRO-3's fp32 master weights from the checkpoint's stored values.

With bf16 training the model is built in bf16 under ``zero.Init`` (no rank ever holds fp32 weights), and DeepSpeed
creates each rank's fp32 master partition from those bf16 values, so full fine-tuning starts from weights rounded to
bf16's 8 mantissa bits (Llama-2 is released in fp16, 11 bits). The official EMoE code loads fp32 and keeps an fp32
master copy. Here, after ``deepspeed.initialize``, every rank reads its own slice of each trainable tensor from the
safetensors files (``get_slice``: only the rows of its own partition) and writes it into its fp32 master partition;
the bf16 compute copy is already the rounding of the same value. A resumed run then restores its own master weights.
"""

from __future__ import annotations

import json
import math
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


def read_flat_range(tensor_slice, shape, start: int, n: int) -> torch.Tensor:
    """Elements [start, start + n) of a stored tensor in flat (row-major) order, read through safetensors'
    ``get_slice``: only the rows that hold them (a ZeRO-3 partition is a flat range, which is rows of a matrix plus
    at most a partial row at each end), never the whole tensor."""
    if n <= 0:
        return torch.empty(0)
    if len(shape) <= 1:
        return tensor_slice[start:start + n].reshape(-1)
    row = math.prod(shape[1:])
    first, last = start // row, -(-(start + n) // row)
    rows = tensor_slice[first:last].reshape(-1)
    offset = start - first * row
    return rows[offset:offset + n]


@torch.no_grad()
def load_fp32_master(engine, checkpoint: str | Path) -> int:
    """Overwrite this rank's fp32 master partition of every trainable ZeRO-3 parameter with the checkpoint's values
    (cast to fp32). Local (no collective). Each rank reads only its own slice of each tensor (about 1/world of the
    checkpoint: 65 GB at 30B would otherwise be read by every rank). Returns the number of tensors set."""
    from safetensors import safe_open

    files = _tensor_files(Path(checkpoint))
    model = getattr(engine, "module", engine)
    by_file: dict[Path, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and hasattr(param, "ds_id") and name in files:
            by_file.setdefault(files[name], []).append((name, param))
    done = 0
    for path, params in by_file.items():
        with safe_open(str(path), "pt") as f:  # one handle per shard, memory-mapped
            for name, param in params:
                optimizer = param._z3_optimizer
                master, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
                start = optimizer._get_param_partition_rank(param) * param.partition_numel()
                stored = f.get_slice(name)
                shape = stored.get_shape()
                if math.prod(shape) != param.ds_numel:
                    raise ValueError(f"{checkpoint}: {name} has {math.prod(shape)} elements, the model's parameter "
                                     f"{param.ds_numel}")
                n = max(0, min(master.numel(), param.ds_numel - start))  # the last rank's partition is padded
                master[:n].copy_(read_flat_range(stored, shape, start, n).to(master.dtype))
                done += 1
    return done
