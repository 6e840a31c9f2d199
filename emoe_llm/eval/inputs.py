"""Checks of an eval request that need nothing loaded: run first by ``emoe-llm eval``, before any weights load."""

from __future__ import annotations

from pathlib import Path

from emoe_llm.checks import range_error
from emoe_llm.data.tokenizer import tokenizer_files_error


def check_eval_inputs(checkpoint: str, *, batch_size: int, top_k: int | None = None,
                      max_length: int | None = None) -> None:
    """ValueError / FileNotFoundError (one line) for a batch size, top-k or max length below 1, or a checkpoint without
    config.json or tokenizer files (a checkpoint saved without its tokenizer: say which files are missing, and
    where)."""
    for flag, value in (("--batch-size", batch_size), ("--top-k", top_k), ("--max-length", max_length)):
        error = None if value is None else range_error(value, ge=1, integer=True)
        if error:
            raise ValueError(f"{flag} {error}")
    root = Path(checkpoint)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root / 'config.json'} not found: expected an HF checkpoint dir")
    error = tokenizer_files_error(root)
    if error:
        raise FileNotFoundError(error)
