"""The recipe in-process on one gloo rank (seconds, no launcher): setup() -> fit() -> finish() on a tiny EMoE Llama
with real ZeRO-3, a STOP-file preemption and resume that reproduces the uninterrupted losses, and a NaN injected by
monkeypatching the loss (no hooks in the package). The 2-rank runs are in test_train_zero3.py."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from emoe_llm.convert import convert_checkpoint
from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint
from emoe_llm.train import recipe
from emoe_llm.train.checkpoint import checkpoint_path
from emoe_llm.train.config import load_config, load_ds_config

from test_train_zero3 import TINY, Z3

STEPS = 4


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """One gloo process group for the module; signal handlers put back afterwards."""
    root = tmp_path_factory.mktemp("recipe")
    dense = save_tiny_checkpoint(root / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    convert_checkpoint(dense, root / "emoe", n_experts=16, top_k=4, layers="2,3", seed=0, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = pytest.MonkeyPatch()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        mp.setenv(k, v)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    ds = load_ds_config(Z3)
    ds["bf16"] = {"enabled": False}  # fp32: bf16 matmuls are ~150x slower on CPU
    yield {"root": root, "model": root / "emoe", "ds": ds}
    for sig, h in handlers.items():
        signal.signal(sig, h)
    # The 1-rank gloo group stays up until pytest exits: DeepSpeed caches process groups module-wide, so a group
    # destroyed here leaves stale handles ("Group ... is not registered") for the next module that sets up a run.
    mp.undo()


def recipe_config(env, out, *overrides):
    return load_config(TINY, [f"output_dir={out}", f"model.path={env['model']}", f"data.cache_dir={env['root']}/cache",
                              "data.sources.0.max_rows=64", "logging.progress_bar=false", "logging.tensorboard=false",
                              "train.micro_batch_size=2", "train.global_batch_size=4", f"train.max_steps={STEPS}",
                              "train.save_every_steps=2", "train.eval_every_steps=0", "train.eval_max_batches=1",
                              "train.export_max_shard_size=5GB", *overrides])


def losses(out) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "event" not in r}


def train(env, out, *overrides) -> tuple[str, recipe.TrainState]:
    cfg = recipe_config(env, out, *overrides)
    run, state = recipe.setup(cfg, env["ds"])
    outcome = recipe.fit(run, state)
    if outcome == "done":
        recipe.finish(run, state)
    recipe.close(run, outcome)
    return outcome, state


def test_setup_fit_finish_then_preempt_and_resume_bit_exact(single_rank, monkeypatch):
    env = single_rank
    ref = env["root"] / "ref"
    outcome, state = train(env, ref)
    assert outcome == "done" and state.step == STEPS and state.world_size == 1
    assert (ref / "COMPLETED").is_file() and (ref / "final" / "model.safetensors").is_file()
    saved = json.loads((checkpoint_path(ref, STEPS) / "trainer_state.json").read_text())
    assert saved == state.to_dict()  # trainer_state.json is exactly the TrainState
    assert sorted(losses(ref)) == list(range(1, STEPS + 1))
    attention = json.loads((ref / "run" / "environment.json").read_text())["attention"]
    assert attention == {"implementation": "sdpa", "why": "auto: no GPU (FlashAttention-2 is CUDA only)"}

    # a stop request after step 1 (what SIGUSR1 / the STOP file do), then resume=auto continues bit for bit
    out = env["root"] / "interrupted"
    votes = iter([None, "STOP file"])
    monkeypatch.setattr(recipe, "stop_vote", lambda run: next(votes))
    outcome, state = train(env, out, "train.export=false")
    assert outcome == "preempted" and state.step == 2 and not (out / "COMPLETED").exists()
    monkeypatch.undo()
    outcome, state = train(env, out, "train.export=false")
    assert outcome == "done" and state.step == STEPS
    assert losses(out) == losses(ref)


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(single_rank, monkeypatch):
    env = single_rank
    out = env["root"] / "nan"
    real_ce, calls = recipe.token_ce_sum, []

    def nan_at_step_3(logits, labels):  # 2 micro-batches per step: calls 5 and 6 are step 3
        calls.append(1)
        return real_ce(logits, labels) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(recipe, "token_ce_sum", nan_at_step_3)
    outcome, state = train(env, out, "train.export=false")
    assert outcome == "nonfinite" and state.step == 2
    assert json.loads((checkpoint_path(out, 2) / "trainer_state.json").read_text())["step"] == 2
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite_loss" and "Last good checkpoint" in events[-1]["message"]
    assert not (out / "final").exists() and not (out / "COMPLETED").exists()


def test_step_verdict_tells_a_skipped_fp16_step_from_a_diverged_one():
    v = recipe.step_verdict
    assert v(applied=True, grad_norm=0.7, max_grad_norm=1.0) == "applied"
    assert v(applied=False, grad_norm=float("inf"), max_grad_norm=1.0) == "skipped"  # fp16 overflow: not applied
    assert v(applied=True, grad_norm=float("nan"), max_grad_norm=1.0) == "nonfinite"  # applied with a bad norm
    assert v(applied=True, grad_norm=float("nan"), max_grad_norm=0.0) == "applied"  # no clipping: norm not computed


def _skip_steps(monkeypatch, skipped: set[int]):
    """DeepSpeed's engine reports the given optimizer steps (1-based, this run) as not applied, as it does for an
    fp16 loss-scale overflow (the CPU accelerator has no fp16 training to overflow for real)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    calls = []
    real = DeepSpeedEngine.was_step_applied

    def was_step_applied(self):
        calls.append(1)
        return False if len(calls) in skipped else real(self)

    monkeypatch.setattr(DeepSpeedEngine, "was_step_applied", was_step_applied)


def test_skipped_fp16_steps_are_counted_not_fatal(single_rank, monkeypatch):
    env = single_rank
    out = env["root"] / "skips"
    _skip_steps(monkeypatch, {2, 3})
    outcome, state = train(env, out, "train.export=false", "train.max_skipped_steps=3")
    assert outcome == "done" and state.step == STEPS and state.skipped_steps == 2
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skips = [e for e in events if e.get("event") == "skipped_step"]
    assert [(e["step"], e["in_a_row"]) for e in skips] == [(2, 1), (3, 2)]
    assert json.loads((checkpoint_path(out, STEPS) / "trainer_state.json").read_text())["skipped_steps"] == 2


def test_too_many_skipped_steps_in_a_row_stop_the_run(single_rank, monkeypatch, capsys):
    env = single_rank
    out = env["root"] / "skips_stop"
    _skip_steps(monkeypatch, {2, 3})
    outcome, state = train(env, out, "train.export=false", "train.max_skipped_steps=2")
    assert outcome == "nonfinite" and state.step == 3
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "skipped_steps_stop"
    errors = [line for line in capsys.readouterr().out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "2 optimizer steps in a row skipped by the loss scaler" in errors[0]


def test_attention_choice_says_why(monkeypatch, tmp_path):
    """auto on a GPU box (the device query faked) whose flash-attn does not import: SDPA, and the line says why;
    fp32 on a GPU: SDPA because FlashAttention-2 needs 16-bit; a class without SDPA support: eager."""
    import builtins

    import torch

    real_import = builtins.__import__

    def no_flash_attn(name, *args, **kwargs):
        if name == "flash_attn":
            raise ImportError("flash_attn_2_cuda.so: undefined symbol")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flash_attn)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    impl, why = recipe.choose_attention("auto", torch.bfloat16)
    assert impl == "sdpa"
    assert why == "auto: flash-attn does not import (ImportError: flash_attn_2_cuda.so: undefined symbol)"
    assert recipe.choose_attention("auto", torch.float32) == (
        "sdpa", "auto: float32 training (FlashAttention-2 needs bf16/fp16)")
    assert recipe.choose_attention("eager", torch.bfloat16) == ("eager", "model.attn_implementation=eager")
    monkeypatch.setattr(recipe, "supports_sdpa", lambda path: False)
    impl, why = recipe.choose_attention("auto", torch.bfloat16, path=tmp_path)
    assert impl == "eager" and why.startswith("auto: the model class has no SDPA support, and flash-attn does not")


def test_universal_conversion_needs_no_process_group(single_rank):
    """A real ZeRO-3 checkpoint converted to the universal format the way setup does it before the process group
    exists: ds_to_universal in its own process, several workers, renamed into place; the log gives s/GB."""
    from emoe_llm.train.checkpoint import convert_to_universal

    env = single_rank
    out = env["root"] / "universal"
    outcome, _ = train(env, out, "train.export=false", "train.max_steps=2")
    assert outcome == "done"
    ckpt = checkpoint_path(out, 2)
    lines = []
    universal = convert_to_universal(ckpt, workers=(2, 1), log=lines.append)
    assert (universal / "zero" / "optimizer_state.pt").is_file() and (universal / "zero" / "lm_head.weight").is_dir()
    assert "2 extract / 1 merge workers" in lines[0] and lines[1].endswith("s/GB)")
    assert convert_to_universal(ckpt, log=lines.append) == universal and len(lines) == 2  # done once
