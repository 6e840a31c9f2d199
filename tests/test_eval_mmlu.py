"""MMLU from the shipped CSVs: prompt format, letter scoring, and `emoe-llm eval` on a tiny checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from emoe_llm.data import load_tokenizer
from emoe_llm.eval.mmlu import (
    CHOICES,
    Question,
    _read_csv,
    answer_token_ids,
    build_prompt,
    evaluate_mmlu,
    list_subjects,
)
from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint

MMLU = DATA_DIR / "eval" / "mmlu"
SUBJECTS = ["abstract_algebra", "anatomy", "marketing"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from emoe_llm.emoe import apply_emoe
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mmlu")
    dense = save_tiny_checkpoint(root / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    model = AutoModelForCausalLM.from_pretrained(dense)
    apply_emoe(model, n_experts=16, top_k=4, layers="2,3")
    model.save_pretrained(root / "emoe")
    load_tokenizer(dense).save_pretrained(root / "emoe")
    return {"dense": dense, "emoe": root / "emoe"}


def test_shipped_mmlu_files_parse():
    subjects = list_subjects(MMLU, "val")
    assert len(subjects) == 57 and list_subjects(MMLU, "dev") == subjects
    n_val = sum(len(_read_csv(MMLU / "val" / f"{s}_val.csv", s)) for s in subjects)
    assert n_val == 1543  # data/LICENSES.md: pre-release snapshot of hendrycks/test
    for s in subjects:
        assert len(_read_csv(MMLU / "dev" / f"{s}_dev.csv", s)) == 5


def test_prompt_format_is_the_original():
    shot = Question("high_school_geography", "Q1?", ("a", "b", "c", "d"), "C")
    q = Question("high_school_geography", "Q2?", ("e", "f", "g", "h"), "A")
    assert build_prompt([shot], q) == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
        "Q2?\nA. e\nB. f\nC. g\nD. h\nAnswer:"
    )


@pytest.mark.parametrize("tok", ["tiny_llama3_style", "llama2", "llama3"])
def test_answer_letters_are_single_tokens(tok):
    ids = answer_token_ids(load_tokenizer(DATA_DIR / "tokenizers" / tok))
    assert len(set(ids)) == 4


def test_scores_match_a_manual_forward(tiny):
    """evaluate_mmlu's batched, left-padded scoring == argmax of the next-token log-probs of each prompt alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["dense"], dtype=torch.float32)
    tok = load_tokenizer(tiny["dense"])
    res = evaluate_mmlu(model, tok, MMLU, split="val", shots=2, subjects=SUBJECTS[:2], limit=4, batch_size=3,
                        progress=False)
    letters = torch.tensor(answer_token_ids(tok))
    correct = 0
    for s in SUBJECTS[:2]:
        dev = _read_csv(MMLU / "dev" / f"{s}_dev.csv", s)[:2]
        for q in _read_csv(MMLU / "val" / f"{s}_val.csv", s)[:4]:
            ids = tok(build_prompt(dev, q), add_special_tokens=False)["input_ids"]
            ids = [tok.bos_token_id] + ids if tok("a")["input_ids"][0] == tok.bos_token_id else ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            correct += int(CHOICES[int(logits[letters].argmax())] == q.answer)
    assert res["overall"]["n"] == 8
    assert res["overall"]["acc"] == pytest.approx(correct / 8)
    assert set(res["subjects"]) == set(SUBJECTS[:2])


def test_shots_are_dropped_to_fit(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["dense"])
    res = evaluate_mmlu(model, load_tokenizer(tiny["dense"]), MMLU, shots=5, subjects=["high_school_european_history"],
                        limit=2, max_length=400, progress=False)
    assert res["settings"]["mean_shots_used"] < 5 and res["overall"]["n"] == 2


def test_eval_cli_on_shipped_val(tiny, tmp_path):
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, "-m", "emoe_llm.cli", "eval", str(tiny["emoe"]), "--tasks", "mmlu", "--split", "val",
         "--shots", "5", "--subjects", ",".join(SUBJECTS), "--limit", "5", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mode emoe" in proc.stdout and "overall" in proc.stdout
    res = json.loads(out.read_text())
    assert res["mode"] == "emoe" and res["overall"]["n"] == 15
    assert set(res["categories"]) == {"STEM", "other (business, health, misc.)"}
    assert 0.0 <= res["overall"]["acc"] <= 1.0
    # dense mode on the same weights; an unknown subject is a clear error
    proc = subprocess.run([sys.executable, "-m", "emoe_llm.cli", "eval", str(tiny["emoe"]), "--mode", "dense",
                           "--subjects", "astrology", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown MMLU subject(s) ['astrology']" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "emoe_llm.cli", "eval", str(tiny["dense"]), "--mode", "emoe"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no 'emoe' block" in proc.stderr


def test_zero_shot_on_the_dev_split(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["dense"])
    res = evaluate_mmlu(model, load_tokenizer(tiny["dense"]), MMLU, split="dev", shots=0, progress=False)
    assert res["overall"]["n"] == 285 and len(res["subjects"]) == 57  # every shipped dev question
    assert res["settings"]["mean_shots_used"] == 0
    assert set(res["categories"]) == {"STEM", "humanities", "social sciences", "other (business, health, misc.)"}


def test_eval_mode_follows_the_training_record():
    from emoe_llm.emoe import resolve_eval_mode, trained_record

    block = {"n_experts": 16, "top_k": 4, "layers": [2, 3]}
    dense_run = {"emoe": block, "emoe_trained": trained_record("dense", block)}
    emoe_run = {"emoe": {**block, "top_k": 2}, "emoe_trained": trained_record("emoe", {**block, "top_k": 2})}
    assert resolve_eval_mode(dense_run)[0] == "dense"          # the dense baseline is scored dense
    assert resolve_eval_mode(dense_run, "emoe")[0] == "emoe"   # ... unless asked (dense -> masked cell)
    assert resolve_eval_mode(emoe_run)[0] == "emoe" and resolve_eval_mode(emoe_run, "dense")[0] == "dense"
    assert emoe_run["emoe_trained"] == {"mode": "emoe", "lora": False, "n_experts": 16, "top_k": 2, "layers": [2, 3]}
    assert resolve_eval_mode({"emoe": block})[0] == "emoe"     # converted, never trained
    assert resolve_eval_mode({})[0] == "dense"
    with pytest.raises(ValueError, match="'dense' or 'emoe'"):
        trained_record("masked", block)


def _eval_json(ckpt, out, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "emoe_llm.cli", "eval", str(ckpt), "--subjects", "abstract_algebra", "--limit", "4",
         "--shots", "1", "--output", str(out), "--no-progress", *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_dense_trained_export_evaluates_dense_by_default(tiny, tmp_path):
    """A converted checkpoint marked as trained dense (what the recipe writes) is scored dense unless --mode emoe."""
    import shutil

    from emoe_llm.emoe import trained_record

    ckpt = tmp_path / "final"
    shutil.copytree(tiny["emoe"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["emoe_trained"] = trained_record("dense", cfg["emoe"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    dense, stdout = _eval_json(ckpt, tmp_path / "a.json")
    assert dense["mode"] == "dense" and "trained dense" in dense["mode_source"] and "mode dense" in stdout
    assert dense["trained"]["mode"] == "dense" and "top_k" not in dense
    masked, _ = _eval_json(ckpt, tmp_path / "b.json", "--mode", "emoe")
    assert masked["mode"] == "emoe" and masked["mode_source"] == "requested (--mode)"
    assert masked["top_k"] == 4 and masked["layers"] == [2, 3]
    assert masked["overall"]["mean_logprob_answer"] != pytest.approx(dense["overall"]["mean_logprob_answer"], abs=1e-6)


def test_old_scorer_and_lm_eval_pick_the_same_answers(tiny):
    """Before the hand-written scorer goes: lm-eval's emoe_mmlu picks the same letter on >= 99% of questions."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from emoe_llm.eval.cli import task_manager

    model = AutoModelForCausalLM.from_pretrained(tiny["dense"], dtype=torch.float32).eval()
    tok = load_tokenizer(tiny["dense"])
    old = evaluate_mmlu(model, tok, MMLU, split="val", shots=5, subjects=SUBJECTS, max_length=4096, progress=False)
    new = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=4096),
                                  tasks=[f"emoe_mmlu_{s}" for s in SUBJECTS],
                                  task_manager=task_manager(lm_eval_tasks=False), log_samples=True)
    same = total = 0
    for s in SUBJECTS:
        for sample in new["samples"][f"emoe_mmlu_{s}"]:
            pick = max(range(4), key=lambda i: sample["filtered_resps"][i][0])
            same += pick == old["predictions"][s][sample["doc_id"]]
            total += 1
    assert total == old["overall"]["n"] and same / total >= 0.99
