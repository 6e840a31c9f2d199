"""``emoe-llm report DIR``: a study dir's results as report.json, report.md and report.png.

    report.json  metrics[metric][row] = {mean, ci95: [lo, hi] | null, n, values, seeds}   (Student t over seeds)
                 paired[metric][row]  = {baseline, mean_diff, ci95, n, seeds, diffs}      (row - baseline, per seed)
                 direction[metric]    = "higher" | "lower"  (which way is better, from the metric's name)
                 training[cell]       = {final_loss, tokens, train_seconds, steps, expert_load_max_over_mean}
    report.md    the table a paper prints + a line per metric: does the interval of the difference exclude 0?
    report.png   dot plots of the seeds per metric (mean and interval), training-loss curves of every cell

Rows are arms; an EMoE-trained arm also has the row ``<arm>@dense`` (the same weights scored without the mask).
A metric is ``<task>/<name>`` from lm-eval's results dict (``acc,none`` -> ``acc``; another filter is kept:
``exact_match[strict-match]``). Cells without eval JSONs yet are left out (n says how many seeds each row has).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..fileio import atomic_write_text
from .spec import DENSE_SUFFIX, eval_file
from .stats import excludes_zero, paired, t_interval

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


def read_results(path: Path, tasks: list[str] = ()) -> tuple[dict[str, float], dict[str, str]]:
    """(metric -> value, metric -> "higher" | "lower") from one eval JSON: lm-eval's "results" (tasks) and "groups"
    (a group's aggregate, e.g. emoe_mmlu over its subjects), limited to the requested ``tasks`` when the JSON has
    them. The direction is lm-eval's ``higher_is_better`` when the JSON has it, else read from the metric's name."""
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: no top-level 'results' mapping (expected an emoe-llm eval JSON)")
    results = {**results, **(doc.get("groups") or {})}
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


def build_report(out: Path) -> dict:
    stored_path = out / "study.json"
    if not stored_path.is_file():
        raise FileNotFoundError(f"{stored_path} not found: is {out} a study dir (emoe-llm study --out {out})?")
    stored = json.loads(stored_path.read_text())
    study, cells = stored["study"], stored["cells"]
    order = [n for n in stored["order"] if n in cells]
    baseline = study["baseline"]
    rows: list[str] = []
    values: dict[str, dict[str, dict[int, float]]] = {}
    evaluated, directions = {}, {}
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
                found, found_directions = read_results(path, spec["tasks"])
                directions.update(found_directions)
                for metric, value in found.items():
                    values.setdefault(metric, {}).setdefault(row, {})[cell["seed"]] = value
    rows.sort(key=lambda r: (list(study["arms"]).index(r.removesuffix(DENSE_SUFFIX)), r.endswith(DENSE_SUFFIX)))
    metrics, pairs = {}, {}
    for metric in sorted(values):
        by_row = values[metric]
        metrics[metric] = {row: {**t_interval([by_row[row][s] for s in sorted(by_row[row])]),
                                 "seeds": sorted(by_row[row])} for row in rows if row in by_row}
        if baseline in by_row:
            pairs[metric] = {row: {"baseline": baseline, **paired(by_row[row], by_row[baseline])}
                             for row in rows if row != baseline and row in by_row}
    training = {name: training_figures(out / "cells" / name) for name in order}
    return {"study": study, "rows": rows, "baseline": baseline, "seeds": study["seeds"],
            "cells": {name: {"arm": cells[name]["arm"], "seed": cells[name]["seed"],
                             "evaluated": evaluated.get(name, [])} for name in order},
            "direction": {m: directions[m] for m in metrics}, "metrics": metrics, "paired": pairs,
            "training": training}


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
    return f"{_num(stats['mean'])} [{_num(lo)}, {_num(hi)}] (n={stats['n']})"


def format_markdown(report: dict) -> str:
    rows, baseline = report["rows"], report["baseline"]
    lines = [f"# Study report: {', '.join(rows)} over seeds {report['seeds']}", "",
             "Mean over seeds [95% Student t interval] (n seeds). An arm trained in EMoE mode is scored twice: "
             f"`<arm>` with the expert mask (its training mode) and `<arm>{DENSE_SUFFIX}` without it (as a plain "
             "`AutoModelForCausalLM` load sees the export).", ""]
    if not report["metrics"]:
        lines += ["No eval results yet.", ""]
    else:
        lines += ["| metric | better | " + " | ".join(rows) + " |", "|---|---|" + "---|" * len(rows)]
        for metric, by_row in report["metrics"].items():
            lines.append(f"| {metric} | {report['direction'][metric]} | "
                         + " | ".join(_cell_text(by_row.get(r)) for r in rows) + " |")
        lines += ["", f"## Paired differences against `{baseline}` (same seed = same data order)", ""]
        for metric, by_row in report["paired"].items():
            better = report["direction"][metric]
            for row, p in by_row.items():
                head = f"- {metric} ({better} is better): {row} - {baseline} = {_num(p['mean_diff'])}"
                verdict = excludes_zero(p["ci95"])
                if verdict is None:
                    lines.append(f"{head} over {p['n']} seed(s): no interval with a single paired seed; it says "
                                 "nothing about seed noise")
                    continue
                lo, hi = p["ci95"]
                if verdict:
                    side = "better" if (p["mean_diff"] > 0) == (better == "higher") else "worse"
                    lines.append(f"{head} [{_num(lo)}, {_num(hi)}], n={p['n']}: the interval excludes 0, "
                                 f"{row} is {side} than {baseline}")
                else:
                    lines.append(f"{head} [{_num(lo)}, {_num(hi)}], n={p['n']}: the interval includes 0, no "
                                 "difference shown")
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
