"""Tiny models built in code: the embedded default for the demo, tests and CPU benchmarks (no model hub). The tiny
Llama is the default; ``model_type`` builds the same-sized model of any family in the architecture table."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

# The shipped data (tokenizers, instruction sets, MMLU) lives beside the package in the repo.
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"


def tiny_llama_config(*, vocab_size: int = 2048, **overrides):
    """A 4-layer Llama small enough to train on 2 CPU cores in seconds; d_ff = 256 splits into 8/16/32 experts."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_config(model_type: str = "llama", **overrides):
    """The tiny Llama's sizes as a ``model_type`` config (head_dim pinned: Gemma's default of 256 would dwarf it)."""
    if model_type == "llama":
        return tiny_llama_config(**overrides)
    from transformers import AutoConfig

    base = tiny_llama_config().to_dict()
    kwargs = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                   "tie_word_embeddings", "bos_token_id", "eos_token_id")}
    kwargs.update(head_dim=base["hidden_size"] // base["num_attention_heads"], pad_token_id=0)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    dtype: torch.dtype = torch.float32,
    model_type: str = "llama",
    **config_overrides,
) -> Path:
    """Write a randomly initialised tiny model (Llama unless ``model_type`` says otherwise) as a real HF safetensors
    checkpoint (optionally sharded).

    With ``tokenizer_dir`` the tokenizer files are copied in and vocab/bos/eos ids follow the tokenizer.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = Path(path)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        config_overrides.setdefault("vocab_size", len(tok))
        if tok.bos_token_id is not None:
            config_overrides.setdefault("bos_token_id", tok.bos_token_id)
        if tok.eos_token_id is not None:
            config_overrides.setdefault("eos_token_id", tok.eos_token_id)
    torch.manual_seed(seed)
    config = tiny_config(model_type, **config_overrides)
    model = (LlamaForCausalLM(config) if model_type == "llama" else AutoModelForCausalLM.from_config(config)).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and not f.name.endswith((".md", ".txt")):
                shutil.copy2(f, path / f.name)
    return path


DEMO_CONVERSION = {"n_experts": 16, "top_k": 4, "layers": "2,3", "permute_layers": None, "seed": 0, "method": "kmeans"}


def build_demo_model(emoe_dir: str | os.PathLike, *, conversion: dict | None = None, seed: int = 0) -> dict:
    """The demo's model: the tiny random Llama with the shipped 2k-vocab tokenizer (``tiny_dense`` beside
    ``emoe_dir``), converted to EMoE at ``emoe_dir`` with ``conversion`` (the recipe's ``emoe:`` section as
    ``EMoEConfig.conversion()``; default 16 experts, top-4, layers 2,3). Returns the conversion summary.

    Both directories appear complete or not at all (built under temporary names, then renamed)."""
    import tempfile

    from emoe_llm.convert.prepare import prepare_emoe_checkpoint

    emoe_dir = Path(emoe_dir)
    dense_dir = emoe_dir.parent / "tiny_dense"
    emoe_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny_build.", dir=emoe_dir.parent) as tmp:
        dense_tmp = save_tiny_checkpoint(Path(tmp) / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style",
                                         seed=seed)
        summary = prepare_emoe_checkpoint(dense_tmp, emoe_dir, **(conversion or DEMO_CONVERSION), overwrite=True,
                                          progress=False, log=lambda msg: None)["summary"]
        if not (dense_dir / "config.json").is_file():
            shutil.rmtree(dense_dir, ignore_errors=True)
            os.rename(dense_tmp, dense_dir)
    return summary
