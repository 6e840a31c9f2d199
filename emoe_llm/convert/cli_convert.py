"""``emoe-llm convert SRC DST``: make DST the EMoE conversion of SRC, with the settings of a recipe's ``emoe:`` section
(``--config``) or given as flags. A DST that already is that conversion is kept (k and the active layers are
training-time settings: changing them never re-clusters). See :mod:`emoe_llm.convert.prepare`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..checks import nonnegative_int, positive_int

EXAMPLES = """examples:
  emoe-llm convert Llama-2-7b-hf Llama-2-7b-emoe --config configs/llama2_7b_emoe.yaml      # the recipe's emoe: section
  emoe-llm convert Llama-2-7b-hf Llama-2-7b-emoe --config configs/llama2_7b_emoe.yaml emoe.seed=1 --verify
  emoe-llm convert Llama-2-7b-hf Llama-2-7b-emoe --experts 64 --top-k 16 --layers 28,30
  emoe-llm convert llama-30b llama-30b-emoe --experts 256 --top-k 64 --layers 56:2 --permute-layers all --device cuda
  emoe-llm convert llama-30b llama-30b-emoe --experts 256 --top-k 64 --layers 56:2 --resume   # after a Ctrl-C
"""

SPEC_FLAGS = ("experts", "top_k", "layers", "permute_layers", "seed", "method")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", metavar="SRC", help="HF checkpoint dir (sharded or single-file safetensors) or a Hub "
                        "id like meta-llama/Llama-2-7b-hf (fetched safetensors-only into the HF cache)")
    parser.add_argument("--revision", metavar="REV", help="with a Hub id: the branch, tag or commit to convert "
                        "(default main); the commit it resolves to is recorded in DST/emoe_conversion.json")
    parser.add_argument("dst", metavar="DST", help="output dir (created; must be empty unless --overwrite)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (with --config)")
    parser.add_argument("--config", metavar="RECIPE", help="take N, k, layers, seed and method from this recipe's "
                        "emoe: section (instead of the flags below)")
    parser.add_argument("--experts", type=positive_int, metavar="N", help="experts per layer; must divide d_ff")
    parser.add_argument("--top-k", type=positive_int, metavar="K",
                        help="experts kept per token (the default for training)")
    parser.add_argument("--layers", help="EMoE layers: '28,30', START:EVERY like '28:2' (paper style), or 'all'")
    parser.add_argument("--permute-layers", metavar="LAYERS",
                        help="layers to cluster+permute (default: --layers); 'all' lets the EMoE layers change later")
    parser.add_argument("--seed", type=nonnegative_int, help="clustering seed (default 0)")
    parser.add_argument("--method", choices=["kmeans", "kmeans_exact", "random"],
                        help="kmeans = EMoE (fast balanced assignment, default); kmeans_exact = EMoE with the optimal "
                             "balanced assignment in every step (as k-means-constrained; minutes per layer at 30B "
                             "width); random = the paper's random-split ablation")
    parser.add_argument("--device", default="cpu", help="where to run the clustering: cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep",
                        help="output dtype of floating tensors (default keep)")
    parser.add_argument("--assign", choices=["fast", "exact"], default=None,
                        help="balanced assignment of k-means: exact = --method kmeans_exact (default fast)")
    parser.add_argument("--n-init", type=positive_int, default=3, help="k-means restarts (default 3)")
    parser.add_argument("--max-iter", type=positive_int, default=30, help="k-means iterations per restart (default 30)")
    parser.add_argument("--overwrite", action="store_true", help="replace a DST that is another conversion (once the "
                        "new one is complete)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion into the same DST")
    parser.add_argument("--verify", action="store_true", help="reuse DST only if it verifies against SRC, and verify "
                        "a fresh conversion")
    parser.add_argument("--skip-copied", action="store_true", help="with --verify: do not byte-compare the copied "
                        "tensors (faster on big models)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pytorch_model*.bin (loaded with torch.load(weights_only=True))")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def conversion_settings(args: argparse.Namespace) -> dict:
    """n_experts, top_k, layers, permute_layers, seed, method: from the recipe (--config) or from the flags."""
    if args.config:
        given = [f"--{f.replace('_', '-')}" for f in SPEC_FLAGS if getattr(args, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} and --config both set the conversion: use one (or key=value "
                             f"overrides such as emoe.seed=1 with --config)")
        from emoe_llm.train.config import load_config

        spec = load_config(args.config, args.overrides).emoe
        if spec is None:
            raise ValueError(f"{args.config} has no emoe: section (n_experts, top_k, layers)")
        return {"n_experts": spec.n_experts, "top_k": spec.top_k, "layers": spec.layers,
                "permute_layers": spec.permute_layers, "seed": spec.seed, "method": spec.method}
    if args.overrides:
        raise ValueError(f"key=value overrides {args.overrides} need --config RECIPE")
    missing = [f"--{f.replace('_', '-')}" for f in ("experts", "top_k", "layers") if getattr(args, f) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or --config RECIPE)")
    return {"n_experts": args.experts, "top_k": args.top_k, "layers": args.layers,
            "permute_layers": args.permute_layers, "seed": args.seed or 0, "method": args.method or "kmeans"}


def run(args: argparse.Namespace) -> int:
    from emoe_llm.train.config import ConfigError

    from .convert import format_summary
    from .errors import ConversionError
    from .prepare import prepare_emoe_checkpoint

    try:
        settings = conversion_settings(args)
        if args.assign == "exact":
            if settings["method"] == "random":
                raise ValueError("--assign exact applies to k-means, not --method random")
            settings["method"] = "kmeans_exact"
    except (ValueError, ConfigError) as e:
        print(f"emoe-llm convert: error: {e}", file=sys.stderr)
        return 2
    # Slurm sends SIGTERM at the time limit / on preemption: stop like Ctrl-C, keeping finished work for --resume.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = prepare_emoe_checkpoint(
            args.src, args.dst, **settings, n_init=args.n_init, max_iter=args.max_iter, device=args.device,
            dtype=args.dtype, overwrite=args.overwrite, resume=args.resume, allow_pickle=args.allow_pickle,
            progress=not args.quiet, verify={"check_copied": not args.skip_copied} if args.verify else None,
            log=lambda msg: print(f"emoe-llm convert: {msg}", flush=True), revision=args.revision,
        )
    except ConversionError as e:
        print(f"emoe-llm convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emoe-llm convert: interrupted; DST was not touched (rerun with --resume to continue)", file=sys.stderr)
        return 130
    if result["summary"] is not None:
        print(format_summary(result["summary"]))
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
