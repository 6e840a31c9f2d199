"""Checks of an eval request that need nothing loaded: run first by ``emoe-llm eval``, before any weights load.
(The numeric flags are checked by their argparse types in ``emoe_llm.eval.cli``.)"""

from __future__ import annotations

from pathlib import Path

from emoe_llm.data.tokenizer import tokenizer_files_error


def check_eval_inputs(checkpoint: str) -> None:
    """FileNotFoundError (one line) for a checkpoint without config.json or tokenizer files (a checkpoint saved
    without its tokenizer: say which files are missing, and where)."""
    root = Path(checkpoint)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root / 'config.json'} not found: expected an HF checkpoint dir")
    error = tokenizer_files_error(root)
    if error:
        raise FileNotFoundError(error)
