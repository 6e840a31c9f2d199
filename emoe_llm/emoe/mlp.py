"""EMoEMLP: a drop-in for any gated MLP of the architecture table (LlamaMLP, Gemma2MLP, Phi3MLP's fused gate/up, ...)
with avg-k top-k expert masking.

The MLP's neurons were permuted so that expert i is the contiguous block [i*E, (i+1)*E). For every token:

    g, u = gate(x), up(x)                              # (..., d_ff)   pre-activation gate values, up projection
    s = g.view(..., N, E).mean(-1)                     # (..., N)      avg-k expert scores (the router)
    m = one_hot(topk(s, k))                            # (..., N)      hard 0/1 mask, no softmax, no rescale
    y = down((act(g) * u).view(..., N, E) * m[..., None])

(A fused layout computes g and u with one projection and splits it: the score uses the gate half.)
The router is the mean of each expert's gate rows, so there are no new parameters, and top-k is not
differentiable, so the router gets no gradient: a neuron outside the selected experts gets zero gradient for that
token. With k == N the mask is skipped and the module computes exactly the dense MLP.

ZeRO-3: parameters are only touched through the projection submodule calls, and the same parameters are used for
every token (compute-all-then-mask), so there is no data-dependent module order and no leaf-module registration is
needed. The mask is applied by broadcasting over (N, E) instead of materialising a (..., d_ff) mask.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import LLAMA, MLPLayout


class EMoEMLP(nn.Module):
    """Wraps an existing MLP's projections and activation (same parameters, same state-dict keys) and adds the EMoE
    top-k expert mask.

    Args:
        mlp: the dense MLP module to wrap; its submodules are reused, not copied.
        n_experts: N; must divide d_ff.
        top_k: k, 1 <= k <= N.
        layer_idx: for logging only.
        layout: the architecture-table entry of the model (``emoe_llm.arch.layout_of(model)``); default Llama.
    """

    def __init__(self, mlp: nn.Module, *, n_experts: int, top_k: int, layer_idx: int | None = None,
                 layout: MLPLayout = LLAMA):
        super().__init__()
        for name in layout.submodules:
            if not hasattr(mlp, name):
                raise TypeError(
                    f"{type(mlp).__name__} has no '{name}': EMoE needs a gated MLP with {', '.join(layout.submodules)}"
                )
        self.layout = layout
        for name in layout.submodules:
            setattr(self, name, getattr(mlp, name))
        object.__setattr__(self, "_dense", mlp)  # kept unregistered: no duplicate parameters or state-dict keys
        # Under ZeRO-3 the weight is partitioned (shape 0); out_features is the reliable width.
        d_ff = layout.d_ff(self)
        if n_experts < 1 or d_ff % n_experts:
            raise ValueError(f"n_experts={n_experts} must divide the MLP width d_ff={d_ff}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must satisfy 1 <= top_k <= n_experts={n_experts}")
        self.d_ff = d_ff
        self.n_experts = n_experts
        self.top_k = top_k
        self.expert_size = d_ff // n_experts
        self.layer_idx = layer_idx
        # Running per-expert token counts for logging. Plain tensors (not buffers): they are not part of the
        # checkpoint and ZeRO-3 leaves them alone. Recomputation under gradient checkpointing adds to both the
        # counts and the token total, so the reported fractions are unaffected.
        self._load = None
        self._tokens = 0

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}, expert_size={self.expert_size}, layer={self.layer_idx}"

    def expert_mask(self, gate_out: torch.Tensor) -> torch.Tensor:
        """(..., d_ff) pre-activation gate values -> (..., N) 0/1 mask of the top-k experts (no gradient)."""
        with torch.no_grad():
            # fp32 scores make routing the same in bf16 and fp32 runs except on near-ties. The mean accumulates in
            # fp32 (dtype=) instead of reducing an fp32 copy: on CUDA torch's reduction then reads the 16-bit values
            # directly (make_reduction_from_out_ty's low-precision -> fp32 case), so no (tokens, d_ff) fp32 tensor
            # exists (1.2 GB per EMoE layer at 30B with 4 x 4,096 tokens); CPU reductions still cast a copy.
            # reshape, not view: a fused layout's gate half is a strided slice.
            scores = gate_out.detach().reshape(*gate_out.shape[:-1], self.n_experts, self.expert_size).mean(
                -1, dtype=torch.float32)
            top = scores.topk(self.top_k, dim=-1).indices
            mask = torch.zeros_like(scores, dtype=gate_out.dtype).scatter_(-1, top, 1.0)
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_out, up_out = self.layout.gate_and_up(self, x)
        hidden = getattr(self, self.layout.act_attr)(gate_out) * up_out
        if self.top_k < self.n_experts:
            mask = self.expert_mask(gate_out)
            if self.training:
                self._record_load(mask)
            # In place: the product's backward keeps its inputs (act(g), up), not its output, so this is safe and
            # saves one (tokens, d_ff) tensor per EMoE layer.
            hidden.view(*hidden.shape[:-1], self.n_experts, self.expert_size).mul_(mask.unsqueeze(-1))
        return self.down_proj(hidden)

    def _record_load(self, mask: torch.Tensor) -> None:
        counts = mask.detach().reshape(-1, self.n_experts).sum(0, dtype=torch.float32)
        self._load = counts if self._load is None else self._load + counts
        self._tokens += mask.numel() // self.n_experts

    def pop_expert_load(self) -> torch.Tensor | None:
        """Fraction of tokens routed to each expert since the last call, shape (N,); sums to k. Resets the counts."""
        if self._load is None or self._tokens == 0:
            return None
        load = self._load / self._tokens
        self._load, self._tokens = None, 0
        return load

    def dense_mlp(self) -> nn.Module:
        """The original dense module (sharing these parameters), e.g. to undo EMoE for dense inference."""
        # Re-attach the current submodules: peft may have swapped them (LoRA) after this wrapper was made.
        for name in self.layout.submodules:
            setattr(self._dense, name, getattr(self, name))
        return self._dense
