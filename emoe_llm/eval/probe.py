"""``emoe-llm probe CKPT --out DIR``: what EMoE masking costs a model before any training, layer by layer.

Forward-only. For every decoder layer L and every k in ``--ks``, only layer L's MLP is masked to its top-k experts
(the EMoE router, no training) and we measure on held-out instruction data:

  * dNLL: the increase of the mean next-token NLL on response tokens over the dense model;
  * the expert load of that layer: max/mean (1 = balanced) and the normalised entropy of the load (1 = uniform);
  * per layer, the balanced k-means inertia of the gate rows (keys) against a random balanced split (<1 = clustered).

It prints a table, writes ``DIR/probe.json`` and a heatmap ``DIR/probe.png`` (layer x k), and recommends the
cheapest layer set for a dNLL budget (greedy on the single-layer figures, then measured with those layers masked
together, since the costs are not exactly additive).

Speed: one dense pass records every layer's input; a probe of layer L then reruns only layers L.. on those inputs
and the LM head only on the response positions. SmolLM2-135M: a few CPU minutes; 7B: minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

from emoe_llm.checks import arg_number, nonnegative_int, positive_int
from emoe_llm.fileio import output_dir_error, write_files_atomically
from emoe_llm.tiny import DATA_DIR

EXAMPLES = """examples:
  emoe-llm probe $(scripts/get_smollm2.sh) --experts 16 --out runs/probe_smollm2       # dense + N
  emoe-llm probe runs/llama2_7b_emoe --out runs/probe_7b --ks 8,16,32 --device cuda    # converted: its N
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("checkpoint", metavar="CKPT", help="HF checkpoint dir or Hub id: converted (has an 'emoe' "
                        "block) or dense")
    parser.add_argument("--revision", metavar="REV", help="with a Hub id: the branch, tag or commit (default main)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output dir for probe.json and probe.png")
    parser.add_argument("--experts", type=positive_int, default=None, metavar="N",
                        help="experts per layer (required for a dense checkpoint; default: the converted one's)")
    parser.add_argument("--ks", default=None,
                        help="comma-separated top-k values (default: N/4 and N/2, e.g. 4,8 for N=16)")
    parser.add_argument("--layers", default="all", help="layers to probe: 'all', '0,2,26', '20:2' (default all)")
    parser.add_argument("--data", default=str(DATA_DIR / "instruct" / "alpaca_en_demo.json"),
                        help="instruction data (any format the data pipeline reads; default: the shipped alpaca demo)")
    parser.add_argument("--tokens", type=positive_int, default=300,
                        help="response tokens to score, taken from the *last* rows of --data (default 300)")
    parser.add_argument("--max-seq-len", type=arg_number(integer=True, ge=2), default=256,
                        help="rows are truncated to this (default 256)")
    parser.add_argument("--template", default="auto", help="chat template (default auto: the tokenizer's own)")
    parser.add_argument("--budget", type=arg_number(ge=0), default=0.1,
                        help="dNLL budget (nats) for the recommended layer set (default 0.1)")
    parser.add_argument("--recommend-k", type=positive_int, default=None,
                        help="k for the recommendation (default: the checkpoint's top-k, else N/4)")
    parser.add_argument("--max-layers", type=positive_int, default=4,
                        help="at most this many layers in the recommendation (default 4)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="clustering seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:1")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: fp32 on CPU (bf16 matmuls are ~100x slower there), bf16 on GPU")
    parser.add_argument("--no-plot", action="store_true", help="skip probe.png (no matplotlib needed)")


def run(args: argparse.Namespace) -> int:
    from emoe_llm import hub

    try:
        args.checkpoint = str(hub.resolve(args.checkpoint, revision=getattr(args, "revision", None)).path)
        result = probe(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"emoe-llm probe: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up while writing: nothing was left behind
        print(f"emoe-llm probe: error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(format_table(result))
    out = Path(args.out)
    print(f"wrote {out / 'probe.json'}" + ("" if args.no_plot else f" and {out / 'probe.png'}"))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# data


def held_out_rows(tokenizer, path: str, *, template: str, n_tokens: int, max_seq_len: int) -> list[tuple[list, list]]:
    """(input_ids, labels) of the last rows of ``path`` until ``n_tokens`` response tokens are collected."""
    from emoe_llm.data import IGNORE_INDEX, encode_conversation, read_source, resolve_template

    records, fmt, _ = read_source(path)
    if fmt == "text":
        raise ValueError(f"--data {path}: plain text; the probe scores responses of instruction/chat data")
    _, jinja = resolve_template(template, tokenizer)
    rows, total = [], 0
    for rec in reversed(records):
        ids, labels = encode_conversation(tokenizer, jinja, rec["messages"])
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        n = sum(x != IGNORE_INDEX for x in labels[1:])
        if n == 0:
            continue
        rows.append((ids, labels))
        total += n
        if total >= n_tokens:
            break
    if not rows:
        raise ValueError(f"--data {path}: no row with response tokens")
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# model pieces


def layer_inputs(model, ids):
    """Run the dense model once; return [(args, kwargs)] of every decoder layer call (hidden state first)."""
    import torch

    from emoe_llm.emoe import decoder_layers

    captured = []

    def hook(module, args, kwargs):
        captured.append((args, dict(kwargs)))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def nll_from(model, start: int, captured, target_pos, targets) -> tuple[float, int]:
    """Summed NLL of ``targets`` when layers ``start..`` are rerun from their recorded input (current MLPs)."""
    import torch
    import torch.nn.functional as F

    from emoe_llm.emoe import decoder_layers

    layers = decoder_layers(model)
    with torch.no_grad():
        args, kwargs = captured[start]
        hidden = args[0]
        for i in range(start, len(layers)):
            out = layers[i](hidden, *captured[i][0][1:], **captured[i][1])
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = model.model.norm(hidden)
        logits = model.get_output_embeddings()(hidden[0, target_pos]).float()
        return float(F.cross_entropy(logits, targets, reduction="sum")), int(targets.numel())


def keys_inertia(gate_weight, labels, n_experts: int) -> float:
    """Sum of squared distances of the L2-normalised gate rows to their expert's centroid."""
    import torch
    import torch.nn.functional as F

    x = F.normalize(gate_weight.detach().float(), dim=-1)
    sums = torch.zeros(n_experts, x.shape[1]).index_add_(0, labels, x)
    centroids = sums / torch.bincount(labels, minlength=n_experts)[:, None].float()
    return float(((x - centroids[labels]) ** 2).sum())


def load_stats(load, top_k: int) -> dict:
    """Load = fraction of tokens routed to each expert (sums to k): max/mean and normalised entropy."""
    p = (load / load.sum()).clamp_min(1e-12)
    entropy = float(-(p * p.log()).sum()) / math.log(len(p))
    return {"load_max_over_mean": round(float(load.max() / load.mean()), 4), "load_entropy": round(entropy, 4),
            "load": [round(float(x), 4) for x in load]}


# ---------------------------------------------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    """--device: auto -> cuda when available, else cpu; a CUDA device this machine lacks is an error, said up front."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")
    return requested


def probe(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from emoe_llm.arch import layout_of
    from emoe_llm.data import IGNORE_INDEX, load_tokenizer
    from emoe_llm.emoe import (EMoEMLP, EMoESettings, cluster_labels, decoder_layers, expert_permutation,
                               parse_layer_spec, permute_mlp_, random_balanced_labels)

    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}/config.json not found (expected an HF checkpoint dir)")
    error = output_dir_error(args.out, flag="--out")  # before minutes of computing
    if error:
        raise ValueError(error)
    if not args.no_plot:
        from .plotting import pyplot

        pyplot()  # matplotlib missing: said now, not after the computation
    config = json.loads((ckpt / "config.json").read_text())
    emoe_block = config.get("emoe")
    settings = EMoESettings.from_dict(emoe_block) if emoe_block else None
    n_experts = args.experts or (settings.n_experts if settings else None)
    if n_experts is None:
        raise ValueError(f"{ckpt} is a dense checkpoint: give --experts N (N must divide d_ff)")
    if settings and n_experts != settings.n_experts:
        raise ValueError(f"{ckpt} was converted with {settings.n_experts} experts; --experts {n_experts} differs "
                         "(probe the dense source instead)")
    d_ff = config["intermediate_size"]
    if d_ff % n_experts:
        raise ValueError(f"--experts {n_experts} does not divide d_ff={d_ff}")
    try:
        ks = [int(k) for k in args.ks.split(",")] if args.ks else sorted({max(1, n_experts // d) for d in (4, 2)})
    except ValueError:
        raise ValueError(f"--ks {args.ks!r}: expected comma-separated integers, e.g. 4,8") from None
    bad = [k for k in ks if not 1 <= k < n_experts]
    if bad:
        raise ValueError(f"--ks {bad}: each k must satisfy 1 <= k < N={n_experts}")
    rec_k = args.recommend_k or (settings.top_k if settings else max(1, n_experts // 4))
    if rec_k not in ks:
        ks = sorted(set(ks) | {rec_k})

    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float32 if device == "cpu" else torch.bfloat16)
    tokenizer = load_tokenizer(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    layers_all = decoder_layers(model)
    layout = layout_of(model)
    probe_layers = parse_layer_spec(args.layers, len(layers_all))
    rows = held_out_rows(tokenizer, args.data, template=args.template, n_tokens=args.tokens,
                         max_seq_len=args.max_seq_len)

    # cluster (or read the conversion's clusters) and permute every probed layer; inertia vs a random split
    block_labels = torch.arange(d_ff) // (d_ff // n_experts)
    permuted = set(settings.permuted_layers) if settings else set()
    clustering = {}
    for i in probe_layers:
        mlp = layers_all[i].mlp
        if i in permuted:
            labels = block_labels
        else:
            labels, _ = cluster_labels(layout.gate_weight(mlp), n_experts, seed=args.seed, device=device)
            permute_mlp_(mlp, expert_permutation(labels, n_experts), layout)
            labels = block_labels  # after the permutation expert e is the block e
        weight = layout.gate_weight(mlp).cpu()
        kmeans = keys_inertia(weight, labels, n_experts)
        rand = keys_inertia(weight, random_balanced_labels(d_ff, n_experts, seed=args.seed), n_experts)
        clustering[i] = {"inertia_kmeans": round(kmeans, 4), "inertia_random": round(rand, 4),
                         "inertia_ratio": round(kmeans / rand, 4)}

    # dense pass: per row, every layer's input and the dense NLL
    prepared = []
    dense_sum, n_tok = 0.0, 0
    for ids, labels in rows:
        ids_t = torch.tensor([ids], device=device)
        lab = torch.tensor(labels[1:], device=device)
        target_pos = (lab != IGNORE_INDEX).nonzero().squeeze(-1)
        targets = lab[target_pos]
        captured = layer_inputs(model, ids_t)
        s, n = nll_from(model, 0, captured, target_pos, targets)
        dense_sum, n_tok = dense_sum + s, n_tok + n
        prepared.append((captured, target_pos, targets))
    dense_nll = dense_sum / n_tok

    def masked_nll(masked: dict[int, int]) -> tuple[float, dict]:
        """Mean NLL with layers {layer: k} masked; per-layer expert load over every token of the rows."""
        wrapped = {}
        for i, k in masked.items():
            wrapped[i] = layers_all[i].mlp
            layers_all[i].mlp = EMoEMLP(wrapped[i], n_experts=n_experts, top_k=k, layer_idx=i,
                                         layout=layout)
            layers_all[i].mlp.training = True  # only switches on its load counters; the model stays in eval
        try:
            start = min(masked)
            total = sum(nll_from(model, start, cap, pos, tgt)[0] for cap, pos, tgt in prepared)
            loads = {i: layers_all[i].mlp.pop_expert_load().cpu() for i in masked}
        finally:
            for i, mlp in wrapped.items():
                layers_all[i].mlp = mlp
        return total / n_tok, loads

    results = []
    for i in probe_layers:
        by_k = {}
        for k in ks:
            nll, loads = masked_nll({i: k})
            by_k[str(k)] = {"nll": round(nll, 5), "dnll": round(nll - dense_nll, 5), **load_stats(loads[i], k)}
        results.append({"layer": i, **clustering[i], "by_k": by_k})
        print(f"  layer {i:3d}: dNLL " + " ".join(f"k={k}:{by_k[str(k)]['dnll']:+.3f}" for k in ks), flush=True)

    recommendation = recommend(results, k=rec_k, budget=args.budget, max_layers=args.max_layers)
    if recommendation["layers"]:
        nll, _ = masked_nll({i: rec_k for i in recommendation["layers"]})
        recommendation["measured_dnll"] = round(nll - dense_nll, 5)
    result = {
        "checkpoint": str(ckpt), "n_experts": n_experts, "ks": ks, "layers": probe_layers,
        "data": args.data, "rows": len(rows), "response_tokens": n_tok, "max_seq_len": args.max_seq_len,
        "dense_nll": round(dense_nll, 5), "device": device, "dtype": str(dtype).replace("torch.", ""),
        "seconds": round(time.perf_counter() - t0, 1), "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "recommendation": recommendation, "per_layer": results,
    }
    writers = {"probe.json": lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n")}
    if not args.no_plot:
        writers["probe.png"] = lambda tmp: plot_probe(result, tmp)
    write_files_atomically(args.out, writers)  # both or neither
    return result


def recommend(results: list[dict], *, k: int, budget: float, max_layers: int) -> dict:
    """Greedy: the layers with the smallest single-layer dNLL at ``k`` while their sum stays within ``budget``."""
    ranked = sorted(results, key=lambda r: r["by_k"][str(k)]["dnll"])
    chosen, spent = [], 0.0
    for r in ranked:
        cost = max(0.0, r["by_k"][str(k)]["dnll"])
        if len(chosen) >= max_layers or spent + cost > budget:
            break
        chosen.append(r["layer"])
        spent += cost
    return {"k": k, "budget": budget, "max_layers": max_layers, "layers": sorted(chosen),
            "sum_single_layer_dnll": round(spent, 5)}


def format_table(result: dict) -> str:
    ks = result["ks"]
    head = (f"dense NLL {result['dense_nll']:.4f} on {result['response_tokens']} response tokens "
            f"({result['rows']} rows), N={result['n_experts']}, {result['device']} {result['dtype']}, "
            f"{result['seconds']:.0f} s\n")
    cols = "".join(f"  dNLL k={k:<3d}" for k in ks) + "".join(f"  max/mean k={k:<3d}" for k in ks)
    lines = [head, f"layer{cols}  entropy k={ks[0]:<3d}  inertia kmeans/random"]
    for r in result["per_layer"]:
        b = r["by_k"]
        lines.append(f"{r['layer']:5d}" + "".join(f"  {b[str(k)]['dnll']:+10.4f}" for k in ks)
                     + "".join(f"  {b[str(k)]['load_max_over_mean']:14.2f}" for k in ks)
                     + f"  {b[str(ks[0])]['load_entropy']:11.3f}  {r['inertia_ratio']:21.3f}")
    rec = result["recommendation"]
    if rec["layers"]:
        lines.append(f"\nrecommended EMoE layers for dNLL <= {rec['budget']} at k={rec['k']}: "
                     f"{','.join(map(str, rec['layers']))} (sum of single-layer dNLL {rec['sum_single_layer_dnll']:+.4f}, "
                     f"measured together {rec['measured_dnll']:+.4f})")
    else:
        lines.append(f"\nno layer fits a dNLL budget of {rec['budget']} at k={rec['k']}: raise --budget or k")
    return "\n".join(lines)


def plot_probe(result: dict, path: Path) -> None:
    """Heatmaps layer x k: dNLL (log colour scale) and load max/mean."""
    from .plotting import pyplot

    plt = pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    ks = result["ks"]
    layers = [r["layer"] for r in result["per_layer"]]
    dnll = np.array([[r["by_k"][str(k)]["dnll"] for k in ks] for r in result["per_layer"]])
    load = np.array([[r["by_k"][str(k)]["load_max_over_mean"] for k in ks] for r in result["per_layer"]])
    fig, axes = plt.subplots(1, 2, figsize=(4.4 + 1.4 * len(ks), 1.6 + 0.28 * len(layers)), squeeze=False)
    n = result["n_experts"]
    panels = [(axes[0][0], np.clip(dnll, 1e-3, None), "dNLL (nats), only this layer masked", "viridis", True),
              (axes[0][1], load, "expert load max/mean\n(1 = balanced, N/k = one expert on every token)", "magma",
               False)]
    for ax, data, title, cmap, log in panels:
        norm = LogNorm() if log else Normalize(vmin=1.0, vmax=max(n / min(ks), float(data.max())))
        im = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, origin="lower")
        ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        raw = dnll if log else load
        for y in range(len(layers)):
            for x in range(len(ks)):
                bright = norm(data[y, x]) > 0.6  # light cells get dark text
                ax.text(x, y, f"{raw[y, x]:.2f}" if log else f"{raw[y, x]:.1f}", ha="center", va="center",
                        fontsize=6, color="k" if bright else "w")
        fig.colorbar(im, ax=ax, shrink=0.8)
    rec = result["recommendation"]
    fig.suptitle(f"EMoE probe: {Path(result['checkpoint']).name}, N={n}, dense NLL {result['dense_nll']:.3f} on "
                 f"{result['response_tokens']} tokens\nrecommended for dNLL <= {rec['budget']} at k={rec['k']}: "
                 f"layers {rec['layers'] or 'none'}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
