"""Instruction / chat / plain-text data pipeline: validation, chat templates, label masking, caching and packing.

    tok = load_tokenizer("data/tokenizers/llama3")
    cfg = data_config_from_dict({"sources": ["data/instruct/alpaca_en_demo.json"], "packing": True})
    train, eval_, stats = build_sft_datasets(cfg, tok)
    loader = DataLoader(train, batch_size=8, collate_fn=SFTCollator(tok.pad_token_id))
"""

from .collator import SFTCollator
from .config import DataConfig, DataSource, data_config_from_dict
from .encode import IGNORE_INDEX, encode_conversation, encode_text
from .formats import DataError, DataFileNotFoundError, read_source
from .pipeline import build_sft_datasets
from .templates import TemplateError, resolve_template
from .tokenizer import load_tokenizer, stop_token_ids

__all__ = [
    "DataConfig", "DataSource", "data_config_from_dict", "build_sft_datasets", "SFTCollator", "load_tokenizer",
    "DataError", "DataFileNotFoundError", "TemplateError", "IGNORE_INDEX", "encode_conversation", "encode_text",
    "read_source", "resolve_template", "stop_token_ids",
]
