"""emoe-llm plan: parameter counts, DeepSpeed's estimators, activation/micro-batch arithmetic, CLI exit codes."""

import json

import pytest

from emoe_llm.plan import (GiB, PlanError, Setup, activation_bytes, load_shape, main, make_plan, model_states,
                           shape_from_config,
                            step_bytes)


@pytest.mark.parametrize("preset,billions", [("llama-7b", 6.738), ("llama-13b", 13.016), ("llama-30b", 32.529),
                                             ("llama-65b", 65.286), ("llama-3-8b", 8.030)])
def test_preset_parameter_counts_match_the_published_models(preset, billions):
    assert load_shape(preset).n_params() / 1e9 == pytest.approx(billions, abs=0.002)


def test_config_json_with_an_emoe_block(tmp_path):
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "emoe": {"n_experts": 16, "top_k": 4, "layers": [28, 29]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = load_shape(str(tmp_path))
    assert shape.n_params() == 134_515_008  # SmolLM2-135M (tied embeddings)
    assert (shape.emoe_layers, shape.n_experts) == (2, 16)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PlanError, match="missing 'num_attention_heads'"):
        load_shape(str(tmp_path / "bad"))


def test_zero3_bf16_model_states_come_from_deepspeed_and_match_the_byte_count():
    """16-bit ZeRO-3: DeepSpeed's estimator = 18 bytes/param over all GPUs + 4 bytes x the largest layer; the
    ZeRO paper's 7.5B / 64 GPU figure (Rajbhandari et al. 2020, Fig. 1: 1.9 GB with K=12, i.e. 16 bytes/param) is
    within the 2 extra bytes of fp32 gradients DeepSpeed counts."""
    shape = load_shape("llama-7b")
    s = Setup(nodes=8, gpus_per_node=8)
    parts, cpu, source = model_states(shape, s, shape.n_params())
    assert "deepspeed" in source
    P = shape.n_params()
    assert sum(parts.values()) == pytest.approx(18 * P / 64 + 4 * shape.largest_layer_params(), rel=1e-6)
    paper = 16 * 7.5e9 / 64  # 1.875 GB
    ours = parts["model states (ZeRO-3 partitions)"] * 7.5e9 / P
    assert 1.0 <= ours / paper <= 18 / 16 + 1e-9
    # offload: the optimizer states leave the GPU and appear as CPU memory per node
    off, cpu_off, _ = model_states(shape, Setup(nodes=8, gpus_per_node=8, offload_optimizer=True), P)
    assert sum(off.values()) < sum(parts.values()) and cpu_off > cpu


def test_fp32_and_lora_use_the_same_byte_counts():
    shape = load_shape("llama-7b")
    P = shape.n_params()
    parts, _, source = model_states(shape, Setup(nodes=1, gpus_per_node=2, precision="fp32"), P)
    assert "emoe_llm.plan" in source
    # ZeRO keeps a separate fp32 master partition even in fp32 (measured: 5 partition-sized fp32 tensors per rank)
    assert parts["parameters"] + parts["gradients"] + parts["optimizer states"] == pytest.approx(20 * P / 2, rel=1e-6)
    plain, _, _ = model_states(shape, Setup(nodes=1, gpus_per_node=2, precision="fp32", zero_stage=0), P)
    assert plain["parameters"] + plain["gradients"] + plain["optimizer states"] == pytest.approx(16 * P, rel=1e-6)
    full = make_plan(shape, Setup(nodes=1, gpus_per_node=8))
    lora = make_plan(shape, Setup(nodes=1, gpus_per_node=8, lora=True, lora_r=8))
    assert lora.trainable_params == 32 * 8 * (2 * 4096 + 2 * 4096)  # q_proj + v_proj
    assert lora.total_bytes < full.total_bytes / 2 and lora.step_time_s < full.step_time_s


def test_activations_checkpointing_micro_batch_and_the_emoe_mask():
    shape = load_shape("llama-7b")
    ckpt = activation_bytes(shape, Setup(micro_batch=1, seq_len=2048), 1)
    full = activation_bytes(shape, Setup(micro_batch=1, seq_len=2048, gradient_checkpointing=False), 1)
    assert full["activations (decoder layers)"] > 10 * ckpt["activations (decoder layers)"]
    two = activation_bytes(shape, Setup(seq_len=2048), 2)
    assert two["activations (decoder layers)"] == 2 * ckpt["activations (decoder layers)"]
    # EMoE: a (tokens, N) mask per EMoE layer; the fp32 scores read the 16-bit gate output directly on CUDA, while a
    # 16-bit run on CPU casts one transient fp32 (tokens, d_ff) copy first
    assert ckpt["EMoE mask"] == 2 * 2048 * 64 * 2
    cpu16 = activation_bytes(shape, Setup(micro_batch=1, seq_len=2048, device="cpu"), 1)
    assert cpu16["EMoE mask"] == 2 * 2048 * 64 * 2 + 2048 * 11008 * 4
    dense = load_shape("llama-7b", emoe_override=False)
    assert "EMoE mask" not in activation_bytes(dense, Setup(seq_len=2048), 1)


def test_largest_micro_batch_is_the_boundary_of_fitting():
    shape = load_shape("llama-30b")
    s = Setup(nodes=4, gpus_per_node=8, seq_len=2048)
    best = make_plan(shape, s).max_micro_batch
    assert best >= 1
    s.micro_batch = best
    assert make_plan(shape, s).fits
    s.micro_batch = best + 1
    assert not make_plan(shape, s).fits


def test_step_time_from_flops_and_mfu():
    shape = load_shape("llama-7b", emoe_override=False)
    s = Setup(nodes=1, gpus_per_node=8, micro_batch=1, seq_len=1024, gradient_checkpointing=False, mfu=0.5,
              peak_tflops=1000.0, steps=10)
    p = make_plan(shape, s)
    tokens = 8 * 1024
    flops = tokens * (6 * shape.n_params() + 12 * 32 * 4096 * 1024)
    assert p.flops_per_step == pytest.approx(flops)
    assert p.step_time_s == pytest.approx(flops / (8 * 1000e12 * 0.5))
    assert p.tokens_per_s == pytest.approx(tokens / p.step_time_s)
    assert p.wall_time_s == pytest.approx(10 * p.step_time_s)


def test_cli_exit_codes_and_recipe(capsys, tmp_path):
    assert main(["--model", "llama-7b", "--config", "configs/llama2_7b_emoe.yaml", "--ds-config",
                 "ds_configs/z3.json", "--train-rows", "52002"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "micro 4 x seq 512" in out and "recipe: 1218 steps" in out
    assert main(["--model", "llama-65b", "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem-gb", "80"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "not a preset" in capsys.readouterr().err
    assert main(["--model", "llama-30b", "--config", "configs/llama30b_emoe.yaml", "--ds-config",
                 "ds_configs/z3.json", "--table", "1,2,4"]) == 1  # 1 node x 8 x 80 GB: micro 2 does not fit
    table = capsys.readouterr().out
    assert "| 1 x 8 |" in table and "| no | 0 |" in table and table.count("| yes |") == 2
    # 8 nodes: the recipe's global batch 128 cannot be split as micro 4 x 64 GPUs: said in the row, not a crash
    assert main(["--model", "llama-7b", "--config", "configs/llama2_7b_emoe.yaml", "--table", "4,8"]) == 1
    assert "not divisible" in capsys.readouterr().out


def test_offload_checks_cpu_memory_per_node():
    shape = load_shape("llama-30b")
    one = make_plan(shape, Setup(nodes=1, gpus_per_node=8, offload_optimizer=True, offload_param=True,
                                 cpu_mem_gb=512))
    assert not one.fits and "CPU memory per node" in one.notes[0]
    eight = make_plan(shape, Setup(nodes=8, gpus_per_node=8, offload_optimizer=True, offload_param=True,
                                   cpu_mem_gb=512))
    assert eight.fits and eight.cpu_per_node_bytes == pytest.approx(one.cpu_per_node_bytes / 8, rel=1e-6)


SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}


def test_optimizer_step_transients_follow_deepspeed_and_the_device():
    """ZeRO-3's step flattens a sub-group's gradient partitions into a new fp32 tensor (16-bit: the 16-bit flat copy
    and its fp32 conversion briefly coexist); the loop holds the logits; CPU adds torch AdamW's two temporaries."""
    shape = load_shape("llama-7b")
    P = shape.n_params()
    gpu = step_bytes(shape, Setup(nodes=1, gpus_per_node=8, micro_batch=2, seq_len=512), P, 2)
    assert gpu["optimizer step: flat fp32 gradient"] == 6 * -(-P // 8)  # 842M elements < sub_group_size 1e9
    assert "optimizer step: logits held by the loop" not in gpu  # the chunked loss returns per-token losses
    gemma2 = shape_from_config({**SMOLLM2, "model_type": "gemma2"}, name="gemma2")  # soft-capped: the plain loss
    plain = step_bytes(gemma2, Setup(nodes=1, gpus_per_node=8, micro_batch=2, seq_len=512), P, 2)
    assert plain["optimizer step: logits held by the loop"] == 2 * 2 * 512 * 49152
    assert not any("CPU" in k for k in gpu)
    capped = step_bytes(shape, Setup(nodes=1, gpus_per_node=1, sub_group_size=10**8), P, 1)
    assert capped["optimizer step: flat fp32 gradient"] == 6 * 10**8
    cpu = step_bytes(shape, Setup(nodes=1, gpus_per_node=2, precision="fp32", device="cpu"), P, 1)
    n = 10**9  # 7B / 2 ranks = 3.4B elements: capped at DeepSpeed's default sub_group_size
    assert cpu["optimizer step: flat fp32 gradient"] == 4 * n
    assert cpu["optimizer step: AdamW temporaries (CPU)"] == 8 * n
    assert step_bytes(shape, Setup(offload_optimizer=True), P, 1) == {}  # DeepSpeedCPUAdam on CPU buffers
    assert step_bytes(shape, Setup(zero_stage=2), P, 1) == {}


def test_activation_estimate_uses_the_chunked_loss():
    """Llama-3-8B, 4 x 4,096 tokens: the chunked LM-head loss is a fraction of the full logits + fp32 cross-entropy
    (which families that transform their logits still pay), and it is what the plan adds up."""
    shape = load_shape("llama-3-8b")
    s = Setup(micro_batch=4, seq_len=4096)
    act = activation_bytes(shape, s, 4)
    assert "logits + cross-entropy" not in act
    full = 4 * 4096 * shape.vocab * (2 + 12)
    assert act["chunked LM-head loss"] < 0.25 * full
    capped = shape_from_config({**SMOLLM2, "model_type": "gemma2"}, name="gemma2")
    assert activation_bytes(capped, s, 4)["logits + cross-entropy"] == 4 * 4096 * 49152 * 14
    plan = make_plan(shape, s)
    assert plan.per_gpu["chunked LM-head loss"] == act["chunked LM-head loss"]


def test_step_and_train_pass_add_on_cpu_and_take_the_larger_on_gpu(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    shape = load_shape(str(tmp_path))
    P = shape.n_params()
    cpu = make_plan(shape, Setup(nodes=1, gpus_per_node=2, precision="fp32", device="cpu", micro_batch=2,
                                 seq_len=256, runtime_overhead_gb=0))
    step = step_bytes(shape, Setup(nodes=1, gpus_per_node=2, precision="fp32", device="cpu", seq_len=256), P, 2)
    assert cpu.per_gpu["optimizer step: AdamW temporaries (CPU)"] == step["optimizer step: AdamW temporaries (CPU)"]
    assert "optimizer step: logits held by the loop" not in cpu.per_gpu  # the chunked loss holds no logits
    assert cpu.total_bytes == sum(cpu.per_gpu.values())
    # the same run planned for a GPU: the step reuses the train pass's memory, only its excess counts
    gpu = make_plan(shape, Setup(nodes=1, gpus_per_node=2, precision="fp32", micro_batch=2, seq_len=256,
                                 runtime_overhead_gb=0))
    assert gpu.total_bytes == sum(gpu.per_gpu.values())
    train = sum(v for k, v in gpu.per_gpu.items() if k not in ("optimizer step above the train pass",))
    assert gpu.total_bytes == max(train, train - gpu.per_gpu["ZeRO-3 live parameters"]
                                  - sum(activation_bytes(shape, Setup(precision="fp32", seq_len=256), 2).values())
                                  + sum(step_bytes(shape, Setup(nodes=1, gpus_per_node=2, precision="fp32",
                                                                seq_len=256), P, 2).values()))
    assert cpu.total_bytes > gpu.total_bytes
    # 7B on 8 GPUs at micro 1: the flat fp32 gradient (4.7 GiB) exceeds the train pass; at micro 64 it does not
    big = load_shape("llama-7b")
    small_micro = make_plan(big, Setup(nodes=1, gpus_per_node=8, micro_batch=1, seq_len=512))
    assert small_micro.per_gpu["optimizer step above the train pass"] > 1 * GiB
    assert make_plan(big, Setup(nodes=1, gpus_per_node=8, micro_batch=64, seq_len=512)).per_gpu[
        "optimizer step above the train pass"] == 0
    # CPU, buffers below glibc's 32 MiB mmap threshold (the tiny model: 8.3M elements per rank = 31.8 MiB): they come
    # from the free lists the train pass left, so the step combines as on a GPU
    tiny = {**SMOLLM2, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 128256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    t = make_plan(load_shape(str(tmp_path)), Setup(nodes=1, gpus_per_node=2, precision="fp32", device="cpu",
                                                   micro_batch=2, seq_len=256))
    assert "optimizer step: AdamW temporaries (CPU)" not in t.per_gpu
    assert t.per_gpu["optimizer step above the train pass"] == 0


def test_sub_group_size_and_device_come_from_the_ds_json_and_gpu(tmp_path, capsys):
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "sub_group_size": 1e8}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    main(["--model", "llama-7b", "--ds-config", str(tmp_path / "ds.json"), "--micro-batch", "1", "--seq-len", "512",
          "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["setup"]["sub_group_size"] == 10**8 and plan["setup"]["device"] == "cuda"
    main(["--model", "llama-7b", "--gpu", "cpu", "--gpu-mem-gb", "1000", "--ds-config", str(tmp_path / "ds.json"),
          "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["setup"]["device"] == "cpu"
    assert plan["per_gpu"]["optimizer step: AdamW temporaries (CPU)"] == 8 * 10**8


def test_a_preset_takes_n_and_the_layers_from_the_recipe():
    """The recipe's emoe: section, not the preset's paper default, sizes the mask term."""
    assert (load_shape("llama-7b").n_experts, load_shape("llama-7b").emoe_layers) == (64, 2)
    shape = load_shape("llama-7b", emoe_override={"n_experts": 128, "layers": "16:2"})
    assert (shape.n_experts, shape.emoe_layers) == (128, 8)  # 16, 18, ..., 30 of 32 layers
    assert load_shape("llama-7b", emoe_override=False).emoe_layers == 0  # a dense recipe
    with pytest.raises(PlanError, match="emoe.layers"):
        load_shape("llama-7b", emoe_override={"n_experts": 64, "layers": "40,41"})


def test_the_advice_names_the_real_cause(capsys):
    """A micro batch of one row that does not fit while the model states do: the advice blames the sequence length
    (the activations), not the model states; and the states alone not fitting still says so. (131,072 tokens: with
    the chunked loss one row of 65,536 fits 7B on 80 GB.)"""
    assert main(["--model", "llama-7b", "--seq-len", "131072"]) == 1
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("DOES NOT FIT: the model states fit") and "one row of 131072 tokens needs" in out, out
    assert "lower data.max_seq_len (--seq-len)" in out and "model states alone" not in out
    assert main(["--model", "llama-65b", "--nodes", "1", "--gpus-per-node", "1"]) == 1
    assert "the model states alone do not fit" in capsys.readouterr().out
