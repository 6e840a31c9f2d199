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


def next_token_losses(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) fp32 cross-entropy of position t against labels[:, t+1] (0 where ignored). ``out`` is the model's
    logits (B, T, V), or the per-token losses (B, T) the chunked LM head already computed (chunked_loss.py)."""
    if out.dim() == 2:
        return out[:, :-1]
    return F.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape[0], -1)


def sequence_ce_sum(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Sum over documents of each document's mean next-token cross-entropy. (B, T, V) logits or (B, T) per-token
    losses, (B, T), (B, T) -> ()."""
    ce = next_token_losses(logits, labels).reshape(-1)
    target = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).to(ce.dtype)
    ids = sequence_ids(position_ids)[:, 1:].reshape(-1)  # the document of each position
    # fixed-size sums instead of boolean indexing: no host sync inside the micro-batch (on a GPU each one waits for
    # the forward to finish); a document without targets has sum 0 and count 0 and adds nothing
    n = int(position_ids.numel())
    sums = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, ids, ce * target)
    counts = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, ids, target)
    return (sums / counts.clamp(min=1)).sum()
