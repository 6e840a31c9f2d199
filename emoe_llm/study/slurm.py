"""``emoe-llm study --launcher slurm``: one ``sbatch --array`` job (a task per cell) and a report job after it.

Each array task is one cell through the project's Slurm wrapper (slurm/common.sh): the run snapshot, the preemption
trap (``--signal=B:USR1@60``: checkpoint, ``scontrol requeue``, resume from the checkpoint), then ``emoe-llm study
--cells <cell>`` on the study dir for the evals (training is COMPLETED by then, so it only evaluates). The report job
(``--dependency=afterany`` on the array) writes the report from whatever cells finished.

    DIR/slurm/cell.sh     the array job (the cell of task i is in its case statement)
    DIR/slurm/report.sh   the report job
    DIR/slurm/*.out       the logs (%A_%a per array task)
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from ..fileio import atomic_write_text
from .cells import cell_done, check_models, planned_model, prepare_models, record_study
from .spec import Cell, Study, StudyError

HEADER = """#!/bin/bash
# Written by `emoe-llm study --launcher slurm`: task i of the array trains and evaluates cell i of the study.
#SBATCH --job-name=emoe-study
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts NPROC_PER_NODE workers
#SBATCH --signal=B:USR1@60             # 60 s before the time limit: checkpoint, requeue, resume (slurm/common.sh)
#SBATCH --requeue
#SBATCH --open-mode=append             # a requeued attempt appends to the same log
#SBATCH --output={logs}/cell-%A_%a.out
set -euo pipefail
"""

CELL_BODY = """
RECIPE={recipe}
DS_CONFIG={ds_config}
OUTPUT_DIR={cells}/$CELL
export RECIPE DS_CONFIG EMOE_ROOT={root}
{nproc}# shellcheck source=slurm/common.sh
source "$EMOE_ROOT/slurm/common.sh"
if [ ! -f "$OUTPUT_DIR/COMPLETED" ]; then
  emoe_snapshot "$RECIPE" "$DS_CONFIG" output_dir="$OUTPUT_DIR" model.path="$MODEL_PATH" resume=auto "$@"
  # shellcheck disable=SC2016
  emoe_run srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=1 \\
    bash -c 'trap "" USR1; exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \\
      --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" train.py "$@"' torchrun \\
    --ds_config "$DS_CONFIG" --config "$RECIPE" output_dir="$OUTPUT_DIR" model.path="$MODEL_PATH" resume=auto "$@"
fi
[ -f "$OUTPUT_DIR/COMPLETED" ] || exit 0   # stopped and not requeued (see the log above)
"$PYTHON" -m emoe_llm.cli study {study_file} --out {out} --cells "$CELL" --no-report
"""

REPORT = """#!/bin/bash
# Written by `emoe-llm study --launcher slurm`: the report of the study once the array job has ended.
#SBATCH --job-name=emoe-study-report
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --output={logs}/report-%j.out
set -euo pipefail
cd {root}
if [ -z "${{VIRTUAL_ENV:-}}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091  # the environment's own script (absent where the venv lives elsewhere)
  source .venv/bin/activate
fi
"${{PYTHON:-python}}" -m emoe_llm.cli report {out}
"""


def write_scripts(study: Study, out: Path, cells: list[Cell], models: dict[str, str]) -> tuple[Path, Path]:
    root = Path.cwd().resolve()
    out = out.resolve()
    logs = out / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    q = shlex.quote
    cases = []
    for i, cell in enumerate(study.cells):
        if cell not in cells:
            continue
        args = " ".join(q(o) for o in cell.overrides)
        cases.append(f"  {i}) CELL={q(cell.name)}; MODEL_PATH={q(str(Path(models[cell.name]).resolve()))}; "
                     f"set -- {args} ;;")
    nproc = study.slurm.get("nproc_per_node")
    script = (HEADER.format(logs=logs)
              + 'case "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array}" in\n' + "\n".join(cases)
              + '\n  *) echo "no cell for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;\nesac\n'
              + CELL_BODY.format(recipe=q(study.base), ds_config=q(study.ds_config or "ds_configs/z3.json"),
                                 cells=q(str(out / "cells")), root=q(str(root)),
                                 nproc=f"export NPROC_PER_NODE=${{NPROC_PER_NODE:-{nproc}}}\n" if nproc else "",
                                 study_file=q(str(out / "study.yaml")), out=q(str(out))))
    cell_sh, report_sh = logs / "cell.sh", logs / "report.sh"
    atomic_write_text(cell_sh, script)
    atomic_write_text(report_sh, REPORT.format(logs=logs, root=q(str(root)), out=q(str(out))))
    return cell_sh, report_sh


def submit(study: Study, out: Path, selected: list[Cell], *, changed: list[str], dry_run: bool) -> int:
    """Write the scripts, then (unless ``dry_run``) submit the array and the report job; prints the sbatch lines."""
    todo = [c for c in selected if not cell_done(study, out, c)]
    if dry_run:
        models = {c.name: planned_model(study, out, c) for c in todo}
    else:
        check_models(study, todo)
        record_study(study, out, changed)
        models = prepare_models(study, out, todo)
    cell_sh, report_sh = write_scripts(study, out, todo, models)
    indices = ",".join(str(study.cells.index(c)) for c in todo)
    if todo and indices == ",".join(str(i) for i in range(len(todo))):
        indices = f"0-{len(todo) - 1}"
    array = ["sbatch", "--parsable", f"--array={indices}", *study.slurm.get("sbatch_args", []), str(cell_sh)]
    print(f"[study] {len(selected) - len(todo)}/{len(selected)} cells already done; {len(todo)} in the array",
          flush=True)
    if dry_run:
        if todo:
            print(" ".join(shlex.quote(a) for a in array))
        print(" ".join(["sbatch", "--parsable", *(["--dependency=afterany:<array job id>"] if todo else []),
                        str(report_sh)]))
        return 0
    dependency = []
    if todo:
        array_id = _sbatch(array)
        print(f"[study] submitted the array job {array_id}: {len(todo)} cell(s), logs {cell_sh.parent}", flush=True)
        dependency = [f"--dependency=afterany:{array_id}"]
    report_id = _sbatch(["sbatch", "--parsable", *dependency, str(report_sh)])
    print(f"[study] submitted the report job {report_id} ({out / 'report.md'} when it ends)", flush=True)
    return 0


def _sbatch(cmd: list[str]) -> str:
    print("+ " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise StudyError("sbatch not found: --launcher slurm needs a Slurm login node (or use --launcher local)") \
            from None
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise StudyError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip().split(";")[0]
