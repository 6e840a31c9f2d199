"""Packing: rows of exactly max_seq_len, positions restarting per document, and packed loss == sum of unpacked losses
on a tiny Llama (transformers builds the block-diagonal mask from position_ids when no attention_mask is given)."""

import pytest
import torch

from emoe_llm.data import IGNORE_INDEX, SFTCollator, build_sft_datasets, data_config_from_dict, load_tokenizer
from emoe_llm.data.packing import pack_lengths
from emoe_llm.tiny import DATA_DIR, tiny_llama_config

SEQ = 256


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DATA_DIR / "tokenizers" / "tiny_llama3_style")


@pytest.fixture(scope="module")
def built(tok, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    common = {"sources": [str(DATA_DIR / "instruct" / "alpaca_tiny.json"), str(DATA_DIR / "chat" / "chat_tiny.json")],
              "template": "llama3", "max_seq_len": SEQ, "cache_dir": str(cache), "seed": 3}
    packed = build_sft_datasets(data_config_from_dict(common | {"packing": True}), tok)
    unpacked = build_sft_datasets(data_config_from_dict(common), tok)
    return packed, unpacked


def _documents(row):
    """Split a packed row into its documents (position_ids restart at 0), dropping the padding segment."""
    docs, start = [], 0
    pos = row["position_ids"]
    for t in range(1, len(pos) + 1):
        if t == len(pos) or pos[t] == 0:
            ids, labels = row["input_ids"][start:t], row["labels"][start:t]
            if any(x != IGNORE_INDEX for x in labels):
                docs.append({"input_ids": ids, "labels": labels, "position_ids": list(range(t - start))})
            start = t
    return docs


def test_packed_rows_are_full_length_with_restarting_positions(built, tok):
    (packed, _, pstats), (unpacked, _, ustats) = built
    assert all(len(r) == SEQ for r in packed["input_ids"])
    assert all(len(r) == SEQ for r in packed["position_ids"]) and all(len(r) == SEQ for r in packed["labels"])
    assert pstats["rows"] < ustats["rows"] and pstats["packing_efficiency"] > 0.8
    packed_docs = sorted(tuple(d["input_ids"]) for row in packed for d in _documents(row))
    unpacked_docs = sorted(tuple(r["input_ids"]) for r in unpacked)
    assert packed_docs == unpacked_docs  # nothing lost, nothing duplicated, nothing split
    no_eos = 0
    for row in packed:
        for d in _documents(row):
            assert d["labels"][0] == IGNORE_INDEX  # no document is trained to predict the first token of the next
            # Every document ends in a trained EOS, except those the truncation policy cut.
            no_eos += not (d["labels"][-1] == d["input_ids"][-1] == tok.eos_token_id)
    assert no_eos == pstats["truncated"] > 0 and tok.pad_token_id != tok.eos_token_id
    assert pstats["target_tokens"] == ustats["target_tokens"] and pstats["tokens"] == ustats["tokens"]


def test_pack_lengths_best_fit():
    bins = pack_lengths([5, 3, 8, 2, 6, 4], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 8, 2, 6, 4][i] for i in b) <= 10 for b in bins) and len(bins) == 3
    with pytest.raises(ValueError, match="more than the packing capacity"):
        pack_lengths([11], 10)


def _token_losses(model, batch):
    """Summed next-token cross-entropy of a collated batch (HF shift: logits[t] predicts labels[t+1])."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_sum_of_unpacked_losses(built, tok, attn):
    from transformers import LlamaForCausalLM

    (packed, _, _), _ = built
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tok), max_position_embeddings=SEQ)
    config._attn_implementation = attn
    # Training must run without a KV cache: with use_cache=True LlamaModel creates a DynamicCache and
    # transformers' masking_utils skips packed-sequence detection, so documents would attend to each other.
    config.use_cache = False
    model = LlamaForCausalLM(config).eval()
    collate = SFTCollator(tok.pad_token_id)
    # The three rows holding the most documents (BFD also makes rows of one long document).
    rows = sorted(packed, key=lambda r: -len(_documents(r)))[:3]
    batch = collate(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (3, SEQ)
    docs = [d for r in rows for d in _documents(r)]
    assert len(docs) > 6
    with torch.no_grad():
        packed_loss = _token_losses(model, batch)
        single = sum(_token_losses(model, collate([d])) for d in docs)
        # Unpacked, padded batches (attention_mask path) give the same total as well.
        padded = sum(_token_losses(model, collate(docs[i:i + 4])) for i in range(0, len(docs), 4))
        # Control: the same rows with positions that do not restart attend across documents -> different loss.
        leaky = {k: v.clone() for k, v in batch.items()}
        leaky["position_ids"] = torch.arange(SEQ).expand(3, SEQ).clone()
        leaky_loss = _token_losses(model, leaky)
    n_targets = int((batch["labels"] != IGNORE_INDEX).sum())
    assert n_targets > 100
    torch.testing.assert_close(packed_loss / n_targets, single / n_targets, atol=1e-4, rtol=0)
    torch.testing.assert_close(padded / n_targets, single / n_targets, atol=1e-4, rtol=0)
    assert abs(leaky_loss - packed_loss) / n_targets > 1e-3


def test_collator_unpacked_padding_and_flash_kwargs(tok):
    collate = SFTCollator(tok.pad_token_id, pad_to_multiple_of=8)
    rows = [{"input_ids": [2000, 5, 6], "labels": [-100, 5, 6], "position_ids": [0, 1, 2]},
            {"input_ids": [2000, 7], "labels": [-100, 7], "position_ids": [0, 1]}]
    b = collate(rows)
    assert b["input_ids"].shape == (2, 8) and b["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert b["labels"][1, 2:].eq(IGNORE_INDEX).all() and b["input_ids"][1, 2:].eq(tok.pad_token_id).all()
    packed_row = {"input_ids": [2000, 5, 2001, 2000, 7, 2001], "labels": [-100, 5, 2001, -100, 7, 2001],
                  "position_ids": [0, 1, 2, 0, 1, 2]}
    b = SFTCollator(tok.pad_token_id, flash_attn_kwargs=True)([packed_row, packed_row])
    assert "attention_mask" not in b
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 6, 9, 12] and b["max_length_q"] == 3
    # Same boundaries as transformers' own FA2 derivation from flattened position_ids.
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(b["position_ids"].reshape(1, -1))
    assert cu_q.tolist() == b["cu_seq_lens_q"].tolist() and int(max_q) == b["max_length_q"]
    # And transformers' SDPA/eager packed-sequence detection sees the same documents.
    from transformers.masking_utils import find_packed_sequence_indices

    assert find_packed_sequence_indices(b["position_ids"]).tolist() == [[0, 0, 0, 1, 1, 1]] * 2


def test_token_counts_exclude_padding_in_packed_batches(tok):
    """tokens_seen and tokens/s count real tokens: a packed batch (no attention mask) padded to its longest row and
    to a multiple of 8 counts its rows' tokens, as an unpacked one counts its mask."""
    from emoe_llm.train.recipe import count_inputs, count_targets

    packed = [{"input_ids": [2000, 5, 2001, 2000, 7, 2001], "labels": [-100, 5, 2001, -100, 7, 2001],
               "position_ids": [0, 1, 2, 0, 1, 2]},
              {"input_ids": [2000, 9, 2001], "labels": [-100, 9, 2001], "position_ids": [0, 1, 2]}]
    b = SFTCollator(tok.pad_token_id, pad_to_multiple_of=8)(packed)
    assert "attention_mask" not in b and b["input_ids"].numel() == 16
    assert count_inputs(b, tok.pad_token_id) == 9 and count_targets(b) == 6
    assert count_inputs(b) == 16  # without the pad id: every position
    unpacked = SFTCollator(tok.pad_token_id, pad_to_multiple_of=8)(packed[1:] + [
        {"input_ids": [2000, 5], "labels": [-100, 5], "position_ids": [0, 1]}])
    assert count_inputs(unpacked, tok.pad_token_id) == 5 == int(unpacked["attention_mask"].sum())
