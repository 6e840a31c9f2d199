"""Balanced k-means (emoe_llm.emoe.balanced_kmeans) vs reference solvers on real Llama layer shapes (issue #7).

Points are the d_ff rows of a gate_proj weight (L2-normalised inside every solver, as EMoE does):

  7b   Llama-2-7B   11008 x 4096,  N = 64  experts of 172 neurons
  30b  LLaMA-30B    17920 x 6656,  N = 256 experts of 70 neurons

Two kinds of synthetic weights of that shape (no checkpoint is downloaded):

  random      i.i.d. Gaussian, like a freshly initialised layer: almost no cluster structure, so every partition
              has nearly the same inertia; this case measures *speed*.
  structured  a planted balanced mixture of N directions, x = s * c_z + g / sqrt(d) (unit c, cosine to the own
              direction about s / sqrt(1 + s^2)); the planted partition is a near-optimal reference, so this case
              measures *quality* (inertia relative to the planted labels, adjusted Rand index).

Solvers (every inertia is recomputed the same way: squared distances of the normalised rows to their cluster mean):

  ours         balanced_kmeans, exactly balanced, on CPU and (when present) CUDA
  sklearn      sklearn KMeans, same k-means++ / n_init / max_iter, *unconstrained*: its inertia is the lower
               reference (not a strict bound, but no balanced partition should beat it by much)
  kmc          k-means-constrained (the paper's min-cost-flow solver), exactly balanced. On full 30B shapes it takes
               far too long, so by default it runs on a sub-problem of the same expert size (--kmc-experts experts,
               e.g. 16 x 70 rows of 6656 dims) where ours runs too; --kmc-full also tries the full shape
  random       a random balanced split (the paper's random-split ablation): the upper reference

    python benchmarks/clustering.py                         # CPU: 7b and 30b shapes, both cases, a few minutes
    python benchmarks/clustering.py --kmc-full --budget 600       # let the references run longer

The reference solvers run in a child process that is killed after --budget seconds (reported as such).
    python benchmarks/clustering.py --shapes tiny --cases random,structured      # smoke (seconds)
    python benchmarks/clustering.py --shapes 30b --devices cuda --no-sklearn --no-kmc --json out.json   # GPU only

Real weights (--real): the gate_proj of several layers of a real HF checkpoint (default: the SmolLM2-135M-Instruct
fixture, scripts/get_smollm2.sh), ours (fast assignment, the default) vs ours with --assign exact (the optimal
balanced assignment in every Lloyd step, same seeds) vs k-means-constrained with the official settings
(n_init 10, max_iter 300) vs a random split:

    python benchmarks/clustering.py --real smollm2 --layers 0,10,20,29 --experts 16,64 --budget 300
    python benchmarks/clustering.py --real smollm2 --solvers fast0,fast --kmc-ref benchmarks/kmc_smollm2.json
                                    # issue #10: Lloyd only vs with the swap refinement, against earlier kmc results

The last line is the figure: seconds for one 30B-shape layer (target <= 20 s on 2 CPU cores) and its inertia
relative to unconstrained k-means and to a random split.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import time

import torch
import torch.nn.functional as F

from bench_json import add_json_args, print_config_and_exit, write_json
from emoe_llm.emoe import balanced_kmeans, random_balanced_labels

SHAPES = {  # name: (d_ff, hidden, n_experts)
    "tiny": (512, 64, 16),
    "7b": (11008, 4096, 64),
    "30b": (17920, 6656, 256),
}

try:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
except ImportError:  # scikit-learn is a dev extra
    KMeans = adjusted_rand_score = None
try:
    from k_means_constrained import KMeansConstrained
except ImportError:
    KMeansConstrained = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="7b,30b", help=f"comma list of {sorted(SHAPES)} or N_ROWSxDIMxEXPERTS")
    p.add_argument("--cases", default="random,structured")
    p.add_argument("--n-init", type=int, default=3, help="k-means++ restarts (all solvers)")
    p.add_argument("--max-iter", type=int, default=30, help="Lloyd iterations per restart (all solvers)")
    p.add_argument("--signal", type=float, default=0.2, help="structured case: planted direction strength s")
    p.add_argument("--devices", default="auto", help="devices for ours: auto (cpu, plus cuda if available) or list")
    p.add_argument("--no-sklearn", action="store_true")
    p.add_argument("--no-kmc", action="store_true")
    p.add_argument("--kmc-experts", type=int, default=16, help="experts in the kmc sub-problem (same expert size)")
    p.add_argument("--kmc-full", action="store_true", help="also try kmc on the full shape (time-capped)")
    p.add_argument("--budget", type=float, default=45.0, help="seconds before a reference solver (sklearn, kmc) "
                   "is killed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swap-rounds", type=int, default=None,
                   help="ours: rounds of the final swap refinement (default: balanced_kmeans's, 10; 0 = Lloyd only)")
    add_json_args(p)
    p.add_argument("--real", default=None, help="real-weights case: 'smollm2' (the fixture) or an HF checkpoint dir")
    p.add_argument("--layers", default="0,10,20,29", help="--real: decoder layers whose gate_proj is clustered")
    p.add_argument("--experts", default="16,64", help="--real: numbers of experts N")
    p.add_argument("--kmc-n-init", type=int, default=10, help="--real: k-means-constrained restarts (official: 10)")
    p.add_argument("--kmc-max-iter", type=int, default=300, help="--real: k-means-constrained iterations")
    p.add_argument("--solvers", default="fast,exact,kmc",
                   help="--real: comma list of fast (the default: swap refinement on), fast0 (the same with\n"
                        "swap_rounds=0: Lloyd only, the default before issue #10), exact (assign='exact'), kmc")
    p.add_argument("--kmc-ref", default=None,
                   help="--real: JSON file {\"LAYER/N\": inertia} of earlier k-means-constrained results, used for\n"
                        "the fast/kmc ratio when kmc is not run (it is slow)")
    args = p.parse_args(argv)
    if args.devices == "auto":
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        args.devices = args.devices.split(",")
    for shape in args.shapes.split(","):
        try:
            shape_of(shape)
        except ValueError:
            p.error(f"--shapes: '{shape}' is neither one of {sorted(SHAPES)} nor N_ROWSxDIMxEXPERTS")
    if args.print_config:
        print_config_and_exit(args)
    return args


def shape_of(name):
    if name in SHAPES:
        return SHAPES[name]
    n, d, k = (int(v) for v in name.lower().split("x"))
    return n, d, k


def make_points(case, n, d, n_clusters, *, signal, seed):
    """(n, d) fp32 points and, for the structured case, the planted balanced labels."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, d, generator=gen) * 0.02  # the usual 0.02 init scale; scale is irrelevant after normalising
    if case == "random":
        return noise, None
    if case != "structured":
        raise ValueError(f"unknown case '{case}'")
    centers = F.normalize(torch.randn(n_clusters, d, generator=gen), dim=-1)
    planted = random_balanced_labels(n, n_clusters, seed=seed + 1)
    return signal * centers[planted] + noise / (0.02 * d**0.5), planted


def inertia_of(x_unit, labels, n_clusters):
    """Sum of squared distances of the unit rows to their cluster mean (the k-means objective)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    sums = torch.zeros(n_clusters, x_unit.shape[1], dtype=torch.float64).index_add_(0, labels, x_unit.double())
    counts = torch.bincount(labels, minlength=n_clusters).clamp_min(1).double()
    # sum ||x - mu||^2 = sum ||x||^2 - sum_c ||S_c||^2 / n_c
    return float((x_unit.double() ** 2).sum() - ((sums**2).sum(-1) / counts).sum())


def max_size_ratio(labels, n_clusters, n):
    return float(torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=n_clusters).max()) / (n / n_clusters)


def _child(solver, x_np, n_clusters, n_init, max_iter, seed, out):
    t0 = time.perf_counter()
    if solver == "kmc":
        size = x_np.shape[0] // n_clusters
        km = KMeansConstrained(n_clusters=n_clusters, size_min=size, size_max=size, init="k-means++", n_init=n_init,
                               max_iter=max_iter, random_state=seed, n_jobs=1)
    else:
        km = KMeans(n_clusters=n_clusters, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed,
                    algorithm="lloyd")
    labels = km.fit_predict(x_np)
    out.put((labels, time.perf_counter() - t0))


def run_capped(solver, x_unit, n_clusters, *, n_init, max_iter, seed, budget):
    """A reference solver in a child process (spawned: no OpenMP state inherited), killed after ``budget`` seconds.

    Returns (labels or None if killed, seconds). The seconds are measured inside the child, so they exclude
    process start-up and the transfer of the points."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    x_np = x_unit.double().numpy() if solver == "kmc" else x_unit.numpy()
    proc = ctx.Process(target=_child, daemon=True, args=(solver, x_np, n_clusters, n_init, max_iter, seed, out))
    t0 = time.perf_counter()
    proc.start()
    try:
        labels, seconds = out.get(timeout=budget + 15)  # + start-up and transfer allowance
        if seconds > budget:
            labels = None
    except queue.Empty:
        labels, seconds = None, time.perf_counter() - t0
    proc.kill()
    proc.join()
    return labels, seconds


def fmt(v, spec):
    text = "-" if v is None else format(v, spec)
    return text.rjust(int(spec.split(".")[0] or 0))


def report(problem, results, refs, planted):
    """Print one problem's rows (after all solvers ran, so every ratio has its references) -> {key: row}."""
    rows = {}
    for key, r in results.items():
        inertia = r.get("inertia")
        ari = None
        if planted is not None and r.get("labels") is not None and adjusted_rand_score is not None:
            ari = adjusted_rand_score(planted.numpy(), torch.as_tensor(r["labels"]).numpy())
        row = dict(problem=problem, solver=key, seconds=r.get("seconds"), inertia=inertia, ari=ari,
                   vs_lower=inertia / refs["lower"] if inertia is not None and refs.get("lower") else None,
                   vs_upper=inertia / refs["upper"] if inertia is not None and refs.get("upper") else None,
                   vs_planted=inertia / refs["planted"] if inertia is not None and refs.get("planted") else None,
                   balance=r.get("balance", 1.0))
        rows[key] = row
        if inertia is None:
            print(f"  {key:<10} killed at the --budget time limit ({r['seconds']:.0f} s wall incl. start-up), no result")
            continue
        print(f"  {key:<10} {fmt(row['seconds'], '8.2f')} s  inertia {inertia:12.3f}  /sklearn "
              f"{fmt(row['vs_lower'], '6.4f')}  /planted {fmt(row['vs_planted'], '6.4f')}  /random "
              f"{fmt(row['vs_upper'], '6.4f')}  ARI {fmt(ari, '5.3f')}  max size/E {row['balance']:.2f}", flush=True)
    return rows


def solve_all(args, problem, x, n_clusters, planted, *, with_sklearn, kmc_budget):
    """Every solver on one problem; prints the rows and returns {solver or ours@device: row}."""
    n = x.shape[0]
    x_unit = F.normalize(x, dim=-1)
    out = {}
    random_labels = random_balanced_labels(n, n_clusters, seed=args.seed)
    out["random"] = dict(seconds=None, inertia=inertia_of(x_unit, random_labels, n_clusters), labels=random_labels)
    if planted is not None:
        out["planted"] = dict(seconds=None, inertia=inertia_of(x_unit, planted, n_clusters), labels=planted)
    if with_sklearn and KMeans is not None:
        labels, secs = run_capped("sklearn", x_unit, n_clusters, n_init=args.n_init, max_iter=args.max_iter,
                                  seed=args.seed, budget=args.budget)
        out["sklearn"] = dict(seconds=secs, inertia=None if labels is None else inertia_of(x_unit, labels, n_clusters),
                              labels=labels, balance=1.0 if labels is None else max_size_ratio(labels, n_clusters, n))
    for dev in args.devices:
        if dev.startswith("cuda"):
            balanced_kmeans(x[: n_clusters * 2], n_clusters, n_init=1, max_iter=1, device=dev)  # CUDA context warm-up
            torch.cuda.synchronize()
        extra = {} if args.swap_rounds is None else dict(swap_rounds=args.swap_rounds)
        res = balanced_kmeans(x, n_clusters, seed=args.seed, n_init=args.n_init, max_iter=args.max_iter, device=dev,
                              **extra)
        assert torch.equal(torch.bincount(res.labels, minlength=n_clusters),
                           torch.full((n_clusters,), n // n_clusters)), "balanced_kmeans returned unbalanced labels"
        out[f"ours@{dev}"] = dict(seconds=res.seconds, inertia=inertia_of(x_unit, res.labels, n_clusters),
                                  labels=res.labels)
    if kmc_budget and not args.no_kmc and KMeansConstrained is not None:
        labels, secs = run_capped("kmc", x_unit, n_clusters, n_init=args.n_init, max_iter=args.max_iter,
                                  seed=args.seed, budget=kmc_budget)
        out["kmc"] = dict(seconds=secs, inertia=None if labels is None else inertia_of(x_unit, labels, n_clusters),
                          labels=labels)
    refs = {"upper": out["random"]["inertia"], "lower": out.get("sklearn", {}).get("inertia"),
            "planted": out.get("planted", {}).get("inertia")}
    return report(problem, out, refs, planted)


def gate_proj(path, layer):
    """One layer's gate_proj weight (fp32) from a safetensors HF checkpoint, read without loading the model."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    key = f"model.layers.{layer}.mlp.gate_proj.weight"
    index = path / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(str(path / file), "pt") as f:
        return f.get_tensor(key).float()


def real_weights(args):
    """ours (fast) vs ours (exact assignment) vs k-means-constrained vs random on real gate_proj weights."""
    if args.real == "smollm2":
        from emoe_llm.fixtures import smollm2_path

        path = smollm2_path(download=False)
    else:
        path = args.real
    print(f"real weights: {path}; ours n_init {args.n_init}, max_iter {args.max_iter}; k-means-constrained n_init "
          f"{args.kmc_n_init}, max_iter {args.kmc_max_iter}"
          + ("" if KMeansConstrained is not None and not args.no_kmc or "kmc" not in args.solvers.split(",")
             else " (NOT INSTALLED: rows skipped)"))
    import json

    solvers = args.solvers.split(",")
    if "kmc" in solvers and (KMeansConstrained is None or args.no_kmc):
        solvers.remove("kmc")
    kmc_ref = json.loads(open(args.kmc_ref).read()) if args.kmc_ref else {}
    print(f"{'layer':>5} {'N':>4} {'solver':<8} {'seconds':>8} {'inertia':>11} {'swaps':>6} {'/exact':>7} {'/kmc':>7} "
          f"{'/random':>8}")
    ratios = {}  # (solver, reference) -> [ratio per case]
    for layer in [int(v) for v in args.layers.split(",")]:
        w = gate_proj(path, layer)
        x_unit = F.normalize(w, dim=-1)
        for n_clusters in [int(v) for v in args.experts.split(",")]:
            rows = {}
            for key in solvers:
                if key == "kmc":
                    labels, secs = run_capped("kmc", x_unit, n_clusters, n_init=args.kmc_n_init,
                                              max_iter=args.kmc_max_iter, seed=args.seed, budget=args.budget)
                    rows["kmc"] = (secs, None if labels is None else inertia_of(x_unit, labels, n_clusters), None)
                    continue
                extra = dict(swap_rounds=0) if key == "fast0" else {}
                res = balanced_kmeans(w, n_clusters, seed=args.seed, n_init=args.n_init, max_iter=args.max_iter,
                                      assign="exact" if key == "exact" else "fast", **extra)
                rows[key] = (res.seconds, inertia_of(x_unit, res.labels, n_clusters), res.swaps)
            rand = inertia_of(x_unit, random_balanced_labels(w.shape[0], n_clusters, seed=args.seed), n_clusters)
            rows["random"] = (None, rand, None)
            refs = {"exact": rows.get("exact", (None, None))[1],
                    "kmc": rows.get("kmc", (None, None))[1] or kmc_ref.get(f"{layer}/{n_clusters}")}
            for key, (secs, inertia, swaps) in rows.items():
                if inertia is None:
                    print(f"{layer:>5} {n_clusters:>4} {key:<8} killed at --budget ({secs:.0f} s)")
                    continue
                rel = {r: inertia / v if v else None for r, v in refs.items()}
                print(f"{layer:>5} {n_clusters:>4} {key:<8} {fmt(secs, '8.2f')} {inertia:11.3f} {fmt(swaps, '6.0f')} "
                      f"{fmt(rel['exact'], '7.4f')} {fmt(rel['kmc'], '7.4f')} {inertia / rand:8.4f}", flush=True)
                for r, v in rel.items():
                    if v is not None and key in ("fast", "fast0", "exact") and key != r:
                        ratios.setdefault((key, r), []).append(v)
    print()
    for (key, ref), vals in ratios.items():
        print(f"ours ({key}) / {'ours (exact assignment)' if ref == 'exact' else 'k-means-constrained'}, real weights: "
              f"mean {sum(vals) / len(vals):.4f}, worst {max(vals):.4f} over {len(vals)} layer x N cases")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        return real_weights(args)
    devs = ", ".join(torch.cuda.get_device_name(d) if d.startswith("cuda") else f"cpu ({torch.get_num_threads()} "
                     f"threads)" for d in args.devices)
    print(f"ours on: {devs}; n_init {args.n_init}, max_iter {args.max_iter}; torch {torch.__version__}")
    print("sklearn KMeans: " + ("yes" if KMeans is not None and not args.no_sklearn else "not used (not installed)"
                                if KMeans is None else "skipped"))
    print("k-means-constrained: " + ("yes" if KMeansConstrained is not None and not args.no_kmc else
                                      "NOT INSTALLED (pip install k-means-constrained); its rows are skipped"
                                      if KMeansConstrained is None else "skipped"))
    results = {}
    kmc_lines = []
    use_kmc = not args.no_kmc and KMeansConstrained is not None
    for shape in args.shapes.split(","):
        n, d, n_clusters = shape_of(shape)
        size = n // n_clusters
        sub_problem = use_kmc and args.kmc_experts < n_clusters
        for case in args.cases.split(","):
            x, planted = make_points(case, n, d, n_clusters, signal=args.signal, seed=args.seed)
            problem = f"{shape}/{case}"
            print(f"\n{problem}: {n} x {d}, {n_clusters} experts of {size}")
            # kmc on the full shape only when asked (time-capped) or when the shape is already small
            full_kmc = args.budget if use_kmc and (args.kmc_full or not sub_problem) else 0
            results[problem] = rows = solve_all(args, problem, x, n_clusters, planted,
                                                with_sklearn=not args.no_sklearn, kmc_budget=full_kmc)
            kmc_on = [(problem, rows)] if full_kmc else []
            if sub_problem:  # k-means-constrained on a same-expert-size sub-problem where it finishes
                k_sub = args.kmc_experts
                xs, ps = make_points(case, k_sub * size, d, k_sub, signal=args.signal, seed=args.seed + 7)
                sub = f"{shape}-sub/{case}"
                print(f"{sub}: {k_sub * size} x {d}, {k_sub} experts of {size} (sub-problem for k-means-constrained)")
                kmc_on.append((sub, solve_all(args, sub, xs, k_sub, ps, with_sklearn=not args.no_sklearn,
                                              kmc_budget=args.budget)))
            for name, r in kmc_on:
                kmc, ours = r["kmc"], r[f"ours@{args.devices[0]}"]
                if kmc.get("inertia") is not None:
                    kmc_lines.append(f"ours/k-means-constrained on {name}: inertia {ours['inertia'] / kmc['inertia']:.4f}"
                                     f", time {ours['seconds'] / kmc['seconds']:.4f} ({ours['seconds']:.2f} s vs "
                                     f"{kmc['seconds']:.2f} s)")
                else:
                    kmc_lines.append(f"ours/k-means-constrained on {name}: kmc killed after {kmc['seconds']:.0f} s "
                                     f"(ours {ours['seconds']:.2f} s)")
    headline_problem = "30b/random" if "30b/random" in results else next(iter(results))
    rows = results[headline_problem]
    shape, case = headline_problem.split("/")
    main_dev = "cpu" if "cpu" in args.devices else args.devices[0]  # the device of the figure line
    write_json(args.json, {
        "benchmark": "clustering",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "print_config")},
        "shapes": {s: dict(zip(("rows", "dim", "experts"), shape_of(s))) for s in args.shapes.split(",")},
        "results": {problem: {solver: {k: v for k, v in row.items() if k != "labels"} for solver, row in r.items()}
                    for problem, r in results.items()},
        "headline": {"problem": headline_problem, "device": main_dev,
                     "seconds_per_layer": rows[f"ours@{main_dev}"]["seconds"]},
        "kmc_comparison": kmc_lines,
    }, main_dev if main_dev.startswith("cuda") else None)
    print()
    for line in kmc_lines:
        print(line)
    if KMeansConstrained is None and not args.no_kmc:
        print("k-means-constrained not installed: no comparison with the paper's solver in this run")
    for key, row in rows.items():
        if key.startswith("ours@") and key != f"ours@{main_dev}":
            print(f"balanced k-means, {shape}-shape layer ({case} weights) on {key[5:]}: {row['seconds']:.2f} s")
    ours = rows[f"ours@{main_dev}"]
    lower = f"{ours['vs_lower']:.4f}" if ours["vs_lower"] else "n/a (sklearn not run or killed at --budget)"
    structured = results.get(f"{shape}/structured")
    if structured:
        o = structured[f"ours@{main_dev}"]
        print(f"balanced k-means, {shape}-shape layer (structured weights): inertia / planted {o['vs_planted']:.4f}, "
              f"ARI {fmt(o['ari'], '.3f')}")
    print(f"balanced k-means, {shape}-shape layer ({case} weights) on {main_dev}: {ours['seconds']:.2f} s"
          f"{' [target <= 20 s]' if shape == '30b' else ''}; inertia / unconstrained k-means {lower}, "
          f"/ random split {ours['vs_upper']:.4f}")


if __name__ == "__main__":
    main()
