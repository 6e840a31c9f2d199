"""A study dir's state, shared by both launchers (``run``: local, ``slurm``: a job array): what it ran with
(study.json), the models its cells train from (shared conversions), and which cells are done.

Kept apart from ``run`` so that ``slurm`` (which ``run`` calls for ``--launcher slurm``) imports these without
importing ``run``: no import circle between the two launchers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ..fileio import atomic_write_text
from .spec import Cell, Study, StudyError, eval_file

STUDY_JSON = "study.json"


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
