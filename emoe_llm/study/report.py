"""``emoe-llm report DIR``: a study dir's results as report.json, report.md and report.png.

    report.json  metrics[metric][row] = {mean, ci95, se, df, n_seeds, n_docs, share_seed, share_doc, method,
                                         values (per-seed means), seeds}
                 paired[metric][row]  = {baseline, mean_diff, ci95, se, df, n_docs, n_seeds, mde80, p, p_holm,
                                         share_seed, share_doc, var_seed, var_doc, var_resid, method, verdict, primary,
                                         seeds, diffs (per-seed mean differences)}
                 primary              = the study's primary metric; comparisons = {primary: m, secondary: m}
                 tasks                = {documents: task -> full size (lm-eval's n-samples), groups: group -> tasks}
                 direction[metric]    = "higher" | "lower"  (which way is better)
                 training[cell]       = {final_loss, tokens, train_seconds, steps, expert_load_max_over_mean}
    report.md    the table a paper prints + a line per comparison: estimate, interval, MDE, verdict
    report.png   dot plots of the seeds per metric (mean and interval), training-loss curves of every cell

Every number comes from the per-document records beside each eval JSON (``<mode>.samples.jsonl``): a metric is a
seeds x documents table per row, a comparison the table of paired differences (same seed, same document) against the
baseline, and its interval counts seed *and* document sampling (stats.two_way; docs/study.md). A ratio metric
(nll_per_token: summed NLL / summed target tokens) weights documents by their tokens. Without per-document records
(an older study dir) the interval is over seeds only, and says so in ``method``.

Rows are arms, scored dense (as the paper's evaluation and a plain load see an export); an EMoE-trained arm also has
the row ``<arm>@masked`` (the same weights scored with the expert mask). A metric is ``<task>/<name>`` from lm-eval's
results dict (``acc,none`` -> ``acc``; another filter is kept: ``exact_match[strict-match]``); a group's metric
(emoe_mmlu/acc) pools the documents of its tasks. Cells without eval JSONs yet are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from ..eval.cli import samples_path
from ..fileio import atomic_write_text
from .spec import MASKED_SUFFIX, eval_file
from .stats import holm, mde80, p_value, two_way, verdict

LOWER_IS_BETTER = ("nll", "perplexity", "ppl", "loss", "bits_per_byte", "bpb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a study dir (emoe-llm study --out DIR)")
    parser.add_argument("--no-plot", action="store_true", help="skip report.png (no matplotlib needed)")


def run(args: argparse.Namespace) -> int:
    try:
        write_report(Path(args.dir), plot=not args.no_plot)  # prints what it wrote
    except (FileNotFoundError, ValueError) as e:
        print(f"emoe-llm report: error: {e}", file=sys.stderr)
        return 2
    return 0


def direction(metric: str) -> str:
    """Which way is better, from the metric's name (nll, perplexity, loss, bits_per_byte: lower)."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "lower" if any(word in name for word in LOWER_IS_BETTER) else "higher"


def load_eval_json(path: Path) -> dict:
    """One eval JSON, parsed once; ValueError naming the file when it is not an `emoe-llm eval` result."""
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise ValueError(f"{path}: no top-level 'results' mapping (expected an emoe-llm eval JSON)")
    return doc


def read_results(doc: dict, tasks: list[str] = ()) -> tuple[dict[str, float], dict[str, str]]:
    """(metric -> value, metric -> "higher" | "lower") from one eval JSON (``load_eval_json``): lm-eval's "results"
    (tasks) and "groups" (a group's aggregate, e.g. emoe_mmlu over its subjects), limited to the requested ``tasks``
    when the JSON has them. The direction is lm-eval's ``higher_is_better`` when the JSON has it, else read from the
    metric's name."""
    results = {**doc["results"], **(doc.get("groups") or {})}
    if any(t in results for t in tasks):
        results = {t: v for t, v in results.items() if t in tasks}
    higher = doc.get("higher_is_better") or {}
    values, directions = {}, {}
    for task, entries in results.items():
        if not isinstance(entries, dict):
            continue
        for key, value in entries.items():
            name, comma, filt = key.partition(",")  # lm-eval metric keys are "<metric>,<filter>"
            if not comma or "stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            metric = f"{task}/{name}" + (f"[{filt}]" if filt != "none" else "")
            values[metric] = float(value)
            known = (higher.get(task) or {}).get(name)
            directions[metric] = direction(metric) if known is None else ("higher" if known else "lower")
    return values, directions


def training_figures(run_dir: Path) -> dict | None:
    """Final train loss, tokens seen, training seconds (sum of logged step times) and expert load of one cell."""
    from ..eval.plot_run import read_metrics

    try:
        steps, _ = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return None
    last = steps[-1]
    loads = [r["expert_load_max_over_mean"] for r in steps if r.get("expert_load_max_over_mean")]
    return {"steps": last["step"], "final_loss": last.get("loss"), "tokens": last.get("tokens_seen"),
            # a step record's step_time_s is the mean over the steps since the previous record
            "train_seconds": round(sum(r.get("step_time_s", 0.0) * (r["step"] - prev["step"] if prev else r["step"])
                                       for prev, r in zip([None] + steps[:-1], steps)), 2),
            "expert_load_max_over_mean": max(loads[-1].values()) if loads else None,
            "loss_curve": [[r["step"], r["loss"]] for r in steps if "loss" in r]}


def read_samples(eval_json: Path, doc: dict,
                 metrics: list[str]) -> dict[str, dict[tuple[str, int], tuple[float, float | None]]]:
    """metric -> {(task, doc_id): (value, weight)} from the per-document records beside ``eval_json`` (parsed as
    ``doc``), for the ``metrics`` (``<task>/<name>``) its results hold; a group's metric pools its tasks' documents
    (the JSON's group_subtasks). {} when there are no records (an eval JSON written before they existed)."""
    path = samples_path(eval_json)
    if not path.is_file():
        return {}
    by_task: dict[str, list[dict]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            by_task.setdefault(rec["task"], []).append(rec)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'task' and 'doc_id' (emoe-llm eval's "
                             "per-document records)") from None
    subtasks = doc.get("group_subtasks") or {}

    def tasks_of(name: str) -> list[str]:
        if name in by_task:
            return [name]
        return [t for sub in subtasks.get(name, []) for t in tasks_of(sub)]

    out = {}
    for metric in metrics:
        task, name = metric.split("/", 1)
        docs = {(t, rec["doc_id"]): (rec[name], rec.get(f"{name}_weight"))
                for t in tasks_of(task) for rec in by_task[t] if rec.get(name) is not None}
        if docs:
            out[metric] = docs
    return out


def doc_table(per_seed: dict[int, dict], seeds: list[int], docs: list) -> np.ndarray:
    """seeds x documents table of one row. A weighted metric (a ratio: nll_per_token = summed NLL / summed tokens)
    becomes its linearisation R_s + (num[s, d] - R_s w_d) / mean(w), with num = value x weight and R_s the seed's
    ratio over the documents: each seed's mean is exactly its ratio (what the eval JSON reports), and the document
    spread is that of the ratio estimator (a long document does not count as a large value), so a difference of two
    such tables is the token-weighted per-document difference of docs/study.md."""
    table = np.array([[per_seed[s][d][0] for d in docs] for s in seeds], dtype=float)
    weights = [per_seed[seeds[0]][d][1] for d in docs]
    if all(w is not None for w in weights):
        w = np.array(weights, dtype=float)
        num = table * w[None, :]
        ratio = num.sum(axis=1, keepdims=True) / w.sum()
        table = ratio + (num - ratio * w[None, :]) / w.mean()
    return table


def _common_docs(tables: list[dict]) -> list:
    keys = set.intersection(*(set(t) for t in tables)) if tables else set()
    return sorted(keys)


def row_stats(by_seed_docs: dict[int, dict], by_seed_value: dict[int, float]) -> dict:
    """Mean and interval of one row over its seeds and documents (seeds only without per-document records)."""
    seeds = sorted(by_seed_docs) if by_seed_docs else sorted(by_seed_value)
    docs = _common_docs([by_seed_docs[s] for s in seeds]) if by_seed_docs else []
    table = doc_table(by_seed_docs, seeds, docs) if docs else np.array([[by_seed_value[s]] for s in seeds])
    stats = two_way(table)
    return {**stats, "n": len(seeds), "seeds": seeds, "values": [float(v) for v in table.mean(axis=1)]}


def paired_stats(arm_docs: dict, base_docs: dict, arm_value: dict, base_value: dict) -> dict | None:
    """Paired differences arm - baseline over the seeds both have and the documents every one of them scored."""
    if arm_docs and base_docs:
        seeds = sorted(set(arm_docs) & set(base_docs))
        docs = _common_docs([arm_docs[s] for s in seeds] + [base_docs[s] for s in seeds])
    else:
        seeds, docs = sorted(set(arm_value) & set(base_value)), []
    if not seeds:
        return None
    if docs:
        table = doc_table(arm_docs, seeds, docs) - doc_table(base_docs, seeds, docs)
    else:
        table = np.array([[arm_value[s] - base_value[s]] for s in seeds])
    stats = two_way(table)
    mean = stats.pop("mean")
    return {"mean_diff": mean, **stats, "mde80": mde80(stats["se"], stats["df"]),
            "p": p_value(mean, stats["se"], stats["df"]), "verdict": verdict(stats), "seeds": seeds,
            "n": len(seeds), "diffs": [float(v) for v in table.mean(axis=1)]}


def build_report(out: Path) -> dict:
    stored_path = out / "study.json"
    if not stored_path.is_file():
        raise FileNotFoundError(f"{stored_path} not found: is {out} a study dir (emoe-llm study --out {out})?")
    stored = json.loads(stored_path.read_text())
    study, cells = stored["study"], stored["cells"]
    order = [n for n in stored["order"] if n in cells]
    baseline = study["baseline"]
    rows: list[str] = []
    values: dict[str, dict[str, dict[int, float]]] = {}     # metric -> row -> seed -> the eval JSON's value
    per_doc: dict[str, dict[str, dict[int, dict]]] = {}     # metric -> row -> seed -> {doc: (value, weight)}
    evaluated, directions = {}, {}
    documents, groups = {}, {}  # task -> its full size (lm-eval's n-samples), group -> tasks: for --pilot
    for name in order:
        cell = cells[name]
        for mode, row in cell["rows"].items():
            if row not in rows:
                rows.append(row)
            for i, spec in enumerate(study["eval"]):
                path = out / "cells" / name / "eval" / eval_file(mode, i)
                if not path.is_file():
                    continue
                evaluated.setdefault(name, []).append(path.name)
                doc = load_eval_json(path)
                found, found_directions = read_results(doc, spec["tasks"])
                directions.update(found_directions)
                documents.update({t: int(n.get("original", n.get("effective", 0)))
                                  for t, n in (doc.get("n-samples") or {}).items()})
                groups.update(doc.get("group_subtasks") or {})
                for metric, value in found.items():
                    values.setdefault(metric, {}).setdefault(row, {})[cell["seed"]] = value
                for metric, docs in read_samples(path, doc, list(found)).items():
                    per_doc.setdefault(metric, {}).setdefault(row, {})[cell["seed"]] = docs
    arms = list(study["arms"])
    rows.sort(key=lambda r: (arms.index(r.removesuffix(MASKED_SUFFIX)), r.endswith(MASKED_SUFFIX)))
    metrics, pairs = {}, {}
    for metric in sorted(values):
        by_row, docs_by_row = values[metric], per_doc.get(metric, {})
        # per-document records only when every evaluated (row, seed) has them: else seeds only, for all rows
        complete = all(set(docs_by_row.get(r, {})) == set(by_row[r]) for r in by_row)
        docs_by_row = docs_by_row if complete else {}
        metrics[metric] = {row: row_stats(docs_by_row.get(row, {}), by_row[row]) for row in rows if row in by_row}
        if baseline in by_row:
            pairs[metric] = {}
            for row in rows:
                if row == baseline or row not in by_row:
                    continue
                p = paired_stats(docs_by_row.get(row, {}), docs_by_row.get(baseline, {}), by_row[row],
                                 by_row[baseline])
                if p is not None:
                    pairs[metric][row] = {"baseline": baseline, **p, "primary": metric == study.get("primary")}
    counts = adjust_for_multiplicity(pairs)
    training = {name: training_figures(out / "cells" / name) for name in order}
    return {"study": study, "rows": rows, "baseline": baseline, "seeds": study["seeds"],
            "primary": study.get("primary"), "comparisons": counts,
            "tasks": {"documents": documents, "groups": groups},
            "cells": {name: {"arm": cells[name]["arm"], "seed": cells[name]["seed"],
                             "evaluated": evaluated.get(name, [])} for name in order},
            "direction": {m: directions[m] for m in metrics}, "metrics": metrics, "paired": pairs,
            "training": training}


def adjust_for_multiplicity(pairs: dict) -> dict:
    """Holm-adjust the p-values of the primary metric's comparisons (one per row) and, apart, of all the secondary
    ones; returns how many each family holds."""
    counts = {}
    for family in (True, False):
        entries = [p for by_row in pairs.values() for p in by_row.values() if p["primary"] is family]
        for entry, adjusted in zip(entries, holm([e["p"] for e in entries])):
            entry["p_holm"] = adjusted
        counts["primary" if family else "secondary"] = len(entries)
    return counts


def write_report(out: Path, *, plot: bool = True) -> list[Path]:
    report = build_report(out)
    paths = [out / "report.json", out / "report.md"]
    atomic_write_text(paths[0], json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths[1], format_markdown(report))
    if plot:
        try:
            paths.append(plot_report(report, out / "report.png"))
        except ImportError as e:  # the numbers are written; the figure needs the plot extra
            print(f"[report] report.png skipped: {e}", flush=True)
    print(f"[report] wrote {', '.join(str(p) for p in paths)}", flush=True)
    return paths


# --------------------------------------------------------------------------------------------------------------------
# report.md


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.5g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def _cell_text(stats: dict | None) -> str:
    if not stats:
        return "-"
    if stats["ci95"] is None:
        return f"{_num(stats['mean'])} (n={stats['n']})"
    lo, hi = stats["ci95"]
    return f"{_num(stats['mean'])} [{_num(lo)}, {_num(hi)}]"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def comparison_line(metric: str, row: str, p: dict, better: str) -> str:
    """One comparison in words: estimate, interval, design, variance shares, MDE and what it shows."""
    base = p["baseline"]
    size = f"{p['n_seeds']} seed(s) x {p['n_docs']} document(s)"
    head = f"- **{metric}** ({better} is better) [{'primary' if p['primary'] else 'secondary'}]: {row} - {base} = " \
           f"{_num(p['mean_diff'])}"
    v = p["verdict"]
    if v == "no interval":
        return f"{head} over {size}: no interval (one seed and one document say nothing about either noise)"
    if v == "no variation observed":
        return (f"{head} over {size}: no variation observed (every paired difference is the same), so no "
                "interval can be given; this shows nothing either way")
    lo, hi = p["ci95"]
    shares = f"seeds {_pct(p['share_seed'])}, documents {_pct(p['share_doc'])} of the variance" \
        if p["share_seed"] is not None else p["method"]
    line = f"{head} [{_num(lo)}, {_num(hi)}] over {size} ({shares}); MDE80 {_num(p['mde80'])}"
    if v == "excludes 0":
        side = "better" if (p["mean_diff"] > 0) == (better == "higher") else "worse"
        if p.get("p_holm") is not None and p["p_holm"] >= 0.05:
            return (f"{line}: excludes 0 before adjustment only (Holm p = {_num(p['p_holm'])}): not shown once "
                    "the family's comparisons are counted")
        return f"{line}: excludes 0 (Holm p = {_num(p.get('p_holm'))}), {row} is {side} than {base}"
    return f"{line}: includes 0, no difference shown; one smaller than {_num(p['mde80'])} would likely go unseen"


def format_markdown(report: dict) -> str:
    rows, baseline = report["rows"], report["baseline"]
    lines = [f"# Study report: {', '.join(rows)} over seeds {report['seeds']}", "",
             "Mean [95% interval over seeds and documents]. Every row is scored dense, as the paper's evaluation and "
             f"a plain `AutoModelForCausalLM` load see the export; `<arm>{MASKED_SUFFIX}` is the same EMoE-trained "
             "weights scored with the expert mask. Intervals: per-document paired differences, seed x document "
             "variance components (docs/study.md).", ""]
    if not report["metrics"]:
        lines += ["No eval results yet.", ""]
    else:
        lines += ["| metric | better | " + " | ".join(rows) + " |", "|---|---|" + "---|" * len(rows)]
        for metric, by_row in report["metrics"].items():
            mark = " (primary)" if metric == report.get("primary") else ""
            lines.append(f"| {metric}{mark} | {report['direction'][metric]} | "
                         + " | ".join(_cell_text(by_row.get(r)) for r in rows) + " |")
        counts = report["comparisons"]
        primary = report.get("primary") or "none named"
        lines += ["", f"## Paired differences against `{baseline}` (same seed = same data order, same documents)", "",
                  f"Primary metric: `{primary}` ({counts['primary']} comparison(s)); the other "
                  f"{counts['secondary']} comparisons are secondary. Each family's p-values are Holm-adjusted; "
                  "MDE80 is the true difference this design detects 80% of the time (two-sided 0.05).", ""]
        ordered = sorted(report["paired"].items(), key=lambda kv: kv[0] != report.get("primary"))
        for metric, by_row in ordered:
            for row, p in by_row.items():
                lines.append(comparison_line(metric, row, p, report["direction"][metric]))
    lines += ["", "## Training (per cell)", "", "| cell | steps | final train loss | tokens | train s | "
              "expert load max/mean |", "|---|---|---|---|---|---|"]
    for name, t in report["training"].items():
        if t is None:
            lines.append(f"| {name} | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {t['steps']} | {_num(t['final_loss'])} | {t['tokens']} | {t['train_seconds']} | "
                     f"{_num(t['expert_load_max_over_mean'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# report.png


def plot_report(report: dict, path: Path) -> Path:
    from ..eval.plotting import pyplot

    plt = pyplot()
    metrics, rows = list(report["metrics"]), report["rows"]
    n = len(metrics) + 1
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax, metric in zip(axes, metrics):
        for x, row in enumerate(rows):
            stats = report["metrics"][metric].get(row)
            if not stats:
                continue
            ax.scatter([x] * stats["n"], stats["values"], s=14, alpha=0.6, color="tab:gray")
            if stats["ci95"] is not None:
                lo, hi = stats["ci95"]
                ax.errorbar([x + 0.15], [stats["mean"]], yerr=[[stats["mean"] - lo], [hi - stats["mean"]]],
                            fmt="o", color="tab:blue", capsize=4)
            else:
                ax.plot([x + 0.15], [stats["mean"]], "o", color="tab:blue")
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({report['direction'][metric]} is better)", fontsize=9)
    ax = axes[len(metrics)]
    for name, t in report["training"].items():
        if t and t["loss_curve"]:
            steps, losses = zip(*t["loss_curve"])
            ax.plot(steps, losses, label=name, linewidth=1)
    ax.set_title("training loss per cell", fontsize=9)
    ax.set_xlabel("optimizer step")
    if report["training"]:
        ax.legend(fontsize=6)
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
