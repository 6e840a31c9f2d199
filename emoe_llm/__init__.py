"""emoe-llm: Emergent Mixture-of-Experts for dense Llama-family LLMs, fine-tuned with DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
