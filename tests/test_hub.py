"""Hub ids where a checkpoint dir is expected, resolved offline (HF_HUB_OFFLINE=1) by huggingface_hub's real
snapshot_download from a Hub cache the test builds: `emoe-llm convert org/tiny DST` records and is keyed on the
commit; a missing id is one line naming it and the cache; a run trains from `model.path=org/tiny` on a `hub:` data
source, logging to wandb offline, and wandb reads the run back with the step losses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hubcache import cache_checkpoint, make_hub_cache
from test_train_recipe import single_rank  # noqa: F401 - the fixture: one gloo rank for the run below

from emoe_llm.cli import main
from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint

A, B = "a" * 40, "b" * 40


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HOME in tmp_path, offline: {"cache": .../hub, "dense": a tiny checkpoint cached as org/tiny at commit A}."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense = save_tiny_checkpoint(tmp_path / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    cache_checkpoint(home / "hub", "org/tiny", dense, commit=A)
    return {"cache": home / "hub", "dense": dense}


def test_convert_a_hub_id_records_and_is_keyed_on_the_commit(tmp_path, offline_hub, capsys):
    dst = tmp_path / "emoe"
    args = ["convert", "org/tiny", str(dst), "--experts", "16", "--top-k", "4", "--layers", "2,3", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((dst / "emoe_conversion.json").read_text())
    assert summary["source"] == {"repo_id": "org/tiny", "commit": A}
    assert main(args) == 0
    assert "conversion skipped" in capsys.readouterr().out
    # main moves to a new commit (other weights): the same settings convert again instead of reusing A's conversion
    other = save_tiny_checkpoint(tmp_path / "dense_b", seed=1,
                                 tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    cache_checkpoint(offline_hub["cache"], "org/tiny", other, commit=B)
    assert main([*args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"source commit {A} -> {B}" in out
    assert json.loads((dst / "emoe_conversion.json").read_text())["source"]["commit"] == B
    # --revision pins the old commit
    assert main([*args, "--overwrite", "--revision", A]) == 0
    assert json.loads((dst / "emoe_conversion.json").read_text())["source"]["commit"] == A


def test_a_missing_hub_id_offline_is_one_line_naming_it_and_the_cache(tmp_path, offline_hub, capsys):
    assert main(["convert", "org/absent", str(tmp_path / "x"), "--experts", "16", "--top-k", "4",
                 "--layers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "org/absent" in err and "HF_HUB_OFFLINE=1" in err and str(offline_hub["cache"]) in err
    assert not (tmp_path / "x").exists()


def test_a_hub_snapshot_with_only_pickle_weights_is_refused(tmp_path, offline_hub):
    from emoe_llm import hub

    make_hub_cache(offline_hub["cache"], "org/pickled", {"config.json": offline_hub["dense"] / "config.json",
                                                         "pytorch_model.bin": b"not read"})
    with pytest.raises(hub.HubError, match="no .safetensors weights"):
        hub.resolve("org/pickled")


def test_a_local_dir_wins_over_a_hub_id_of_the_same_spelling(tmp_path, offline_hub, monkeypatch):
    from emoe_llm import hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    assert not hub.is_hub_id("org/tiny")  # a missing dir under an existing one: a local typo, not a Hub request
    shutil.copytree(offline_hub["dense"], tmp_path / "org" / "tiny")
    assert hub.resolve("org/tiny") == hub.Resolved(Path("org/tiny"))
    assert hub.is_hub_id("other/tiny")


@pytest.fixture
def env(single_rank):  # noqa: F811 - test_train_recipe's one gloo rank, shared by the module
    return single_rank


def test_train_from_a_hub_model_and_dataset_with_wandb_offline(tmp_path, offline_hub, env, monkeypatch):
    from test_data_sources import make_dataset_repo
    from test_train_zero3 import TINY

    from emoe_llm.train import recipe
    from emoe_llm.train.config import check_runnable, load_config, resolve_hub_ids

    repo = make_dataset_repo(tmp_path / "ds_repo", rows=json.loads(
        (DATA_DIR / "instruct" / "alpaca_en_demo.json").read_text())[:64])
    make_hub_cache(offline_hub["cache"], "org/alpaca", {p.relative_to(repo).as_posix(): p
                                                        for p in repo.rglob("*.jsonl")}, repo_type="dataset", commit=B)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = load_config(TINY, [f"output_dir={out}", "model.path=org/tiny", "model.build_tiny_if_missing=false",
                             "data.sources=[{hub: org/alpaca, split: train}]", "data.eval_fraction=0",
                             f"data.cache_dir={tmp_path}/cache", "logging.progress_bar=false",
                             "logging.tensorboard=false", "logging.wandb.mode=offline",
                             "logging.wandb.project=emoe-test", "train.micro_batch_size=2",
                             "train.global_batch_size=4", "train.max_steps=3", "train.save_every_steps=0",
                             "train.eval_every_steps=0", "train.export=false"])
    resolve_hub_ids(cfg)
    check_runnable(cfg)
    assert cfg.model.hub_commit == A and cfg.data.sources[0].hub_commit == B
    run, state = recipe.setup(cfg, env["ds"])
    assert recipe.fit(run, state) == "done"
    recipe.finish(run, state)
    recipe.close(run, "done")
    assert "hub_commit: " + A in (out / "run" / "config.yaml").read_text()
    steps = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "event" not in r}
    assert sorted(steps) == [1, 2, 3]
    # wandb's own reader over the offline run dir it wrote
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_cli = Path(sys.executable).with_name("wandb")
    read = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(runs[0])], capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    records = [json.loads(line) for line in read.stdout.splitlines() if line.startswith("{")]
    history = {int(r["history"]["step"]["num"]): r["history"]["item"] for r in records if r["type"] == "history"}
    for step, rec in steps.items():
        assert history[step]["loss"] == pytest.approx(rec["loss"])
        layer = next(iter(rec["expert_load"]))
        assert history[step][f"expert_load/{layer}/00"] == pytest.approx(rec["expert_load"][layer][0])
    # the run's resolved config: the Hub commit it trained, the wandb section that asked for it
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["model"]["hub_commit"] == A and config["logging"]["wandb"]["mode"] == "offline"


def test_verify_and_generate_take_the_hub_id_too(tmp_path, offline_hub, capsys):
    dst = tmp_path / "emoe"
    assert main(["convert", "org/tiny", str(dst), "--experts", "16", "--top-k", "4", "--layers", "2,3",
                 "--quiet"]) == 0
    assert main(["verify", "org/tiny", str(dst), "--revision", A]) == 0, capsys.readouterr().err
    capsys.readouterr()
    args = ["generate", "org/tiny", "--prompt", "Hi", "--max-new-tokens", "6"]
    assert main(args) == 0
    by_id = capsys.readouterr().out
    assert main([*args[:1], str(offline_hub["dense"]), *args[2:]]) == 0
    assert capsys.readouterr().out == by_id  # the snapshot is the same model as the dir it was cached from


def test_plan_reads_a_hub_ids_config(offline_hub, capsys):
    from emoe_llm.plan import load_shape

    shape = load_shape("org/tiny")
    config = json.loads((offline_hub["dense"] / "config.json").read_text())
    assert (shape.layers, shape.ffn) == (config["num_hidden_layers"], config["intermediate_size"])
