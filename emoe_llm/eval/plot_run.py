"""``emoe-llm plot RUN_DIR``: PNGs of a training run from its ``metrics.jsonl`` (see emoe_llm/train/runlog.py).

    RUN_DIR/plots/training.png      train loss (+ held-out loss), learning rate, tokens/s over optimizer steps
    RUN_DIR/plots/expert_load.png   per EMoE layer: fraction of tokens routed to each expert over steps (heatmap)

A resumed run appends to metrics.jsonl and re-logs the steps after its checkpoint: the last record of each step wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"emoe-llm plot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records sorted by step, last record of each step; final_eval events)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a training output_dir?)")
    steps, finals = {}, []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a run killed mid-write leaves a partial last line
            raise ValueError(f"{path}: line {n} is not valid JSON") from None
        if rec.get("event") == "final_eval":
            finals.append(rec)
        elif "event" not in rec and "step" in rec:
            steps[rec["step"]] = rec
    if not steps:
        raise ValueError(f"{path}: no step records yet")
    return [steps[s] for s in sorted(steps)], finals


def plot_run(run_dir, out=None) -> list[Path]:
    from .plotting import pyplot

    plt = pyplot()
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    records, finals = read_metrics(run_dir)
    written = [_plot_training(plt, records, finals, out / "training.png", title=run_dir.name)]
    load = _plot_expert_load(plt, records, out / "expert_load.png", title=run_dir.name)
    if load:
        written.append(load)
    return written


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, plt, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _plot_training(plt, records, finals, path: Path, *, title: str) -> Path:
    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    ax_loss.plot(*_series(records, "loss"), label="train loss", lw=1.2)
    ex, ey = _series(records, "eval_loss")
    if finals:
        ex, ey = ex + [f["step"] for f in finals], ey + [f["eval_loss"] for f in finals]
    if ex:
        ax_loss.plot(ex, ey, "o-", label="held-out loss", ms=4)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_lr.plot(*_series(records, "lr"), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_tps.plot(*_series(records, "tokens_per_s"), color="tab:purple")
    ax_tps.set_ylabel("tokens/s (all ranks)")
    ax_tps.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_lr, ax_tps):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for line in ax.get_lines():
            if len(records) <= 30:
                line.set_marker(line.get_marker() if line.get_marker() not in (None, "None", "") else ".")
    fig.suptitle(f"{title}: {len(records)} logged steps")
    fig.tight_layout()
    return _save(fig, plt, path)


def _plot_expert_load(plt, records, path: Path, *, title: str) -> Path | None:
    import numpy as np

    with_load = [r for r in records if isinstance(r.get("expert_load"), dict) and r["expert_load"]]
    if not with_load:
        return None
    layers = sorted({k for r in with_load for k in r["expert_load"]}, key=lambda k: int(k.split("_")[-1]))
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 1.0 + 2.2 * len(layers)), squeeze=False)
    steps = [r["step"] for r in with_load]
    for ax, layer in zip(axes[:, 0], layers):
        n = max(len(r["expert_load"].get(layer, [])) for r in with_load)
        grid = np.full((n, len(with_load)), np.nan)
        for j, r in enumerate(with_load):
            vals = r["expert_load"].get(layer)
            if vals:
                grid[: len(vals), j] = vals
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n - 0.5))
        k = np.nansum(grid[:, -1])
        ax.set_title(f"{layer}: fraction of tokens per expert (sums to k={k:.0f}; balanced = {k / n:.2f})", fontsize=9)
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title}: expert load")
    fig.tight_layout()
    return _save(fig, plt, path)
