"""A checkpoint's neuron-indexed MLP tensors (names from the architecture table) and the checks that it has them."""

from __future__ import annotations

from ..arch import MLPLayout, mlp_layout
from .errors import ConversionError
from .source import SourceCheckpoint


def source_layout(source: SourceCheckpoint) -> MLPLayout:
    """The architecture-table entry for SRC's config.json ``model_type`` (ConversionError when it has none)."""
    try:
        return mlp_layout(source.config.get("model_type"))
    except ValueError as e:
        raise ConversionError(f"{source.root / 'config.json'}: {e}") from None


def mlp_tensor_names(layer: int, source: SourceCheckpoint) -> dict[str, str]:
    """{role: tensor name} of one layer's neuron-indexed tensors (biases included when the checkpoint has them)."""
    names = source_layout(source).tensor_names(layer)
    return {role: n for role, n in names.items() if not role.endswith("_bias") or n in source.tensors}


def check_mlp_layout(source: SourceCheckpoint, layers: list[int]) -> None:
    """Every layer to permute has its MLP tensors with the shapes the layout and config.json give."""
    layout = source_layout(source)
    d_ff, d = source.config["intermediate_size"], source.config["hidden_size"]
    expected = layout.expected_shapes(d_ff, d)
    for layer in layers:
        names = mlp_tensor_names(layer, source)
        for role, name in names.items():
            meta = source.tensors.get(name)
            if meta is None:
                raise ConversionError(_missing_mlp_message(source, layer, name))
            if meta.shape != expected[role]:
                raise ConversionError(
                    f"{source.root / meta.shard}: '{name}' has shape {list(meta.shape)}, expected "
                    f"{list(expected[role])} from config.json (intermediate_size={d_ff}, hidden_size={d})"
                )
            if not meta.is_floating:
                raise ConversionError(f"{source.root / meta.shard}: '{name}' has non-float dtype {meta.dtype}")


def _missing_mlp_message(source: SourceCheckpoint, layer: int, name: str) -> str:
    prefix = f"layers.{layer}."
    found = sorted(n for n in source.tensors if prefix in n and (".mlp." in n or "ffn" in n or "feed_forward" in n))
    if not found:
        found = sorted(n for n in source.tensors if prefix in n)[:8]
    model_type = source.config.get("model_type")
    return (
        f"{source.root}: tensor '{name}' not found. EMoE needs a Llama-style SwiGLU MLP (gated, stored as "
        f"model_type '{model_type}' does under model.layers.N.mlp); layer {layer} has: "
        f"{found[:8] or 'no tensors at all'}"
    )
