"""Step-time overhead of EMoE's masked forward over the dense model (issue #7).

Same Llama, same batch, same parameters and optimizer: a forward + backward + AdamW step with

  dense      every MLP is the plain LlamaMLP
  emoe-paper EMoEMLP (compute-all-then-mask, section 1.4 / 5.1 of the method notes) in the paper's layer set, the
             last two even layers ("28:2" on a 32-layer 7B model; L-4 and L-2 here)
  emoe-all   EMoEMLP in every layer (the worst case)

The three variants share one model: the EMoE MLPs wrap the very same Linear modules (``enable_emoe`` /
``disable_emoe`` swap the wrapper), so weights, optimizer state, batch and allocator are identical. Steps are
interleaved one by one in one process (dense, paper, all, dense, paper, all, ...; the order rotates every round) so
that load from other processes hits all variants alike. A round times --steps steps of each variant and keeps each
variant's fastest step (a burst of load from another process only ever adds time); the ratio is taken per round,
and we report its median with min and max over the rounds.

Then a per-FFN-layer microbenchmark: one LlamaMLP vs the EMoEMLP wrapping it, forward + backward on the same
(batch, seq, hidden) input, interleaved the same way.

    python benchmarks/step_overhead.py                      # CPU: small Llama (~20M params), fp32, ~1-2 minutes
    python benchmarks/step_overhead.py --preset 7b-slice    # CUDA: Llama-2-7B widths, 8 layers, seq 2048, bf16
    python benchmarks/step_overhead.py --rounds 2 --steps 1 --hidden 64 --ffn 256 --layers 4 --seq 32   # smoke
    python benchmarks/step_overhead.py --preset 7b-slice --json results/step_overhead.json          # + JSON

The last line is the figure: ``emoe/dense step time: R (min a, max b)`` for the paper layer set.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from bench_json import add_json_args, print_config_and_exit, write_json
from emoe_llm.emoe import EMoEMLP, apply_emoe, disable_emoe, enable_emoe
from emoe_llm.tiny import tiny_llama_config

PRESETS = {
    # CPU default: a "tiny-to-small" Llama; d_ff 2752 = 16 experts x 172 neurons (the 7B expert size)
    "small": dict(hidden=512, ffn=2752, layers=8, heads=8, kv_heads=4, vocab=4096, seq=256, batch=1,
                  experts=16, top_k=4, dtype="float32"),
    # CUDA default: Llama-2-7B widths (d 4096, d_ff 11008, N=64, k=16) with 8 of its 32 layers, seq 2048
    "7b-slice": dict(hidden=4096, ffn=11008, layers=8, heads=32, kv_heads=32, vocab=32000, seq=2048, batch=1,
                     experts=64, top_k=16, dtype="bfloat16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: small on CPU, 7b-slice on CUDA")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    for name, typ in [("hidden", int), ("ffn", int), ("layers", int), ("heads", int), ("kv-heads", int),
                      ("vocab", int), ("seq", int), ("batch", int), ("experts", int), ("top-k", int)]:
        p.add_argument(f"--{name}", type=typ, help="override the preset")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (preset: fp32 CPU, bf16 CUDA)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (each measures every variant)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round (the fastest counts)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the first round")
    p.add_argument("--micro-rounds", type=int, default=15, help="rounds of the per-layer microbenchmark (0: skip)")
    p.add_argument("--micro-reps", type=int, default=3, help="fwd+bwd per variant per micro round (fastest counts)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    add_json_args(p)
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.preset = args.preset or ("7b-slice" if args.device.startswith("cuda") else "small")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.print_config:
        print_config_and_exit(args)
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paper_layers(n_layers: int) -> list[int]:
    """The paper's layer choice scaled to n_layers: the last two even layers (28, 30 of 32)."""
    last_even = n_layers - 1 if (n_layers - 1) % 2 == 0 else n_layers - 2
    return sorted({max(last_even - 2, 0), last_even})


def spread(xs):
    return statistics.median(xs), min(xs), max(xs)


def summary(xs) -> dict:
    med, lo, hi = spread(xs)
    return {"median": med, "min": lo, "max": hi, "all": list(xs)}


def fmt(xs, unit=""):
    med, lo, hi = spread(xs)
    return f"{med:.3f}{unit} (min {lo:.3f}, max {hi:.3f})"


def step_benchmark(args, device, dtype):
    config = tiny_llama_config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 128),
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    paper = paper_layers(args.layers)
    # Cluster + permute every layer once (random split: the masked path costs the same whatever the clusters are,
    # and it keeps the setup fast at 7B widths); the variants then only swap MLP wrappers.
    apply_emoe(model, n_experts=args.experts, top_k=args.top_k, layers=paper, permute_layers="all",
               method="random", enable=False)
    model.to(device=device, dtype=dtype).train()
    n_params = sum(p.numel() for p in model.parameters())
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    variants = {
        "dense": lambda: disable_emoe(model),
        "emoe-paper": lambda: enable_emoe(model, layers=paper),
        "emoe-all": lambda: enable_emoe(model, layers="all"),
    }

    def run(name):
        """One timed training step of one variant."""
        variants[name]()
        n_emoe = sum(isinstance(m, EMoEMLP) for m in model.modules())
        assert n_emoe == {"dense": 0, "emoe-paper": len(paper), "emoe-all": args.layers}[name], (name, n_emoe)
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    print(f"model: {args.layers} layers, hidden {args.hidden}, d_ff {args.ffn}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}, {n_params / 1e6:.1f}M params, {args.dtype}; batch {args.batch} x seq {args.seq}; "
          f"EMoE N={args.experts} k={args.top_k}, paper layers {paper} ({len(paper)}/{args.layers}), all layers")
    names = list(variants)
    for _ in range(args.warmup):
        for name in names:
            run(name)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        best = {name: float("inf") for name in names}
        for _ in range(args.steps):
            for name in order:
                best[name] = min(best[name], run(name))
        for name in names:
            times[name].append(best[name])
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names),
              flush=True)
    ratios = {n: [t / d for t, d in zip(times[n], times["dense"])] for n in names[1:]}
    disable_emoe(model)
    del optimizer, model
    return times, ratios, paper


def micro_benchmark(args, device, dtype):
    """One FFN layer: LlamaMLP vs the EMoEMLP that wraps it (same weights), forward + backward."""
    config = tiny_llama_config(hidden_size=args.hidden, intermediate_size=args.ffn)
    torch.manual_seed(args.seed)
    dense = LlamaMLP(config).to(device=device, dtype=dtype)
    emoe = EMoEMLP(dense, n_experts=args.experts, top_k=args.top_k).train()
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)

    def run(module):
        sync(device)
        t0 = time.perf_counter()
        module(x).backward(grad_out)
        sync(device)
        for p in dense.parameters():
            p.grad = None
        x.grad = None
        return time.perf_counter() - t0

    modules = {"dense": dense, "emoe": emoe}
    for m in modules.values():
        run(m)
    times = {"dense": [], "emoe": []}
    for r in range(args.micro_rounds):
        best = {"dense": float("inf"), "emoe": float("inf")}
        for _ in range(args.micro_reps):
            for name in (["dense", "emoe"] if r % 2 == 0 else ["emoe", "dense"]):
                best[name] = min(best[name], run(modules[name]))
        for name in best:
            times[name].append(best[name])
    return times, [e / d for e, d in zip(times["emoe"], times["dense"])]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}")

    times, ratios, paper = step_benchmark(args, device, dtype)
    print(f"\nstep time (forward + backward + AdamW), fastest of {args.steps} per round; median over {args.rounds} "
          f"rounds (min, max):")
    for name, ts in times.items():
        print(f"  {name:<11} {fmt([t * 1e3 for t in ts], ' ms')}")
    mtimes, mratios = None, None
    if args.micro_rounds > 0:
        mtimes, mratios = micro_benchmark(args, device, dtype)
        print(f"\nper-FFN-layer fwd+bwd ({args.batch}x{args.seq} tokens, {args.hidden}->{args.ffn}):")
        for name, ts in mtimes.items():
            print(f"  {name:<11} {fmt([t * 1e3 for t in ts], ' ms')}")
        print(f"  emoe/dense FFN layer fwd+bwd: {fmt(mratios)}")
    all_med = statistics.median(ratios["emoe-all"])
    # Per-layer overhead o from the all-layers run, scaled to the paper's 7B setting (2 of 32 EMoE layers),
    # assuming equal layers and ignoring embedding/head time (so it slightly overstates the overhead).
    print(f"\nestimate for 2 EMoE layers of 32 (paper 7B setting): {1 + (all_med - 1) * 2 / 32:.4f}")
    print(f"emoe/dense step time, all {args.layers} layers EMoE: {fmt(ratios['emoe-all'])}")
    write_json(args.json, {
        "benchmark": "step_overhead",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "print_config")},
        "paper_layers": paper,
        "step_ms": {name: [t * 1e3 for t in ts] for name, ts in times.items()},
        "step_ratio": {name: summary(rs) for name, rs in ratios.items()},
        "ffn_layer_ms": {name: [t * 1e3 for t in ts] for name, ts in mtimes.items()} if mtimes else None,
        "ffn_layer_ratio": summary(mratios) if mratios else None,
        "estimate_2_of_32_layers": 1 + (all_med - 1) * 2 / 32,
        "target": 1.03,
        "meets_target": statistics.median(ratios["emoe-paper"]) <= 1.03,
    }, device)
    print(f"emoe/dense step time: {fmt(ratios['emoe-paper'])}  [layers {paper} of {args.layers}; target <= 1.03]")


if __name__ == "__main__":
    main()
