"""`emoe-llm demo`: the README's one command (tiny model -> convert -> ZeRO-3 on 2 CPU ranks -> export -> eval)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.smoke  # `make test` runs it: the README's main job, real ZeRO-3 ranks
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "emoe_llm.cli", "demo", "--output", str(out), "--steps", "6",
         "--subjects", "abstract_algebra,marketing", "--limit", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    text = proc.stdout
    assert "converted it to EMoE" in text and "ZeRO-3, 2 CPU ranks" in text
    assert "max |logit diff| vs the ZeRO-3 model: 0.00e+00 emoe, 0.00e+00 dense" in text
    assert "MMLU val 5-shot" in text and "on 6 questions" in text
    assert f"plots           {out / 'train' / 'plots' / 'training.png'}" in text
    assert (out / "train" / "plots" / "expert_load.png").is_file()
    final = out / "train" / "final"
    assert (out / "train" / "COMPLETED").is_file() and (final / "model.safetensors").is_file()
    assert json.loads((final / "config.json").read_text())["emoe"]["top_k"] == 4
    res = json.loads((out / "eval.json").read_text())
    assert res["mode"] == "dense" and set(res["results"]) == {"emoe_mmlu_abstract_algebra", "emoe_mmlu_marketing",
                                                             "emoe_nll_alpaca_heldout"}
    assert 0 < res["results"]["emoe_nll_alpaca_heldout"]["nll_per_token,none"] < 10
