"""Packing documents into fixed-length rows (best-fit decreasing; documents are never split across rows)."""

from __future__ import annotations

import bisect

from .encode import IGNORE_INDEX


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: returns rows as lists of document indices.

    Deterministic (ties keep input order, so shuffle the input with the seed first). O(n log n + n * distinct_caps):
    bins are bucketed by remaining space, and the smallest remaining space that still fits is found by bisection.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # remaining space -> bin ids with exactly that space
    spaces: list[int] = []  # sorted distinct remaining spaces that have at least one bin
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document {i} has {n} tokens, more than the packing capacity {capacity}")
        j = bisect.bisect_left(spaces, n)
        if j < len(spaces):
            space = spaces[j]
            b = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(j)
        else:
            b, space = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(b)
    return bins


def pack_rows(docs_input_ids: list[list[int]], docs_labels: list[list[int]], *, seq_len: int,
              pad_token_id: int) -> dict:
    """Concatenate the documents of one packed row and pad it to exactly ``seq_len``.

    ``position_ids`` restart at 0 for every document; the padding is its own segment (positions 0..k-1, labels -100),
    so attention built from the position ids keeps it away from real tokens.
    """
    input_ids, labels, position_ids = [], [], []
    for ids, lab in zip(docs_input_ids, docs_labels):
        input_ids += ids
        labels += lab
        position_ids += range(len(ids))
    pad = seq_len - len(input_ids)
    input_ids += [pad_token_id] * pad
    labels += [IGNORE_INDEX] * pad
    position_ids += range(pad)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
