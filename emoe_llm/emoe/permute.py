"""Function-preserving neuron permutation: make every expert a contiguous block of the MLP.

Neuron j of a SwiGLU MLP owns row j of gate_proj and up_proj (and their biases, if any) and column j of down_proj.
Reordering the neurons consistently in all three leaves the MLP's output unchanged, because the intermediate
activation is elementwise and down_proj sums over the neurons.
"""

from __future__ import annotations

import torch


def expert_permutation(labels: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Permutation that places the neurons of expert i at positions [i*E, (i+1)*E), E = d_ff / n_experts.

    Neurons keep their original relative order inside an expert (stable sort). ``new_weight = old_weight[perm]``.

    Args:
        labels: (d_ff,) expert index of every neuron; each expert must have exactly d_ff / n_experts neurons.
        n_experts: N.

    Returns:
        (d_ff,) int64 permutation.
    """
    labels = labels.to(torch.long).cpu()
    counts = torch.bincount(labels, minlength=n_experts)
    if labels.numel() % n_experts or counts.numel() != n_experts or not bool((counts == labels.numel() // n_experts).all()):
        raise ValueError(
            f"labels are not an exactly balanced split into {n_experts} experts (sizes: {counts.tolist()[:16]}...)"
        )
    return torch.argsort(labels, stable=True)


def permute_mlp_tensors(
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    perm: torch.Tensor,
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Return permuted copies: gate/up rows (d_ff, d), down columns (d, d_ff), gate/up biases (d_ff,).

    down_proj's bias (shape d) is indexed by output features and is not touched by a neuron permutation.
    """
    d_ff = gate_weight.shape[0]
    if up_weight.shape[0] != d_ff or down_weight.shape[1] != d_ff or perm.numel() != d_ff:
        raise ValueError(
            f"inconsistent MLP shapes: gate {tuple(gate_weight.shape)}, up {tuple(up_weight.shape)}, "
            f"down {tuple(down_weight.shape)}, permutation of {perm.numel()}"
        )
    perm = perm.to(gate_weight.device)
    return {
        "gate": gate_weight.index_select(0, perm).contiguous(),
        "up": up_weight.index_select(0, perm).contiguous(),
        "down": down_weight.index_select(1, perm.to(down_weight.device)).contiguous(),
        "gate_bias": None if gate_bias is None else gate_bias.index_select(0, perm.to(gate_bias.device)).contiguous(),
        "up_bias": None if up_bias is None else up_bias.index_select(0, perm.to(up_bias.device)).contiguous(),
    }


@torch.no_grad()
def permute_mlp_(mlp: torch.nn.Module, perm: torch.Tensor) -> None:
    """Permute a loaded MLP module (gate_proj / up_proj / down_proj Linear layers) in place."""
    out = permute_mlp_tensors(
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
        perm,
        gate_bias=mlp.gate_proj.bias,
        up_bias=mlp.up_proj.bias,
    )
    mlp.gate_proj.weight.copy_(out["gate"])
    mlp.up_proj.weight.copy_(out["up"])
    mlp.down_proj.weight.copy_(out["down"])
    if out["gate_bias"] is not None:
        mlp.gate_proj.bias.copy_(out["gate_bias"])
    if out["up_bias"] is not None:
        mlp.up_proj.bias.copy_(out["up_bias"])
