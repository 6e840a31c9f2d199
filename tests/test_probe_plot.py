"""`emoe-llm probe` (forward-only masking cost per layer x k) and `emoe-llm plot` (PNGs from metrics.jsonl)."""

from __future__ import annotations

import json

import pytest

from emoe_llm.cli import main
from emoe_llm.eval.probe import recommend
from emoe_llm.tiny import DATA_DIR, build_demo_model, save_tiny_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("probe") / "dense",
                                tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")


def test_probe_dense_checkpoint_writes_json_table_and_png(tiny_dense, tmp_path, capsys):
    out = tmp_path / "probe"
    rc = main(["probe", str(tiny_dense), "--experts", "16", "--ks", "4,8", "--tokens", "64", "--template", "llama3",
               "--out", str(out), "--budget", "1000"])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "probe.json").read_text())
    assert res["ks"] == [4, 8] and res["layers"] == [0, 1, 2, 3] and res["response_tokens"] >= 64
    for r in res["per_layer"]:
        assert set(r["by_k"]) == {"4", "8"}
        assert r["inertia_ratio"] > 0
        for k, b in r["by_k"].items():
            assert b["nll"] == pytest.approx(res["dense_nll"] + b["dnll"], abs=1e-4)
            assert sum(b["load"]) == pytest.approx(int(k), abs=1e-2) and b["load_max_over_mean"] >= 1.0
            assert 0.0 < b["load_entropy"] <= 1.0
    rec = res["recommendation"]  # a huge budget: max_layers (4) cheapest layers, then measured together
    assert rec["k"] == 4 and len(rec["layers"]) == 4 and "measured_dnll" in rec
    assert "recommended EMoE layers" in text and "dense NLL" in text
    assert (out / "probe.png").read_bytes()[:8] == PNG


def test_probe_converted_checkpoint_uses_its_experts(tmp_path, capsys):
    emoe = tmp_path / "tiny_emoe"
    build_demo_model(emoe)  # 16 experts, top-4, layers 2,3 (only those were clustered at conversion)
    out = tmp_path / "probe"
    rc = main(["probe", str(emoe), "--layers", "2,3", "--ks", "2,4", "--tokens", "32", "--template", "llama3",
               "--out", str(out), "--no-plot"])
    assert rc == 0, capsys.readouterr()
    res = json.loads((out / "probe.json").read_text())
    assert res["n_experts"] == 16 and res["layers"] == [2, 3] and res["recommendation"]["k"] == 4
    assert not (out / "probe.png").exists()


def test_probe_dense_without_experts_is_one_clear_error(tiny_dense, tmp_path, capsys):
    assert main(["probe", str(tiny_dense), "--out", str(tmp_path / "p")]) == 2
    assert "dense checkpoint: give --experts N" in capsys.readouterr().err
    assert main(["probe", str(tiny_dense), "--experts", "16", "--ks", "16", "--out", str(tmp_path / "p")]) == 2
    assert "1 <= k < N=16" in capsys.readouterr().err


def test_recommend_is_greedy_within_budget():
    rows = [{"layer": i, "by_k": {"4": {"dnll": d}}} for i, d in enumerate([5.0, 0.05, 0.02, 0.04, 0.3])]
    rec = recommend(rows, k=4, budget=0.1, max_layers=4)
    assert rec["layers"] == [2, 3] and rec["sum_single_layer_dnll"] == pytest.approx(0.06)
    assert recommend(rows, k=4, budget=0.01, max_layers=4)["layers"] == []
    assert recommend(rows, k=4, budget=10, max_layers=2)["layers"] == [2, 3]


def _metrics(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_plot_writes_training_and_expert_load_pngs(tmp_path, capsys):
    load = {"layer_2": [0.5, 0.1, 0.2, 0.2], "layer_3": [0.25] * 4}
    recs = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 100.0 + s, "expert_load": load}
            for s in range(1, 7)]
    recs.insert(4, {"event": "resume", "step": 4})
    recs.append({"event": "final_eval", "step": 6, "eval_loss": 2.5})
    _metrics(tmp_path / "run", recs, tail='{"step": 7, "lo')  # a run killed mid-write
    assert main(["plot", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for name in ("training.png", "expert_load.png"):
        assert (tmp_path / "run" / "plots" / name).read_bytes()[:8] == PNG
        assert name in out


def test_plot_dense_run_has_no_expert_load_and_errors_are_clear(tmp_path, capsys):
    _metrics(tmp_path / "dense", [{"step": 1, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 5.0}])
    assert main(["plot", str(tmp_path / "dense"), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "training.png").is_file() and not (tmp_path / "png" / "expert_load.png").exists()
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    _metrics(tmp_path / "bad", [{"step": 1, "loss": 2.0}], tail="not json\n" + json.dumps({"step": 2}) + "\n")
    assert main(["plot", str(tmp_path / "bad")]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
