"""``emoe-llm chat CKPT``: talk to a checkpoint in the terminal, tokens streamed as they are generated.

Every turn is rendered with the checkpoint's chat template over the whole conversation so far (``--template auto``:
the tokenizer's own, else the Alpaca prompt). ``/reset`` starts a new conversation, ``/exit`` (or end of input) quits.
Greedy unless ``--temperature`` > 0; dense unless ``--mode emoe``. Reads stdin line by line, so a script can drive it:
``printf 'hi\\n/exit\\n' | emoe-llm chat runs/x/final``.
"""

from __future__ import annotations

import argparse
import sys

from .generate import Generator, add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)


def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from transformers import TextStreamer

    from .. import hub
    from ..data.templates import TemplateError

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.template == "none":
        print("emoe-llm chat: error: --template none has no turns to chat with; use emoe-llm generate",
              file=sys.stderr)
        return 2
    try:
        gen = Generator(args)
    except (FileNotFoundError, ValueError, TemplateError, hub.HubError) as e:
        print(f"emoe-llm chat: error: {e}", file=sys.stderr)
        return 2
    interactive = stdin.isatty()
    print(f"chatting with {args.checkpoint} ({gen.info['mode']}); /reset starts over, /exit quits", file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system else []
    start = list(history)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            print("(new conversation)", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        streamer = TextStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda chunk, stream_end=False: print(chunk, end="\n" if stream_end else "",
                                                                           file=stdout, flush=True)
        reply = gen.complete(history, streamer=streamer)
        history.append({"role": "assistant", "content": reply})
