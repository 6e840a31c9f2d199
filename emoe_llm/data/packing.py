"""Packing documents into fixed-length rows (best-fit decreasing; documents are never split across rows)."""

from __future__ import annotations

import bisect

import numpy as np

from .encode import IGNORE_INDEX


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: returns rows as lists of document indices.

    Deterministic (ties keep input order, so shuffle the input with the seed first). O(n log n + n * distinct_caps):
    bins are bucketed by remaining space, and the smallest remaining space that still fits is found by bisection.
    """
    bin_of, order = best_fit_bins(lengths, capacity)
    bins: list[list[int]] = [[] for _ in range(int(bin_of.max()) + 1 if len(bin_of) else 0)]
    for i, b in zip(order.tolist(), bin_of[order].tolist()):
        bins[b].append(i)
    return bins


def best_fit_bins(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """``pack_lengths`` as arrays (no Python list per row, for millions of documents): returns ``(bin_of, order)``,
    the row of every document (rows numbered as ``pack_lengths`` numbers them) and the order the documents were
    placed in (longest first, ties in input order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # = sorted(range(n), key=lambda i: -lengths[i])
    if len(order) and lengths[order[0]] > capacity:
        raise ValueError(f"document {int(order[0])} has {int(lengths[order[0]])} tokens, more than the packing "
                         f"capacity {capacity}")
    bin_of = np.empty(len(lengths), dtype=np.int64)
    n_bins = 0
    by_space: dict[int, list[int]] = {}  # remaining space -> bin ids with exactly that space
    spaces: list[int] = []  # sorted distinct remaining spaces that have at least one bin
    for start in range(0, len(order), 1 << 16):  # in slices: no Python int per document held at once
        idx = order[start:start + (1 << 16)]
        for i, n in zip(idx.tolist(), lengths[idx].tolist()):
            j = bisect.bisect_left(spaces, n)
            if j < len(spaces):
                space = spaces[j]
                b = by_space[space].pop()
                if not by_space[space]:
                    del by_space[space]
                    spaces.pop(j)
            else:
                b, space = n_bins, capacity
                n_bins += 1
            bin_of[i] = b
            left = space - n
            if left > 0:
                if left not in by_space:
                    by_space[left] = []
                    bisect.insort(spaces, left)
                by_space[left].append(b)
    return bin_of, order


def pack_arrays(input_ids: np.ndarray, labels: np.ndarray, doc_lengths: np.ndarray, docs_per_row: np.ndarray, *,
                seq_len: int, pad_token_id: int) -> dict:
    """Many packed rows at once, with numpy instead of per-token Python: each row is its documents back to back, padded
    to exactly ``seq_len``.

    ``input_ids``/``labels`` hold the documents back to back, row after row (the documents of row 0, then those of
    row 1, ...); ``doc_lengths`` are their lengths and ``docs_per_row`` how many documents each row takes. Returns
    ``input_ids``, ``labels`` and ``position_ids`` as int32 arrays of shape ``(rows, seq_len)``. ``position_ids``
    restart at 0 for every document; the padding is its own segment (positions 0..k-1, labels -100), so attention
    built from the position ids keeps it away from real tokens.
    """
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    docs_per_row = np.asarray(docs_per_row, dtype=np.int64)
    n_rows, total = len(docs_per_row), int(doc_lengths.sum())
    if len(input_ids) != total or len(labels) != total or int(docs_per_row.sum()) != len(doc_lengths):
        raise ValueError("pack_arrays: input_ids/labels/doc_lengths/docs_per_row disagree")
    row_of_doc = np.repeat(np.arange(n_rows), docs_per_row)
    row_tokens = np.bincount(row_of_doc, weights=doc_lengths, minlength=n_rows).astype(np.int64)
    if n_rows and int(row_tokens.max()) > seq_len:
        raise ValueError(f"a packed row holds {int(row_tokens.max())} tokens, more than seq_len {seq_len}")
    row_first = np.concatenate([[0], np.cumsum(row_tokens)[:-1]])  # each row's first token in the flat input
    doc_first = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
    flat = np.arange(total, dtype=np.int64)
    # Destination of every token: row r, column (token - r's first token); in the output's flat (rows*seq_len) layout.
    dest = flat + np.repeat(np.arange(n_rows, dtype=np.int64) * seq_len - row_first, row_tokens)
    out_ids = np.full(n_rows * seq_len, pad_token_id, dtype=np.int32)
    out_labels = np.full(n_rows * seq_len, IGNORE_INDEX, dtype=np.int32)
    out_ids[dest] = input_ids
    out_labels[dest] = labels
    # Positions: 0.. within every document; the padding continues as its own segment 0..pad-1.
    positions = (np.arange(seq_len, dtype=np.int64)[None, :] - row_tokens[:, None]).reshape(-1)
    positions[dest] = flat - np.repeat(doc_first, doc_lengths)
    shape = (n_rows, seq_len)
    return {"input_ids": out_ids.reshape(shape), "labels": out_labels.reshape(shape),
            "position_ids": positions.astype(np.int32).reshape(shape)}
