"""QLoRA (``lora.quantize=4bit``) on CPU: NF4 base weights from bitsandbytes' CPU build, fp32 compute, LoRA adapters
trained under real DeepSpeed ZeRO-3 on 2 gloo ranks, and a plain merged export (dequantized base + adapter deltas).

Measured on the tiny model (2026-12-02): the merged export's logits differ from the trained model's by at most
4e-7 (fp32 rounding: both compute dequantize(W) @ x + LoRA); the tests hold them to 1e-5. The NF4 rounding itself
(exported weight vs the original fp32 weight) is ~10% of a weight's magnitude and is the same on every rank and in
the export: the frozen base weights equal bitsandbytes' own dequantization bit for bit.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint
from ranks import rank_command, rank_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # merged export vs trained model, max |logit difference| (measured: <= 4e-7)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    return save_tiny_checkpoint(root / "tiny_dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")


def qlora_run(out: Path, dense: Path, mode: str) -> str:
    """torchrun --nproc_per_node 2 -m emoe_llm.train.probe (the recipe + run/export_probe.pt), 3 QLoRA steps."""
    cmd = rank_command("emoe_llm.train.probe", module=True) + [
           "--ds_config", "ds_configs/z3.json", "--config", "configs/tiny_cpu.yaml", f"model.path={dense}",
           f"model.mode={mode}", f"output_dir={out}", "lora.enabled=true", "lora.quantize=4bit",
           "lora.target_modules=[q_proj,v_proj,gate_proj,up_proj,down_proj]", "train.lr=1e-2",
           f"data.cache_dir={out.parent / 'cache'}", "data.sources.0.max_rows=40", "train.max_steps=3",
           "train.save_every_steps=0", "train.eval_every_steps=0", "logging.progress_bar=false",
           "logging.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500, env=rank_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.mark.parametrize("mode", ["dense", "emoe"])
def test_qlora_two_ranks_trains_and_exports_a_plain_merged_checkpoint(tmp_path, dense, mode):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from emoe_llm.emoe import enable_emoe

    out = tmp_path / mode
    log = qlora_run(out, dense, mode)
    # the NF4 weights are ZeRO-3 parameters: each rank holds half of their packed storage
    held = re.search(r"QLoRA: (\d+) NF4 weights, rank 0 holds ([\d.]+)% of their packed storage", log)
    assert held and int(held.group(1)) == 4 * 7 and abs(float(held.group(2)) - 50.0) < 1.0, log[-3000:]
    assert "ZeRO-3 fp32" in log and "LoRA r=8" in log

    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config and config["emoe_trained"]["mode"] == mode
    probe = torch.load(out / "run" / "export_probe.pt", weights_only=False)
    plain = AutoModelForCausalLM.from_pretrained(final).eval()  # no bitsandbytes involved
    assert plain.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32
    with torch.no_grad():
        dense_logits = plain(**probe["inputs"], use_cache=False).logits
        assert (dense_logits - probe["dense_logits"]).abs().max() < TOLERANCE
        if mode == "emoe":
            enable_emoe(plain)
            masked = plain(**probe["inputs"], use_cache=False).logits
            assert (masked - probe["logits"]).abs().max() < TOLERANCE
            assert (masked - dense_logits).abs().max() > 1e-3  # the expert mask is active

    # k_proj has no adapter: its exported weight is bitsandbytes' own NF4 round trip of the source weight, exactly
    source = out / "converted"
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, quantization_config=nf4)
    import bitsandbytes.functional as bnb_functional

    w4 = quantized.model.layers[0].self_attn.k_proj.weight
    round_trip = bnb_functional.dequantize_4bit(w4.data, w4.quant_state)
    exported = plain.model.layers[0].self_attn.k_proj.weight
    original = AutoModelForCausalLM.from_pretrained(source).model.layers[0].self_attn.k_proj.weight
    assert torch.equal(exported, round_trip)
    assert not torch.equal(exported, original)  # really quantized
    # the adapted q_proj moved away from its NF4 base: the adapters were trained and merged
    q4 = quantized.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(plain.model.layers[0].self_attn.q_proj.weight,
                              bnb_functional.dequantize_4bit(q4.data, q4.quant_state), atol=1e-6)
