"""`emoe-llm eval` on lm-evaluation-harness: same results as lm_eval.simple_evaluate, the shipped tasks, the modes."""

import json
import math

import pytest
import torch

from emoe_llm.cli import main
from emoe_llm.data import load_tokenizer
from emoe_llm.eval import tasks as shipped
from emoe_llm.eval.cli import task_manager
from emoe_llm.tiny import DATA_DIR

USER_TASK = """\
task: capitals_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ROWS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "answer": 0},
    {"question": "What is the capital of Italy?", "choices": ["Berlin", "Rome", "Lisbon"], "answer": 1},
    {"question": "What is the capital of Spain?", "choices": ["Vienna", "Oslo", "Madrid"], "answer": 2},
    {"question": "Which planet is closest to the sun?", "choices": ["Mercury", "Mars"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
]


@pytest.fixture(scope="module")
def tiny(tiny_eval_checkpoints):  # tests/conftest.py
    return tiny_eval_checkpoints


@pytest.fixture()
def user_tasks(tmp_path):
    d = tmp_path / "my_tasks"
    d.mkdir()
    data = d / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "capitals_qa.yaml").write_text(USER_TASK.format(data=data))
    return d


def test_cli_results_equal_simple_evaluate(tiny, user_tasks, tmp_path):
    """The must-show: `emoe-llm eval --include-path` == lm_eval.simple_evaluate on the same model, key for key."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "res.json"
    assert main(["eval", str(tiny["dense"]), "--tasks", "capitals_qa", "--include-path", str(user_tasks),
                 "--batch-size", "2", "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    ours = json.loads(out.read_text())

    model = AutoModelForCausalLM.from_pretrained(tiny["dense"], dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(tiny["dense"]), batch_size=2)
    direct = lm_eval.simple_evaluate(model=lm, tasks=["capitals_qa"],
                                     task_manager=lm_eval.tasks.TaskManager(include_path=str(user_tasks)))
    assert set(ours["results"]) == {"capitals_qa"}
    assert ours["results"] == json.loads(json.dumps(direct["results"]))  # exactly, every key and value
    # beside lm-eval's dict: how the model was evaluated
    assert ours["mode"] == "dense" and ours["mode_source"].startswith("auto: every export is scored dense")
    assert ours["tasks"] == ["capitals_qa"] and ours["lm_eval_version"] == lm_eval.__version__
    assert ours["checkpoint"] == str(tiny["dense"].resolve()) and ours["seconds"] > 0


def test_emoe_checkpoint_scores_dense_by_default_masked_on_request(tiny, user_tasks, tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    common = ["--tasks", "capitals_qa", "--include-path", str(user_tasks), "--device", "cpu", "--no-progress"]
    assert main(["eval", str(tiny["emoe"]), *common, "--mode", "emoe", "--output", str(a)]) == 0
    assert main(["eval", str(tiny["emoe"]), *common, "--mode", "dense", "--output", str(b)]) == 0
    assert main(["eval", str(tiny["emoe"]), *common, "--output", str(c)]) == 0  # auto: dense, as the paper scored
    masked, dense, auto = (json.loads(p.read_text()) for p in (a, b, c))
    assert masked["mode"] == "emoe" and masked["top_k"] == 4 and masked["layers"] == [2, 3]
    assert dense["mode"] == "dense" and "top_k" not in dense
    assert auto["mode"] == "dense" and "converted" in auto["mode_source"] and auto["results"] == dense["results"]
    assert main(["eval", str(tiny["dense"]), *common, "--mode", "emoe"]) == 2  # no 'emoe' block

    # both modes in one process: a JSON per mode, each equal to its own run's
    both = tmp_path / "both" / "{mode}.json"
    assert main(["eval", str(tiny["emoe"]), *common, "--mode", "emoe,dense", "--output", str(both)]) == 0
    for mode, alone in (("emoe", masked), ("dense", dense)):
        together = json.loads((tmp_path / "both" / f"{mode}.json").read_text())
        assert together["mode"] == mode and together["results"] == alone["results"]
    # refused before anything loads: one file for two modes, a mode twice, emoe on a dense checkpoint
    assert main(["eval", str(tiny["emoe"]), *common, "--mode", "emoe,dense", "--output", str(a)]) == 2
    assert main(["eval", str(tiny["emoe"]), *common, "--mode", "auto,dense", "--output", str(both)]) == 2
    assert main(["eval", str(tiny["dense"]), *common, "--mode", "dense,emoe", "--output", str(both)]) == 2


def test_default_output_path(tiny, user_tasks):
    assert main(["eval", str(tiny["dense"]), "--tasks", "capitals_qa", "--include-path", str(user_tasks),
                 "--device", "cpu", "--no-progress", "--limit", "2"]) == 0
    out = tiny["dense"].parent / "eval" / "dense_dense.json"
    assert json.loads(out.read_text())["limit"] == 2


def test_list_tasks_names_every_shipped_task(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped.SHIPPED)


def test_shipped_tasks_resolve_without_lm_evals_own():
    manager = task_manager(lm_eval_tasks=False)
    names = set(manager.all_tasks)
    assert set(shipped.SHIPPED) <= names
    subjects = sorted(p.name[: -len("_val.csv")] for p in (DATA_DIR / "eval" / "mmlu" / "val").glob("*_val.csv"))
    assert len(subjects) == 57 and {f"emoe_mmlu_{s}" for s in subjects} <= names


def test_mmlu_task_prompt_is_the_original():
    """The fully rendered 1-shot context of emoe_mmlu: Hendrycks' description, the dev shot, the question."""
    manager = task_manager(lm_eval_tasks=False)
    task = manager.load("emoe_mmlu_high_school_geography")["tasks"]["emoe_mmlu_high_school_geography"]
    task.set_config("num_fewshot", 1)
    doc = task.dataset["eval"][0]
    shot = task.dataset["dev"][0]
    ctx = task.fewshot_context(doc, num_fewshot=1)
    letters = "ABCD"

    def block(q):
        return q["question"] + "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(q["choices"])) + "\nAnswer:"
    assert ctx == ("The following are multiple choice questions (with answers) about high school geography.\n\n"
                   + block(shot) + f" {letters[shot['answer']]}\n\n" + block(doc))
    assert len(task.dataset["eval"]) == len(
        (DATA_DIR / "eval" / "mmlu" / "val" / "high_school_geography_val.csv").read_text().splitlines())


def test_nll_task_matches_a_manual_forward(tiny, tmp_path):
    """emoe_nll_alpaca_heldout: nll_per_token is sum over rows of -log p(output + EOS | prompt) / sum of target
    tokens; the per-document records beside the JSON carry each row's NLL and token count."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nll.json"
    assert main(["eval", str(tiny["dense"]), "--tasks", "emoe_nll_alpaca_heldout,emoe_nll_selfinstruct",
                 "--limit", "3", "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    rows = json.loads((DATA_DIR / "instruct" / "alpaca_en_demo.json").read_text())[900:903]
    tok = load_tokenizer(tiny["dense"])
    model = AutoModelForCausalLM.from_pretrained(tiny["dense"], dtype=torch.float32)
    tokens, per_row = [], []
    for r in rows:
        prompt = tok(shipped.alpaca_prompt(r["instruction"], r["input"]))["input_ids"]
        full = tok(shipped.alpaca_prompt(r["instruction"], r["input"]) + r["output"] + tok.eos_token)["input_ids"]
        assert full[: len(prompt)] == prompt and full[-1] == tok.eos_token_id
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        nll = -sum(logp[i - 1, full[i]].item() for i in range(len(prompt), len(full)))
        per_row.append(nll)
        tokens.append(len(full) - len(prompt))
    assert res["emoe_nll_alpaca_heldout"]["nll_per_token,none"] == pytest.approx(sum(per_row) / sum(tokens), rel=1e-4)
    assert res["emoe_nll_alpaca_heldout"]["nll_per_row,none"] == pytest.approx(sum(per_row) / 3, rel=1e-4)
    assert math.isfinite(res["emoe_nll_selfinstruct"]["nll_per_token,none"])
    records = [json.loads(line) for line in (tmp_path / "nll.samples.jsonl").read_text().splitlines()]
    heldout = [r for r in records if r["task"] == "emoe_nll_alpaca_heldout"]
    assert [r["doc_id"] for r in heldout] == [0, 1, 2] and len(records) == 6
    assert [r["nll_per_row"] for r in heldout] == pytest.approx(per_row, rel=1e-4)
    assert [r["nll_per_token_weight"] for r in heldout] == tokens
    assert [r["nll_per_token"] for r in heldout] == pytest.approx([n / t for n, t in zip(per_row, tokens)], rel=1e-4)


def test_nll_sets_are_held_out_and_complete():
    tok = str(DATA_DIR / "tokenizers" / "tiny_llama3_style")
    heldout = shipped.load_alpaca_heldout(tokenizer=tok)["test"]
    selfinstruct = shipped.load_selfinstruct(tokenizer=tok)["test"]
    assert len(heldout) == 999 - shipped.ALPACA_HELDOUT_START == 99 and len(selfinstruct) == 175
    train = json.loads((DATA_DIR / "instruct" / "alpaca_en_demo.json").read_text())[: shipped.ALPACA_HELDOUT_START]
    seen = {shipped.alpaca_prompt(r["instruction"], r["input"]) for r in train}
    assert not any(p in seen for p in heldout["prompt"])  # no held-out prompt is also a training prompt
    assert all(n > 0 for n in [*heldout["n_target_tokens"], *selfinstruct["n_target_tokens"]])
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        shipped.load_selfinstruct()


def test_gsm8k_task_scores_the_number_after_the_hashes():
    manager = task_manager(lm_eval_tasks=False)
    task = manager.load("emoe_gsm8k")["tasks"]["emoe_gsm8k"]
    assert len(task.dataset["test"]) == 1319
    doc = task.dataset["test"][0]  # Janet's ducks: "... #### 18"
    assert doc["answer"].endswith("#### 18")
    assert task.process_results(doc, ["18"])["exact_match"] == 1.0
    assert task.process_results(doc, ["$18."])["exact_match"] == 1.0  # "$" and a final "." are ignored
    assert task.process_results(doc, ["17"])["exact_match"] == 0.0


@pytest.mark.parametrize("name,rows", [("arc_easy", 570), ("arc_challenge", 299), ("piqa", 1838), ("sciq", 1000),
                                       ("copa", 100), ("openbookqa", 500), ("hellaswag", 2831), ("winogrande", 1267)])
def test_shipped_multiple_choice_sets(name, rows):
    """Every shipped set loads offline with all its rows, and each document's gold answer is one of its choices."""
    manager = task_manager(lm_eval_tasks=False)
    task = manager.load(f"emoe_{name}")["tasks"][f"emoe_{name}"]
    docs = list(task.eval_docs)
    assert len(docs) == rows
    for doc in docs[:50]:
        choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
        if name == "winogrande":  # partial scoring: the contexts are the choices, the gold one is doc_to_text
            target = task.doc_to_text(doc)
        # the gold answer: an index, or (COPA) the text of one choice
        assert len(choices) >= 2 and (target in choices or 0 <= int(target) < len(choices))


@pytest.mark.parametrize("template", ["alpaca", "auto", "llama3"])
def test_nll_target_is_what_training_learnt(template):
    """The NLL tasks score, under the checkpoint's training template, exactly the tokens training learnt for the row:
    the target's ids after the prompt equal the labelled ids of the training encoder (Llama-3 tokenizer: its own
    chat template for auto)."""
    from emoe_llm.data.encode import encode_conversation
    from emoe_llm.data.formats import normalize_record
    from emoe_llm.data.templates import resolve_template

    tok = load_tokenizer(DATA_DIR / "tokenizers" / "llama3")
    rows = json.loads((DATA_DIR / "instruct" / "alpaca_en_demo.json").read_text())[900:904]
    for row in rows:
        prompt, target = shipped.nll_prompt_and_target(tok, template, row)
        full = tok(prompt + target, add_special_tokens=False)["input_ids"]
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        assert full[: len(head)] == head
        messages = normalize_record(dict(row), "alpaca", "row")["messages"]
        ids, labels = encode_conversation(tok, resolve_template(template, tok)[1], messages)
        learnt = [i for i, label in zip(ids, labels) if label != -100]
        assert full[len(head):] == learnt, template
    if template == "auto":
        assert "<|start_header_id|>assistant<|end_header_id|>" in prompt  # the chat template, not the Alpaca prompt


def test_eval_puts_a_model_that_fits_on_one_gpu(tmp_path):
    """--device auto: one GPU when the weights (in the dtype they load in) fit in 80% of it, all GPUs only when they
    do not; a 7B in bf16 on 8 x 80 GB runs on one, a 30B in bf16 (65 GB) is sharded."""
    from emoe_llm.eval.cli import eval_placement, weight_bytes

    gb = 10**9
    eight = [80 * gb] * 8
    assert eval_placement(int(13.5 * gb), eight) == "cuda:0"
    assert eval_placement(65 * gb, eight) == "auto"
    assert eval_placement(65 * gb, [141 * gb] * 8) == "cuda:0"  # H200
    assert eval_placement(65 * gb, [80 * gb]) == "cuda:0"  # one GPU: nothing to shard over
    assert eval_placement(65 * gb, []) == "cpu"
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 1000)
    assert weight_bytes(tmp_path, {"dtype": "float32"}, "auto") == 4000
    assert weight_bytes(tmp_path, {"dtype": "float32"}, torch.bfloat16) == 2000  # loaded in bf16: half
    assert weight_bytes(tmp_path, {"torch_dtype": "bfloat16"}, torch.float32) == 8000
