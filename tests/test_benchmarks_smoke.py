"""The benchmark scripts run end to end at their tiniest settings and print their figure last (no timing asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

CASES = {
    "step_overhead": (["--hidden", "64", "--ffn", "256", "--layers", "4", "--heads", "4", "--kv-heads", "2",
                       "--vocab", "128", "--seq", "16", "--rounds", "2", "--steps", "1", "--micro-rounds", "2", "--micro-reps", "1",
                       "--device", "cpu"], "emoe/dense step time: "),
    "clustering": (["--shapes", "tiny", "--cases", "random,structured", "--n-init", "1", "--max-iter", "5",
                    "--devices", "cpu"], "balanced k-means, tiny-shape layer (random weights) on cpu: "),
    "train_throughput": (["--preset", "tiny", "--layers", "2", "--seq", "16", "--rounds", "1", "--steps", "1",
                          "--warmup", "1", "--experts", "8", "--top-k", "2"], "emoe/dense step time: "),
}


# train_throughput starts a DeepSpeed job (1 rank): slow, like every test that runs DeepSpeed in a subprocess
@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s == "train_throughput" else s
                                    for s in sorted(CASES)])
def test_benchmark_script_runs_and_prints_its_figure_last(script):
    args, last_line_prefix = CASES[script]
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
