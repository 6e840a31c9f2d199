"""End-to-end ZeRO-3 training with 2 real CPU ranks (``deepspeed --num_gpus 2``, gloo) on a tiny Llama and the shipped
Alpaca demo data: loss goes down (EMoE and dense), exact resume after preemption and kill -9, the exported final/
loads with plain transformers and matches the trained model's logits, loss normalisation over grad accumulation,
NaN handling, LoRA.

Each launch takes ~20-40 s on 2 cores; the runs are module-scoped fixtures shared by several assertions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ranks import rank_command, rank_env, tiny_fp32_workspace

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
Z3 = REPO / "ds_configs" / "z3.json"
WRAPPER = REPO / "tests" / "dist" / "train_with_faults.py"  # the recipe + export probe + monkeypatched faults
STEPS = 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    dense, fp32 = tiny_fp32_workspace(root)
    return {"root": root, "dense": dense, "cache": root / "data_cache", "fp32": fp32}


def launch(work, out: Path, *overrides, ds=Z3, faults=(), background=False, launcher="torchrun"):
    """torchrun --nproc_per_node 2 tests/dist/train_with_faults.py ...: the recipe `emoe-llm train --nproc 2` runs, plus
    run/export_probe.pt and the faults asked for (e.g. ["--nan-at-step", "3"])."""
    # a run with a fault asserts the exit code, which only the deepspeed launcher passes through (tests/ranks.py)
    cmd = rank_command(WRAPPER, *faults, launcher="deepspeed" if faults else launcher)
    cmd += ["--ds_config", str(ds), "--config", str(TINY), f"output_dir={out}", f"model.path={work['dense']}",
           f"data.cache_dir={work['cache']}", "logging.progress_bar=false", f"train.max_steps={STEPS}",
           "train.save_every_steps=4", "train.eval_every_steps=4", "train.eval_max_batches=1", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.{int(time.time() * 1000)}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=rank_env())
    proc.log_path = Path(log.name)
    if background:
        return proc
    try:
        proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def output_of(proc) -> str:
    return proc.log_path.read_text()


def step_records(out: Path) -> dict[int, dict]:
    """Last record of each optimizer step in metrics.jsonl (a resumed run re-logs steps after its checkpoint)."""
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" not in r:
            recs[r["step"]] = r
    return recs


def wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(0.1)
    return False


def max_step(out: Path) -> int:
    p = out / "metrics.jsonl"
    if not p.exists():
        return 0
    steps = [json.loads(x).get("step", 0) for x in p.read_text().splitlines() if x.strip().endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def emoe_run(work):
    out = work["root"] / "emoe"
    proc = launch(work, out, launcher="deepspeed")  # the reference of the preemption test, under the same launcher
    assert proc.returncode == 0, output_of(proc)[-4000:]
    work["emoe_run_port"] = proc.args[proc.args.index("--master_port") + 1]
    return out, output_of(proc)


def test_two_rank_run_leaves_no_shared_memory_behind(emoe_run, work):
    """DeepSpeed's CPU comm op makes a 67 MB /dev/shm segment per rank and never unlinks it: /dev/shm is RAM, and
    a CI run's worth of leaked segments once filled the machine until the OOM killer took a rank."""
    port = work["emoe_run_port"]
    leaked = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert leaked == []


def test_emoe_loss_decreases_and_logs(emoe_run):
    out, log = emoe_run
    recs = step_records(out)
    assert sorted(recs) == list(range(1, STEPS + 1))
    losses = [recs[s]["loss"] for s in sorted(recs)]
    assert losses[-1] < losses[0] - 0.3, losses
    for r in recs.values():
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "expert_load"} <= set(r)
        assert set(r["expert_load"]) == {"layer_2", "layer_3"}
        for load in r["expert_load"].values():  # fractions of tokens per expert: k of N experts per token
            assert len(load) == 16 and sum(load) == pytest.approx(4.0, abs=1e-2)
    assert "eval_loss" in recs[4] and "eval_loss" in recs[8]
    assert "EMoE: layers [2, 3], 16 experts, top-4" in log
    share = float(log.split("ZeRO-3: rank 0 holds ")[1].split("%")[0])
    assert 45 <= share <= 55  # zero.Init: each of the 2 ranks holds half of the parameters
    # run dir, tensorboard, checkpoints (keep_last=2), COMPLETED
    for f in ("config.yaml", "ds_config.json", "data_stats.json", "git.txt", "environment.json", "launches.jsonl"):
        assert (out / "run" / f).is_file(), f
    ds = json.loads((out / "run" / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["step_in_epoch"] == STEPS
    assert (out / "COMPLETED").is_file() and (out / "converted" / "config.json").is_file()


def test_export_loads_with_plain_transformers_and_matches(emoe_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emoe_llm.emoe import enable_emoe

    out, _ = emoe_run
    final = out / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["emoe"]["layers"] == [2, 3] and cfg["emoe"]["n_experts"] == 16 and cfg["model_type"] == "llama"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    AutoTokenizer.from_pretrained(final)
    probe = torch.load(out / "run" / "export_probe.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(final)  # plain transformers: dense inference of the weights
    # z3.json says bf16; train.precision=auto runs (and exports) fp32 on a machine without CUDA
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with torch.no_grad():
        dense = model(**probe["inputs"], use_cache=False).logits.float()
        enable_emoe(model)  # EMoE masking, as trained
        masked = model(**probe["inputs"], use_cache=False).logits.float()
    torch.testing.assert_close(dense, probe["dense_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, probe["logits"], rtol=0, atol=1e-5)
    assert (masked - dense).abs().max() > 1e-3  # the mask is really active in the trained model's logits


def test_preempt_then_kill9_then_resume_reproduces_the_curve(work, emoe_run):
    """STOP file -> graceful stop + checkpoint; resume; kill -9 after the step-4 checkpoint; resume: same losses and
    the same final weights as the uninterrupted run."""
    ref_out, _ = emoe_run
    out = work["root"] / "interrupted"
    # 1) preemption through the STOP file (what a Slurm trap creates)
    # the deepspeed launcher: its ranks share its process group, which kill -9 below takes down whole (torchrun
    # starts each rank in a session of its own)
    proc = launch(work, out, background=True, launcher="deepspeed")
    assert wait_for(lambda: max_step(out) >= 2, proc), output_of(proc)[-3000:]
    (out / "STOP").touch()
    proc.wait(timeout=300)
    log = output_of(proc)
    assert proc.returncode == 0, log[-3000:]
    stopped = max_step(out)
    assert f"preempted at step {stopped}, checkpoint saved" in log
    assert not (out / "COMPLETED").exists() and stopped < STEPS
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "trainer_state.json").is_file()
    # 2) restart (removes the stale STOP), killed with SIGKILL after the step-4 checkpoint is complete
    proc = launch(work, out, background=True, launcher="deepspeed")
    ckpt4 = out / "checkpoints" / "step_00000004" / "trainer_state.json"
    assert wait_for(lambda: ckpt4.is_file() and max_step(out) >= 5, proc), output_of(proc)[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'}" in output_of(proc)
    assert not (out / "STOP").exists() and not (out / "COMPLETED").exists()
    # 3) resume: auto picks step 4 and finishes
    proc = launch(work, out, launcher="deepspeed")
    log = output_of(proc)
    assert proc.returncode == 0, log[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'}" in log
    ref, got = step_records(ref_out), step_records(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=1e-6), (s, got[s], ref[s])
        assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-9)
    events = [json.loads(x).get("event") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("resume") == 2 and "preempted" in events
    from safetensors.torch import load_file

    a, b = load_file(ref_out / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dense_runs(work):
    """fp32 dense runs: micro 4 x accum 1 (8 steps) and micro 2 x accum 2 with a NaN injected at step 3."""
    big = work["root"] / "dense_m4"
    p1 = launch(work, big, "model.mode=dense", "train.micro_batch_size=4", ds=work["fp32"])
    assert p1.returncode == 0, output_of(p1)[-3000:]
    acc = work["root"] / "dense_m2a2"
    p2 = launch(work, acc, "model.mode=dense", "train.micro_batch_size=2", ds=work["fp32"],
                faults=["--nan-at-step", "3"])
    return big, acc, p2


def test_dense_loss_decreases(dense_runs):
    big, _, _ = dense_runs
    recs = step_records(big)
    losses = [recs[s]["loss"] for s in sorted(recs)]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3, losses
    assert "expert_load" not in recs[1]
    assert json.loads((big / "final" / "config.json").read_text())["emoe"]  # still the converted checkpoint


def _eval(final: Path, out: Path, *extra) -> dict:
    proc = subprocess.run([sys.executable, "-m", "emoe_llm.cli", "eval", str(final), "--tasks",
                           "emoe_mmlu_abstract_algebra,emoe_nll_alpaca_heldout", "--limit", "4", "--num-fewshot", "1",
                           "--output", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_dense_run_export_evaluates_dense_by_default(dense_runs, emoe_run, tmp_path):
    """The dense baseline's export records how it was trained and `emoe-llm eval` scores it dense (not masked);
    --mode emoe on the same export is the masked cell and differs; the EMoE run's export is scored dense too (the
    paper's protocol) unless --mode emoe."""
    big, _, _ = dense_runs
    cfg = json.loads((big / "final" / "config.json").read_text())
    assert cfg["emoe_trained"] == {"mode": "dense", "lora": False, "template": "alpaca"}
    dense = _eval(big / "final", tmp_path / "dense.json")
    assert dense["mode"] == "dense" and dense["trained"]["mode"] == "dense" and "trained dense" in dense["mode_source"]
    assert dense["nll_template"]["name"] == "alpaca" and "training template" in dense["nll_template"]["source"]
    masked = _eval(big / "final", tmp_path / "masked.json", "--mode", "emoe")
    assert masked["mode"] == "emoe" and masked["top_k"] == 4 and masked["layers"] == [2, 3]
    nll = "nll_per_token,none"
    assert masked["results"]["emoe_nll_alpaca_heldout"][nll] != pytest.approx(
        dense["results"]["emoe_nll_alpaca_heldout"][nll], abs=1e-6)
    out, _ = emoe_run
    assert json.loads((out / "final" / "config.json").read_text())["emoe_trained"] == {
        "mode": "emoe", "lora": False, "template": "alpaca", "n_experts": 16, "top_k": 4, "layers": [2, 3]}
    assert _eval(out / "final", tmp_path / "emoe.json")["mode"] == "dense"
    assert _eval(out / "final", tmp_path / "emoe_masked.json", "--mode", "emoe")["mode"] == "emoe"


def test_grad_accumulation_matches_one_big_batch(dense_runs):
    """Same rows per optimizer step, split 1x4 or 2x2 per rank: the loss is normalised by the step's global target
    tokens, so losses and gradient norms agree (packed rows carry different numbers of target tokens)."""
    big, acc, _ = dense_runs
    a, b = step_records(big), step_records(acc)
    for s in (1, 2):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5)
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4)
        assert b[s]["target_tokens"] == a[s]["target_tokens"]


def test_nonfinite_loss_stops_with_last_good_checkpoint(dense_runs):
    _, acc, proc = dense_runs
    log = output_of(proc)
    assert proc.returncode == 3, log[-3000:]
    assert "non-finite loss at step 3" in log and "Last good checkpoint" in log
    state = json.loads((acc / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert not (acc / "COMPLETED").exists() and not (acc / "final").exists()
    assert any(json.loads(x).get("event") == "nonfinite_loss" for x in (acc / "metrics.jsonl").read_text().splitlines())


def test_lora_on_emoe_two_epochs_trains_and_exports_merged(work):
    """LoRA (incl. on the EMoE MLP's gate/up/down) over 2 epochs of a small slice: epoch-end checkpoint, merged export
    loadable by plain transformers, and the adapter alone on the converted base gives the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from emoe_llm.emoe import enable_emoe

    out = work["root"] / "lora"
    proc = launch(work, out, "lora.enabled=true", "train.lr=1e-2", "train.max_steps=0", "train.epochs=2",
                  "data.sources.0.max_rows=40", "train.save_every_steps=0",
                  "lora.target_modules=[q_proj,v_proj,gate_proj,up_proj,down_proj]", ds=work["fp32"])
    log = output_of(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "LoRA r=8" in log and "4 steps/epoch, 8 steps" in log
    recs = step_records(out)
    assert sorted(recs) == list(range(1, 9)) and recs[4]["epoch"] == 0 and recs[5]["epoch"] == 1
    assert recs[8]["loss"] < recs[1]["loss"]
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (0, 4)
    assert "saved" in log and "(end of epoch 0)" in log
    probe = torch.load(out / "run" / "export_probe.pt", weights_only=False)
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe["inputs"], use_cache=False).logits, probe["dense_logits"],
                                   rtol=0, atol=1e-4)
        enable_emoe(merged)
        torch.testing.assert_close(merged(**probe["inputs"], use_cache=False).logits, probe["logits"],
                                   rtol=0, atol=1e-4)
    # the adapter alone, on the converted base, gives the same model
    base = AutoModelForCausalLM.from_pretrained(out / "converted")
    enable_emoe(base)
    peft_model = PeftModel.from_pretrained(base, out / "final" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**probe["inputs"], use_cache=False).logits, probe["logits"],
                                   rtol=0, atol=1e-4)
