"""``emoe-llm convert SRC DST --experts N --top-k K --layers 28,30``: see :mod:`emoe_llm.convert.convert`."""

from __future__ import annotations

import argparse
import signal
import sys

EXAMPLES = """examples:
  emoe-llm convert Llama-2-7b-hf Llama-2-7b-emoe --experts 64 --top-k 16 --layers 28,30
  emoe-llm convert llama-30b llama-30b-emoe --experts 256 --top-k 64 --layers 56:2 --all-layers --device cuda
  emoe-llm convert llama-30b llama-30b-emoe --experts 256 --top-k 64 --layers 56:2 --resume   # after a Ctrl-C
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", metavar="SRC", help="local HF checkpoint dir (sharded or single-file safetensors)")
    parser.add_argument("dst", metavar="DST", help="output dir (created; must be empty unless --overwrite)")
    parser.add_argument("--experts", type=int, required=True, metavar="N", help="experts per layer; must divide d_ff")
    parser.add_argument("--top-k", type=int, required=True, metavar="K", help="experts kept per token at train time")
    parser.add_argument("--layers", required=True,
                        help="EMoE layers: '28,30', START:EVERY like '28:2' (paper style), or 'all'")
    parser.add_argument("--all-layers", action="store_true",
                        help="cluster+permute every layer so the EMoE layer set can be changed later")
    parser.add_argument("--device", default="cpu", help="where to run the clustering: cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="clustering seed (default 0)")
    parser.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep",
                        help="output dtype of floating tensors (default keep)")
    parser.add_argument("--method", choices=["kmeans", "kmeans_exact", "random"], default="kmeans",
                        help="kmeans = EMoE (fast balanced assignment); kmeans_exact = EMoE with the optimal balanced "
                             "assignment in every step (as k-means-constrained; minutes per layer at 30B width); "
                             "random = the paper's random-split ablation")
    parser.add_argument("--assign", choices=["fast", "exact"], default=None,
                        help="balanced assignment of k-means: exact = --method kmeans_exact (default fast)")
    parser.add_argument("--n-init", type=int, default=3, help="k-means restarts (default 3)")
    parser.add_argument("--max-iter", type=int, default=30, help="k-means iterations per restart (default 30)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion into the same DST")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pytorch_model*.bin (loaded with torch.load(weights_only=True))")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint, format_summary
    from .errors import ConversionError

    # Slurm sends SIGTERM at the time limit / on preemption: stop like Ctrl-C, keeping finished work for --resume.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if args.assign == "exact":
        if args.method == "random":
            print("emoe-llm convert: error: --assign exact applies to k-means, not --method random", file=sys.stderr)
            return 2
        args.method = "kmeans_exact"
    try:
        summary = convert_checkpoint(
            args.src, args.dst, n_experts=args.experts, top_k=args.top_k, layers=args.layers,
            all_layers=args.all_layers, seed=args.seed, method=args.method, n_init=args.n_init,
            max_iter=args.max_iter, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
            resume=args.resume, allow_pickle=args.allow_pickle, progress=not args.quiet,
        )
    except ConversionError as e:
        print(f"emoe-llm convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emoe-llm convert: interrupted; DST was not touched (rerun with --resume to continue)", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
