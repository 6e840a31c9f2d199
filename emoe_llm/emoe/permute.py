"""Function-preserving neuron permutation: make every expert a contiguous block of the MLP.

Neuron j of a gated MLP owns row j of the gate and up projections (and their biases, if any) and column j of the
down projection; in a fused gate/up tensor it owns rows j and d_ff + j (``emoe_llm.arch``). Reordering the neurons
consistently in all of them leaves the MLP's output unchanged, because the intermediate activation is elementwise and
the down projection sums over the neurons.
"""

from __future__ import annotations

import torch

from ..arch import LLAMA, MLPLayout


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
def permute_mlp_(mlp: torch.nn.Module, perm: torch.Tensor, layout: MLPLayout = LLAMA) -> None:
    """Permute a loaded MLP module's projections (their weights and neuron-indexed biases) in place."""
    for name in layout.projections:
        proj = getattr(mlp, name)
        role = name.removesuffix("_proj")  # gate / up / down / gate_up, the table's tensor roles
        index = layout.neuron_index(role, perm).to(proj.weight.device)
        proj.weight.copy_(proj.weight.index_select(layout.neuron_axis(role), index))
        if proj.bias is not None and role != "down":  # down's bias is indexed by output features
            proj.bias.copy_(proj.bias.index_select(0, index))
