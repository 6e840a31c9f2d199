"""emoe-llm convert / verify on real tiny multi-shard checkpoints written by save_pretrained.

The streamed conversion must equal the in-memory ``apply_emoe`` byte for byte, leave SRC untouched, keep the dense
logits, and resume after an interruption to exactly the uninterrupted result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from emoe_llm import emoe
from emoe_llm.cli import main as cli_main
from emoe_llm.convert import ConversionError, convert_checkpoint, verify_checkpoint
from emoe_llm.tiny import save_tiny_checkpoint

N_EXPERTS = 8  # tiny d_ff = 256 -> 32 neurons per expert


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                out[name] = st.get_tensor(name)
    return out


def tree_hash(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                       b.reshape(-1).view(torch.uint8))


def in_memory_conversion(src: Path, *, layers, permute_layers=None, seed=0, cast=None) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)  # dtype "auto": the stored dtype, as the converter clusters
    emoe.apply_emoe(model, n_experts=N_EXPERTS, top_k=2, layers=layers, permute_layers=permute_layers, seed=seed,
                    enable=False)
    if cast is not None:
        model = model.to(cast)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sharded_fp32(tmp_path_factory) -> Path:
    # 100 KB shards: each fp32 MLP tensor is 64 KB, so layers' MLPs straddle shard boundaries.
    return save_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", max_shard_size="100KB", seed=1)


@pytest.fixture(scope="module")
def sharded_bf16_bias(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny_bias", max_shard_size="60KB", seed=2,
                                dtype=torch.bfloat16, mlp_bias=True)


def shards_of_layer(src: Path, layer: int) -> set[str]:
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    return {weight_map[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}


@pytest.mark.parametrize(
    "fixture, options, cast",
    [
        ("sharded_fp32", dict(layers="1,3"), None),
        ("sharded_fp32", dict(layers="2", dtype="bf16"), torch.bfloat16),
        ("sharded_bf16_bias", dict(layers="3", permute_layers="all"), None),
    ],
    ids=["fp32-layers-1-3", "fp32-to-bf16", "bf16-bias-all-layers"],
)
def test_streamed_equals_in_memory_and_src_unchanged(request, tmp_path, fixture, options, cast):
    src = request.getfixturevalue(fixture)
    assert any(len(shards_of_layer(src, i)) > 1 for i in range(4)), "test needs an MLP split across shards"
    before = tree_hash(src)
    dst = tmp_path / "emoe"
    summary = convert_checkpoint(src, dst, n_experts=N_EXPERTS, top_k=2, seed=3, progress=False, **options)
    assert tree_hash(src) == before

    permute = options.get("permute_layers")
    expected = in_memory_conversion(src, layers=options["layers"], permute_layers=permute, seed=3, cast=cast)
    streamed = read_checkpoint(dst)
    assert streamed.keys() == expected.keys()
    for name, tensor in streamed.items():
        assert same_bytes(tensor, expected[name]), name
    # the permutation really moved neurons (otherwise equality above would be trivial)
    original = read_checkpoint(src)
    gate = f"model.layers.{emoe.parse_layer_spec(options['layers'], 4)[0]}.mlp.gate_proj.weight"
    assert not torch.equal(original[gate].to(streamed[gate].dtype), streamed[gate])

    config = json.loads((dst / "config.json").read_text())
    layers = emoe.parse_layer_spec(options["layers"], 4)
    assert config["emoe"]["layers"] == layers
    assert config["emoe"]["permuted_layers"] == (list(range(4)) if permute else layers)
    assert set(summary["inertia"]) == {str(i) for i in config["emoe"]["permuted_layers"]}
    assert json.loads((dst / "emoe_conversion.json").read_text())["bytes_written"] == summary["bytes_written"]
    assert (dst / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".*partial*")), "workspace must be gone after success"

    report = verify_checkpoint(src, dst, n_experts=N_EXPERTS, layers=options["layers"])
    assert report["ok"], report["failures"]
    assert report["checks"]["logits_max_rel_diff"] < 1e-5


def test_single_file_tied_checkpoint_and_loads_as_emoe(tmp_path):
    # one model.safetensors, tied embeddings (no lm_head.weight on disk), as small Qwen2 models ship
    src = save_tiny_checkpoint(tmp_path / "single", seed=4, tie_word_embeddings=True)
    assert (src / "model.safetensors").is_file()
    dst = tmp_path / "emoe"
    convert_checkpoint(src, dst, n_experts=N_EXPERTS, top_k=2, layers="0", progress=False)
    assert (dst / "model.safetensors").is_file() and not (dst / "model.safetensors.index.json").exists()
    report = verify_checkpoint(src, dst)
    assert report["ok"] and report["checks"]["logits_max_rel_diff"] < 1e-5, report

    # whole-file identity: the streamed file is exactly what save_pretrained writes after apply_emoe
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    emoe.apply_emoe(model, n_experts=N_EXPERTS, top_k=2, layers="0", enable=False)
    model.save_pretrained(tmp_path / "in_memory")
    assert (dst / "model.safetensors").read_bytes() == (tmp_path / "in_memory" / "model.safetensors").read_bytes()
    model = emoe.load_emoe_model(dst)
    assert [m.layer_idx for m in emoe.emoe_modules(model)] == [0]


def test_interrupted_then_resumed_equals_uninterrupted(sharded_fp32, tmp_path):
    reference = tmp_path / "reference"
    options = dict(n_experts=N_EXPERTS, top_k=2, layers="0,2", permute_layers="all", seed=5, progress=False)
    convert_checkpoint(sharded_fp32, reference, **options)

    dst = tmp_path / "resumed"
    steps = []

    def stop_after(kind: str, n: int):
        def hook(step, info):
            steps.append((step, info))
            if sum(s == kind for s, _ in steps) == n:
                raise KeyboardInterrupt
        return hook

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after two clustered layers
        convert_checkpoint(sharded_fp32, dst, on_step=stop_after("layer", 2), **options)
    assert not dst.exists()
    partial = tmp_path / ".resumed.emoe-partial"
    assert partial.is_dir()

    steps.clear()
    with pytest.raises(KeyboardInterrupt):  # resume, then Ctrl-C again after three shards
        convert_checkpoint(sharded_fp32, dst, resume=True, on_step=stop_after("shard", 3), **options)
    assert [s for s, _ in steps].count("layer") == 2, "the two finished layers must not be clustered again"
    assert not dst.exists()

    steps.clear()
    convert_checkpoint(sharded_fp32, dst, resume=True, on_step=lambda s, i: steps.append((s, i)), **options)
    assert [s for s, _ in steps] == ["shard"] * (len(list(sharded_fp32.glob("*.safetensors"))) - 3)
    assert tree_hash(dst).keys() == tree_hash(reference).keys()
    ref_hash, got_hash = tree_hash(reference), tree_hash(dst)
    for name in ref_hash:
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            assert got_hash[name] == ref_hash[name], name
    ref_cfg, got_cfg = (json.loads((p / "config.json").read_text()) for p in (reference, dst))
    strip_time = lambda c: {k: {kk: vv for kk, vv in v.items() if kk != "seconds"} for k, v in c.items()}  # noqa: E731
    assert strip_time(ref_cfg["emoe"].pop("clustering")) == strip_time(got_cfg["emoe"].pop("clustering"))
    assert ref_cfg == got_cfg
    assert not partial.exists()


def test_resume_refuses_other_options(sharded_fp32, tmp_path):
    dst = tmp_path / "out"

    def interrupt(step, info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(sharded_fp32, dst, n_experts=N_EXPERTS, top_k=2, layers="1", seed=0, progress=False,
                           on_step=interrupt)
    with pytest.raises(ConversionError, match=r"cannot resume .*seed: 0 -> 1"):
        convert_checkpoint(sharded_fp32, dst, n_experts=N_EXPERTS, top_k=2, layers="1", seed=1, progress=False,
                           resume=True)
    assert not dst.exists()
    # without --resume a stale partial is replaced and the run completes
    convert_checkpoint(sharded_fp32, dst, n_experts=N_EXPERTS, top_k=2, layers="1", seed=1, progress=False)
    assert verify_checkpoint(sharded_fp32, dst, check_logits=False)["ok"]


def test_second_run_into_same_dst_is_locked_out(sharded_fp32, tmp_path):
    dst = tmp_path / "out"
    options = dict(n_experts=N_EXPERTS, top_k=2, layers="1", progress=False)
    errors = []

    def start_another(step, info):
        if step == "layer":
            with pytest.raises(ConversionError, match="another emoe-llm convert is writing") as e:
                convert_checkpoint(sharded_fp32, dst, **options)
            errors.append(e.value)

    convert_checkpoint(sharded_fp32, dst, on_step=start_another, **options)
    assert len(errors) == 1
    assert verify_checkpoint(sharded_fp32, dst, check_logits=False)["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "lock and workspace must be gone"


def test_overwrite_rules(sharded_fp32, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match="not empty; pass --overwrite"):
        convert_checkpoint(sharded_fp32, dst, n_experts=N_EXPERTS, top_k=2, layers="1", progress=False)
    assert (dst / "keep.txt").read_text() == "user data"
    convert_checkpoint(sharded_fp32, dst, n_experts=N_EXPERTS, top_k=2, layers="1", progress=False, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    with pytest.raises(ConversionError, match="must not be SRC"):
        convert_checkpoint(sharded_fp32, sharded_fp32 / "inside", n_experts=N_EXPERTS, top_k=2, layers="1",
                           progress=False, overwrite=True)


def test_verify_detects_broken_conversions(sharded_fp32, tmp_path, capsys):
    dst = tmp_path / "out"
    convert_checkpoint(sharded_fp32, dst, n_experts=N_EXPERTS, top_k=2, layers="1", progress=False)
    assert cli_main(["verify", str(sharded_fp32), str(dst)]) == 0
    assert cli_main(["verify", str(sharded_fp32), str(dst), "--experts", "16"]) == 1
    assert "expected 16" in capsys.readouterr().out

    # corrupt one permuted weight: perturb a value of layer 1's down_proj inside its shard
    from safetensors.torch import load_file, save_file

    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = dst / weight_map[name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] += 1.0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    report = verify_checkpoint(sharded_fp32, dst)
    assert not report["ok"]
    assert any("layer 1" in f for f in report["failures"]), report["failures"]

    # a copied tensor changed, and then a shard missing
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = dst / weight_map[name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] += 1.0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert any(name in f for f in verify_checkpoint(sharded_fp32, dst, check_logits=False)["failures"])
    shard.unlink()
    report = verify_checkpoint(sharded_fp32, dst)
    assert not report["ok"] and "missing file" in report["failures"][0]
    assert cli_main(["verify", str(sharded_fp32), str(tmp_path / "nothing-here")]) == 1


def test_cli_convert_prints_summary(sharded_fp32, tmp_path, capsys):
    dst = tmp_path / "cli"
    rc = cli_main(["convert", str(sharded_fp32), str(dst), "--experts", "8", "--top-k", "2", "--layers", "2:1",
                   "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "clustering inertia per layer: 2:" in out and "peak RSS" in out
    assert json.loads((dst / "config.json").read_text())["emoe"]["layers"] == [2, 3]
    rc = cli_main(["convert", str(sharded_fp32), str(dst), "--experts", "8", "--top-k", "2", "--layers", "1",
                   "--quiet"])
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_only_weight_settings_key_a_conversion(sharded_fp32, tmp_path, capsys):
    """`emoe-llm convert --config RECIPE`: another k or a subset of the permuted layers reuses DST untouched (no
    re-clustering); another N or seed converts again (with --overwrite); flags and --config do not mix."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    dst = tmp_path / "emoe"
    def base(*overrides):  # overrides right after DST (argparse positionals), then the options
        return ["convert", str(sharded_fp32), str(dst), "emoe.n_experts=8", "emoe.layers=1", "emoe.permute_layers=1,3",
                *overrides, "--config", str(recipe), "--quiet"]

    assert cli_main([*base("emoe.top_k=2"), "--verify"]) == 0
    assert "converted and verified" in capsys.readouterr().out
    before = tree_hash(dst)
    assert cli_main([*base("emoe.top_k=5", "emoe.layers=3"), "--verify"]) == 0   # k and active layers: train-time
    assert "conversion skipped" in capsys.readouterr().out and tree_hash(dst) == before
    assert cli_main(base("emoe.seed=1")) == 2
    assert "seed 0 -> 1" in capsys.readouterr().out
    assert cli_main([*base("emoe.seed=1"), "--overwrite"]) == 0
    assert json.loads((dst / "config.json").read_text())["emoe"]["seed"] == 1 and tree_hash(dst) != before
    assert cli_main([*base(), "--experts", "4"]) == 2
    assert "--experts and --config" in capsys.readouterr().err
    report = verify_checkpoint(sharded_fp32, dst, n_experts=8, layers="3")  # any permuted layer may be switched on
    assert report["ok"], report["failures"]
    assert not verify_checkpoint(sharded_fp32, dst, layers="0,1")["ok"]      # layer 0 was never clustered


@pytest.mark.slow
def test_killed_by_signal_then_resume_cli(tmp_path):
    """A real signal to `emoe-llm convert` mid-clustering: no DST, exit 130, and --resume finishes the job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = save_tiny_checkpoint(tmp_path / "src", max_shard_size="300KB", num_hidden_layers=12, hidden_size=128,
                               intermediate_size=512)
    args = ["--experts", "8", "--top-k", "2", "--layers", "10,11", "--permute-layers", "all", "--quiet"]
    dst = tmp_path / "dst"
    manifest = tmp_path / ".dst.emoe-partial" / "emoe_partial.json"
    proc = subprocess.Popen([sys.executable, "-m", "emoe_llm.cli", "convert", str(src), str(dst), *args],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text() or "{}").get("layers"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends at the time limit; Ctrl-C (SIGINT) takes the same path
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and not dst.exists()
    done = json.loads(manifest.read_text())["layers"]
    assert 1 <= len(done) < 12

    assert cli_main(["convert", str(src), str(dst), *args, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert cli_main(["convert", str(src), str(reference), *args]) == 0
    for name, digest in tree_hash(reference).items():
        if name.endswith((".safetensors", ".index.json")):
            assert tree_hash(dst)[name] == digest, name
