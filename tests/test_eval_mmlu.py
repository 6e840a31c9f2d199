"""MMLU from the shipped CSVs (the emoe_mmlu tasks) and the eval mode a checkpoint is scored in."""

import json
import shutil

import pytest

from emoe_llm.cli import main
from emoe_llm.eval.tasks import MMLU_DIR, load_mmlu


def test_shipped_mmlu_files_load():
    subjects = sorted(p.name[: -len("_val.csv")] for p in (MMLU_DIR / "val").glob("*_val.csv"))
    assert len(subjects) == 57
    loaded = {s: load_mmlu(s) for s in subjects}
    assert sum(len(d["eval"]) for d in loaded.values()) == 1543  # data/LICENSES.md: pre-release snapshot
    assert all(len(d["dev"]) == 5 for d in loaded.values())
    row = loaded["abstract_algebra"]["dev"][0]
    assert row == {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
                   "choices": ["0", "1", "2", "3"], "answer": 1}
    assert len(load_mmlu("anatomy", mmlu_split="dev")["eval"]) == 5
    with pytest.raises(FileNotFoundError, match="anatomy_test.csv not found"):
        load_mmlu("anatomy", mmlu_split="test")  # the shipped snapshot has no test split


def test_eval_mode_auto_is_dense_for_every_export():
    """The paper scored the saved checkpoint with a plain load: auto is dense, the mask only on request."""
    from emoe_llm.emoe import resolve_eval_mode, trained_record

    block = {"n_experts": 16, "top_k": 4, "layers": [2, 3]}
    dense_run = {"emoe": block, "emoe_trained": trained_record("dense", block)}
    emoe_run = {"emoe": {**block, "top_k": 2},
                "emoe_trained": trained_record("emoe", {**block, "top_k": 2}, template="alpaca")}
    assert resolve_eval_mode(dense_run)[0] == "dense"
    assert resolve_eval_mode(dense_run, "emoe")[0] == "emoe"   # dense -> masked cell, on request
    mode, why = resolve_eval_mode(emoe_run)
    assert mode == "dense" and "trained emoe" in why and "--mode emoe" in why
    assert resolve_eval_mode(emoe_run, "emoe") == ("emoe", "requested (--mode)")
    assert emoe_run["emoe_trained"] == {"mode": "emoe", "lora": False, "template": "alpaca", "n_experts": 16,
                                        "top_k": 2, "layers": [2, 3]}
    assert resolve_eval_mode({"emoe": block})[0] == "dense"    # converted, never trained
    assert resolve_eval_mode({})[0] == "dense"
    with pytest.raises(ValueError, match="'dense' or 'emoe'"):
        trained_record("masked", block)


def _eval_json(ckpt, out, *extra):
    assert main(["eval", str(ckpt), "--tasks", "emoe_mmlu_abstract_algebra,emoe_nll_alpaca_heldout", "--limit", "4",
                 "--num-fewshot", "1", "--device", "cpu", "--no-progress", "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_dense_trained_export_evaluates_dense_by_default(tiny_eval_checkpoints, tmp_path, capsys):
    """A converted checkpoint marked as trained dense (what the recipe writes) is scored dense unless --mode emoe."""
    from emoe_llm.emoe import trained_record

    ckpt = tmp_path / "final"
    shutil.copytree(tiny_eval_checkpoints["emoe"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["emoe_trained"] = trained_record("dense", cfg["emoe"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    dense = _eval_json(ckpt, tmp_path / "a.json")
    assert dense["mode"] == "dense" and "trained dense" in dense["mode_source"]
    assert "mode dense" in capsys.readouterr().out
    assert dense["trained"]["mode"] == "dense" and "top_k" not in dense
    masked = _eval_json(ckpt, tmp_path / "b.json", "--mode", "emoe")
    assert masked["mode"] == "emoe" and masked["mode_source"] == "requested (--mode)"
    assert masked["top_k"] == 4 and masked["layers"] == [2, 3]
    nll = "nll_per_token,none"  # the mask changes the model: a continuous score shows it
    assert masked["results"]["emoe_nll_alpaca_heldout"][nll] != pytest.approx(
        dense["results"]["emoe_nll_alpaca_heldout"][nll], abs=1e-6)
    assert set(dense["results"]) == {"emoe_mmlu_abstract_algebra", "emoe_nll_alpaca_heldout"}
    assert dense["n-shot"]["emoe_mmlu_abstract_algebra"] == 1
