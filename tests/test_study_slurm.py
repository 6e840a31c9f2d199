"""`emoe-llm study --launcher slurm` on a real local Slurm cluster (tests/slurm_cluster.py): the tiny model, 2 arms x
2 seeds as one `sbatch --array=0-3` job through slurm/common.sh, then the report job (`--dependency=afterany`)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from slurm_cluster import REPO
from test_slurm import cluster  # noqa: F401 - the module-scoped local cluster fixture

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

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
    assert data["rows"] == ["dense", "emoe", "emoe@dense"]
    nll = data["metrics"]["emoe_nll_alpaca_heldout/nll_per_token"]
    assert all(nll[row]["n"] == 2 for row in data["rows"]), nll
    assert set(data["paired"]["emoe_nll_alpaca_heldout/nll_per_token"]) == {"emoe", "emoe@dense"}
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
