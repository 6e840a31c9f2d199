"""Batch collation for unpacked (padded) and packed rows.

Packed batches carry no ``attention_mask``: transformers 5 then reads the document boundaries from ``position_ids``
(``masking_utils.find_packed_sequence_indices``: a new document wherever consecutive positions do not increase by 1)
and builds a block-diagonal causal mask for SDPA and eager attention. FlashAttention-2 infers varlen boundaries from
``position_ids`` only when the batch size is 1 (``modeling_flash_attention_utils._is_packed_sequence``); for B > 1 set
``flash_attn_kwargs=True`` so the batch also carries ``cu_seq_lens_q/k`` and ``max_length_q/k``, which FA2 uses over
the flattened (B*T) tokens. Without either, FA2 would attend across documents.

IMPORTANT: run the model with ``use_cache=False`` (``model.config.use_cache = False``) when training on packed rows.
With a KV cache (``use_cache`` defaults to True and LlamaModel then creates a DynamicCache), transformers skips the
packed-sequence detection (``_preprocess_mask_arguments`` requires ``past_key_values is None``) and every document
attends to the previous ones in its row. ``tests/test_data_packing.py`` checks the equivalence this relies on.
"""

from __future__ import annotations

import torch

from .encode import IGNORE_INDEX


def is_packed(position_ids: list[int]) -> bool:
    """A row is packed when its positions restart (``position_ids[t] == 0`` for some t > 0)."""
    return any(p == 0 for p in position_ids[1:])


def count_real_tokens(batch: dict, pad_token_id: int) -> int:
    """Tokens of a collated batch that are not padding. Unpacked: the attention mask. Packed (no mask): a row's
    padding is the segment the collator appends (positions restarting at 0, every id ``pad_token_id``, no target)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    total = ids.numel()
    for b in range(ids.shape[0]):
        starts = (pos[b] == 0).nonzero().reshape(-1)
        last = int(starts[-1]) if starts.numel() else 0
        if last > 0 and bool((ids[b, last:] == pad_token_id).all()) and bool((labels[b, last:] == IGNORE_INDEX).all()):
            total -= ids.shape[1] - last
    return total


class SFTCollator:
    """``SFTCollator(pad_token_id, *, pad_to_multiple_of=None, flash_attn_kwargs=False)(rows) -> dict of tensors``.

    Returns ``input_ids`` (B, T), ``labels`` (B, T) (-100 on padding), ``position_ids`` (B, T) and, only for unpacked
    batches, ``attention_mask`` (B, T). With ``flash_attn_kwargs`` packed batches also get ``cu_seq_lens_q``/
    ``cu_seq_lens_k`` (int32, (num_segments + 1,)) and ``max_length_q``/``max_length_k`` (python ints).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, flash_attn_kwargs: bool = False):
        if pad_token_id is None:
            raise ValueError("SFTCollator needs a pad_token_id (use emoe_llm.data.load_tokenizer, which sets one)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.flash_attn_kwargs = flash_attn_kwargs

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("SFTCollator got an empty batch")
        lengths = [len(r["input_ids"]) for r in rows]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        positions = [list(r["position_ids"]) if "position_ids" in r else list(range(n)) for r, n in zip(rows, lengths)]
        packed = any(is_packed(p) for p in positions)
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, (row, n, pos) in enumerate(zip(rows, lengths, positions)):
            input_ids[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            position_ids[b, :n] = torch.as_tensor(pos, dtype=torch.long)
            # Padding of a packed row is its own segment (restarting at 0); of an unpacked row it just continues.
            position_ids[b, n:] = torch.arange(T - n) + (0 if packed else n)
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if not packed:
            batch["attention_mask"] = attention_mask
        elif self.flash_attn_kwargs:
            flat = position_ids.reshape(-1)
            starts = torch.nonzero(flat == 0).reshape(-1)
            cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
            max_len = int((cu[1:] - cu[:-1]).max())
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
        return batch
