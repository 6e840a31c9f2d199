"""``emoe-llm study STUDY.yaml --out DIR``: every (arm, seed) cell trained and evaluated, then the report.

    emoe-llm study configs/study_tiny.yaml --out runs/study_tiny                  # local: one cell after another
    emoe-llm study configs/study_tiny.yaml --out runs/study_tiny --launcher slurm --dry-run   # the sbatch lines
    emoe-llm study configs/study_smollm2.yaml --out runs/s model.path=$(scripts/get_smollm2.sh)  # + every cell

DIR holds the study it ran with (study.yaml, study.json), the shared conversions (converted/), and per cell
cells/<arm>-s<seed>/ (the training output_dir: checkpoints, metrics.jsonl, final/, eval/<mode>.json). Rerunning skips
finished cells and resumes interrupted ones (the recipe's resume=auto); a changed study file is refused unless the
changed cells are named (--cells) or --force is given.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..dirlock import DirBusyError, DirLock
from ..fileio import atomic_write_text
from .spec import Cell, Study, StudyError, eval_file, load_study

STUDY_JSON = "study.json"
INTERMIXED = True  # emoe_llm.cli: key=value overrides may come after --out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study file (configs/study_*.yaml; format in docs/study.md)")
    parser.add_argument("--out", required=True, help="study dir: cells, shared conversions, report")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local (default): cells one after another on this machine; slurm: one sbatch job "
                             "array (a task per cell) and a report job after it")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run (local: the commands; slurm: the sbatch lines, scripts written)")
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
        if not args.dry_run:  # one study per dir, held while ``run`` runs (each cell locks its own run dir)
            _study_lock.append(DirLock(out, what="study dir").acquire())
        changed = check_changes(study, out, named=selected if args.cells else [], force=args.force)
        if args.launcher == "slurm":
            from .slurm import submit

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


# --------------------------------------------------------------------------------------------------------------------
# the study dir remembers what it ran


def cell_record(study: Study, cell: Cell) -> dict:
    """What a cell's results depend on: its resolved recipe (base file content included) and the eval."""
    from ..train.config import config_to_dict

    return {"arm": cell.arm, "seed": cell.seed, "overrides": cell.overrides, "trains_emoe": cell.trains_emoe,
            "rows": {mode: cell.row(mode) for mode in cell.eval_modes()},
            "recipe": config_to_dict(cell.config), "eval": study.to_dict()["eval"]}


def check_changes(study: Study, out: Path, *, named: list[Cell], force: bool) -> list[str]:
    """Cells of an earlier run of DIR whose recipe or eval differ now. Refused (StudyError) unless each is named or
    --force is given; returns them so their old results can be cleared. New cells are not changes."""
    stored_path = out / STUDY_JSON
    if not stored_path.is_file():
        return []
    stored = json.loads(stored_path.read_text())["cells"]
    changed = [c.name for c in study.cells if c.name in stored and stored[c.name] != cell_record(study, c)]
    unnamed = [n for n in changed if n not in {c.name for c in named}]
    if unnamed and not force:
        raise StudyError(f"{study.path} differs from the study {out} ran ({out / 'study.yaml'}) for cell(s) "
                         f"{', '.join(unnamed)}: name them with --cells to run them again, pass --force, or use "
                         "another --out")
    return changed


def record_study(study: Study, out: Path, changed: list[str]) -> None:
    """Write study.yaml / study.json (atomically) and clear the old results of changed cells."""
    out.mkdir(parents=True, exist_ok=True)
    stored_path = out / STUDY_JSON
    stored = json.loads(stored_path.read_text())["cells"] if stored_path.is_file() else {}
    for name in changed:
        old, new = stored[name], cell_record(study, study.cell(name))
        cell_dir = out / "cells" / name
        if old["recipe"] != new["recipe"] or old["arm"] != new["arm"]:
            print(f"[study] {name}: the recipe changed; removing its old run {cell_dir}", flush=True)
            shutil.rmtree(cell_dir, ignore_errors=True)
        else:
            print(f"[study] {name}: the eval changed; removing its old eval JSONs", flush=True)
            shutil.rmtree(cell_dir / "eval", ignore_errors=True)
    stored.update({c.name: cell_record(study, c) for c in study.cells})
    atomic_write_text(out / "study.yaml", yaml.safe_dump(study.to_dict(), sort_keys=False))
    atomic_write_text(stored_path, json.dumps({"study": study.to_dict(), "cells": stored,
                                               "order": [c.name for c in study.cells]}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# models: the conversions are shared between the cells that need the same one


def prepare_models(study: Study, out: Path, cells: list[Cell]) -> dict[str, str]:
    """cell name -> the model.path it trains from: the dense checkpoint itself (no emoe: section, or a converted
    model.path that already is the cell's conversion), else the shared conversion out/converted/<key>, made once
    through ``prepare_emoe_checkpoint``. A recipe that builds the tiny demo model gets the tiny *dense* model built
    in out/models/ instead, so that every arm (kmeans, random, ...) converts the same weights."""
    from ..convert.errors import ConversionError
    from ..convert.prepare import conversion_key, existing_key, key_differences, prepare_emoe_checkpoint

    check_models(study, cells)
    models, done = {}, {}
    for cell in cells:
        cfg = cell.config
        src = Path(cfg.model.path)
        if cfg.model.build_tiny_if_missing:
            src = build_tiny_dense(out / "models" / "tiny_dense")
        if cfg.emoe is None:
            models[cell.name] = str(src)
            continue
        e = cfg.emoe
        try:
            want = conversion_key(src, n_experts=e.n_experts, layers=e.layers, permute_layers=e.permute_layers,
                                  seed=e.seed, method=e.method)
        except (ConversionError, ValueError) as err:
            raise StudyError(f"{study.path}: arm '{cell.arm}': {err}") from None
        have = existing_key(src)
        if have is not None:
            if key_differences(have, want, permute_layers_given=e.permute_layers is not None):
                raise StudyError(f"{study.path}: arm '{cell.arm}': model.path {src} is already another EMoE "
                                 "conversion; give the dense checkpoint as model.path so the study converts it "
                                 "for every arm")
            models[cell.name] = str(src)
            continue
        dst = conversion_dir(out, e)
        if str(dst) not in done:
            print(f"[study] conversion for arm '{cell.arm}': {src} -> {dst}", flush=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                done[str(dst)] = prepare_emoe_checkpoint(src, dst, **e.conversion(), overwrite=True, resume=True,
                                                         progress=False, log=lambda m: print(f"[study] {m}"))
            except (ConversionError, ValueError) as err:
                raise StudyError(f"{study.path}: arm '{cell.arm}': conversion of {src} failed: {err}") from None
        models[cell.name] = str(dst)
    return models


def planned_model(study: Study, out: Path, cell: Cell) -> str:
    """The model.path a cell would train from, without building or converting anything (--dry-run)."""
    cfg = cell.config
    src = out / "models" / "tiny_dense" if cfg.model.build_tiny_if_missing else Path(cfg.model.path)
    if cfg.emoe is None:
        return str(src)
    from ..convert.prepare import existing_key

    return str(src if existing_key(src) is not None else conversion_dir(out, cfg.emoe))


def check_models(study: Study, cells: list[Cell]) -> None:
    """Every model.path is an HF checkpoint dir (or the tiny model the study builds), before anything is created."""
    for cell in cells:
        path = Path(cell.config.model.path)
        if not cell.config.model.build_tiny_if_missing and not (path / "config.json").is_file():
            raise StudyError(f"{study.path}: arm '{cell.arm}': model.path {path}: config.json not found (expected "
                             "an HF checkpoint dir; e.g. model.path=$(scripts/get_smollm2.sh) after the study file)")


def conversion_dir(out: Path, emoe) -> Path:
    """out/converted/<method>-n<N>-l<permuted layer spec>-s<seed>: the weight-changing settings name it."""
    spec = str(emoe.permute_layers if emoe.permute_layers is not None else emoe.layers)
    spec = "".join(ch if ch.isalnum() else "-" for ch in spec.replace(" ", ""))
    return out / "converted" / f"{emoe.method}-n{emoe.n_experts}-l{spec}-s{emoe.seed}"


def build_tiny_dense(path: Path) -> Path:
    """The demo's tiny dense Llama (random weights, the shipped 2k-vocab tokenizer), built once, atomically."""
    if (path / "config.json").is_file():
        return path
    import tempfile

    from ..tiny import DATA_DIR, save_tiny_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny_build.", dir=path.parent) as tmp:
        built = save_tiny_checkpoint(Path(tmp) / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style",
                                     seed=0)
        built.rename(path)
    print(f"[study] built the tiny dense model {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------------------------------
# the local launcher


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.name


def eval_path(out: Path, cell: Cell, mode: str, index: int = 0) -> Path:
    return cell_dir(out, cell) / "eval" / eval_file(mode, index)


def eval_runs(study: Study, cell: Cell) -> list[tuple[str, int]]:
    """(mode, eval index) of every `emoe-llm eval` run of a cell."""
    return [(m, i) for m in cell.eval_modes() for i in range(len(study.evals))]


def cell_done(study: Study, out: Path, cell: Cell) -> bool:
    return (cell_dir(out, cell) / "COMPLETED").is_file() and all(
        eval_path(out, cell, m, i).is_file() for m, i in eval_runs(study, cell))


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
