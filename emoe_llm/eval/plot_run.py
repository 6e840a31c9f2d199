"""``emoe-llm plot RUN_DIR``: PNGs of a training run from its ``metrics.jsonl`` (see emoe_llm/train/runlog.py).

    RUN_DIR/plots/training.png      train loss (+ held-out loss), learning rate, tokens/s over optimizer steps
    RUN_DIR/plots/expert_load.png   per EMoE layer: fraction of tokens routed to each expert over steps (heatmap)

A resumed run appends to metrics.jsonl and re-logs the steps after its checkpoint: the last record of each step wins.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..fileio import output_dir_error, write_files_atomically


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = plot_run(args.run_dir, args.out, note=lambda m: print(f"emoe-llm plot: note: {m}", file=sys.stderr))
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"emoe-llm plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only --out found while writing: nothing was left behind
        print(f"emoe-llm plot: error: cannot write the plots: {e.strerror or e} ({e.filename or args.out})",
              file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records sorted by step, last record of each step; final_eval events). Every line is checked: a record
    that is not a JSON object, a non-integer step, a final_eval without eval_loss or a non-UTF-8 byte is an error
    naming the line (only the last line may be cut short: a run killed mid-write)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a training output_dir?)")
    steps, finals = {}, []
    lines = path.read_bytes().splitlines()
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                             f"{e.start + 1})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a run killed mid-write leaves a partial last line
            raise ValueError(f"{path}: line {n}: not valid JSON") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {n}: expected a JSON object, got {type(rec).__name__} "
                             f"{line.strip()[:40]}")
        step = rec.get("step")
        if "step" in rec and (isinstance(step, bool) or not isinstance(step, int)):
            raise ValueError(f"{path}: line {n}: 'step' must be an integer, got {step!r}")
        if rec.get("event") == "final_eval":
            if not isinstance(rec.get("eval_loss"), (int, float)) or step is None:
                raise ValueError(f"{path}: line {n}: a final_eval record needs 'step' and a numeric 'eval_loss'")
            finals.append(rec)
        elif "event" not in rec and step is not None:
            steps[step] = rec
    if not steps:
        raise ValueError(f"{path}: no step records yet")
    return [steps[s] for s in sorted(steps)], finals


def plot_run(run_dir, out=None, *, note=None) -> list[Path]:
    """Write the PNGs; every input is checked before anything is created, and the PNGs appear together or not at
    all (temp names, renamed at the end). ``note(message)`` hears about plots with nothing to show."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"RUN_DIR {run_dir} {'is not a directory' if run_dir.exists() else 'does not exist'} "
                         "(expected a training output_dir holding metrics.jsonl)")
    records, finals = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "plots"
    error = output_dir_error(out, flag="--out")
    if error:
        raise ValueError(error)
    from .plotting import pyplot

    plt = pyplot()
    if not any(math.isfinite(v) for v in _series(records, "loss")[1]):
        (note or (lambda m: None))(f"no finite train loss in {run_dir / 'metrics.jsonl'} (every one NaN or inf: "
                                   "a diverged run?); its panel says so")
    figures = {"training.png": _plot_training(plt, records, finals, title=run_dir.name,
                                              stalled=stalled_steps(run_dir))}
    load = _plot_expert_load(plt, records, title=run_dir.name)
    if load is not None:
        figures["expert_load.png"] = load
    try:
        return write_files_atomically(out, {name: (lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
                                            for name, fig in figures.items()})
    finally:
        for fig in figures.values():
            plt.close(fig)


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def stalled_steps(run_dir: Path) -> list[int]:
    """Steps where the run warned that it stopped learning (``"stalled"`` events, train/stall.py)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "stalled" and isinstance(rec.get("since_step"), int):
            out.append(rec["since_step"])
    return sorted(set(out))


def _plot_training(plt, records, finals, *, title: str, stalled=()):
    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    ax_loss.plot(*_series(records, "loss"), label="train loss", lw=1.2)
    for i, step in enumerate(stalled):  # from here on the run was not learning
        ax_loss.axvline(step, color="tab:red", ls="--", lw=1, label="stopped learning" if i == 0 else None)
    if not any(math.isfinite(v) for v in _series(records, "loss")[1]):
        ax_loss.text(0.5, 0.5, "no finite train loss (NaN / inf)", transform=ax_loss.transAxes, ha="center",
                     va="center", color="tab:red")
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
    return fig


def _plot_expert_load(plt, records, *, title: str):
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
    return fig
