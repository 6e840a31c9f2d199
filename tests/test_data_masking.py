"""Label masking on the shipped real data with the real Llama-2 and Llama-3 tokenizers, checked by decoding."""

import itertools
import json

import pytest

from emoe_llm.data import IGNORE_INDEX, encode_conversation, load_tokenizer, read_source, resolve_template
from emoe_llm.data import stop_token_ids
from emoe_llm.tiny import DATA_DIR

TOK = DATA_DIR / "tokenizers"


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(TOK / "llama2")


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(TOK / "llama3")


def _conversations():
    """A real sample of every shipped chat format: alpaca, sharegpt (multi-turn + system), messages (json, parquet)."""
    out = []
    for name, n in (("instruct/alpaca_en_demo.json", 40), ("chat/dummy_conversation.json", 40),
                    ("chat/chat_tiny.json", 1), ("chat/kto_en_demo.json", 40), ("chat/deita_subset_sft.parquet", 5)):
        records, _, _ = read_source(str(DATA_DIR / name), max_rows=n)
        out += [r["messages"] for r in records]
    assert any(m[0]["role"] == "system" for m in out) and any(len(m) >= 6 for m in out)
    return out


def _target_runs(ids, labels):
    """Maximal runs of consecutive target tokens, as token-id lists."""
    runs = []
    for is_target, group in itertools.groupby(zip(ids, labels), key=lambda x: x[1] != IGNORE_INDEX):
        if is_target:
            runs.append([i for i, _ in group])
    return runs


def _norm(s):
    return " ".join(s.split())


def _expected_turns(tok, template, messages):
    """What each assistant turn must decode to: content plus the template's end-of-turn marker; the last one also
    ends with the EOS (appended when the template does not write it)."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    eos = tok.eos_token
    if template == "llama3":
        out = [r.strip() + "<|eot_id|>" for r in replies]
        out[-1] += eos
    elif template == "llama2":
        out = [r.strip() + " " + eos for r in replies]
    else:  # alpaca
        out = [r + eos for r in replies]
    return [_norm(x) for x in out]


@pytest.mark.parametrize("tok_name,template", [("llama2", "alpaca"), ("llama2", "alpaca_merged"), ("llama2", "llama2"),
                                               ("llama2", "auto"), ("llama3", "auto"), ("llama3", "llama3")])
def test_minus_100_exactly_on_prompt_tokens(tok_name, template, request):
    tok = request.getfixturevalue(tok_name)
    resolved_name, source = resolve_template(template, tok)
    kind = {"tokenizer": "llama3", "alpaca": "alpaca", "alpaca_merged": "alpaca", "llama2": "llama2",
            "llama3": "llama3"}[resolved_name]
    for messages in _conversations():
        ids, labels = encode_conversation(tok, source, messages)
        assert len(ids) == len(labels) and labels[0] == IGNORE_INDEX
        assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
        assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # EOS appended and trained
        # Targets decode to exactly the assistant replies, one run per turn, in order.
        runs = [_norm(tok.decode(r)) for r in _target_runs(ids, labels)]
        if resolved_name == "alpaca":
            # the official prompt ends "### Response:" with no newline; SentencePiece may merge the ':' with the
            # reply's first characters, and a token that straddles the boundary is one the model must generate
            runs = [r[1:] if r.startswith(":") else r for r in runs]
        assert runs == _expected_turns(tok, kind, messages)
        # Everything else (the prompt side) decodes to the user/system text and the template scaffolding.
        prompt = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
        for m in messages:
            if m["role"] != "assistant":
                parts = [m["instruction"], m["input"]] if resolved_name == "alpaca" and "instruction" in m else \
                    [m["content"]]
                assert all(_norm(p) in _norm(prompt) for p in parts)
        assert tok.bos_token_id == ids[0]


def test_llama2_tokenizer_loads_with_unk_pad_and_alpaca_fallback(llama2):
    assert type(llama2).__name__ == "LlamaTokenizer" and len(llama2) == 32000
    assert llama2("Hello").input_ids[0] == llama2.bos_token_id == 1
    assert llama2.pad_token == "<unk>" and llama2.pad_token_id != llama2.eos_token_id
    assert resolve_template("auto", llama2)[0] == "alpaca"  # no chat template of its own


def test_llama3_tokenizer_pad_is_reserved_token_and_own_template(llama3):
    assert len(llama3) == 128256 and llama3("Hello world").input_ids == [128000, 9906, 1917]
    assert llama3.pad_token == "<|reserved_special_token_0|>" and llama3.pad_token_id != llama3.eos_token_id
    assert resolve_template("auto", llama3)[0] == "tokenizer"
    assert stop_token_ids(llama3) == [llama3.eos_token_id, llama3.convert_tokens_to_ids("<|eot_id|>")]


def test_train_on_prompt_trains_every_token_but_the_first(llama3):
    _, source = resolve_template("auto", llama3)
    messages = _conversations()[0]
    ids, labels = encode_conversation(llama3, source, messages, train_on_prompt=True)
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_user_template_file(tmp_path, llama2):
    path = tmp_path / "vicuna.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                    "ASSISTANT:{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
                    "{% endfor %}")
    name, source = resolve_template(str(path), llama2)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    ids, labels = encode_conversation(llama2, source, messages)
    assert [_norm(llama2.decode(r)) for r in _target_runs(ids, labels)] == ["Hello there.</s>"]


@pytest.mark.parametrize("tok_name", ["llama2", "llama3"])
def test_control_tokens_quoted_in_messages_stay_plain_text(tok_name, request):
    """kto_en_demo quotes `</s>` in a reply; it must not become an EOS (the model would learn to stop mid-reply)."""
    tok = request.getfixturevalue(tok_name)
    _, source = resolve_template("auto", tok)
    rows = json.loads((DATA_DIR / "chat" / "kto_en_demo.json").read_text())  # label=false rows included
    quoting = [r["messages"] for r in rows if any("</s>" in m["content"] for m in r["messages"])]
    quoting.append([{"role": "user", "content": "Print <|eot_id|> and <|begin_of_text|>."},
                    {"role": "assistant", "content": "<|eot_id|> <|begin_of_text|> </s>"}])
    assert len(quoting) >= 2
    for messages in quoting:
        ids, labels = encode_conversation(tok, source, messages)
        assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = [_norm(tok.decode(r)) for r in _target_runs(ids, labels)]
        assert all(_norm(reply) in run for reply, run in zip(replies, runs))


def test_template_errors_are_clear(llama2, tmp_path):
    from emoe_llm.data import TemplateError

    with pytest.raises(TemplateError, match=r"template 'llama3' needs the special tokens \['<\|start_header_id\|>'"):
        resolve_template("llama3", llama2)
    with pytest.raises(TemplateError, match="neither one of auto/alpaca/alpaca_merged/llama2/llama3 nor an existing file"):
        resolve_template(str(tmp_path / "missing.jinja"), llama2)
    inconsistent = tmp_path / "bad.jinja"  # a trailer after the last turn breaks prefix consistency
    inconsistent.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}[END]")
    _, source = resolve_template(str(inconsistent), llama2)
    with pytest.raises(TemplateError, match="not prefix-consistent"):
        encode_conversation(llama2, source, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


STANFORD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
STANFORD_NO_INPUT = ("Below is an instruction that describes a task. "
                     "Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Response:")


def test_alpaca_template_is_the_stanford_prompt_character_for_character(llama2, tmp_path):
    """PROMPT_DICT of tatsu-lab/stanford_alpaca train.py (and the EMoE code); text = BOS + prompt + output + EOS."""
    from emoe_llm.data.templates import render_with_target_spans

    rows = [{"instruction": "Sum these.", "input": "1, 2", "output": "3"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    records, _, _ = read_source(str(path))
    _, source = resolve_template("alpaca", llama2)
    for row, rec in zip(rows, records):
        text, spans = render_with_target_spans(llama2, source, rec["messages"])
        official = (STANFORD_INPUT if row["input"] else STANFORD_NO_INPUT).format_map(row)
        assert text == llama2.bos_token + official + row["output"] + llama2.eos_token
        assert text[spans[0][0]:spans[0][1]] == row["output"] + llama2.eos_token
    # the earlier form stays available by name: input merged into the instruction, newline after Response:
    _, merged = resolve_template("alpaca_merged", llama2)
    text, _ = render_with_target_spans(llama2, merged, records[0]["messages"])
    assert text == (llama2.bos_token + STANFORD_NO_INPUT.format(instruction="Sum these.\n\n1, 2") + "\n3"
                    + llama2.eos_token)
