"""Per-sequence loss normalisation (``train.loss_norm: sequence``), the official recipe's objective.

The official EMoE / Stanford Alpaca recipe is HF Trainer with one sequence per GPU: each sequence's mean token loss,
averaged over the global batch. Here that is computed exactly for any micro-batch size, accumulation, number of
ranks, padding and packing: a "sequence" is one original document, found from ``position_ids`` (which restart at 0
at every packed document; padding after a packed row restarts too, but carries no targets and so never counts).

    loss = (1 / S) * sum over the step's sequences s with targets of  mean_{t in s} CE_t

S is counted over all ranks and micro-batches before the forward passes, so the gradient equals that of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) index of the document every position belongs to, unique across the batch's rows."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts.reshape(-1).long().cumsum(0).sub_(1).view_as(position_ids)


def count_sequences(batch: dict) -> int:
    """Documents of the batch that have at least one target token (the only ones that enter the mean)."""
    ids = sequence_ids(batch["position_ids"])[:, 1:]
    return int(ids[batch["labels"][:, 1:] != IGNORE_INDEX].unique().numel())


def sequence_ce_sum(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Sum over documents of each document's mean next-token cross-entropy. (B, T, V), (B, T), (B, T) -> ()."""
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    target = labels[:, 1:].reshape(-1) != IGNORE_INDEX
    ids = sequence_ids(position_ids)[:, 1:].reshape(-1)[target]  # the document of each target token
    n = int(position_ids.numel())
    sums = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, ids, ce[target])
    counts = torch.bincount(ids, minlength=n)
    has = counts > 0
    return (sums[has] / counts[has].to(ce.dtype)).sum()
