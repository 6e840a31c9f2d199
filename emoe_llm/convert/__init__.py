"""Streaming conversion of dense HF checkpoints to EMoE (``emoe-llm convert``) and its check (``emoe-llm verify``).

    from emoe_llm.convert import convert_checkpoint, verify_checkpoint
    convert_checkpoint(src, dst, n_experts=64, top_k=16, layers="28,30")
    report = verify_checkpoint(src, dst)   # report["ok"], report["failures"]
"""

from .convert import convert_checkpoint, format_summary
from .errors import ConversionError
from .verify import format_report, verify_checkpoint

__all__ = ["convert_checkpoint", "format_summary", "verify_checkpoint", "format_report", "ConversionError"]
