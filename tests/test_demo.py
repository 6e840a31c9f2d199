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


def test_probe_copies_tensors_only_and_knows_each_precision():
    """The FlashAttention-2 collator adds Python ints (max_length_q/k) to a batch: the probe copies the tensors to
    the CPU and keeps the rest; the demo's tolerance exists for every training precision, tighter for fp32."""
    import torch

    from emoe_llm.data import SFTCollator
    from emoe_llm.train.probe import LOGIT_TOLERANCE, to_cpu, to_device
    from emoe_llm.train.recipe import DTYPES, model_inputs

    rows = [{"input_ids": [5, 6, 7, 3, 4], "labels": [-100, 6, 7, -100, 4], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 1]}]  # packed: documents restart at 0
    batch = model_inputs(SFTCollator(pad_token_id=0, flash_attn_kwargs=True)(rows), torch.device("cpu"))
    ints = {k: v for k, v in batch.items() if not torch.is_tensor(v)}
    assert ints, "the flash-attn collator's batch has non-tensor entries"
    out = to_cpu(batch)
    assert {k: out[k] for k in ints} == ints
    for k, v in batch.items():
        if torch.is_tensor(v):
            assert torch.equal(out[k], v)
    assert to_device(out, "cpu").keys() == batch.keys()
    assert {str(d) for d in DTYPES.values()} <= set(LOGIT_TOLERANCE)
    assert LOGIT_TOLERANCE["torch.float32"] < LOGIT_TOLERANCE["torch.float16"] < LOGIT_TOLERANCE["torch.bfloat16"]
