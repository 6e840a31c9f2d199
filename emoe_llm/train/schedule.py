"""The learning-rate schedule: linear warmup, then cosine or linear decay to ``lr * min_lr_ratio`` (``constant``: no
decay), as a ``torch.optim.lr_scheduler.LambdaLR``.

It is transformers' ``warmup_stable_decay`` schedule (tests/test_train_config.py checks every step against it), written
out here because importing ``transformers.optimization`` pulls in ``trainer_utils`` -> peft -> bitsandbytes -> torch
inductor: ~5 s in every rank of every launch, for a function of a dozen lines.
"""

from __future__ import annotations

import functools
import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, warmup: int, stable: int, decay: int, decay_type: str, min_lr_ratio: float) -> float:
    """The multiplier of the peak lr at optimizer step ``step`` (0-based, before that step's update)."""
    if step < warmup:  # rises from min_lr_ratio (0 by default, as in the HF Trainer) to 1
        return max(0.0, step / max(1, warmup) * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        factor = 1.0 - progress if decay_type == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def warmup_then_decay(optimizer, *, total_steps: int, warmup: int, kind: str, min_lr_ratio: float) -> LambdaLR:
    """``kind``: cosine | linear | constant (decay over the steps after the warmup; constant: none)."""
    decay = 0 if kind == "constant" else max(0, total_steps - warmup)
    shape = functools.partial(lr_factor, warmup=warmup, stable=max(0, total_steps - warmup - decay), decay=decay,
                              decay_type="linear" if kind == "linear" else "cosine", min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, shape)
