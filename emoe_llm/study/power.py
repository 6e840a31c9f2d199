"""Sizing a study before paying for it: the MDE a planned study would have, from a finished pilot's variance.

    emoe-llm study configs/study_smollm2.yaml --out runs/s2 --dry-run --pilot runs/study_smollm2

The pilot's report gives, for each metric and arm, the seed, document and residual variance components of the paired
differences (stats.two_way). A planned study with S seeds and D documents per task then has the standard error and
degrees of freedom of ``stats.planned(components, S, D)``, and its minimum detectable effect at 80% power follows.
More documents shrink the document and residual parts, more seeds the seed part: the table shows which buys more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .report import build_report
from .spec import MASKED_SUFFIX, Study, StudyError
from .stats import mde80, planned, two_way


def planned_docs(task: str, study: Study, sizes: dict[str, int], groups: dict[str, list[str]]) -> int | None:
    """Documents the planned study scores for ``task`` (a group: its tasks pooled); lm-eval's limit is per task."""
    spec = next((e for e in study.evals if task in e.tasks), None)
    if spec is None:
        return None

    def count(name: str) -> int | None:
        if name in sizes:
            return min(sizes[name], spec.limit) if spec.limit else sizes[name]
        subs = [count(s) for s in groups.get(name, [])]
        return sum(subs) if subs and None not in subs else None

    return count(task)


def plan_from_pilot(study: Study, pilot: Path) -> list[dict]:
    """One entry per (metric, arm) of the pilot that the planned study also measures: the pilot's size and MDE, the
    planned size and MDE."""
    if (pilot / "study.json").is_file():
        report = build_report(pilot)
    elif (pilot / "report.json").is_file():  # a committed results dir (benchmarks/results/...): its report alone
        report = _saved_report(pilot / "report.json")
    else:
        raise StudyError(f"--pilot {pilot}: neither study.json (a finished `emoe-llm study --out` dir) nor "
                         "report.json (a study's saved report) there")
    if not report["paired"]:
        raise StudyError(f"--pilot {pilot}: no paired results yet (are its cells evaluated?)")
    sizes, groups = report["tasks"]["documents"], report["tasks"]["groups"]
    plan = []
    for metric, by_row in report["paired"].items():
        docs = planned_docs(metric.split("/", 1)[0], study, sizes, groups)
        for row, p in by_row.items():
            entry = {"metric": metric, "row": row, "pilot_seeds": p["n_seeds"], "pilot_docs": p["n_docs"],
                     "pilot_mde80": p["mde80"], "seeds": len(study.seeds), "docs": docs, "mde80": None,
                     "share_seed": p["share_seed"], "share_doc": p["share_doc"], "primary": metric == study.primary}
            if docs and p["var_resid"] is not None:  # the pilot has per-document records and several seeds
                se, df = planned({k: p[k] for k in ("var_seed", "var_doc", "var_resid")}, len(study.seeds), docs)
                entry["mde80"] = mde80(se, df)
            elif p["var_seed"] and p["var_doc"] is None and len(study.seeds) > 1:  # 0: no variation, no plan
                # a seeds-only pilot: the spread of its per-seed differences, as if the documents were fixed (one
                # "document"). The document-sampling part is not in it: a lower bound, and the table says so.
                entry["mde80"] = mde80(*planned({"var_seed": p["var_seed"]}, len(study.seeds), 1))
                entry["seeds_only"] = True
            plan.append(entry)
    plan.sort(key=lambda e: not e["primary"])
    return plan


def _saved_report(path: Path) -> dict:
    """A saved report.json as ``plan_from_pilot`` reads it. One written before per-document records (the first
    SmolLM2 study) has per-seed differences only and the old row names (``emoe`` masked, ``emoe@dense`` dense):
    its rows are renamed to today's (``emoe@masked``, ``emoe``) and each comparison gets the variance components
    ``stats.two_way`` reads from its per-seed differences (seeds x one summary)."""
    report = json.loads(path.read_text())
    old_names = any(row.endswith("@dense") for rows in report.get("paired", {}).values() for row in rows)
    paired = {}
    for metric, rows in report.get("paired", {}).items():
        paired[metric] = {}
        for row, p in rows.items():
            if old_names:
                row = row.removesuffix("@dense") if row.endswith("@dense") else row + MASKED_SUFFIX
            if "var_resid" not in p and p.get("diffs"):  # no variance components saved: from the differences
                p = {**two_way(np.array(p["diffs"], dtype=float)[:, None]), "n_docs": None, "mde80": None}
            paired[metric][row] = p
    return {"paired": paired, "tasks": report.get("tasks") or {"documents": {}, "groups": {}}}


def format_plan(plan: list[dict], pilot: Path) -> str:
    def num(x):
        return "-" if x is None else f"{x:.4g}"

    lines = [f"minimum detectable effect (80% power, two-sided 0.05) from the pilot {pilot}:",
             f"{'metric':<44} {'row':<16} {'pilot S x D':>12} {'pilot MDE':>10} {'planned S x D':>14} "
             f"{'planned MDE':>12}  variance: seeds / documents"]
    for e in plan:
        name = e["metric"] + (" *" if e["primary"] else "")
        share = ("seeds only: documents not counted, a lower bound" if e.get("seeds_only")
                 else f"{100 * e['share_seed']:.0f}% / {100 * e['share_doc']:.0f}%" if e["share_seed"] is not None
                 else "- (pilot: one seed or no per-document records)")
        lines.append(f"{name:<44} {e['row']:<16} {e['pilot_seeds']:>5} x {str(e['pilot_docs'] or '-'):<5}"
                     f" {num(e['pilot_mde80']):>10} {e['seeds']:>6} x {str(e['docs'] or '-'):<6} "
                     f"{num(e['mde80']):>12}  {share}")
    lines.append("* the study's primary metric. A true difference below the planned MDE would likely go unseen; "
                 "raise the documents (eval.limit) or the seeds to lower it.")
    return "\n".join(lines)
