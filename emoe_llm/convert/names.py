"""The explicit tensor-name map of a Llama-style SwiGLU MLP, and the checks that a checkpoint has it."""

from __future__ import annotations

from .errors import ConversionError
from .source import SourceCheckpoint

# role -> tensor name template; biases exist only with config "mlp_bias": true.
MLP_WEIGHTS = {
    "gate": "model.layers.{i}.mlp.gate_proj.weight",  # (d_ff, d): rows are neurons
    "up": "model.layers.{i}.mlp.up_proj.weight",  # (d_ff, d): rows are neurons
    "down": "model.layers.{i}.mlp.down_proj.weight",  # (d, d_ff): columns are neurons
}
MLP_BIASES = {
    "gate_bias": "model.layers.{i}.mlp.gate_proj.bias",  # (d_ff,)
    "up_bias": "model.layers.{i}.mlp.up_proj.bias",  # (d_ff,)
    # down_proj.bias is indexed by output features: a neuron permutation leaves it alone.
}
NEURON_AXIS = {"gate": 0, "up": 0, "down": 1, "gate_bias": 0, "up_bias": 0}


def mlp_tensor_names(layer: int, source: SourceCheckpoint) -> dict[str, str]:
    """{role: tensor name} of one layer's neuron-indexed tensors (biases included when the checkpoint has them)."""
    names = {role: t.format(i=layer) for role, t in MLP_WEIGHTS.items()}
    for role, t in MLP_BIASES.items():
        if t.format(i=layer) in source.tensors:
            names[role] = t.format(i=layer)
    return names


def check_mlp_layout(source: SourceCheckpoint, layers: list[int]) -> None:
    """Every layer to permute has gate/up/down with shapes (d_ff, d), (d_ff, d), (d, d_ff) from config.json."""
    d_ff, d = source.config["intermediate_size"], source.config["hidden_size"]
    expected = {"gate": (d_ff, d), "up": (d_ff, d), "down": (d, d_ff), "gate_bias": (d_ff,), "up_bias": (d_ff,)}
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
    return (
        f"{source.root}: tensor '{name}' not found. EMoE needs a Llama-style SwiGLU MLP named "
        f"model.layers.N.mlp.{{gate,up,down}}_proj.weight; layer {layer} has: {found[:8] or 'no tensors at all'}"
    )
