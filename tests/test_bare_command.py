"""The used-by command with nothing else: ``deepspeed --num_gpus 2 train.py --ds_config ds_configs/z3.json`` on a fresh
checkout (no runs/, no `make demo` before) runs the default tiny demo recipe, building the embedded tiny model, and
the bf16 of z3.json resolves to fp32 on this CPU-only machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from emoe_llm.train.launch import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def test_bare_deepspeed_command_on_a_fresh_checkout(tmp_path):
    checkout = tmp_path / "checkout"  # what a fresh clone has at its root (the shipped data, configs, train.py)
    checkout.mkdir()
    for name in ("train.py", "data", "configs", "ds_configs"):
        (checkout / name).symlink_to(REPO / name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "EMOE_LLM_CACHE": str(tmp_path / "cache")}
    # train.max_steps only keeps the test short; the recipe is still the default one (no --config)
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
           "--ds_config", "ds_configs/z3.json", "train.max_steps=2", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "building the embedded tiny model" in log
    assert "running in fp32 instead" in log and "ZeRO-3 fp32" in log
    run = checkout / "runs" / "tiny_cpu"  # output_dir of configs/tiny_cpu.yaml
    assert (run / "COMPLETED").is_file()
    assert json.loads((checkout / "runs" / "demo" / "tiny_emoe" / "config.json").read_text())["emoe"]["top_k"] == 4
    ds = json.loads((run / "run" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is False
