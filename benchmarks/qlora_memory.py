"""QLoRA vs plain LoRA on CPU: weight memory, peak memory and step time of one training step (issue #21).

A random Llama of the given widths is written once as an fp32 safetensors checkpoint; each variant then runs in its
own process (so its peak RSS is its own): load it (plain fp32, or NF4 with the recipe's own
``qlora_quantization_config`` = double-quantised NF4, fp32 compute and storage), wrap it with peft LoRA on
q/v/gate/up/down, and time forward + backward + AdamW on the adapters over random tokens. One process, no DeepSpeed:
the figures are the model's, not ZeRO-3's partitioning (which divides both variants' weights by the world size).

    python benchmarks/qlora_memory.py                              # "small": 8 layers, hidden 512, vocab 32000
    python benchmarks/qlora_memory.py --layers 4 --hidden 64 --ffn 256 --heads 4 --kv-heads 2 --vocab 128 --seq 16

The last line is ``qlora/lora step time: R (peak RSS Q / L MiB)``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_json import add_json_args, print_config_and_exit, write_json

MiB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    add_json_args(p)
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(args) -> dict:
    """In the child process: load, wrap, train; one JSON line on stdout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if args.child == "qlora":
        from emoe_llm.train.recipe import keep_4bit_layout, qlora_quantization_config

        kwargs["quantization_config"] = qlora_quantization_config(torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, **kwargs)
    if args.child == "qlora":
        keep_4bit_layout(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rss_loaded = rss_bytes()
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"variant": args.child, "weight_bytes": weight_bytes, "trainable_params": sum(p.numel() for p in trainable),
            "rss_after_load_bytes": rss_loaded,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds_median": statistics.median(times), "step_seconds": times, "losses": losses}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_config:
        print_config_and_exit(args)
    if args.child:
        print(json.dumps(run_variant(args)))
        return 0
    from emoe_llm.tiny import save_tiny_checkpoint

    shape = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                 max_position_embeddings=max(1024, args.seq))
    results = {}
    with tempfile.TemporaryDirectory(prefix="qlora_bench.") as tmp:
        ckpt = save_tiny_checkpoint(Path(tmp) / "model", **shape)
        for variant in ("lora", "qlora"):
            cmd = [sys.executable, __file__, "--child", variant, "--checkpoint", str(ckpt), "--vocab", str(args.vocab),
                   "--seq", str(args.seq), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--rank", str(args.rank)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'variant':8} {'weights MiB':>12} {'RSS loaded MiB':>15} {'peak RSS MiB':>13} {'step s (median)':>16}")
    for v, r in results.items():
        print(f"{v:8} {r['weight_bytes'] / MiB:12.1f} {r['rss_after_load_bytes'] / MiB:15.1f} "
              f"{r['peak_rss_bytes'] / MiB:13.1f} {r['step_seconds_median']:16.3f}")
    lo, q = results["lora"], results["qlora"]
    ratio = q["step_seconds_median"] / lo["step_seconds_median"]
    write_json(args.json, {"benchmark": "qlora_memory", "shape": shape, "seq": args.seq,
                           "micro_batch": args.micro_batch, "lora_rank": args.rank, "results": results,
                           "qlora_lora_step_ratio": ratio})
    print(f"qlora/lora step time: {ratio:.2f} (peak RSS {q['peak_rss_bytes'] / MiB:.0f} / "
          f"{lo['peak_rss_bytes'] / MiB:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
