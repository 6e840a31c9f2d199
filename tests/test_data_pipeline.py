"""build_sft_datasets end to end on the shipped data: determinism, caching, truncation stats, mixing, eval split,
plain-text mode."""

import json
import time

import numpy as np
import pytest

from emoe_llm.data import IGNORE_INDEX, build_sft_datasets, data_config_from_dict, encode_conversation, load_tokenizer
from emoe_llm.data import read_source, resolve_template
from emoe_llm.tiny import DATA_DIR

ALPACA = str(DATA_DIR / "instruct" / "alpaca_tiny.json")
SHAREGPT = str(DATA_DIR / "chat" / "dummy_conversation.json")
KTO = str(DATA_DIR / "chat" / "kto_en_demo.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DATA_DIR / "tokenizers" / "tiny_llama3_style")


def _cfg(tmp_path, **kw):
    d = {"sources": [ALPACA], "template": "llama3", "cache_dir": str(tmp_path / "cache"), "max_seq_len": 256} | kw
    return data_config_from_dict(d)


def _rows(ds):
    return [tuple(r["input_ids"]) for r in ds]


def test_deterministic_order_for_a_seed(tok, tmp_path):
    sources = [ALPACA, {"path": SHAREGPT, "max_rows": 100}]
    a, _, _ = build_sft_datasets(_cfg(tmp_path / "a", sources=sources, seed=7), tok)
    b, _, _ = build_sft_datasets(_cfg(tmp_path / "b", sources=sources, seed=7), tok)  # fresh cache
    c, _, _ = build_sft_datasets(_cfg(tmp_path / "a", sources=sources, seed=8), tok)
    assert _rows(a) == _rows(b)
    assert _rows(a) != _rows(c) and sorted(_rows(a)) == sorted(_rows(c))  # same data, other order
    for r in a:
        assert r["position_ids"] == list(range(len(r["input_ids"]))) and r["labels"][0] == IGNORE_INDEX


def test_second_run_hits_the_cache(tok, tmp_path):
    cfg = _cfg(tmp_path, sources=[SHAREGPT])
    t0 = time.perf_counter()
    first, _, s1 = build_sft_datasets(cfg, tok)
    t1 = time.perf_counter()
    second, _, s2 = build_sft_datasets(cfg, tok)
    t2 = time.perf_counter()
    assert (s1["cache_hit"], s2["cache_hit"]) == (False, True)
    assert s1["sources"][0]["tokenize_seconds"] > 0 and _rows(first) == _rows(second)
    assert t2 - t1 < t1 - t0
    entries = list((tmp_path / "cache" / "tokenized").iterdir())
    assert len(entries) == 1 and json.loads((entries[0] / "stats.json").read_text())["examples"] == 500
    # Anything that changes the tokens is part of the key: another max_seq_len / template / tokenizer misses.
    _, _, s3 = build_sft_datasets(_cfg(tmp_path, sources=[SHAREGPT], max_seq_len=128), tok)
    _, _, s4 = build_sft_datasets(_cfg(tmp_path, sources=[SHAREGPT], template="alpaca"), tok)
    _, _, s5 = build_sft_datasets(_cfg(tmp_path, sources=[SHAREGPT], train_on_prompt=True), tok)
    assert not (s3["cache_hit"] or s4["cache_hit"] or s5["cache_hit"])
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 4
    # Another seed re-mixes and re-shuffles from the tokenized cache without tokenizing again.
    reshuffled, _, s6 = build_sft_datasets(_cfg(tmp_path, sources=[SHAREGPT], seed=1), tok)
    assert (s6["cache_hit"], s6["tokenize_cache_hit"]) == (False, True)
    assert sorted(_rows(reshuffled)) == sorted(_rows(first)) and _rows(reshuffled) != _rows(first)
    # Cache entries are complete directories only (no temp dirs or stray work files left behind).
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name or p.name.startswith("work-")]
    assert not leftovers


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_truncation_policy_is_counted(tok, tmp_path, policy):
    max_len = 96
    records, _, _ = read_source(ALPACA)
    _, source = resolve_template("llama3", tok)
    lengths = [len(encode_conversation(tok, source, r["messages"])[0]) for r in records]
    too_long = sum(n > max_len for n in lengths)
    assert 0 < too_long < len(records)
    train, _, stats = build_sft_datasets(_cfg(tmp_path, truncation=policy, max_seq_len=max_len), tok)
    assert max(len(r) for r in train["input_ids"]) <= max_len
    assert stats["length_max"] == max(lengths) and stats["length_p50"] == float(np.percentile(lengths, 50))
    if policy == "drop":
        assert stats["dropped_too_long"] == too_long and stats["truncated"] == 0
        assert len(train) == len(records) - too_long
    else:
        assert stats["truncated"] + stats["dropped_no_target"] == too_long
        assert len(train) == len(records) - stats["dropped_no_target"]
    assert stats["dropped"] == stats["dropped_too_long"] + stats["dropped_no_target"]


def test_stats_report_lengths_and_target_fraction(tok, tmp_path):
    train, _, stats = build_sft_datasets(_cfg(tmp_path, max_seq_len=2048), tok)
    lengths = sorted(len(r) for r in train["input_ids"])
    targets = sum(sum(t != IGNORE_INDEX for t in r) for r in train["labels"])
    assert stats["rows"] == len(train) == 100 and stats["tokens"] == sum(lengths)
    assert stats["length_max"] == lengths[-1] and lengths[0] <= stats["length_p50"] <= stats["length_p95"]
    assert stats["target_fraction"] == round(targets / sum(lengths), 4) and 0.2 < stats["target_fraction"] < 1


def test_weighted_mix_and_eval_split(tok, tmp_path):
    sources = [{"path": ALPACA, "weight": 3.0}, {"path": SHAREGPT, "weight": 1.0, "max_rows": 100}]
    train, eval_, stats = build_sft_datasets(_cfg(tmp_path, sources=sources, eval_fraction=0.1), tok)
    counts = [s["rows_in_mix"] for s in stats["sources"]]
    assert counts == [135, 45] and len(train) == 180  # 90 + 90 train rows shared 3:1
    assert len(eval_) == 20 and stats["eval_rows"] == 20
    # The held-out rows never appear in training, even though the alpaca rows were upsampled.
    assert not set(_rows(eval_)) & set(_rows(train))
    _, eval2, _ = build_sft_datasets(_cfg(tmp_path, sources=sources, eval_fraction=0.1), tok)
    assert _rows(eval_) == _rows(eval2)


def test_eval_sources_and_label_filter(tok, tmp_path):
    train, eval_, stats = build_sft_datasets(_cfg(tmp_path, sources=[KTO], eval_sources=[ALPACA]), tok)
    assert stats["filtered_label_false"] == 150 and len(train) + stats["dropped"] == 150
    assert len(eval_) == 100


def test_text_mode_trains_every_token_and_splits_long_documents(tok, tmp_path):
    corpus = str(DATA_DIR / "corpus" / "c4_demo.jsonl")
    train, _, stats = build_sft_datasets(_cfg(tmp_path, sources=[{"path": corpus, "max_rows": 50}],
                                              max_seq_len=128, packing=True), tok)
    assert stats["template"] is None and stats["truncated"] > 0  # long documents were split, not cut
    assert all(len(r) == 128 for r in train["input_ids"])
    for row in train:
        for t, (i, lab, pos) in enumerate(zip(row["input_ids"], row["labels"], row["position_ids"])):
            if pos == 0:
                assert lab == IGNORE_INDEX
            elif lab == IGNORE_INDEX:  # only padding is untrained
                assert i == tok.pad_token_id
    n_eos = sum(r.count(tok.eos_token_id) for r in train["input_ids"])
    assert n_eos == 50
    shakespeare, _, st = build_sft_datasets(_cfg(tmp_path, sources=[
        {"path": str(DATA_DIR / "corpus" / "tinyshakespeare.txt"), "max_rows": 200}]), tok)
    assert st["sources"][0]["format"] == "text" and len(shakespeare) == 200
    assert shakespeare[0]["input_ids"][0] == tok.bos_token_id and shakespeare[0]["input_ids"][-1] == tok.eos_token_id


def test_load_from_disk_dir_json_lines_in_json_and_system_prompt(tok, tmp_path):
    import datasets

    records, _, _ = read_source(SHAREGPT, max_rows=20)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved"))
    lines = tmp_path / "lines.json"  # JSON lines in a .json file (LLaMA-Factory accepts both)
    lines.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "output": str(i)}) for i in range(5)))
    train, _, stats = build_sft_datasets(_cfg(tmp_path, sources=[str(tmp_path / "saved"), str(lines)],
                                              system_prompt="You are terse."), tok)
    assert [s["format"] for s in stats["sources"]] == ["messages", "alpaca"]
    assert [s["examples"] for s in stats["sources"]] == [20, 5]
    texts = [tok.decode(r) for r in train["input_ids"]]
    assert all("<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>" in t for t in texts)


def test_empty_response_error_skip_eos_counted_and_keyed(tok, tmp_path):
    """The original Alpaca file has rows with an empty output: error names the row, skip leaves them out, eos trains
    an EOS-only target (the official code); the count lands in the stats and the option is part of the cache key."""
    rows = [{"instruction": f"q{i}", "input": "", "output": f"answer {i}"} for i in range(6)]
    rows[2]["output"] = ""
    rows[4]["output"] = ""
    path = tmp_path / "alpaca_empty.json"
    path.write_text(json.dumps(rows))
    from emoe_llm.data import DataError

    with pytest.raises(DataError, match=r"alpaca_empty.json: row 2: empty response in turn 1 \(output\); set "
                                        r"data.empty_response"):
        build_sft_datasets(_cfg(tmp_path, sources=[str(path)], template="alpaca"), tok)
    skip, _, s_skip = build_sft_datasets(_cfg(tmp_path, sources=[str(path)], template="alpaca",
                                              empty_response="skip"), tok)
    eos, _, s_eos = build_sft_datasets(_cfg(tmp_path, sources=[str(path)], template="alpaca",
                                            empty_response="eos"), tok)
    assert len(skip) == 4 and len(eos) == 6
    assert s_skip["empty_responses"] == s_eos["empty_responses"] == 2 and s_eos["empty_response"] == "eos"
    assert not s_eos["cache_hit"]  # a different option is a different cache entry
    eos_only = [r for r in eos if [x for x in r["labels"] if x != IGNORE_INDEX] == [tok.eos_token_id]]
    assert len(eos_only) == 2  # the empty rows train exactly one target: EOS
    with pytest.raises(ValueError, match="data.empty_response must be one of"):
        _cfg(tmp_path, empty_response="drop")


def test_builtin_template_text_is_part_of_the_cache_key(tok, tmp_path, monkeypatch):
    from emoe_llm.data import templates

    _, _, a = build_sft_datasets(_cfg(tmp_path, template="alpaca"), tok)
    monkeypatch.setitem(templates.BUILTIN, "alpaca", templates.ALPACA_MERGED_TEMPLATE)
    _, _, b = build_sft_datasets(_cfg(tmp_path, template="alpaca"), tok)
    assert not b["cache_hit"] and a["cache_key"] != b["cache_key"]


def test_template_variation_is_opt_in_seeded_and_alpaca_only(tok, tmp_path):
    from emoe_llm.data.templates import ALPACA_PREAMBLE_VARIANTS

    def preambles(seed, variation=True):
        ds, _, _ = build_sft_datasets(_cfg(tmp_path, template="alpaca", template_variation=variation, seed=seed), tok)
        texts = [tok.decode(r["input_ids"]) for r in ds]
        return [next(i for i, pair in enumerate(ALPACA_PREAMBLE_VARIANTS) if any(p in t for p in pair))
                for t in texts], texts

    plain, _ = preambles(0, variation=False)
    assert set(plain) == {0}  # off by default: always the official preamble
    a, texts = preambles(0)
    assert len(set(a)) >= 3 and a == preambles(0)[0]  # several variants, the same for the same seed
    assert preambles(1)[0] != a
    for t in texts:  # the with-input variant exactly when the row has an `### Input:` block
        has_input = "### Input:" in t
        assert any(pair[int(has_input)] in t for pair in ALPACA_PREAMBLE_VARIANTS)
    with pytest.raises(ValueError, match="template_variation varies the Alpaca preamble"):
        _cfg(tmp_path, template="llama3", template_variation=True)


def test_official_template_variation_uses_the_12_official_prompts(tok, tmp_path):
    """data.template_variation: official -- each row's prompt is one of the official code's 12 variants, rendered with
    the row's instruction/input exactly as its str.format does, seeded per row; the reply follows directly."""
    from emoe_llm.data.formats import read_source
    from emoe_llm.data.templates import OFFICIAL_PROMPT_VARIANTS

    assert len(OFFICIAL_PROMPT_VARIANTS) == 12
    rows = read_source(ALPACA)[0]

    candidates = {}  # every (row, variant) rendering -> (row, variant)
    for r_i, r in enumerate(rows):
        user, reply = r["messages"][0], r["messages"][1]
        for v_i, v in enumerate(OFFICIAL_PROMPT_VARIANTS):
            prompt = v[int(not user["input"])].format(instruction=user["instruction"], input=user["input"])
            candidates[prompt + reply["content"]] = (r_i, v_i)

    def variants(seed):
        cfg = _cfg(tmp_path, template="alpaca", template_variation="official", seed=seed, max_seq_len=4096)
        ds, _, _ = build_sft_datasets(cfg, tok)
        hits = [candidates.get(tok.decode(enc["input_ids"], skip_special_tokens=True)) for enc in ds]
        assert None not in hits and len(hits) == len(rows)  # every row is exactly one official rendering
        return [v for _, v in sorted(hits)]

    a = variants(0)
    assert len(set(a)) >= 8 and a == variants(0) and a != variants(1)
    with pytest.raises(ValueError, match="must be true, false or official, got 'paper'"):
        _cfg(tmp_path, template="alpaca", template_variation="paper")
def test_sources_stream_through_arrow_not_python_lists(tok, tmp_path, monkeypatch):
    """Data larger than RAM: the pipeline reads sources row by row into a memory-mapped Arrow table
    (Dataset.from_generator), never through read_source's in-memory list, and keeps every stat."""
    import emoe_llm.data.formats as formats

    def no_lists(*a, **k):
        raise AssertionError("the pipeline must stream sources, not read them into a list")

    monkeypatch.setattr(formats, "read_source", no_lists)
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"say {i}", "output": f"number {i} " * (1 + i % 7)} for i in range(2500)]
    rows.insert(1234, {"instruction": "x", "output": 5})  # bad row, skipped and counted
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, _, stats = build_sft_datasets(_cfg(tmp_path, sources=[str(path)], skip_bad_rows=True), tok)
    assert stats["skipped_bad_rows"] == 1 and "line 1235" in stats["bad_row_examples"][0]
    assert stats["documents"] == 2500 and len(train) == 2500
    assert train.cache_files and all(f["filename"].endswith(".arrow") for f in train.cache_files)  # memory-mapped
    src = stats["sources"][0]
    assert src["rows_read"] == 2501 and src["format"] == "alpaca"


def test_a_bad_row_fails_the_pipeline_naming_file_and_line(tok, tmp_path):
    from emoe_llm.data import DataError

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + '{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: missing field 'output'"):
        build_sft_datasets(_cfg(tmp_path, sources=[str(path)]), tok)
    assert not list((tmp_path / "cache" / "tokenized").glob("*/stats.json"))  # nothing half-written is cached
