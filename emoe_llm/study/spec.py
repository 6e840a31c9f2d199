"""The study file: which recipe, which arms, which seeds, which eval -- checked as a whole before anything runs.

    base: configs/tiny_cpu.yaml                # the recipe every cell starts from
    overrides: [train.max_steps=8]             # key=value for every cell (train.py's language)
    seeds: [1, 2]
    arms:                                      # name -> recipe overrides (a mapping or a key=value list)
      dense:  {model.mode: dense}
      emoe:   {model.mode: emoe}
      random: {model.mode: emoe, emoe.method: random}
    baseline: dense                            # paired differences are taken against this arm
    primary: emoe_mmlu/acc                     # the one metric the study is for (named before it runs)
    eval: {tasks: [emoe_mmlu], include_path: null, limit: 20, num_fewshot: null, batch_size: 8}
    # or a list of such mappings, one `emoe-llm eval` run each (e.g. another --limit for MMLU's 57 subjects)

A cell is (arm, seed): the base recipe + ``overrides`` + the arm's overrides + ``seed=S``. The seed is the recipe's one
seed (data order, held-out split, init of anything new), so every arm sees the same batches for the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..train.config import ConfigError, RecipeConfig, load_config

STUDY_KEYS = ("base", "overrides", "seeds", "arms", "baseline", "primary", "eval", "ds_config", "nproc", "slurm")
EVAL_KEYS = ("tasks", "include_path", "limit", "num_fewshot", "batch_size")
SLURM_KEYS = ("sbatch_args", "nproc_per_node")
MASKED_SUFFIX = "@masked"  # the row of an EMoE-trained arm scored with the expert mask (the arm's own row is dense)
METRIC = re.compile(r"^[^/\s]+/[^/\s]+$")  # <task or group>/<metric>[<filter>]
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def eval_file(mode: str, index: int) -> str:
    """A cell's eval JSON name: <mode>.json for the study's first eval, <mode>.<i>.json for the i-th."""
    return f"{mode}.json" if index == 0 else f"{mode}.{index}.json"


class StudyError(ValueError):
    """A bad study file: one line naming the file, the arm or key, and what was expected."""


@dataclass
class EvalSpec:
    tasks: list[str]
    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int | None = None

    def args(self) -> list[str]:
        """``emoe-llm eval`` options (checkpoint, --mode and --output are the cell's)."""
        out = ["--tasks", ",".join(self.tasks)]
        for flag, value in (("--include-path", self.include_path), ("--num-fewshot", self.num_fewshot),
                            ("--limit", self.limit), ("--batch-size", self.batch_size)):
            if value is not None:
                out += [flag, str(value)]
        return out


@dataclass
class Cell:
    arm: str
    seed: int
    overrides: list[str]
    """every recipe override of this cell after the base file, in order (study, arm, seed)"""
    config: RecipeConfig
    """the resolved recipe (model.path before the study's shared conversion)"""
    trains_emoe: bool

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"

    def eval_modes(self) -> list[str]:
        """An EMoE-trained cell is scored dense (as the paper's evaluation and a plain HF load see the export) and
        masked (its training mode)."""
        return ["dense", "emoe"] if self.trains_emoe else ["dense"]

    def row(self, mode: str) -> str:
        return self.arm + (MASKED_SUFFIX if self.trains_emoe and mode == "emoe" else "")


@dataclass
class Study:
    path: str
    base: str
    overrides: list[str]
    seeds: list[int]
    arms: dict[str, list[str]]
    baseline: str
    evals: list[EvalSpec]
    primary: str | None = None
    ds_config: str | None = None
    nproc: int | None = None
    slurm: dict = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The study as written to the study dir (arms as key=value lists, the command line's overrides folded in)."""
        return {"base": self.base, "overrides": self.overrides, "seeds": self.seeds, "arms": self.arms,
                "baseline": self.baseline, "primary": self.primary,
                "eval": [dataclasses.asdict(e) for e in self.evals], "ds_config": self.ds_config,
                "nproc": self.nproc, "slurm": self.slurm}

    def tasks(self) -> list[str]:
        return [t for e in self.evals for t in e.tasks]

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise StudyError(f"no cell '{name}' in {self.path}; cells: {', '.join(c.name for c in self.cells)}")

    def rows(self) -> list[str]:
        """Report rows in arm order: each arm, then its @masked row when it trains EMoE."""
        out = []
        for arm in self.arms:
            cell = next(c for c in self.cells if c.arm == arm)
            out += [cell.row(m) for m in cell.eval_modes()]
        return out


def _as_overrides(value: Any, where: str) -> list[str]:
    """A mapping {key: value} or a list of 'key=value' strings -> 'key=value' strings (values JSON, which the
    recipe's override parser reads as YAML)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={_override_value(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise StudyError(f"{where}: expected a mapping of recipe keys (model.mode: dense) or a list of key=value "
                     f"strings, got {value!r}")


def _override_value(value: Any) -> str:
    """A value as the recipe's override parser (YAML) reads it back unchanged: plain when it does ("dense", 16),
    else JSON ("28:2" would read as the sexagesimal integer 1682)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def load_study(path: str | Path, extra_overrides: list[str] = ()) -> Study:
    """Read and validate the whole study file: every cell's recipe resolves through the recipe's own loader. Raises
    StudyError naming the file and the arm or key; creates nothing."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"{path}: study file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return study_from_dict(doc, source=str(path), extra_overrides=extra_overrides)


def study_from_dict(doc: Any, *, source: str, extra_overrides: list[str] = ()) -> Study:
    if not isinstance(doc, dict):
        raise StudyError(f"{source}: the top level must be a mapping with keys {', '.join(STUDY_KEYS)}")
    unknown = sorted(set(doc) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(STUDY_KEYS)}")
    for key in ("base", "seeds", "arms", "baseline", "primary", "eval"):
        if doc.get(key) in (None, "", [], {}):
            raise StudyError(f"{source}: '{key}' is missing (see docs/study.md for the format)")
    base = str(doc["base"])
    if not Path(base).is_file():
        raise StudyError(f"{source}: base: recipe {base} not found (paths are relative to the directory you run "
                         "emoe-llm study from, as in train.py)")
    seeds = doc["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise StudyError(f"{source}: seeds: expected a list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{source}: seeds: {seeds} repeats a seed")
    arms_doc = doc["arms"]
    if not isinstance(arms_doc, dict):
        raise StudyError(f"{source}: arms: expected a mapping name -> recipe overrides, got {arms_doc!r}")
    arms = {}
    for name, value in arms_doc.items():
        name = str(name)
        if not NAME.match(name) or MASKED_SUFFIX in name:
            raise StudyError(f"{source}: arm '{name}': names use letters, digits and _ . + - only")
        arms[name] = _as_overrides(value, f"{source}: arm '{name}'")
    baseline = str(doc["baseline"])
    if baseline not in arms:
        raise StudyError(f"{source}: baseline '{baseline}' is not an arm; arms: {', '.join(arms)}")
    overrides = _as_overrides(doc.get("overrides"), f"{source}: overrides") + list(extra_overrides)
    bad = [o for o in overrides + [o for a in arms.values() for o in a]
           if o.partition("=")[0].strip() in ("seed", "output_dir", "resume")]
    if bad:
        raise StudyError(f"{source}: {bad[0]}: the study sets seed, output_dir and resume of every cell itself")
    study = Study(path=source, base=base, overrides=overrides, seeds=seeds, arms=arms, baseline=baseline,
                  evals=[_eval_spec(e, source) for e in (doc["eval"] if isinstance(doc["eval"], list)
                                                          else [doc["eval"]])], ds_config=doc.get("ds_config"),
                  nproc=_positive(doc.get("nproc"), f"{source}: nproc"), slurm=_slurm(doc.get("slurm"), source))
    if study.ds_config is not None and not Path(study.ds_config).is_file():
        raise StudyError(f"{source}: ds_config: {study.ds_config} not found")
    study.primary = _primary(doc["primary"], study, source)
    study.cells = [_cell(study, arm, seed) for seed in seeds for arm in arms]
    return study


def _primary(value: Any, study: Study, source: str) -> str:
    """The primary metric: '<task>/<metric>' of a task the study evaluates (a group counts: emoe_mmlu/acc)."""
    if not isinstance(value, str) or not METRIC.match(value):
        raise StudyError(f"{source}: primary: expected one metric as <task>/<metric> (e.g. "
                         f"{study.tasks()[0]}/acc), got {value!r}")
    task = value.split("/")[0]
    if task not in study.tasks():
        raise StudyError(f"{source}: primary: {value} names task {task}, which the eval does not run; eval tasks: "
                         f"{', '.join(study.tasks())}")
    return value


def _cell(study: Study, arm: str, seed: int) -> Cell:
    overrides = study.overrides + study.arms[arm] + [f"seed={seed}"]
    try:
        cfg = load_config(study.base, overrides)
    except ConfigError as e:
        raise StudyError(f"{study.path}: arm '{arm}': {e}") from None
    return Cell(arm=arm, seed=seed, overrides=overrides, config=cfg, trains_emoe=cfg.model.mode == "emoe")


def _positive(value, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudyError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _eval_spec(doc: Any, source: str) -> EvalSpec:
    if not isinstance(doc, dict):
        raise StudyError(f"{source}: eval: expected a mapping with keys {', '.join(EVAL_KEYS)}, got {doc!r}")
    unknown = sorted(set(doc) - set(EVAL_KEYS))
    if unknown:
        raise StudyError(f"{source}: eval: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(EVAL_KEYS)}")
    tasks = doc.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise StudyError(f"{source}: eval.tasks: expected a non-empty list of task names, got {tasks!r}")
    limit = doc.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise StudyError(f"{source}: eval.limit: expected a positive integer (examples per task) or null, "
                         f"got {limit!r}")
    include = doc.get("include_path")
    if include is not None and not Path(include).is_dir():
        raise StudyError(f"{source}: eval.include_path: {include} is not a directory")
    fewshot = doc.get("num_fewshot")
    if fewshot is not None and (isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0):
        raise StudyError(f"{source}: eval.num_fewshot: expected an integer >= 0 or null, got {fewshot!r}")
    return EvalSpec(tasks=tasks, include_path=include, limit=limit, num_fewshot=fewshot,
                    batch_size=_positive(doc.get("batch_size"), f"{source}: eval.batch_size"))


def _slurm(doc: Any, source: str) -> dict:
    if doc is None:
        return {}
    if not isinstance(doc, dict) or set(doc) - set(SLURM_KEYS):
        raise StudyError(f"{source}: slurm: expected a mapping with keys {', '.join(SLURM_KEYS)}, got {doc!r}")
    args = doc.get("sbatch_args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) and a.startswith("--") for a in args):
        raise StudyError(f"{source}: slurm.sbatch_args: expected a list of sbatch options (--nodes=2), got {args!r}")
    return {"sbatch_args": args, "nproc_per_node": _positive(doc.get("nproc_per_node"),
                                                             f"{source}: slurm.nproc_per_node")}
