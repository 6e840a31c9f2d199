"""``emoe-llm generate CKPT``: completions of prompts, with plain transformers ``generate``.

    emoe-llm generate runs/x/final --prompt "Give three tips for staying healthy."
    emoe-llm generate runs/x/final --prompts prompts.jsonl --output completions.jsonl --temperature 0.7 --seed 1

Each prompt is a user turn rendered with the checkpoint's chat template (``--template auto``: the tokenizer's own,
else the Alpaca prompt, as training chose it), so a fine-tuned model sees what it was trained on; ``--template none``
continues the raw text instead. Greedy unless ``--temperature`` > 0. Dense by default (what serving engines run);
``--mode emoe`` adds the expert mask, as ``emoe-llm eval`` does.

``--prompts`` reads JSON lines with a ``prompt`` field (or ``instruction`` [+ ``input``], alpaca style) and writes one
JSON line per prompt: the row's fields plus ``completion``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checks import arg_number, nonnegative_int, positive_int
from ..fileio import atomic_write_text


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options generate and chat share: which model, how it runs, how it samples."""
    parser.add_argument("checkpoint", metavar="CKPT", help="HF checkpoint dir (e.g. runs/x/final) or a Hub id")
    parser.add_argument("--revision", metavar="REV", help="with a Hub id: the branch, tag or commit (default main)")
    parser.add_argument("--mode", choices=("dense", "emoe"), default="dense",
                        help="dense (default: every expert, what vLLM/TGI/llama.cpp run) or emoe (the top-k expert "
                        "mask; needs a converted checkpoint)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="with --mode emoe: experts per token "
                        "(default: the checkpoint's)")
    parser.add_argument("--template", default="auto", help="auto (the tokenizer's chat template, else alpaca) | "
                        "alpaca | alpaca_merged | llama2 | llama3 | a .jinja file | none (raw text, generate only)")
    parser.add_argument("--system", default=None, help="a system turn before each prompt")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="default 256")
    parser.add_argument("--temperature", type=arg_number(ge=0), default=0.0, help="0 (default) = greedy")
    parser.add_argument("--top-p", type=arg_number(gt=0, le=1), default=1.0,
                        help="nucleus sampling (with --temperature)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:1")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: the checkpoint's on GPU, fp32 on CPU")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt; the completion is printed")
    group.add_argument("--prompts", metavar="FILE.jsonl", help="JSON lines with a `prompt` (or `instruction`) field")
    parser.add_argument("--output", metavar="FILE.jsonl", help="with --prompts: write here (default: stdout)")


class Generator:
    """A loaded model + tokenizer + template, turning a conversation into the next assistant turn."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from .. import hub
        from ..data.templates import resolve_template
        from .cli import load_for_eval, resolve_modes

        path = str(hub.resolve(args.checkpoint, revision=args.revision).path)
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json not found: expected an HF checkpoint dir")
        (mode, source), = resolve_modes(path, [args.mode])  # --mode emoe on a dense checkpoint fails here
        self.model, self.tokenizer, self.info = load_for_eval(path, mode=mode, mode_source=source, device=args.device,
                                                              dtype=args.dtype, top_k=args.top_k)
        self.model.eval()
        self.template = None if args.template == "none" else resolve_template(args.template, self.tokenizer)[1]
        self.args = args
        self.device = next(self.model.parameters()).device
        self._torch = torch

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.template is None:  # raw continuation: the text of the last turn, BOS as the tokenizer adds it
            return self.tokenizer(messages[-1]["content"])["input_ids"]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)
        # the template writes BOS itself where it wants one; the tokenizer must not add a second
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(self, messages: list[dict], streamer=None) -> str:
        torch = self._torch
        a = self.args
        ids = torch.tensor([self.prompt_ids(messages)], device=self.device)
        sample = a.temperature > 0
        kwargs = dict(do_sample=sample, max_new_tokens=a.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id, streamer=streamer)
        if sample:
            kwargs.update(temperature=a.temperature, top_p=a.top_p)
        else:  # the checkpoint's generation_config may ask for sampling; greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(a.seed)  # one seed per completion: a prompt's output does not depend on the ones before it
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def turns(self, user: str) -> list[dict]:
        return ([{"role": "system", "content": self.args.system}] if self.args.system else []) + \
            [{"role": "user", "content": user}]


def read_prompts(path: str) -> list[tuple[dict, str]]:
    """(row, prompt text) per non-blank line; a bad line is one error naming file, line and field."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {path}: cannot read ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i}: expected an object with a `prompt` field")
        if isinstance(row.get("prompt"), str):
            text = row["prompt"]
        elif isinstance(row.get("instruction"), str):
            inp = row.get("input") or ""
            text = f"{row['instruction']}\n\n{inp}" if isinstance(inp, str) and inp.strip() else row["instruction"]
        else:
            raise ValueError(f"{path}: line {i}: field 'prompt' (a string) is missing (or 'instruction', alpaca "
                             "style)")
        rows.append((row, text))
    if not rows:
        raise ValueError(f"--prompts {path}: no prompts (an empty file)")
    return rows


def run(args: argparse.Namespace) -> int:
    from .. import hub
    from ..data.templates import TemplateError

    try:
        rows = read_prompts(args.prompts) if args.prompts else [({"prompt": args.prompt}, args.prompt)]
        if args.output and not args.prompts:
            raise ValueError("--output goes with --prompts (a single --prompt prints its completion)")
        gen = Generator(args)
    except (FileNotFoundError, ValueError, TemplateError, hub.HubError) as e:
        print(f"emoe-llm generate: error: {e}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        print(gen.complete(gen.turns(args.prompt)))
        return 0
    lines = []
    for row, text in rows:
        lines.append(json.dumps({**row, "completion": gen.complete(gen.turns(text))}, ensure_ascii=False))
        if not args.output:
            print(lines[-1], flush=True)
    if args.output:
        atomic_write_text(args.output, "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} completions to {args.output}")
    return 0
