"""Every bad-input case gives a clear error naming the file and the row; --skip-bad-rows counts instead."""

import json

import pytest

from emoe_llm.data import DataError, DataFileNotFoundError, build_sft_datasets, data_config_from_dict, load_tokenizer
from emoe_llm.data.formats import read_source
from emoe_llm.tiny import DATA_DIR

GOOD_ALPACA = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}


def _write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _raises(path, match, **kw):
    with pytest.raises(DataError, match=match) as e:
        read_source(path, **kw)
    assert path in str(e.value)
    return e.value


def test_file_not_found(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataFileNotFoundError, match="file not found") as e:
        read_source(missing)
    assert missing in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def test_not_json_on_line_n(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps(GOOD_ALPACA), json.dumps(GOOD_ALPACA), '{"instruction": "x",'])
    err = _raises(path, r"bad\.jsonl: line 3: not valid JSON")
    assert err.row == 2


def test_broken_json_file_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    _raises(str(path), r"bad\.json: line 3: not valid JSON")


def test_missing_field_in_row_n(tmp_path):
    path = _write_json(tmp_path / "a.json", [GOOD_ALPACA, {"instruction": "Say hi."}])
    err = _raises(path, r"a\.json: row 1: missing field 'output'")
    assert (err.row, err.field) == (1, "output")


def test_empty_response(tmp_path):
    path = _write_json(tmp_path / "a.json", [GOOD_ALPACA, GOOD_ALPACA, {"instruction": "Say hi.", "output": "  "}])
    _raises(path, r"a\.json: row 2: empty response")
    conv = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}]
    _raises(_write_json(tmp_path / "s.json", conv), r"s\.json: row 0: empty response in turn 1 \(conversations\[1\]")


def test_unknown_role(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}]
    _raises(_write_json(tmp_path / "s.json", rows), r"s\.json: row 0: unknown role 'robot' in conversations\[1\]\.from")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}]
    _raises(_write_jsonl(tmp_path / "m.jsonl", [json.dumps(r) for r in rows]),
            r"m\.jsonl: line 1: unknown role 'tool' in messages\[1\]\.role")


def test_conversation_must_end_with_assistant(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]}]
    _raises(_write_json(tmp_path / "m.json", rows), r"m\.json: row 1: conversation does not end with an assistant turn")


def test_roles_must_alternate_and_fields_exist(tmp_path):
    rows = [{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}]
    _raises(_write_json(tmp_path / "m.json", rows), r"m\.json: row 0: turn 0 .* has role 'assistant' but 'user'")
    rows = [{"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}]
    _raises(_write_json(tmp_path / "s.json", rows), r"s\.json: row 0: missing field 'value' in conversations\[0\]")
    _raises(_write_json(tmp_path / "x.json", [{"prompt": "a", "answer": "b"}]), r"x\.json: cannot detect the format")


def test_bad_parquet_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
    ])
    path = str(tmp_path / "m.parquet")
    pq.write_table(table, path)
    _raises(path, r"m\.parquet: row 1: empty response")


def test_skip_bad_rows_counts_and_reports(tmp_path):
    lines = [json.dumps(GOOD_ALPACA), "not json", json.dumps({"instruction": "x"}), json.dumps(GOOD_ALPACA),
             json.dumps({"instruction": "y", "output": ""})]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    records, fmt, report = read_source(path, skip_bad_rows=True)
    assert (fmt, len(records), report["skipped_bad_rows"]) == ("alpaca", 2, 3)
    assert "mixed.jsonl: line 2" in report["bad_row_examples"][0]

    tok = load_tokenizer(DATA_DIR / "tokenizers" / "tiny_llama3_style")
    cfg = data_config_from_dict({"sources": [path], "skip_bad_rows": True, "cache_dir": str(tmp_path / "cache")})
    train, _, stats = build_sft_datasets(cfg, tok)
    assert len(train) == 2 and stats["skipped_bad_rows"] == 3
    with pytest.raises(DataError, match=r"mixed\.jsonl: line 2: not valid JSON"):
        build_sft_datasets(data_config_from_dict({"sources": [path], "cache_dir": str(tmp_path / "cache")}), tok)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pack'\]"):
        data_config_from_dict({"sources": ["a.json"], "pack": True})
    with pytest.raises(ValueError, match=r"data.sources\[0\]: unknown key\(s\) \['weigth'\]"):
        data_config_from_dict({"sources": [{"path": "a.json", "weigth": 2}]})
    with pytest.raises(ValueError, match="truncation"):
        data_config_from_dict({"sources": ["a.json"], "truncation": "cut"})
    with pytest.raises(ValueError, match=r"data.max_seq_len must be an integer, got '512'"):
        data_config_from_dict({"sources": ["a.json"], "max_seq_len": "512"})
    with pytest.raises(ValueError, match=r"data.sources\[0\].weight must be a number"):
        data_config_from_dict({"sources": [{"path": "a.json", "weight": "2"}]})
    with pytest.raises(ValueError, match=r"set `weight` on every source or on none.*\['a.json'\]"):
        data_config_from_dict({"sources": ["a.json", {"path": "b.jsonl", "weight": 2}]})
    cfg = data_config_from_dict({"sources": [{"path": "a.json", "weight": 1},
                                             {"path": "b.jsonl", "weight": 2, "format": "messages"}]})
    assert [s.weight for s in cfg.sources] == [1.0, 2.0] and cfg.sources[1].format == "messages"
    assert data_config_from_dict({"sources": "a.json"}).sources[0].weight is None


def test_alpaca_history_and_openai_text_parts(tmp_path):
    rows = [{"instruction": "And 3+3?", "output": "6", "history": [["2+2?", "4"]], "system": "Be brief."}]
    records, fmt, _ = read_source(_write_json(tmp_path / "h.json", rows))
    assert fmt == "alpaca" and [m["role"] for m in records[0]["messages"]] == ["system", "user", "assistant", "user",
                                                                              "assistant"]
    _raises(_write_json(tmp_path / "h2.json", [{"instruction": "x", "output": "y", "history": [["q"]]}]),
            r"h2\.json: row 0: history\[0\] must be a pair")
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
                           {"role": "assistant", "content": "Hello"}]}]
    records, _, _ = read_source(_write_json(tmp_path / "p.json", parts))
    assert records[0]["messages"][0]["content"] == "Hi\n!"
    parts[0]["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "x"}})
    _raises(_write_json(tmp_path / "p2.json", parts), r"p2\.json: row 0: messages\[0\]\.content\[2\] is not a text")


def test_template_failure_names_the_row(tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
                        "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    path = _write_json(tmp_path / "a.json", [GOOD_ALPACA, {"instruction": "boom", "output": "x"}])
    tok = load_tokenizer(DATA_DIR / "tokenizers" / "tiny_llama3_style")
    cfg = data_config_from_dict({"sources": [path], "template": str(template), "cache_dir": str(tmp_path / "c")})
    with pytest.raises(DataError, match=r"a\.json: row 1: the chat template failed on this conversation: no boom"):
        build_sft_datasets(cfg, tok)
