"""slurm/local_cpu.sh on a real 2-node Slurm cluster (tests/slurm_cluster.py): the same script path as the GPU jobs.

1. `sbatch --wait` across 2 nodes: conversion, ZeRO-3 training over 2 gloo ranks (one torchrun per node, rank r on
   node r+1), export, COMPLETED, and the run snapshot.
2. The preemption signal mid-run, twice: `scancel --batch --signal=USR1` (what `#SBATCH --signal=B:USR1@...` sends
   before the time limit), then plain `scancel --signal=USR1` (to the job steps) in the requeued attempt. Each time
   every rank checkpoints, the job requeues itself, the next attempt skips the conversion and resumes; every
   optimizer step is logged exactly once and the losses equal the uninterrupted run of test 1.
3. A job stopped on two nodes finishes on one.
4. `emoe-llm study --launcher slurm`: the tiny model, 2 arms x 2 seeds as one `sbatch --array=0-3` job through
   slurm/common.sh, then the report job (`--dependency=afterany`).

All four share one cluster: its daemons start once per file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, SlurmCluster, SlurmUnavailable, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

MAX_STEPS = 16  # tiny_cpu.yaml saves every 8 steps; 2 ranks x micro 2 x accum 2


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's tmp_path: munged (user munge) must traverse to its socket, and pytest's dirs are 0700.
    base = Path(tempfile.mkdtemp(prefix="emoe-slurm-"))
    base.chmod(0o755)
    c = SlurmCluster(base / "cluster", nodes=2, cpus_per_node=2)
    try:
        c.start()
    except SlurmUnavailable as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"no local Slurm cluster: {e}")
    try:
        if c.hosts_mode() != "unshare":
            pytest.skip(f"rank placement needs per-node hostnames (unshare -m -u, root); hosts mode is {c.hosts_mode()}")
        yield c
    finally:
        pids = c.stop()
        still = {name: pid for name, pid in pids.items() if pid_alive(pid)}
        shutil.rmtree(base, ignore_errors=True)
        assert pids and not still, f"daemons not stopped by PID: {still} (recorded: {pids})"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Shared by both jobs: the first builds + converts the tiny model, later attempts find it verified."""
    d = tmp_path_factory.mktemp("slurm_models")
    return {"MODEL": str(d / "dense"), "EMOE_MODEL": str(d / "emoe")}


@pytest.fixture(scope="module")
def reference():
    """Per-step losses of the uninterrupted run (test 1), for the resumed run of test 2."""
    return {}


def job_env(models: dict, output_dir: Path) -> dict:
    # OMP_NUM_THREADS=1: two "nodes" share this machine's cores
    return {**models, "OUTPUT_DIR": str(output_dir), "OMP_NUM_THREADS": "1"}


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if "event" not in r and "loss" in r]


def log_of(pattern: Path) -> str:
    files = sorted(pattern.parent.glob(pattern.name))
    return "\n".join(f.read_text(errors="replace") for f in files)


def test_local_cpu_two_nodes(cluster, models, reference, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    proc = cluster.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path}/slurm-%j.out", "slurm/local_cpu.sh",
         f"train.max_steps={MAX_STEPS}"],
        timeout=400, check=False, **job_env(models, out),
    )
    log = log_of(tmp_path / "slurm-*.out")
    assert proc.returncode == 0, f"sbatch --wait exit {proc.returncode}\n{proc.stderr}\n{log[-6000:]}"
    job_id = proc.stdout.split()[0]
    elapsed = time.time() - t0

    # training finished, every step once, and the export exists
    completed = json.loads((out / "COMPLETED").read_text())
    assert completed["step"] == MAX_STEPS
    final = Path(completed["final"])
    assert final == out / "final" and (final / "config.json").is_file(), log[-3000:]
    assert list(final.glob("*.safetensors")), f"no weights in {final}: {os.listdir(final)}"
    assert "emoe" in json.loads((final / "config.json").read_text()), "final/ is not an EMoE export"
    losses = step_losses(read_metrics(out / "metrics.jsonl"))
    assert [s for s, _ in losses] == list(range(1, MAX_STEPS + 1))

    # rank placement: 2 ranks, one per node, rank r on node n(r+1) (node rank = SLURM_NODEID)
    env = json.loads((out / "run" / "environment.json").read_text())
    assert env["hosts_by_rank"] == ["n1", "n2"], env["hosts_by_rank"]
    assert env["env"]["WORLD_SIZE"] == "2" and env["env"]["LOCAL_WORLD_SIZE"] == "1"
    assert env["env"]["MASTER_ADDR"] == "n1" and env["env"]["SLURM_JOB_ID"] == job_id

    # conversion ran (first job of the module) and verified; the run snapshot of attempt 0 is complete
    assert "converted and verified" in log or "conversion skipped" in log, log[-3000:]
    snap = out / "run" / "slurm" / f"{job_id}.0"
    assert "#SBATCH --signal=B:USR1@" in (snap / "batch_script.sh").read_text()   # scontrol write batch_script
    assert (snap / "git.txt").read_text().strip()
    env_txt = (snap / "env.txt").read_text()
    assert f"SLURM_JOB_ID={job_id}\n" in env_txt and "MASTER_PORT=" in env_txt
    assert f"output_dir: {out}" in (snap / "config.yaml").read_text()                  # resolved recipe
    ds = json.loads((snap / "ds_config.json").read_text())                             # filled for 2 ranks
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 3
    assert "NodeList=n[1-2]" in (snap / "job.txt").read_text()
    assert (snap / "slurm.out").resolve() == Path(f"{tmp_path}/slurm-{job_id}.out")
    reference["losses"] = dict(losses)
    print(f"local_cpu.sh on 2 nodes: {MAX_STEPS} steps in {elapsed:.0f} s (job {job_id})")


def test_preemption_requeue_resume(cluster, models, reference, tmp_path):
    out = tmp_path / "run"
    log_pattern = tmp_path / "slurm-*.out"
    stdout = tmp_path / "sbatch.out"
    t0 = time.time()
    with open(stdout, "w") as f:
        sbatch = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", f"--output={tmp_path}/slurm-%j.out", "slurm/local_cpu.sh",
             f"train.max_steps={MAX_STEPS}"],
            stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=cluster.env(**job_env(models, out)),
        )

    def wait_until(done, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not done(read_metrics(out / "metrics.jsonl")):
            assert sbatch.poll() is None, f"job ended before {what}:\n{stdout.read_text()}\n{log_of(log_pattern)[-6000:]}"
            assert time.time() < deadline, f"no {what} after {timeout} s:\n{log_of(log_pattern)[-6000:]}"
            time.sleep(0.2)

    def trained_after_resume(records: list[dict]) -> bool:
        resumes = [i for i, r in enumerate(records) if r.get("event") == "resume"]
        return bool(resumes) and any("loss" in r and "event" not in r for r in records[resumes[0] + 1:])

    try:
        # attempt 0, mid-run: what #SBATCH --signal=B:USR1@... sends before the time limit, to the batch shell
        wait_until(lambda recs: any(s >= 2 for s, _ in step_losses(recs)), "optimizer step 2")
        job_id = stdout.read_text().split()[0]
        cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
        # attempt 1, once it has trained a step: plain `scancel --signal=USR1`, which reaches the ranks instead
        wait_until(trained_after_resume, "step after the first resume")
        cluster.run(["scancel", "--signal=USR1", job_id])
        rc = sbatch.wait(timeout=400)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    log = log_of(log_pattern)
    assert rc == 0, f"sbatch --wait exit {rc}\n{log[-6000:]}"
    elapsed = time.time() - t0

    # each stop: every rank checkpointed, the job requeued itself (same job id), the next attempt skipped the
    # conversion and resumed from that checkpoint
    records = read_metrics(out / "metrics.jsonl")
    preempted = [r for r in records if r.get("event") == "preempted"]
    resumed = [r for r in records if r.get("event") == "resume"]
    assert len(preempted) == 2 and len(resumed) == 2, [r for r in records if "event" in r]
    stops = [r["step"] for r in preempted]
    assert 2 <= stops[0] < stops[1] < MAX_STEPS and [r["step"] for r in resumed] == stops
    assert preempted[0]["reason"] == "STOP file" and preempted[1]["reason"] == "SIGUSR1"
    assert "got SIGUSR1" in log and "the training processes got SIGUSR1" in log, log[-6000:]
    assert log.count(f"requeueing job {job_id}") == 2, log[-6000:]
    for attempt in (1, 2):
        assert f"job {job_id} attempt {attempt}:" in log
        assert "conversion skipped" in log.split(f"job {job_id} attempt {attempt}:")[1]
        assert (out / "run" / "slurm" / f"{job_id}.{attempt}").is_dir()
    launches = [json.loads(line) for line in (out / "run" / "launches.jsonl").read_text().splitlines()]
    assert [la["resumed_from"] and Path(la["resumed_from"]).name for la in launches] == \
        [None] + [f"step_{s:08d}" for s in stops]
    assert [la["env"].get("SLURM_RESTART_COUNT") for la in launches] == [None, "1", "2"]
    assert {la["env"]["SLURM_JOB_ID"] for la in launches} == {job_id}
    assert not (out / "STOP").exists()

    # finished from the checkpoints: no lost and no repeated step, and the export exists
    losses = step_losses(records)
    assert [s for s, _ in losses] == list(range(1, MAX_STEPS + 1)), [s for s, _ in losses]
    assert json.loads((out / "COMPLETED").read_text())["step"] == MAX_STEPS
    assert list((out / "final").glob("*.safetensors"))
    if "losses" in reference:  # the same recipe uninterrupted (test 1): resuming changed nothing
        for step, loss in losses:
            assert loss == pytest.approx(reference["losses"][step], rel=1e-5), f"step {step} (stops at {stops})"
    print(f"stopped at steps {stops}, requeued twice, resumed: {MAX_STEPS} steps in {elapsed:.0f} s (job {job_id})")


def test_stopped_on_two_nodes_finishes_on_one(cluster, models, reference, tmp_path):
    """A job stopped on 2 nodes (STOP file: checkpoint, no requeue) is submitted again with --nodes=1 and finishes:
    resume=auto sees the world-size change, converts the checkpoint to DeepSpeed's universal format once and
    continues with the same global batch and data position (micro 2 x accum 4 x 1 rank instead of x accum 2 x 2)."""
    out = tmp_path / "run"
    log_pattern = tmp_path / "slurm-*.out"
    stdout = tmp_path / "sbatch.out"
    with open(stdout, "w") as f:
        sbatch = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", f"--output={tmp_path}/slurm-%j.out", "slurm/local_cpu.sh",
             f"train.max_steps={MAX_STEPS}"],
            stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=cluster.env(**job_env(models, out)),
        )
    try:
        deadline = time.time() + 300
        while not any(s >= 2 for s, _ in step_losses(read_metrics(out / "metrics.jsonl"))):
            assert sbatch.poll() is None, f"job ended early:\n{log_of(log_pattern)[-6000:]}"
            assert time.time() < deadline, f"no step 2 after 300 s:\n{log_of(log_pattern)[-6000:]}"
            time.sleep(0.2)
        (out / "STOP").touch()
        assert sbatch.wait(timeout=300) == 0, log_of(log_pattern)[-6000:]
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    records = read_metrics(out / "metrics.jsonl")
    stop = [r["step"] for r in records if r.get("event") == "preempted"]
    assert len(stop) == 1 and stop[0] < MAX_STEPS and not (out / "COMPLETED").exists()

    proc = cluster.run(
        ["sbatch", "--wait", "--parsable", "--nodes=1", f"--output={tmp_path}/slurm-%j.out", "slurm/local_cpu.sh",
         f"train.max_steps={MAX_STEPS}"],
        timeout=600, check=False, **job_env(models, out), NPROC_PER_NODE="1",
    )
    log = log_of(log_pattern)
    assert proc.returncode == 0, f"sbatch --wait exit {proc.returncode}\n{proc.stderr}\n{log[-6000:]}"
    assert "1 node(s)" in log and "universal checkpoint, 2 -> 1 ranks" in log, log[-6000:]
    records = read_metrics(out / "metrics.jsonl")
    losses = step_losses(records)
    assert [s for s, _ in losses] == list(range(1, MAX_STEPS + 1)), [s for s, _ in losses]  # none lost or repeated
    assert json.loads((out / "COMPLETED").read_text())["step"] == MAX_STEPS
    state = json.loads((out / "checkpoints" / f"step_{MAX_STEPS:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["global_batch_size"] == 8
    if "losses" in reference:  # the uninterrupted 2-node run: the first resumed step sees the same weights + samples
        step, loss = losses[stop[0]]
        assert loss == pytest.approx(reference["losses"][step], rel=2e-2), (step, loss, reference["losses"][step])


# ------------------------------------------------------------------------------------- the study as a job array


STUDY = f"""\
base: {REPO / 'configs' / 'tiny_cpu.yaml'}
overrides:
  train.max_steps: 2
  train.save_every_steps: 0
  logging.tensorboard: false
  data.sources: [{{path: data/instruct/alpaca_en_demo.json, max_rows: 900}}]
seeds: [1, 2]
arms:
  dense: {{model.mode: dense}}
  emoe: {{model.mode: emoe}}
baseline: dense
primary: emoe_nll_alpaca_heldout/nll_per_token
eval: {{tasks: [emoe_nll_alpaca_heldout], limit: 4}}
slurm: {{sbatch_args: [--cpus-per-task=2, --time=00:20:00], nproc_per_node: 2}}
"""


def test_tiny_study_as_a_job_array(cluster, tmp_path):
    study, out = tmp_path / "study.yaml", tmp_path / "study"
    study.write_text(STUDY)
    proc = cluster.run([sys.executable, "-m", "emoe_llm.cli", "study", str(study), "--out", str(out),
                        "--launcher", "slurm"], timeout=300, check=False, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sbatch --parsable --array=0-3 " in proc.stdout and "--dependency=afterany:" in proc.stdout
    report = out / "report.json"
    deadline = time.time() + 1200
    while time.time() < deadline:
        if not cluster.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
            break
        time.sleep(1)  # polls squeue; the report job is the last one to leave it
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((out / "slurm").glob("*.out")))
    assert report.is_file(), f"no report after the jobs ended:\n{logs}\n{cluster.diagnostics()}"
    data = json.loads(report.read_text())
    assert data["rows"] == ["dense", "emoe", "emoe@masked"]
    nll = data["metrics"]["emoe_nll_alpaca_heldout/nll_per_token"]
    assert all(nll[row]["n"] == 2 for row in data["rows"]), nll
    paired = data["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]
    assert set(paired) == {"emoe", "emoe@masked"} and all(p["n_docs"] == 4 for p in paired.values())
    for cell in ("dense-s1", "emoe-s1", "dense-s2", "emoe-s2"):
        completed = json.loads((out / "cells" / cell / "COMPLETED").read_text())
        assert completed["step"] == 2, logs
        snapshots = list((out / "cells" / cell / "run" / "slurm").iterdir())  # slurm/common.sh's run snapshot
        assert snapshots and (snapshots[0] / "config.yaml").is_file(), logs
    # a rerun submits no array: every cell is done, only the report job
    proc = cluster.run([sys.executable, "-m", "emoe_llm.cli", "study", str(study), "--out", str(out),
                        "--launcher", "slurm", "--dry-run"], timeout=120, check=False, PYTHONPATH=str(REPO))
    assert proc.returncode == 0 and "4/4 cells already done; 0 in the array" in proc.stdout, proc.stdout
    assert "--array" not in proc.stdout
