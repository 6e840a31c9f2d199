"""The training loss's own peak memory: full logits + fp32 cross-entropy vs the chunked LM-head loss.

    python benchmarks/loss_memory.py                          # 4,096 tokens x 128,256 vocab, hidden 4,096, bf16
    python benchmarks/loss_memory.py --tokens 256 --vocab 2048 --hidden 128     # seconds (the smoke test)

Each variant runs in a fresh subprocess on CPU:

    full      logits = h @ W.T; F.cross_entropy(logits.float(), targets, reduction="sum").backward()
              (what the loop did: the model's logits, cast to fp32 for the loss)
    chunked   emoe_llm.train.chunked_loss.linear_cross_entropy(h, W, targets).sum().backward()

Both start from the same state: the LM-head weight W (vocab x hidden), the hidden states h (tokens x hidden) and a
zeroed weight-gradient buffer W.grad, all in the compute dtype; that is the baseline RSS (those belong to the model,
not to the loss). The kernel's peak-RSS mark is then reset (``/proc/self/clear_refs``) and the variant's loss +
backward run; its figure is peak RSS minus the baseline. The last line is ``chunked/full peak memory: R``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_json import add_json_args, print_config_and_exit, write_json

GiB = 2**30


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_variant(variant: str, *, tokens: int, vocab: int, hidden: int, dtype: str) -> dict:
    """In this process: build the baseline, reset the peak mark, run loss + backward; bytes above the baseline."""
    import torch
    import torch.nn.functional as F

    from emoe_llm.train.chunked_loss import linear_cross_entropy

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    weight = (torch.randn(vocab, hidden) * 0.02).to(dt).requires_grad_()
    h = torch.randn(tokens, hidden).to(dt).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    weight.grad = torch.zeros_like(weight)
    h.grad = torch.zeros_like(h)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    if variant == "full":
        loss = F.cross_entropy((h @ weight.t()).float(), targets, reduction="sum")
    else:
        loss = linear_cross_entropy(h, weight, targets).sum()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") * 1024
    return {"variant": variant, "peak_above_baseline": peak - base, "baseline_rss": base, "seconds": seconds,
            "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--variant", choices=("full", "chunked"), help=argparse.SUPPRESS)  # the subprocess
    add_json_args(p)
    args = p.parse_args(argv)
    if args.print_config:
        print_config_and_exit(args)
    shape = dict(tokens=args.tokens, vocab=args.vocab, hidden=args.hidden, dtype=args.dtype)
    if args.variant:
        print(json.dumps(run_variant(args.variant, **shape)))
        return 0
    results = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:8s} loss + backward: {r['peak_above_baseline'] / GiB:6.2f} GiB above the baseline "
              f"({r['baseline_rss'] / GiB:.2f} GiB: weight, hidden states, weight gradient), {r['seconds']:.1f} s, "
              f"loss {r['loss']:.4f}", flush=True)
    ratio = results["chunked"]["peak_above_baseline"] / results["full"]["peak_above_baseline"]
    write_json(args.json, {"benchmark": "loss_memory", "shape": shape, "results": results, "ratio": ratio})
    print(f"{args.tokens} tokens x {args.vocab} vocab, hidden {args.hidden}, {args.dtype}, CPU")
    print(f"chunked/full peak memory: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
