"""The vectorised data paths (issue #14, data larger than RAM) against their per-row reference implementations:
numpy packing == the per-row packing it replaced, vectorised labels_from_spans == the per-token loop, batched text encoding == encode_text
plus chunking; and token columns stored as int32 while the collator still hands torch int64."""

import json
import random

import numpy as np
import pytest
import torch

from emoe_llm.data import IGNORE_INDEX, SFTCollator, build_sft_datasets, data_config_from_dict, encode_text
from emoe_llm.data import load_tokenizer
from emoe_llm.data.encode import DROPPED_TOO_LONG, KEPT, TRUNCATED, _labels_from_spans_loop, encode_text_batch
from emoe_llm.data.encode import labels_from_spans
from emoe_llm.data.packing import best_fit_bins, pack_arrays, pack_lengths
from emoe_llm.tiny import DATA_DIR


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DATA_DIR / "tokenizers" / "tiny_llama3_style")


def _pack_lengths_reference(lengths, capacity):
    """pack_lengths as it was (lists all the way)."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, by_space, spaces = [], {}, []
    for i in order:
        n = lengths[i]
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


def _pack_rows_reference(docs_input_ids: list[list[int]], docs_labels: list[list[int]], *, seq_len: int,
              pad_token_id: int) -> dict:
    """One packed row as the pipeline built it before pack_arrays (lists all the way).

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


def test_best_fit_bins_equal_the_list_packing_and_the_seeded_row_order():
    rng = random.Random(3)
    for n, cap in ((0, 8), (1, 8), (50, 16), (3000, 1024), (2000, 64)):
        lengths = [rng.randint(1, cap) for _ in range(n)]
        ref = _pack_lengths_reference(lengths, cap)
        assert pack_lengths(lengths, cap) == ref
        # The pipeline's array form of `[sorted(bins[i]) for i in permutation]`.
        bin_of, _ = best_fit_bins(lengths, cap)
        order = np.random.default_rng(5).permutation(len(ref))
        rank = np.empty(len(ref), dtype=np.int64)
        rank[order] = np.arange(len(ref))
        docs = np.argsort(rank[bin_of], kind="stable")
        assert docs.tolist() == [d for i in order for d in sorted(ref[i])]
        assert np.bincount(rank[bin_of], minlength=len(ref)).tolist() == [len(ref[i]) for i in order]
    with pytest.raises(ValueError, match="document 1 has 9 tokens, more than the packing capacity 8"):
        pack_lengths([3, 9, 9], 8)


def test_pack_arrays_equals_pack_rows():
    rng = random.Random(0)
    seq = 64
    docs = [[rng.randrange(2000) for _ in range(rng.randint(2, seq))] for _ in range(300)]
    labels = [[IGNORE_INDEX] + [x if rng.random() < 0.7 else IGNORE_INDEX for x in d[1:]] for d in docs]
    bins = [sorted(b) for b in pack_lengths([len(d) for d in docs], seq)]
    order = [i for b in bins for i in b]
    out = pack_arrays(np.array([t for i in order for t in docs[i]]), np.array([t for i in order for t in labels[i]]),
                      np.array([len(docs[i]) for i in order]), np.array([len(b) for b in bins]),
                      seq_len=seq, pad_token_id=7)
    assert all(v.shape == (len(bins), seq) and v.dtype == np.int32 for v in out.values())
    for r, b in enumerate(bins):
        ref = _pack_rows_reference([docs[i] for i in b], [labels[i] for i in b], seq_len=seq, pad_token_id=7)
        for k in ("input_ids", "labels", "position_ids"):
            assert out[k][r].tolist() == ref[k], (r, k)
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_arrays(np.zeros(10), np.zeros(10), np.array([5, 5]), np.array([2]), seq_len=8, pad_token_id=0)


def test_vectorised_labels_equal_the_token_loop():
    rng = random.Random(1)
    for case in range(2000):
        n = rng.randint(0, 30)
        zero_width = case % 3 == 0  # zero-width tokens/spans take the reference loop; the result must not change
        pos, offsets = 0, []
        for _ in range(n):
            w = rng.randint(0 if zero_width else 1, 4)
            offsets.append((pos, pos + w))
            pos += w + rng.choice([0, 0, 1])
        cuts = sorted(rng.sample(range(pos + 3), min(pos + 3, 2 * rng.randint(0, 3))))
        spans = [(cuts[i], cuts[i + 1] + (0 if zero_width else 1)) for i in range(0, len(cuts) - 1, 2)]
        spans = [s for i, s in enumerate(spans) if i == 0 or s[0] >= spans[i - 1][1]]
        ids = [rng.randrange(100) for _ in range(n)]
        for top in (False, True):
            assert labels_from_spans(ids, offsets, spans, top) == _labels_from_spans_loop(ids, offsets, spans, top)


def _reference_text_rows(tok, texts, max_seq_len, truncation):
    """The per-row text path as it was: encode_text, then chunks of max_seq_len (a lone trailing token dropped)."""
    rows = []
    for text in texts:
        ids, _ = encode_text(tok, text)
        n = len(ids)
        if n > max_seq_len and truncation == "drop":
            rows.append(([], [], n, DROPPED_TOO_LONG))
            continue
        for start in range(0, n, max_seq_len):
            chunk = ids[start:start + max_seq_len]
            if len(chunk) >= 2:
                rows.append((chunk, [IGNORE_INDEX] + chunk[1:], n if start == 0 else 0,
                             KEPT if n <= max_seq_len else TRUNCATED))
    return rows


@pytest.mark.parametrize("truncation", ["split", "drop"])
def test_batched_text_encoding_equals_per_row(tok, truncation):
    rng = random.Random(2)
    words = ["hello", "world", "</s>", "<|end_of_text|>", "<|begin_of_text|>", "ü", "😀", "\n", "  ", "123", "x"]
    texts = ["w " + " ".join(rng.choices(words, k=rng.choice([0, 1, 5, 40, 120]))) for _ in range(60)] + ["", " "]
    table = encode_text_batch(tok, texts, max_seq_len=32, truncation=truncation)
    got = list(zip(*(table.column(c).to_pylist() for c in ("input_ids", "labels", "length", "status"))))
    assert got == [tuple(r) for r in _reference_text_rows(tok, texts, 32, truncation)]
    assert str(table.schema.field("input_ids").type) == "list<item: int32>"


def test_token_columns_are_int32_and_collated_as_int64(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * (3 + i % 50)}) + "\n" for i in range(200)))
    for packing in (False, True):
        cfg = data_config_from_dict({"sources": [str(path)], "max_seq_len": 64, "packing": packing,
                                     "cache_dir": str(tmp_path / "cache")})
        train, _, _ = build_sft_datasets(cfg, tok)
        for col in ("input_ids", "labels", "position_ids"):
            assert train.features[col].feature.dtype == "int32"
        batch = SFTCollator(tok.pad_token_id)([train[0], train[1]])
        assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids"))
    tokenized = next((tmp_path / "cache" / "tokenized").iterdir())
    assert "int32" in json.dumps(json.loads((tokenized / "dataset" / "dataset_info.json").read_text())["features"])
