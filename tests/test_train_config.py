"""Recipe config tree, overrides, batch layout, LR schedule, data order, launcher command (no processes)."""

import math
import subprocess
import sys
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
                             "emoe={n_experts: 16, top_k: 4, layers: '2,3'}"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.mode == "dense" and cfg.lora.enabled is True and cfg.train.max_steps == 7
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.data.sources[0].path == "/x.json" and cfg.data.seed == cfg.seed  # one seed
    assert (cfg.emoe.n_experts, cfg.emoe.top_k, cfg.emoe.layers, cfg.emoe.seed) == (16, 4, "2,3", 0)
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


def lr_curve(cfg, total_steps: int):
    """(lr at each optimizer step, the scheduler after them, warmup steps) for an SGD with lr 1."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, warmup = build_scheduler(opt, cfg, total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs, sched, warmup


def test_lr_schedule_warmup_cosine_floor():
    cfg = load_config(TINY, ["train.lr=1.0", "train.warmup_steps=4", "train.min_lr_ratio=0.1"])
    lrs, sched, warmup = lr_curve(cfg, 20)
    assert warmup == 4
    assert lrs[:4] == pytest.approx([0.1, 0.325, 0.55, 0.775])  # linear warmup from lr * min_lr_ratio
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] > 0.1 and sched.get_last_lr()[0] == pytest.approx(0.1)
    # the decay is the one the recipe always had: min + (1 - min) * shape(progress), progress over total - warmup
    for s in (4, 9, 13, 19):
        progress = (s - 4) / 16
        assert lrs[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind,shape", [("linear", lambda p: 1 - p), ("constant", None)])
def test_lr_schedule_linear_and_constant(kind, shape):
    cfg = load_config(TINY, ["train.lr=1.0", "train.warmup_steps=2", "train.min_lr_ratio=0.2",
                             f"train.lr_scheduler={kind}"])
    lrs, _, _ = lr_curve(cfg, 10)
    for s in range(2, 10):
        assert lrs[s] == pytest.approx(1.0 if shape is None else 0.2 + 0.8 * shape((s - 2) / 8))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,min_lr_ratio", [(0, 0.0), (3, 0.0), (4, 0.15)])
def test_lr_schedule_is_transformers_warmup_stable_decay(kind, warmup, min_lr_ratio):
    """schedule.py writes out transformers' warmup_stable_decay (importing it costs ~5 s a rank): every step agrees."""
    from transformers.optimization import get_wsd_schedule

    total = 17
    cfg = load_config(TINY, ["train.lr=1.0", f"train.warmup_steps={warmup}", f"train.min_lr_ratio={min_lr_ratio}",
                             f"train.lr_scheduler={kind}", "train.warmup_ratio=0"])
    ours, _, warmup = lr_curve(cfg, total)
    decay = 0 if kind == "constant" else total - warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_wsd_schedule(opt, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total,
                              num_stable_steps=total - warmup - decay, min_lr_ratio=min_lr_ratio,
                              decay_type="linear" if kind == "linear" else "cosine")
    expected = []
    for _ in range(total):
        expected.append(theirs.get_last_lr()[0])
        opt.step()
        theirs.step()
    assert ours == pytest.approx(expected, abs=1e-12)


def test_the_recipe_imports_neither_peft_nor_bitsandbytes():
    """Every rank of every launch imports the recipe; peft + bitsandbytes (LoRA/QLoRA only) would add ~5 s to it."""
    code = "import sys, emoe_llm.train.recipe; print(sorted({'peft', 'bitsandbytes'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"  # after DeepSpeed's accelerator notice


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
    # one process needs no launcher: the recipe itself, with the variables a launcher gives its rank
    cmd = build_command(["--nproc", "1", "--master-port", "1234", "--config", "c.yaml"])
    assert cmd[0] == "env" and cmd[-4:] == ["-m", "emoe_llm.train", "--config", "c.yaml"]
    assert {"RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "MASTER_PORT=1234"} <= set(cmd)
    assert build_command(["--nproc", "1", "--launcher", "deepspeed", "--config", "c"])[1:3] == ["--num_gpus", "1"]
    with pytest.raises(SystemExit, match="--launcher none runs one process; --nproc is 2"):
        build_command(["--nproc", "2", "--launcher", "none", "--config", "c"])


def test_bare_train_args_use_the_tiny_demo_recipe():
    args = parse_args([])
    assert args.config == str(TINY) and args.ds_config == str(REPO / "ds_configs" / "z3.json")
    cfg = load_config(args.config)
    assert cfg.model.build_tiny_if_missing and cfg.model.path == "runs/demo/tiny_emoe"


def test_a_command_line_model_path_is_never_built(tmp_path):
    from emoe_llm.train.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"model.path: .*typo/config.json not found"):  # checked, not built
        load_recipe(parse_args([f"model.path={tmp_path / 'typo'}"]))
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
# ---------------------------------------------------------------------------------------------------------------------
# the whole recipe is checked before any process group: one line on rank 0, exit 2, other ranks quiet


@pytest.fixture(scope="module")
def tiny_emoe(tmp_path_factory):
    from emoe_llm.convert import convert_checkpoint
    from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("precheck")
    dense = save_tiny_checkpoint(root / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    convert_checkpoint(dense, root / "emoe", n_experts=16, top_k=4, layers="2,3", progress=False)
    no_tok = save_tiny_checkpoint(root / "no_tokenizer")
    return {"emoe": root / "emoe", "dense": dense, "no_tok": no_tok, "root": root}


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown config key(s) train.lrr"),
    (["data.max_seq_len=long"], "data.max_seq_len must be an integer"),
    (["data.seed=3"], "data.seed: a recipe has one seed"),
    (["data.template=chatml"], "data.template: 'chatml' is neither a built-in template"),
    (["data.sources.0.path=nope.jsonl"], "data.sources[0].path: nope.jsonl does not exist"),
    (["model.path={root}/missing"], "model.path: {root}/missing/config.json not found"),
    (["model.path={no_tok}", "model.mode=dense", "emoe=null"], "model.path: no tokenizer in {no_tok}"),
    (["emoe=null"], "model.mode=emoe needs an emoe: section"),
    (["emoe.n_experts=8"], "another EMoE conversion than the emoe: section asks for (checkpoint -> recipe: "
                           "n_experts 16 -> 8)"),
    (["emoe.seed=1"], "seed 0 -> 1"),
    (["emoe.layers=1", "emoe.permute_layers='2,3'"], "emoe.layers [1] are not all in emoe.permute_layers [2, 3]"),
    (["emoe.layers=1"], "permuted_layers [2, 3] -> [1]"),  # layer 1 was never clustered in this checkpoint
    (["emoe.n_experts=12"], "n_experts=12 does not divide intermediate_size=256"),
    (["resume=/nowhere"], "resume: checkpoint dir '/nowhere' does not exist"),
    (["train.global_batch_size=9"], "not divisible"),
])
def test_recipe_errors_before_init_one_line_rank0_exit2(tiny_emoe, monkeypatch, capsys, overrides, message):
    import deepspeed

    from emoe_llm.train import recipe

    def no_process_group(*a, **k):
        raise AssertionError("init_distributed reached: the recipe was not checked first")

    monkeypatch.setattr(deepspeed, "init_distributed", no_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    fill = {k: str(v) for k, v in tiny_emoe.items()}
    argv = ["--config", str(TINY), f"model.path={tiny_emoe['emoe']}", f"output_dir={tiny_emoe['root']}/out",
            *[o.format(**fill) for o in overrides]]
    for rank, expect_output in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert recipe.cli(argv) == 2
        out = capsys.readouterr()
        if expect_output:
            lines = out.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("[emoe-llm] error: "), out.err
            assert message.format(**fill) in lines[0], lines[0]
        else:
            assert out.err == "" and out.out == ""


def test_changing_k_or_the_active_layer_subset_passes_the_checkpoint_check(tiny_emoe):
    from emoe_llm.train.config import check_runnable

    for extra in (["emoe.top_k=7"], ["emoe.layers=3"], ["emoe.top_k=16", "emoe.layers='2,3'"]):
        check_runnable(load_config(TINY, [f"model.path={tiny_emoe['emoe']}", "output_dir=x", *extra]))
    # a dense model.path is converted by the run itself: only the settings' fit to the model is checked
    check_runnable(load_config(TINY, [f"model.path={tiny_emoe['dense']}", "output_dir=x", "emoe.n_experts=8"]))
