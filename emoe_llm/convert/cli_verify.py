"""``emoe-llm verify SRC DST``: exit 0 when DST is a correct EMoE conversion of SRC, 1 when not, 2 on bad input.

Slurm jobs use it to skip a conversion that is already done:
    emoe-llm verify "$SRC" "$DST" --experts 64 --layers 28,30
(``emoe-llm convert --verify`` runs it too before reusing a DST.)
"""

from __future__ import annotations

import argparse
import json
import sys

from ..checks import arg_number, positive_int

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the dense source checkpoint dir or Hub id")
    parser.add_argument("--revision", metavar="REV", help="with a Hub id SRC: the branch, tag or commit (default main)")
    parser.add_argument("dst", metavar="DST", help="the converted checkpoint dir")
    parser.add_argument("--experts", type=positive_int, metavar="N", help="also require DST to have N experts")
    parser.add_argument("--layers", help="also require these layers to be permuted in DST, i.e. usable as EMoE layers "
                        "('28,30', '28:2', 'all'); top-k is a training-time setting and is not checked")
    parser.add_argument("--skip-copied", action="store_true",
                        help="do not byte-compare the copied-through tensors (faster on big models)")
    parser.add_argument("--no-logits", action="store_true", help="skip the whole-model dense logits check")
    parser.add_argument("--max-logits-gib", type=arg_number(ge=0), default=2.0,
                        help="run the logits check only for models up to this size (default 2 GiB)")
    parser.add_argument("--tokens", type=positive_int, default=16, help="random tokens per check (default 16)")
    parser.add_argument("--atol", type=arg_number(ge=0), default=1e-4,
                        help="max relative difference allowed (default 1e-4)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept a pytorch_model*.bin SRC")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from .. import hub
    from .errors import ConversionError
    from .verify import format_report, verify_checkpoint

    try:
        src = hub.resolve(args.src, revision=args.revision).path
        report = verify_checkpoint(
            src, args.dst, n_experts=args.experts, layers=args.layers,
            check_copied=not args.skip_copied, check_logits=not args.no_logits,
            max_logits_bytes=int(args.max_logits_gib * 2**30), n_tokens=args.tokens, atol=args.atol,
            allow_pickle=args.allow_pickle,
        )
    except (ConversionError, hub.HubError) as e:
        print(f"emoe-llm verify: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not report["ok"]:
        print(f"emoe-llm verify: {args.dst} does not verify against {args.src}", file=sys.stderr)
    return 0 if report["ok"] else 1
