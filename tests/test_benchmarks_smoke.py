"""The benchmark scripts run end to end at their tiniest settings and print their figure last (no timing asserted);
their ``--json`` output holds what scripts/gpu_check.sh's summary reads."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("gpu_check_report", BENCH.parent / "scripts" / "gpu_check_report.py")
gpu_check_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check_report)

CASES = {
    "step_overhead": (["--hidden", "64", "--ffn", "256", "--layers", "4", "--heads", "4", "--kv-heads", "2",
                       "--vocab", "128", "--seq", "16", "--rounds", "2", "--steps", "1", "--micro-rounds", "2", "--micro-reps", "1",
                       "--device", "cpu"], "emoe/dense step time: "),
    "clustering": (["--shapes", "tiny", "--cases", "random,structured", "--n-init", "1", "--max-iter", "5",
                    "--devices", "cpu"], "balanced k-means, tiny-shape layer (random weights) on cpu: "),
    "train_throughput": (["--preset", "tiny", "--layers", "2", "--seq", "16", "--rounds", "1", "--steps", "1",
                          "--warmup", "1", "--experts", "8", "--top-k", "2"], "emoe/dense step time: "),
    "data_memory": (["--size-gb", "0.001", "--max-seq-len", "256"], "peak private memory "),
    "loss_memory": (["--tokens", "256", "--vocab", "2048", "--hidden", "128"], "chunked/full peak memory: "),
    "universal_convert": (["--layers", "1", "--hidden", "128", "--vocab", "1000"], "universal conversion: "),
    "qlora_memory": (["--layers", "2", "--hidden", "64", "--ffn", "256", "--heads", "4", "--kv-heads", "2",
                      "--vocab", "128", "--seq", "16", "--steps", "1"], "qlora/lora step time: "),
}


# Each runs a whole benchmark script in a subprocess (train_throughput a 1-rank DeepSpeed job): slow, run by
# `make test-slow`
@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs_and_prints_its_figure_last(script, tmp_path):
    args, last_line_prefix = CASES[script]
    out = tmp_path / f"{script}.json"
    args = [*args, "--json", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)  # train_throughput sets up its own 1-rank job
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(last_line_prefix), proc.stdout[-2000:]
    if "step time" in last_line_prefix:
        ratio = float(lines[-1][len(last_line_prefix):].split()[0])
        assert ratio > 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == script and data["environment"]["torch"] and data["environment"]["date_utc"]
    if script == "data_memory":  # not a GPU-check step: its JSON holds the memory figures
        assert data["peak_private_bytes"] > 0 and data["rows"] > 0
        return
    if script == "universal_convert":  # not a GPU-check step: seconds per GB of a CPU conversion
        assert data["s_per_gb"] > 0 and data["checkpoint_gb"] > 0
        return
    if script == "loss_memory":  # not a GPU-check step: the figure is a memory ratio
        assert data["ratio"] > 0 and data["results"]["full"]["peak_above_baseline"] > 0
        return
    if script == "qlora_memory":  # not a GPU-check step either: NF4 weights are smaller than fp32 ones
        lora, qlora = data["results"]["lora"], data["results"]["qlora"]
        assert qlora["weight_bytes"] < lora["weight_bytes"] and qlora["trainable_params"] == lora["trainable_params"]
        return
    figures = gpu_check_report.headline(script, data)  # what the GPU check's summary.json reports
    if script == "clustering":
        assert figures["seconds_per_layer"] > 0 and figures["device"] == "cpu"
    else:
        assert figures["emoe_dense_step_ratio"] == pytest.approx(ratio, abs=1e-3)


@pytest.mark.slow
def test_clustering_real_weights_case_runs(tmp_path):
    """--real on a checkpoint dir (a tiny one here; the SmolLM2 fixture in BENCHMARKS.md): fast vs exact vs random."""
    from emoe_llm.tiny import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny")
    proc = subprocess.run([sys.executable, str(BENCH / "clustering.py"), "--real", str(ckpt), "--layers", "0,3",
                           "--experts", "8", "--n-init", "1", "--max-iter", "3", "--no-kmc"], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1].startswith("ours (fast) / ours (exact assignment), real weights: mean ")
    assert sum(" exact " in line for line in lines) == 2


@pytest.mark.slow
def test_emoe_protocol_runs_on_a_tiny_model(tmp_path):
    """benchmarks/emoe_protocol.py (routing precision, clustering effort) end to end on the tiny Llama."""
    from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style", seed=0)
    out = tmp_path / "protocol.json"
    proc = subprocess.run([sys.executable, str(BENCH / "emoe_protocol.py"), "--model", str(ckpt), "--layers", "2,3",
                           "--tokens", "256", "--model-tokens", "256", "--cluster-experts", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("routing_model_bf16 layer 3: ")
    data = json.loads(out.read_text())
    assert [r["layer"] for r in data["clustering"]] == [2, 3] and all(r["ratio"] > 0 for r in data["clustering"])
    for kind in ("routing_scores_bf16", "routing_model_bf16"):
        assert set(data[kind]) == {"2", "3"} and all(0 <= r["share"] <= 1 for r in data[kind].values())
