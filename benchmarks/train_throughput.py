"""Training throughput and MFU, dense vs EMoE, under DeepSpeed ZeRO-3 (issue #7).

A Llama with the real widths of Llama-3.2-1B or TinyLlama-1.1B (random init, no download), converted with
``apply_emoe`` (paper layer set: the last two even layers, N=64, k=16), trained with ``deepspeed.initialize``
(ZeRO-3, bf16 on GPU) on random tokens, full sequence length. Dense and EMoE runs are interleaved round by round in
one process on the same engine, each step being the training recipe's own ``train_step`` (its loss normalisation,
non-finite probe and fp32 cross-entropy included): the dense variant sets every EMoEMLP to k = N, which skips the mask and computes
exactly the dense MLP (the wrapper adds one Python call per layer; swapping modules under a live ZeRO-3 engine would
invalidate its prefetch trace instead).

MFU = model FLOPs per second / peak, with model FLOPs per token = 6 * P + 12 * n_layers * hidden * seq (PaLM,
appendix B: P counts every matmul weight including the LM head but not the embedding lookup; attention counted
without the causal half). The masked EMoE forward does the same FLOPs as dense, so both use the same count.
Peak = dense bf16 tensor-core TFLOP/s from the table below (override with --peak-tflops); "n/a" on CPU.

    python benchmarks/train_throughput.py                                    # 1 process; CPU: small defaults
    python benchmarks/train_throughput.py --preset llama-3.2-1b              # 1 GPU: 16 layers, seq 2048, bf16
    deepspeed --num_gpus 8 benchmarks/train_throughput.py --preset tinyllama-1.1b   # multi-GPU, one node
    python benchmarks/train_throughput.py --peak-tflops 989 --extra-peak-tflops 790 --json out.json   # H200, + JSON

The last lines are a short table and ``emoe/dense step time: R (min a, max b)``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import warnings

from pathlib import Path

import torch

from bench_json import add_json_args, print_config_and_exit, write_json

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "llama-3.2-1b": dict(hidden=2048, ffn=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tie=True,
                         rope_theta=500000.0),
    "tinyllama-1.1b": dict(hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000, tie=False,
                           rope_theta=10000.0),
    # smoke tests only
    "tiny": dict(hidden=64, ffn=256, layers=4, heads=4, kv_heads=2, vocab=128, tie=False, rope_theta=10000.0),
}
# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, no sparsity). First match on the device name wins.
PEAK_TFLOPS = [("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("A10", 125.0)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b" if cuda else "tinyllama-1.1b")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's on GPU, 2 on CPU)")
    p.add_argument("--seq", type=int, help="sequence length (default 2048 on GPU, 256 on CPU)")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per step (default 4 on GPU, 1 on CPU)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--emoe-layers", default="paper", help="'paper' (last two even layers), 'all', or '12,14'")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5 on GPU, 3 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps per variant per round (default 5 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant before the first round (2 GPU, 1 CPU)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (recompute is not in MFU)")
    p.add_argument("--attn", default="auto", help="auto (the recipe's choice: flash_attention_2 if installed on "
                   "CUDA, else sdpa), sdpa, eager, flash_attention_2")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "z3.json"),
                   help="the shipped ZeRO-3 config; 'auto' values are filled as the recipe does")
    p.add_argument("--peak-tflops", type=float, help="override the peak table (per device)")
    p.add_argument("--extra-peak-tflops", type=float, help="also report MFU against this peak (e.g. the measured "
                   "bf16 matmul rate, ~790 TFLOP/s on an H200, next to the 989 datasheet figure)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_json_args(p)
    args = p.parse_args(argv)
    defaults = dict(seq=(2048, 256), micro_batch=(4, 1), dtype=("bfloat16", "float32"), rounds=(5, 3), steps=(5, 2),
                    warmup=(2, 1))
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    if args.layers is None:
        args.layers = PRESETS[args.preset]["layers"] if cuda else 2
    if args.print_config:
        print_config_and_exit(args)
    return args


def paper_layers(n_layers: int) -> list[int]:
    """The paper's layer choice scaled to n_layers: the last two even layers (28, 30 of 32)."""
    last_even = n_layers - 1 if (n_layers - 1) % 2 == 0 else n_layers - 2
    return sorted({max(last_even - 2, 0), last_even})


def init_single_process_env():
    """Let `python benchmarks/train_throughput.py` run as a 1-rank job without a launcher."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"{name}, bf16 dense"
    return None, f"{name}: not in the peak table (pass --peak-tflops)"


def build_model(args, preset, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from emoe_llm.emoe import apply_emoe

    config = LlamaConfig(
        vocab_size=preset["vocab"], hidden_size=preset["hidden"], intermediate_size=preset["ffn"],
        num_hidden_layers=args.layers, num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
        max_position_embeddings=max(args.seq, 2048), rope_theta=preset["rope_theta"], rms_norm_eps=1e-5,
        tie_word_embeddings=preset["tie"], bos_token_id=1, eos_token_id=2, use_cache=False,
    )
    try:  # the training recipe's choice, when it is there
        from emoe_llm.train.recipe import pick_attn_implementation

        config._attn_implementation = pick_attn_implementation(args.attn, dtype)
    except ImportError:
        config._attn_implementation = "sdpa" if args.attn == "auto" else args.attn
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    layers = paper_layers(args.layers) if args.emoe_layers == "paper" else args.emoe_layers
    # Random balanced split: the masked forward costs the same whatever the clusters are, and it skips minutes of
    # clustering at 1B widths (benchmarks/clustering.py times the clustering itself).
    settings = apply_emoe(model, n_experts=args.experts, top_k=args.top_k, layers=layers, method="random")
    model.to(dtype)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, settings


def load_ds_config(args, world, dtype, hidden, cuda):
    """The shipped ZeRO-3 JSON with its "auto" values filled like emoe_llm.train.config.fill_ds_config does."""
    path = Path(args.ds_config)
    ds = json.loads(path.read_text()) if path.exists() else {"zero_optimization": {"stage": 3}}
    ds.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=1,
              train_batch_size=args.micro_batch * world, gradient_clipping=1.0)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise SystemExit(f"{path}: this benchmark measures ZeRO-3; the config says stage {zero.get('stage')}")
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in auto.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if not cuda:
        zero["overlap_comm"] = False
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds.pop("fp16", None)
    ds.setdefault("steps_per_print", 10**9)
    ds["wall_clock_breakdown"] = False
    return ds


def flops_per_token(model, args):
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size
    params = sum(p.numel() for p in model.parameters())
    # matmul weights: everything but the embedding lookup (and norms), plus the LM head (tied or not)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    matmul = params - norms - (0 if cfg.tie_word_embeddings else embed)  # the untied input table is a lookup
    return 6 * matmul + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq, params, matmul


def main(argv=None):
    args = parse_args(argv)
    # DeepSpeed calls the deprecated all_gather_into_tensor / reduce_scatter_tensor: one FutureWarning per step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    init_single_process_env()
    import deepspeed

    from emoe_llm.emoe import emoe_modules
    from emoe_llm.train.recipe import train_step
    from emoe_llm.train.shm import release_deepspeed_shm

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    release_deepspeed_shm()  # DeepSpeed's CPU comm op leaves a /dev/shm segment per rank otherwise
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    log = print if rank == 0 else (lambda *a, **k: None)

    model, settings = build_model(args, preset, dtype)
    fpt, n_params, n_matmul = flops_per_token(model, args)
    ds_config = load_ds_config(args, world, dtype, preset["hidden"], cuda)
    optim_kw = {"fused": True} if cuda else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, **optim_kw)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()
    emoe = list(emoe_modules(engine.module))

    gen = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, preset["vocab"], (args.micro_batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids}  # the collator's shape: every token a target, no padding
    tokens_per_step = args.micro_batch * args.seq * world

    def set_variant(name):
        for m in emoe:
            m.top_k = settings.top_k if name == "emoe" else m.n_experts

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
        torch.distributed.barrier()

    def run(name):
        """One timed ZeRO-3 training step of one variant."""
        set_variant(name)
        sync()
        t0 = time.perf_counter()
        result = train_step(engine, [batch], device=device, world=world)
        sync()
        if result["nonfinite"]:
            raise SystemExit(f"non-finite loss in a {name} step: the throughput figures would be meaningless")
        return time.perf_counter() - t0

    peak, peak_src = peak_tflops(args, device)
    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    log(f"device: {world} x {where}; torch {torch.__version__}, deepspeed {deepspeed.__version__}, ZeRO-3, {args.dtype}")
    log(f"ZeRO-3 config: {args.ds_config if Path(args.ds_config).exists() else 'built-in stage 3'}; attention: "
        f"{model.config._attn_implementation}")
    log(f"model: {args.preset} widths, {args.layers} layers, {n_params / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M "
        f"matmul), seq {args.seq}, micro-batch {args.micro_batch}, grad-ckpt {args.grad_ckpt}; EMoE N={settings.n_experts} "
        f"k={settings.top_k} in layers {settings.layers}; {fpt / 1e9:.2f} GFLOP/token; peak: "
        f"{'%g TFLOP/s' % peak if peak else 'n/a'} ({peak_src})")
    names = ["dense", "emoe"]
    for _ in range(args.warmup):
        for name in names:
            run(name)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = {n: [] for n in names}  # every timed step
    fastest = {n: [] for n in names}  # per round
    mem = {}
    for r in range(args.rounds):
        round_times = {n: [] for n in names}
        for _ in range(args.steps):  # alternate single steps: dense, emoe, dense, emoe, ... (order flips per round)
            for name in (names if r % 2 == 0 else names[::-1]):
                round_times[name].append(run(name))
                if cuda:
                    mem[name] = max(mem.get(name, 0), torch.cuda.max_memory_allocated(device))
                    torch.cuda.reset_peak_memory_stats(device)
        for name in names:
            times[name] += round_times[name]
            fastest[name].append(min(round_times[name]))
        log(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {min(round_times[n]) * 1e3:.0f} ms/step (fastest "
                                                          f"of {args.steps})" for n in names), flush=True)

    ratios = [e / d for e, d in zip(fastest["emoe"], fastest["dense"])]
    results = {}
    log(f"\ntokens/s and MFU from the median of all {args.rounds * args.steps} timed steps per variant; the ratio "
        f"from each round's fastest steps")
    log(f"{'variant':<7} {'tokens/s':>10} {'tok/s/dev':>10} {'step ms (min-max)':>20} {'TFLOP/s/dev':>12} "
        f"{'MFU':>6} {'peak mem':>9}")
    for name in names:
        med = statistics.median(times[name])
        tps = tokens_per_step / med
        tflops = fpt * tps / world / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        results[name] = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / world, "step_ms_median": med * 1e3,
                         "step_ms_all": [t * 1e3 for t in times[name]], "tflops_per_device": tflops,
                         "mfu": tflops / peak if peak else None,
                         "mfu_at_extra_peak": tflops / args.extra_peak_tflops if args.extra_peak_tflops else None,
                         "peak_mem_gib": mem[name] / 2**30 if name in mem else None}
        mem_s = f"{mem[name] / 2**30:.1f} GiB" if name in mem else "-"
        log(f"{name:<7} {tps:>10.0f} {tps / world:>10.0f} {med * 1e3:>8.0f} ({min(times[name]) * 1e3:.0f}-"
            f"{max(times[name]) * 1e3:.0f}) {tflops:>12.2f} {mfu:>6} {mem_s:>9}")
    if args.extra_peak_tflops:
        log("MFU against --extra-peak-tflops %g: " % args.extra_peak_tflops + ", ".join(
            f"{n} {r['mfu_at_extra_peak']:.1%}" for n, r in results.items()))
    if rank == 0:
        write_json(args.json, {
            "benchmark": "train_throughput",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "print_config", "local_rank")},
            "world_size": world, "dtype": args.dtype, "attention": model.config._attn_implementation,
            "zero_stage": 3, "params": n_params, "matmul_params": n_matmul, "flops_per_token": fpt,
            "emoe": {"n_experts": settings.n_experts, "top_k": settings.top_k, "layers": list(settings.layers)},
            "peak_tflops": peak, "peak_source": peak_src, "extra_peak_tflops": args.extra_peak_tflops,
            "variants": results,
            "step_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                           "all": ratios},
            "mfu_target": 0.5,
        }, device)
    log(f"emoe/dense step time: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
