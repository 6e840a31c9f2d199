"""``emoe-llm study STUDY.yaml --out DIR``: every (arm, seed) cell trained and evaluated, then the report.

    emoe-llm study configs/study_tiny.yaml --out runs/study_tiny                  # local: one cell after another
    emoe-llm study configs/study_tiny.yaml --out runs/study_tiny --launcher slurm --dry-run   # the sbatch lines
    emoe-llm study configs/study_smollm2.yaml --out runs/s model.path=$(scripts/get_smollm2.sh)  # + every cell
    emoe-llm study configs/study_tiny.yaml --out runs/bigger --dry-run --pilot runs/study_tiny   # its MDE, planned

DIR holds the study it ran with (study.yaml, study.json), the shared conversions (converted/), and per cell
cells/<arm>-s<seed>/ (the training output_dir: checkpoints, metrics.jsonl, final/, eval/<mode>.json). Rerunning skips
finished cells and resumes interrupted ones (the recipe's resume=auto); a changed study file is refused unless the
changed cells are named (--cells) or --force is given.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..dirlock import DirBusyError, DirLock
from .cells import (
    cell_dir, cell_done, check_changes, check_models, eval_path, planned_model, prepare_models, record_study,
)
from .slurm import submit
from .spec import Cell, Study, StudyError, load_study

INTERMIXED = True  # emoe_llm.cli: key=value overrides may come after --out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study file (configs/study_*.yaml; format in docs/study.md)")
    parser.add_argument("--out", required=True, help="study dir: cells, shared conversions, report")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local (default): cells one after another on this machine; slurm: one sbatch job "
                             "array (a task per cell) and a report job after it")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run (local: the commands; slurm: the sbatch lines, scripts written)")
    parser.add_argument("--pilot", default=None, metavar="DIR",
                        help="with --dry-run: a finished study dir whose variance predicts this study's minimum "
                             "detectable effect (more documents or seeds -> smaller)")
    parser.add_argument("--force", action="store_true",
                        help="accept a changed study file: cells whose recipe or eval changed are run again")
    parser.add_argument("--cells", default=None,
                        help="comma-separated cells (arm-sSEED) to run; also names the changed cells to run again")
    parser.add_argument("--nproc", type=int, default=None,
                        help="training processes per cell (local launcher; default: the study's nproc, else "
                             "emoe-llm train's default)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides for every cell "
                                                     "(after the study's), e.g. model.path=/models/smollm2")


_study_lock: list[DirLock] = []  # the study dir's lock while ``run`` runs


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    finally:
        while _study_lock:
            _study_lock.pop().release()


def _run(args: argparse.Namespace) -> int:
    try:
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise StudyError(f"unexpected argument(s) {bad}: trailing arguments are key=value recipe overrides")
        study = load_study(args.study, args.overrides)
        selected = select_cells(study, args.cells)
        out = Path(args.out)
        # One whole-study run per dir, held while ``run`` runs. A --cells run (a Slurm array task: its siblings run
        # at the same time in the same study dir) takes no study lock; its cells' training still locks each run dir.
        if not args.dry_run and not args.cells:
            _study_lock.append(DirLock(out, what="study dir").acquire())
        changed = check_changes(study, out, named=selected if args.cells else [], force=args.force)
        if args.pilot:
            if not args.dry_run:
                raise StudyError("--pilot sizes a planned study: use it with --dry-run")
            from .power import format_plan, plan_from_pilot

            print(format_plan(plan_from_pilot(study, Path(args.pilot)), Path(args.pilot)))
        if args.launcher == "slurm":
            return submit(study, out, selected, changed=changed, dry_run=args.dry_run)
        if args.dry_run:
            for cell in selected:
                model = planned_model(study, out, cell)
                print(" ".join(shlex.quote(c) for c in train_command(study, cell, out, model, args.nproc)))
            return 0
        check_models(study, selected)
        record_study(study, out, changed)
        models = prepare_models(study, out, selected)
    except (StudyError, DirBusyError) as e:
        print(f"emoe-llm study: error: {e}", file=sys.stderr)
        return 2
    rc = run_cells_local(study, out, selected, models, nproc=args.nproc or study.nproc)
    if rc == 0 and not args.no_report:
        from .report import write_report

        write_report(out)
    return rc


def select_cells(study: Study, names: str | None) -> list[Cell]:
    if not names:
        return list(study.cells)
    return [study.cell(n.strip()) for n in names.split(",") if n.strip()]


def train_command(study: Study, cell: Cell, out: Path, model_path: str, nproc: int | None) -> list[str]:
    """The `emoe-llm train` command a user would type for this cell."""
    cmd = [sys.executable, "-m", "emoe_llm.cli", "train"]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    cmd += ["--config", study.base]
    if study.ds_config:
        cmd += ["--ds_config", study.ds_config]
    return cmd + [*cell.overrides, f"model.path={model_path}", f"output_dir={cell_dir(out, cell)}", "resume=auto"]


def eval_command(study: Study, cell: Cell, out: Path, modes: list[str], index: int) -> list[str]:
    """One `emoe-llm eval` for every mode of a cell (emoe,dense: one process, a JSON per mode)."""
    return [sys.executable, "-m", "emoe_llm.cli", "eval", str(cell_dir(out, cell) / "final"),
            *study.evals[index].args(), "--mode", ",".join(modes),
            "--output", str(eval_path(out, cell, "{mode}", index))]


def run_cells_local(study: Study, out: Path, cells: list[Cell], models: dict[str, str], *, nproc: int | None) -> int:
    todo = [c for c in cells if not cell_done(study, out, c)]
    print(f"[study] {len(cells) - len(todo)}/{len(cells)} cells already done; {len(todo)} to run", flush=True)
    t0, finished = time.monotonic(), 0
    for cell in todo:
        rc = run_cell(study, cell, out, models[cell.name], nproc=nproc)
        if rc != 0:
            return rc
        finished += 1
        per_cell = (time.monotonic() - t0) / finished
        done = len(cells) - len(todo) + finished
        print(f"[study] {done}/{len(cells)} cells done; ETA {_duration(per_cell * (len(todo) - finished))}",
              flush=True)
    return 0


def run_cell(study: Study, cell: Cell, out: Path, model_path: str, *, nproc: int | None) -> int:
    """Train (resuming what an interrupted run left) unless COMPLETED, then every missing eval. The subprocesses'
    output goes to cells/<cell>/logs/; a failure prints the tail of the log."""
    d = cell_dir(out, cell)
    logs = d / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = []
    if not (d / "COMPLETED").is_file():
        steps.append(("train", train_command(study, cell, out, model_path, nproc), logs / "train.log"))
    for i in range(len(study.evals)):
        modes = [m for m in cell.eval_modes() if not eval_path(out, cell, m, i).is_file()]
        if modes:
            steps.append((f"eval --mode {','.join(modes)}" + (f" (eval {i})" if i else ""),
                          eval_command(study, cell, out, modes, i), logs / f"eval{f'.{i}' if i else ''}.log"))
    for what, cmd, log in steps:
        t0 = time.monotonic()
        print(f"[study] {cell.name}: {what} (log: {log})", flush=True)
        with open(log, "a") as f:
            f.write("+ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = "\n".join(log.read_text().splitlines()[-20:])
            print(f"{tail}\n[study] {cell.name}: {what} failed (exit {rc}); log: {log}. Fix it and rerun the same "
                  "command: finished cells are kept, this one resumes", file=sys.stderr, flush=True)
            return rc
        print(f"[study] {cell.name}: {what} done in {_duration(time.monotonic() - t0)}", flush=True)
    return 0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
