"""Recipe config tree, overrides, batch layout, LR schedule, data order, launcher command (no processes)."""

import math
from pathlib import Path

import pytest
import torch

from emoe_llm.train.config import ConfigError, config_from_dict, dump_config, load_config, resolve_batch
from emoe_llm.train.launch import build_command
from emoe_llm.train.recipe import build_scheduler, count_steps, epoch_indices, parse_args, token_ce_sum

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def test_overrides_nested_lists_and_types():
    cfg = load_config(TINY, ["train.lr=1e-4", "model.mode=dense", "train.betas=[0.9, 0.95]",
                             "data.sources.0.path=/x.json", "lora.enabled=true", "train.max_steps=7",
                             "model.convert={n_experts: 16, top_k: 4, layers: '2,3'}"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.mode == "dense" and cfg.lora.enabled is True and cfg.train.max_steps == 7
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.data["sources"][0]["path"] == "/x.json"
    assert cfg.model.convert == {"n_experts": 16, "top_k": 4, "layers": "2,3"}
    # the resolved config round-trips
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", "unknown config key.*train.lrr"),
    ("trian.lr=1", "unknown config key.*trian"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.micro_batch_size=1.5", "train.micro_batch_size: expected an integer"),
    ("model.mode=sparse", "model.mode must be 'dense' or 'emoe'"),
    ("train.lr_scheduler=step", "train.lr_scheduler"),
    ("lora.quantize=4bit", "QLoRA.*lora.enabled"),
    ("data.sources.3.path=x", "not an index"),
    ("train", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_batch_layout_check():
    cfg = load_config(TINY, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    assert resolve_batch(cfg, 2) == (2, 2, 8)
    assert resolve_batch(cfg, 4) == (2, 1, 8)
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_batch(cfg, 3)
    cfg = load_config(TINY, ["train.global_batch_size=0", "train.grad_accum=3", "train.micro_batch_size=2"])
    assert resolve_batch(cfg, 2) == (2, 3, 12)
    cfg = load_config(TINY, ["train.global_batch_size=16", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="= 12, but train.global_batch_size is 16"):
        resolve_batch(cfg, 2)


def test_lr_schedule_warmup_cosine_floor():
    cfg = load_config(TINY, ["train.lr=1.0", "train.warmup_steps=4", "train.min_lr_ratio=0.1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, warmup = build_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert warmup == 4
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] > 0.1 and sched.get_last_lr()[0] == pytest.approx(0.1)


def test_epoch_indices_partition_and_determinism():
    n, world, per_rank = 103, 4, 24
    shards = [epoch_indices(n, epoch=1, seed=3, rank=r, world=world, per_rank=per_rank) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert all(len(s) == per_rank for s in shards) and len(set(flat)) == len(flat) == 96
    assert shards[0] == epoch_indices(n, epoch=1, seed=3, rank=0, world=world, per_rank=per_rank)
    assert shards[0] != epoch_indices(n, epoch=2, seed=3, rank=0, world=world, per_rank=per_rank)
    assert count_steps(103, micro=2, accum=3, world=4) == (12, 4)


def test_token_ce_sum_shifts_and_masks():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 4], [-100, -100, 3, 3, -100]])
    expected = 0.0
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                expected -= torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]].item()
    assert token_ce_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_train_args_reject_stray_arguments():
    args = parse_args(["--config", "c.yaml", "train.lr=1", "--local_rank=1"])
    assert args.overrides == ["train.lr=1"] and args.ds_config == str(REPO / "ds_configs" / "z3.json")
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.yaml", "stray"])


def test_launch_command():
    cmd = build_command(["--nproc", "2", "--master-port", "1234", "--config", "c.yaml", "train.lr=1"])
    assert cmd[1:] == ["--num_gpus", "2", "--master_port", "1234", "--module", "emoe_llm.train", "--config",
                       "c.yaml", "train.lr=1"]
    cmd = build_command(["--launcher=torchrun", "--nproc=4", "--config", "c.yaml"])
    assert cmd[1:3] == ["--nproc_per_node", "4"] and "-m" in cmd and cmd[cmd.index("-m") + 1] == "emoe_llm.train"
    with pytest.raises(SystemExit, match="--config"):
        build_command(["--nproc", "2"])
    assert math.isfinite(int(build_command(["--config", "c"])[4]))


def test_bare_train_args_use_the_tiny_demo_recipe():
    args = parse_args([])
    assert args.config == str(TINY) and args.ds_config == str(REPO / "ds_configs" / "z3.json")
    cfg = load_config(args.config)
    assert cfg.model.build_tiny_if_missing and cfg.model.path == "runs/demo/tiny_emoe"


def test_a_command_line_model_path_is_never_built(tmp_path):
    from emoe_llm.train.recipe import load_recipe

    cfg, _ = load_recipe(parse_args([f"model.path={tmp_path / 'typo'}"]))
    assert cfg.model.build_tiny_if_missing is False
    cfg, _ = load_recipe(parse_args(["train.lr=1e-4"]))
    assert cfg.model.build_tiny_if_missing is True


@pytest.mark.parametrize("requested, on_cpu, json_prec, want, note", [
    ("auto", True, "bf16", "fp32", "running in fp32 instead"),  # z3.json on a CPU-only machine
    ("auto", True, "fp16", "fp32", "running in fp32 instead"),
    ("auto", False, "bf16", "bf16", None),                      # GPUs keep the JSON's precision
    ("auto", True, "fp32", "fp32", None),
    ("bf16", True, "bf16", "bf16", None),                       # the explicit override keeps bf16 on CPU
    ("fp32", False, "bf16", "fp32", "overrides"),
    ("bf16", False, "fp32", "bf16", "overrides"),
])
def test_precision_fits_the_device(requested, on_cpu, json_prec, want, note):
    from emoe_llm.train.config import ds_precision, resolve_precision

    ds = {"zero_optimization": {"stage": 3}}
    if json_prec != "fp32":
        ds[json_prec] = {"enabled": True}
    out, msg = resolve_precision(ds, requested, on_cpu=on_cpu)
    assert ds_precision(out) == want and ds[json_prec if json_prec != "fp32" else "zero_optimization"]  # copy
    assert (msg is None) if note is None else (note in msg)


def test_precision_key_is_checked():
    with pytest.raises(ConfigError, match="train.precision must be auto"):
        load_config(TINY, ["train.precision=bf32"])
