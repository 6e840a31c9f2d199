"""A run without QLoRA never imports bitsandbytes: importing it (peft does, whenever it is installed) runs its CPU
backend's set-up, which fetches a kernel from the Hub and logs "Failed to load CPU gemm_4bit_forward from
kernels-community" where it cannot. Checked in a fresh interpreter (nothing imported before), through the two places
that pulled it in: the run dir's environment.json and LoRA's peft import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    from emoe_llm.tiny import save_tiny_checkpoint
    from emoe_llm.train import recipe
    from emoe_llm.train.config import load_config
    from emoe_llm.train.runlog import write_run_dir

    out = Path(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(save_tiny_checkpoint(out / "dense"))
    cfg = load_config(sys.argv[2], ["lora.enabled=true", "model.gradient_checkpointing=false"])
    peft_model = recipe.add_lora(model, cfg)
    write_run_dir(out, config_yaml="", ds_config={}, hosts=["h"], resumed_from=None)
    from peft.import_utils import is_bnb_available
    print(json.dumps({"imported": "bitsandbytes" in sys.modules, "lora_type": type(peft_model).__name__,
                      "found_after": is_bnb_available(),
                      "environment": json.loads((out / "run" / "environment.json").read_text())}))
""")


def test_a_lora_run_without_qlora_leaves_bitsandbytes_unimported(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_train_zero3 import TINY

    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(TINY)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lora_type"].startswith("PeftModel")
    assert not result["imported"]
    assert "gemm_4bit_forward" not in done.stderr
    assert result["found_after"]  # peft's cached "not installed" was cleared: a later QLoRA model finds it
    from importlib.metadata import version

    assert result["environment"]["bitsandbytes"] == version("bitsandbytes")  # the version, read without importing
