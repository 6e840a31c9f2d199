"""Validate and inspect training data: stats plus decoded examples with the masked (label -100) parts shown.

    python -m emoe_llm.data.inspect --config configs/tiny_cpu.yaml --tokenizer data/tokenizers/llama3
    python -m emoe_llm.data.inspect --source data/chat/dummy_conversation.json --tokenizer data/tokenizers/llama2 \\
        --template llama2 --max-seq-len 1024 --packing --show 2
    python -m emoe_llm.data.inspect --source my.jsonl --validate-only --skip-bad-rows   # no tokenizer needed

Exit status: 0 = fine, 1 = bad data (the error names the file, row and field), 2 = usage error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from ..checks import arg_number, arg_path, nonnegative_int

MASK_OPEN, MASK_CLOSE = "\u27e6", "\u27e7"  # ⟦ masked (label -100) text ⟧


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML; its `data:` section is used (and model.tokenizer/model.path)")
    parser.add_argument("--source", action="append", default=[], metavar="PATH", type=arg_path,
                        help="a data file or save_to_disk dir (repeatable); overrides the config's sources")
    parser.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "text"],
                        help="format of --source files")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the config's model.tokenizer or model.path)")
    parser.add_argument("--template", help="auto | alpaca | alpaca_merged | llama2 | llama3 | path/to/template.jinja")
    parser.add_argument("--max-seq-len", type=arg_number(integer=True, ge=2))
    parser.add_argument("--packing", action="store_true", default=None)
    parser.add_argument("--train-on-prompt", action="store_true", default=None)
    parser.add_argument("--truncation", choices=["truncate", "drop"])
    parser.add_argument("--skip-bad-rows", action="store_true", default=None,
                        help="skip malformed rows and report how many (default: stop at the first)")
    parser.add_argument("--cache-dir")
    parser.add_argument("--seed", type=nonnegative_int)
    parser.add_argument("--show", type=nonnegative_int, default=1, help="decoded training rows to print (default 1)")
    parser.add_argument("--validate-only", action="store_true", help="only read and validate the sources")
    parser.add_argument("--json", action="store_true", help="print the stats as JSON")


def _data_section(args) -> tuple[dict, str | None]:
    data, tokenizer = {}, None
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
        data = dict(recipe.get("data") or {})
        data.setdefault("seed", recipe.get("seed", 42))  # a recipe has one seed, the top-level one
        model = recipe.get("model") or {}
        tokenizer = model.get("tokenizer") or model.get("path")
    if args.source:
        data["sources"] = [{"path": p, "format": args.format} for p in args.source]
    for key in ("template", "max_seq_len", "packing", "train_on_prompt", "truncation", "skip_bad_rows", "cache_dir",
                "seed"):
        val = getattr(args, key)
        if val is not None:
            data[key] = val
    return data, args.tokenizer or tokenizer


def render_masked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode a row, wrapping runs of untrained (label -100) tokens in ⟦ ⟧."""
    out = []
    for masked, group in itertools.groupby(zip(input_ids, labels), key=lambda x: x[1] == -100):
        text = tokenizer.decode([i for i, _ in group])
        out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if masked else text)
    return "".join(out)


def run(args) -> int:
    from .config import data_config_from_dict, resolve_hub_source
    from .formats import iter_records

    import yaml

    try:
        data, tokenizer_path = _data_section(args)
        cfg = data_config_from_dict(data)
    except yaml.YAMLError as e:
        print(f"emoe-llm data: error: {args.config}: not valid YAML: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"emoe-llm data: error: {e}", file=sys.stderr)
        return 2
    try:
        for src in cfg.sources + cfg.eval_sources:
            resolve_hub_source(src)
        if args.validate_only:
            for src in cfg.sources + cfg.eval_sources:
                report: dict = {}
                usable = sum(1 for _ in iter_records(src.path, src.format, report=report, max_rows=src.max_rows,
                                                     skip_bad_rows=cfg.skip_bad_rows, load_args=src.load_args(),
                                                     empty_response=cfg.empty_response))  # streamed: any file size
                print(f"{src.path}: format={report['format']} usable={usable} read={report['rows_read']} "
                      f"skipped_bad_rows={report['skipped_bad_rows']} filtered_label_false="
                      f"{report['filtered_label_false']}")
                for msg in report["bad_row_examples"]:
                    print(f"  skipped: {msg}")
            return 0
        if not tokenizer_path:
            print("emoe-llm data: error: --tokenizer is required (or model.tokenizer / model.path in --config)",
                  file=sys.stderr)
            return 2
        from .pipeline import build_sft_datasets
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        train, eval_ds, stats = build_sft_datasets(cfg, tok)
    except (ValueError, FileNotFoundError) as e:  # DataError included: the message names file, row and field
        print(f"emoe-llm data: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the cache dir: full, read-only, no permission
        print(f"emoe-llm data: error: cannot write {e.filename or cfg.cache_dir or 'the data cache'}: "
              f"{e.strerror or e} (set --cache-dir / data.cache_dir to a writable place)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(f"tokenizer: {tokenizer_path} ({type(tok).__name__}, {len(tok)} tokens, pad={tok.pad_token!r} "
              f"eos={tok.eos_token!r})   template: {stats['template']}")
        for s in stats["sources"]:
            share = f"weight {s['weight']}" if s["weight"] is not None else "natural size"
            print(f"  {s['path']}: {s['format']}, {s['examples']} examples -> {s['rows_in_mix']} in the mix ({share}), "
                  f"truncated {s['truncated']}, dropped {s['dropped_too_long']} too long + "
                  f"{s['dropped_no_target']} without targets, skipped {s['skipped_bad_rows']} bad rows")
        print(f"train rows {stats['rows']} ({stats['documents']} documents, packing={stats['packing']}"
              + (f", efficiency {stats['packing_efficiency']:.1%}" if stats["packing"] else "") + ")"
              f"   eval rows {stats['eval_rows']}")
        print(f"tokens {stats['tokens']}  target fraction {stats['target_fraction']:.1%}  document length "
              f"p50/p90/p95/p99/max {stats['length_p50']:.0f}/{stats['length_p90']:.0f}/{stats['length_p95']:.0f}/"
              f"{stats['length_p99']:.0f}/{stats['length_max']}  (max_seq_len {cfg.max_seq_len})")
        for msg in stats["bad_row_examples"]:
            print(f"  skipped: {msg}")
        print(f"cache {'hit' if stats['cache_hit'] else 'miss'}"
              + ("" if stats["cache_hit"] else f" (tokenized: {'hit' if stats['tokenize_cache_hit'] else 'miss'})")
              + f": {stats['cache_dir']}/final/{stats['cache_key']}")
    for i in range(min(args.show, len(train))):
        row = train[i]
        print(f"\n--- train row {i}: {len(row['input_ids'])} tokens; {MASK_OPEN}...{MASK_CLOSE} = no loss (label -100)")
        print(render_masked(tok, row["input_ids"], row["labels"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emoe_llm.data.inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
