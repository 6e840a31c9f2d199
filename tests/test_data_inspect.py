"""The data inspection CLI: stats, a decoded row with masked parts marked, clear errors and exit codes."""

import json

from emoe_llm.data.inspect import MASK_CLOSE, MASK_OPEN, main
from emoe_llm.tiny import DATA_DIR

TINY_TOK = str(DATA_DIR / "tokenizers" / "tiny_llama3_style")


def test_inspect_prints_stats_and_masked_example(tmp_path, capsys):
    rc = main(["--source", str(DATA_DIR / "chat" / "chat_tiny.json"), "--tokenizer", TINY_TOK, "--template", "llama3",
               "--cache-dir", str(tmp_path), "--max-seq-len", "512"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "train rows 1" in out and "target fraction" in out and "cache miss (tokenized: miss)" in out
    # The system and user turns are inside the mask markers, the replies outside.
    assert f"{MASK_OPEN}<|begin_of_text|><|start_header_id|>system" in out
    assert f"{MASK_CLOSE}The meaning of life is 42.<|eot_id|>{MASK_OPEN}" in out
    assert main(["--source", str(DATA_DIR / "chat" / "chat_tiny.json"), "--tokenizer", TINY_TOK, "--template",
                 "llama3", "--cache-dir", str(tmp_path), "--max-seq-len", "512", "--show", "0"]) == 0
    assert "cache hit" in capsys.readouterr().out


def test_inspect_reports_bad_rows(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    rc = main(["--source", str(bad), "--tokenizer", TINY_TOK, "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and f"{bad}: line 2: missing field 'output'" in capsys.readouterr().err
    rc = main(["--source", str(bad), "--validate-only", "--skip-bad-rows"])
    out = capsys.readouterr().out
    assert rc == 0 and "usable=1" in out and "skipped_bad_rows=1" in out and "line 2" in out
    assert main(["--source", str(tmp_path / "missing.json"), "--validate-only"]) == 2
    assert "file not found" in capsys.readouterr().err
