"""Tokenizer loading with a pad token that is never the EOS token."""

from __future__ import annotations

import logging
import os

# Special tokens that some vocabularies already reserve for padding (Llama-3.1 has the first one; Llama-3 the second).
_RESERVED_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "<|pad|>", "[PAD]")


# One of these makes a directory a tokenizer for AutoTokenizer (fast JSON, SentencePiece model, or a config naming one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def tokenizer_files_error(path: str | os.PathLike) -> str | None:
    """Why ``path`` holds no tokenizer (said before anything is loaded), or None."""
    if not os.path.isdir(path):
        return f"tokenizer not found: {path} is not a directory" if os.path.exists(path) else \
            f"tokenizer not found: {path}"
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return (f"no tokenizer files in {path} (expected one of {', '.join(TOKENIZER_FILES)}); copy the base "
                "model's tokenizer files there")
    return None


class _DropTiktokenFallbackNotice(logging.Filter):
    # transformers first tries a Llama-3 tiktoken file as SentencePiece and logs a harmless notice; hide that one line.
    def filter(self, record):
        return "Falling back to TikToken" not in record.getMessage()


def load_tokenizer(path: str | os.PathLike, *, add_pad_token_if_needed: bool = True):
    """Load a tokenizer with ``AutoTokenizer`` (never ``trust_remote_code``) and make sure it has a safe pad token.

    Pad choice, in order (the vocabulary must not grow: a new row would break converted or ZeRO-3 sharded checkpoints):
      1. the tokenizer's own pad token, if it is not EOS;
      2. the UNK token (Llama-2: ``<unk>`` id 0);
      3. a special token the vocabulary reserves for padding (``<|finetune_right_pad_id|>``,
         ``<|reserved_special_token_0|>`` for Llama-3, ``<pad>``, ...);
      4. the BOS token: our labels are built explicitly and the first token of every document is never a target,
         so BOS-as-pad can never leak into the loss (e.g. the tiny 2k-vocab test tokenizer);
      5. only then add a new ``<pad>`` token (the model's embeddings must then be resized).
    EOS is never used: collators that derive labels from ``input_ids != pad`` would stop training the EOS.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = os.fspath(path)
    error = tokenizer_files_error(path)  # before AutoTokenizer's "install sentencepiece or tiktoken" guesswork
    if error:
        raise FileNotFoundError(error)
    notice_filter = _DropTiktokenFallbackNotice()
    hf_logger = hf_logging.get_logger("transformers")
    handlers = list(hf_logger.handlers)
    for h in handlers:
        h.addFilter(notice_filter)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    finally:
        for h in handlers:
            h.removeFilter(notice_filter)
    if not getattr(tok, "is_fast", True) and not hasattr(tok, "backend_tokenizer"):
        raise ValueError(f"{path}: a fast (tokenizers-backed) tokenizer is required for offset-based label masking")
    _ensure_pad_token(tok, add_pad_token_if_needed)
    return tok


def _ensure_pad_token(tok, add_if_needed: bool) -> None:
    eos = tok.eos_token_id
    if tok.pad_token_id is not None and tok.pad_token_id != eos:
        return
    if tok.unk_token_id is not None and tok.unk_token_id != eos:
        tok.pad_token = tok.unk_token
        return
    vocab = tok.get_vocab()
    for cand in _RESERVED_PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != eos:
            tok.pad_token = cand
            return
    if tok.bos_token_id is not None and tok.bos_token_id != eos:
        tok.pad_token = tok.bos_token
        return
    if not add_if_needed:
        raise ValueError("tokenizer has no usable pad token (no pad/unk/reserved/bos token distinct from EOS)")
    tok.add_special_tokens({"pad_token": "<pad>"})
    logging.getLogger(__name__).warning(
        "added a new <pad> token (id %d): resize the model's embeddings to len(tokenizer)=%d", tok.pad_token_id, len(tok)
    )


# End-of-turn markers that chat templates write instead of (or before) EOS.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that should end generation: EOS plus the end-of-turn markers the vocabulary has.

    Llama-3 chat turns end with ``<|eot_id|>`` (our labels train ``<|eot_id|><|end_of_text|>`` at the end), so a
    generation loop or ``generation_config.eos_token_id`` should stop on either.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab and vocab[t] not in ids]
    return ids
