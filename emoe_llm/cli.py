"""``emoe-llm``: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``emoe-llm --help`` is instant and needs neither torch nor deepspeed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "convert": ("emoe_llm.convert.cli_convert", "convert a dense HF safetensors checkpoint to EMoE, shard by shard"),
    "verify": ("emoe_llm.convert.cli_verify", "check a converted checkpoint against its source"),
    "data": ("emoe_llm.data.inspect", "validate instruction data and show tokenized examples with the masked parts"),
    "train": ("emoe_llm.train.launch", "fine-tune (dense or EMoE) with DeepSpeed ZeRO-3 (wraps the deepspeed launcher)"),
    "eval": ("emoe_llm.eval.cli", "evaluate an HF checkpoint with lm-evaluation-harness (shipped MMLU, GSM8K, held-out NLL tasks or your own YAMLs)"),
    "generate": ("emoe_llm.eval.generate", "completions of prompts (--prompt TEXT or --prompts FILE.jsonl), dense or --mode emoe"),
    "chat": ("emoe_llm.eval.chat", "chat with a checkpoint in the terminal (its chat template, streamed tokens, /reset, /exit)"),
    "probe": ("emoe_llm.eval.probe", "forward-only: dNLL of masking each layer at each k, expert load, clustering quality"),
    "plot": ("emoe_llm.eval.plot_run", "PNGs of a training run from its metrics.jsonl (loss, lr, tokens/s, expert load)"),
    "plan": ("emoe_llm.plan", "per-GPU memory, fit, largest micro batch and step time of a job before you sbatch it"),
    "study": ("emoe_llm.study.run", "dense vs EMoE vs random split over seeds (local or a Slurm job array), then the report"),
    "report": ("emoe_llm.study.report", "a study dir's results: per-document paired differences over seeds and documents, MDE, plots"),
    "demo": ("emoe_llm.demo", "the whole pipeline on a tiny embedded Llama on CPU: convert, ZeRO-3 train, export, eval"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="emoe-llm",
        description="Emergent Mixture-of-Experts for dense Llama-family LLMs: convert, fine-tune with DeepSpeed "
        "ZeRO-3, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"emoe-llm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def parse_command(name: str, rest: list[str]):
    """(module, args) of ``emoe-llm NAME REST...`` as ``main`` parses it, without running anything; a bad command line
    exits as argparse does (SystemExit 2). A pass-through subcommand (train) gets its argv, checked by the module's
    ``check_args`` when it has one."""
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"emoe-llm {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    if getattr(module, "PASSTHROUGH", False):
        return module, rest
    if getattr(module, "INTERMIXED", False):  # trailing key=value overrides may follow the options
        return module, sub_parser.parse_intermixed_args(rest)
    return module, sub_parser.parse_args(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)  # prints help / version / the unknown-command error
        if args.command is None:
            parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help", "--version") else 2
    module, args = parse_command(argv[0], argv[1:])
    return int(module.run(args) or 0)


def exit_after(code: int) -> None:
    """End a process (``emoe-llm``, a training rank): ``sys.exit(code)`` without the interpreter's last cyclic garbage
    collection over a loaded model, engine and datasets (~3 s per rank on 2 CPU cores, after every output is written).
    ``gc.freeze`` hides the live objects from the collector; reference counting still frees them."""
    gc.freeze()
    sys.exit(code)


def entry() -> None:
    """The ``emoe-llm`` console script."""
    exit_after(main())


if __name__ == "__main__":
    entry()
