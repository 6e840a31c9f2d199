"""Checkpoint bookkeeping without processes: which checkpoint resume picks, world-size check, rotation."""

import json

import pytest
import torch

from emoe_llm.train.checkpoint import find_resume_checkpoint, list_checkpoints, rotate_checkpoints


def make_ckpt(out, step, *, complete=True, world=2):
    d = out / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    for r in range(world):  # what DeepSpeed writes per rank (a resume checks that they are all there)
        (d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
        (d / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world}))
    return d


def test_auto_picks_latest_complete(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path) is None
    make_ckpt(tmp_path, 4)
    good = make_ckpt(tmp_path, 8)
    make_ckpt(tmp_path, 12, complete=False)  # killed while saving: never resumed from
    assert find_resume_checkpoint("auto", tmp_path) == good
    assert find_resume_checkpoint("none", tmp_path) is None
    assert find_resume_checkpoint(str(tmp_path / "checkpoints" / "step_00000004"), tmp_path).name == \
        "step_00000004"
    with pytest.raises(FileNotFoundError, match="killed while saving"):
        find_resume_checkpoint(str(tmp_path / "checkpoints" / "step_00000012"), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_resume_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_world_size_change_resumes_through_the_universal_format(tmp_path):
    """A checkpoint of another world size is found (no longer refused); the recipe then loads its universal form and
    keeps the saved global batch when the recipe does not fix one."""
    from emoe_llm.train.config import load_config
    from emoe_llm.train.recipe import elastic_resume

    make_ckpt(tmp_path, 4, world=16)
    assert find_resume_checkpoint("auto", tmp_path).name == "step_00000004"
    state = tmp_path / "checkpoints" / "step_00000004" / "trainer_state.json"
    state.write_text(json.dumps({"step": 4, "world_size": 16, "global_batch_size": 64}))
    cfg = load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}", "train.global_batch_size=0",
                                                "train.grad_accum=2"])
    ds = {}
    ckpt, elastic = elastic_resume(cfg, ds, world=8)
    assert elastic and ds["checkpoint"] == {"load_universal": True}
    assert (cfg.train.global_batch_size, cfg.train.grad_accum) == (64, 0)  # 2 x 4 x 8: accum re-derived = 4
    same = load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}", "train.global_batch_size=64"])
    ds = {}
    assert elastic_resume(same, ds, world=16) == (ckpt, False) and ds == {}


def test_rotation_keeps_last_k_and_drops_older_incomplete(tmp_path):
    for s in (2, 4, 6, 8):
        make_ckpt(tmp_path, s)
    make_ckpt(tmp_path, 5, complete=False)
    make_ckpt(tmp_path, 9, complete=False)  # newer than the kept ones: maybe being written, left alone
    removed = rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000002", "step_00000004", "step_00000005"]
    assert [p.name for p in list_checkpoints(tmp_path, complete_only=False)] == \
        ["step_00000006", "step_00000008", "step_00000009"]
    assert rotate_checkpoints(tmp_path, keep_last=0) == []  # 0 = keep all


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_export_shards_and_merges_lora(tmp_path, use_dora):
    """export_hf (single process): several safetensors shards + index, LoRA merged, loadable by plain transformers
    with the same logits as the (peft) model that was exported."""
    import torch
    from peft import LoraConfig, get_peft_model

    from emoe_llm.emoe import apply_emoe
    from emoe_llm.tiny import tiny_llama_config
    from emoe_llm.train.checkpoint import export_hf, export_lora_adapter

    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    apply_emoe(model, n_experts=16, top_k=4, layers="2,3")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                             use_dora=use_dora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero; make the merge matter
        if "lora_magnitude_vector" in name:
            p.data.mul_(1.5)  # DoRA: a magnitude that differs from the weight norm
    ids = torch.randint(0, 2048, (2, 17))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = export_hf(model, tmp_path / "final", config=model.get_base_model().config, tokenizer=None, rank=0,
                    max_shard_size="300KB")
    export_lora_adapter(model, tmp_path / "final" / "adapter", rank=0)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not any("lora" in k or "base_layer" in k for k in index["weight_map"])
    assert not list(tmp_path.glob("*.tmp-export"))
    from emoe_llm.emoe import load_emoe_model

    loaded = load_emoe_model(out)  # plain AutoModelForCausalLM + the EMoE mask from config.json's 'emoe' block
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["use_dora"] is use_dora
    # the exported model is unchanged by the export (the merge is undone), and the adapter alone reproduces it
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    from peft import PeftModel

    base = LlamaForCausalLM(tiny_llama_config())
    base.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                          for k, v in model.state_dict().items() if "lora_" not in k})
    base.config.emoe = model.get_base_model().config.emoe
    from emoe_llm.emoe import enable_emoe

    enable_emoe(base)
    with torch.no_grad():
        again = PeftModel.from_pretrained(base, out / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(again, want, rtol=0, atol=1e-5)


def test_cuda_rng_restores_the_gpus_that_exist_and_warns_about_the_rest(monkeypatch):
    """A checkpoint saved where each process saw 8 GPUs, resumed where it sees 2 (the device query is faked: this
    machine has none): the 2 are restored, the rank's own device gets its own saved state, the other 6 are named in
    one warning; the CPU generators are restored as always."""
    from emoe_llm.train.checkpoint import cuda_states_to_restore, rng_state, set_rng_state

    saved = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    assert cuda_states_to_restore(saved, 8) == ([(i, s) for i, s in enumerate(saved)], 0)
    kept, missing = cuda_states_to_restore(saved, 2)
    assert [i for i, _ in kept] == [0, 1] and missing == 6
    assert cuda_states_to_restore(saved, 16)[1] == 0

    state = rng_state()
    expected = torch.rand(3)
    state.update(cuda=saved, cuda_own=saved[5])  # the rank ran on GPU 5 of 8
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((device, int(s[0]))))
    with pytest.warns(RuntimeWarning, match="RNG state of 8 GPUs, this process sees 2: restored 2.*6 have no device"):
        set_rng_state(state)
    assert restored == [(0, 0), (1, 1), ("cuda", 5)]  # then this rank's device: its own state
    assert torch.equal(torch.rand(3), expected)
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all 8 exist: no warning
        set_rng_state(state)
    assert len(restored) == 9


def test_waiting_ranks_follow_rank_0s_conversion(tmp_path, monkeypatch):
    """The ranks that wait for rank 0's universal conversion (no process group yet, so no collective timeout bounds
    it) return once ckpt/universal is complete, stop with rank 0's error when it failed in this launch, and ignore a
    failure marker an earlier launch left behind."""
    import threading

    from emoe_llm.train.checkpoint import UNIVERSAL_FAILED, launch_id, prepare_universal

    ckpt = make_ckpt(tmp_path, 3)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (ckpt / UNIVERSAL_FAILED).write_text(json.dumps({"launch": "an earlier attempt", "error": "disk full"}))

    def rank0_finishes():
        (ckpt / "universal" / "zero").mkdir(parents=True)
        (ckpt / "universal" / "zero" / "optimizer_state.pt").write_bytes(b"x")

    threading.Timer(0.3, rank0_finishes).start()
    assert prepare_universal(ckpt, rank=3, poll_s=0.05) == ckpt / "universal"

    other = make_ckpt(tmp_path, 6)
    (other / UNIVERSAL_FAILED).write_text(json.dumps({"launch": launch_id(), "error": "MemoryError\ntraceback"}))
    with pytest.raises(RuntimeError, match=r"rank 0 could not convert .*step_00000006.*: MemoryError$"):
        prepare_universal(other, rank=1, poll_s=0.05)


def test_rank_0_records_a_failed_conversion_for_the_others(tmp_path):
    """Rank 0's conversion of something that is not a DeepSpeed checkpoint fails with ds_to_universal's output, and
    leaves the marker the waiting ranks read (and no half universal/ dir)."""
    from emoe_llm.train.checkpoint import UNIVERSAL_FAILED, launch_id, prepare_universal

    ckpt = make_ckpt(tmp_path, 3)
    with pytest.raises(RuntimeError, match="to a universal checkpoint failed"):
        prepare_universal(ckpt, rank=0, log=lambda m: None)
    assert json.loads((ckpt / UNIVERSAL_FAILED).read_text())["launch"] == launch_id()
    assert not (ckpt / "universal").exists() and not list(ckpt.glob(".universal.tmp-*"))
