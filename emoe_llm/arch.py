"""Architecture table: where a decoder layer's gated MLP lives and how its neurons are laid out, per ``model_type``.

EMoE needs one thing from an architecture: a gated MLP ``down(act(gate(x)) * up(x))`` whose gate pre-activations
score the neurons. Transformers stores it in one of two layouts under ``model.layers.{i}.mlp``:

  * separate: ``gate_proj`` (d_ff, d), ``up_proj`` (d_ff, d), ``down_proj`` (d, d_ff) -- Llama and most others;
  * fused: ``gate_up_proj`` (2 d_ff, d) whose rows [0, d_ff) are the gate and rows [d_ff, 2 d_ff) the up
    projection, split with ``chunk(2, dim=-1)`` -- Phi-3 and GLM. Neuron j owns rows j and d_ff + j.

Every part of the package that touches MLP tensors or modules (converter, verify, EMoE module, probe, planner,
training loop) goes through this table; it is the only place that names the projections.
"""

from __future__ import annotations

from dataclasses import dataclass

MLP_PREFIX = "model.layers.{i}.mlp."


@dataclass(frozen=True)
class MLPLayout:
    """How one family's gated MLP is stored.

    fused: one ``gate_up_proj`` (gate rows first) instead of ``gate_proj`` + ``up_proj``.
    act_keys: config.json keys naming the activation, first present wins (Gemma-2/3 call it ``hidden_activation``).
    act_attr: the MLP module's attribute holding the activation (kept under its own name by the EMoE wrapper).
    default_act: the activation when config.json names none (transformers' default for the family).
    """

    fused: bool = False
    act_keys: tuple[str, ...] = ("hidden_act",)
    act_attr: str = "act_fn"
    default_act: str = "silu"
    attention_fused: bool = False  # q/k/v stored as one qkv_proj (Phi-3): LoRA targets map onto it
    # The CausalLM's logits are the LM head's output unchanged, so the training loss can fuse the head with the
    # cross-entropy (train/chunked_loss.py). Not so: Gemma-2/3 soft-cap them, Granite divides and Cohere multiplies
    # them by a config scale after the head; those keep the plain loss.
    plain_logits: bool = True

    # --- module side --------------------------------------------------------------------------------------------

    @property
    def projections(self) -> tuple[str, ...]:
        """The MLP's Linear submodules, in the order gate(-up), up, down."""
        return ("gate_up_proj", "down_proj") if self.fused else ("gate_proj", "up_proj", "down_proj")

    @property
    def submodules(self) -> tuple[str, ...]:
        """Everything the EMoE wrapper takes over from the dense MLP (same names, so the same state-dict keys)."""
        return (*self.projections, self.act_attr)

    @property
    def gate_name(self) -> str:
        """The module (and tensor stem) whose first d_ff output rows are the gate."""
        return "gate_up_proj" if self.fused else "gate_proj"

    def d_ff(self, mlp) -> int:
        """MLP width from a live module; ``out_features`` stays right under ZeRO-3 (empty partitions) and LoRA."""
        gate = getattr(mlp, self.gate_name)
        rows = getattr(gate, "out_features", None) or gate.weight.shape[0]
        return rows // 2 if self.fused else rows

    def gate_weight(self, mlp):
        """(d_ff, d) gate rows of a loaded MLP: the clustering keys."""
        weight = getattr(mlp, self.gate_name).weight
        return weight[: self.d_ff(mlp)] if self.fused else weight

    def gate_and_up(self, mlp, x):
        """(gate pre-activations, up projection) of input x, each (..., d_ff)."""
        if self.fused:
            return mlp.gate_up_proj(x).chunk(2, dim=-1)
        return mlp.gate_proj(x), mlp.up_proj(x)

    # --- state-dict side ----------------------------------------------------------------------------------------

    def tensor_names(self, layer: int) -> dict[str, str]:
        """{role: tensor name} of one layer's neuron-indexed tensors, biases included (they may be absent).

        down_proj's bias is indexed by output features, so a neuron permutation leaves it alone (not listed)."""
        p = MLP_PREFIX.format(i=layer)
        if self.fused:
            return {"gate_up": p + "gate_up_proj.weight", "down": p + "down_proj.weight",
                    "gate_up_bias": p + "gate_up_proj.bias"}
        return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight",
                "gate_bias": p + "gate_proj.bias", "up_bias": p + "up_proj.bias"}

    def down_bias_name(self, layer: int) -> str:
        return MLP_PREFIX.format(i=layer) + "down_proj.bias"

    def expected_shapes(self, d_ff: int, d: int) -> dict[str, tuple[int, ...]]:
        if self.fused:
            return {"gate_up": (2 * d_ff, d), "down": (d, d_ff), "gate_up_bias": (2 * d_ff,)}
        return {"gate": (d_ff, d), "up": (d_ff, d), "down": (d, d_ff), "gate_bias": (d_ff,), "up_bias": (d_ff,)}

    @staticmethod
    def neuron_axis(role: str) -> int:
        """Axis of a role's tensor that indexes neurons: rows, except down_proj's columns."""
        return 1 if role == "down" else 0

    @staticmethod
    def neuron_index(role: str, perm):
        """Index that applies the neuron permutation ``perm`` (d_ff,) to a role's tensor along its neuron axis: a
        fused tensor moves gate row i and up row d_ff + i together."""
        if role.startswith("gate_up"):
            import torch

            return torch.cat([perm, perm + perm.numel()])
        return perm

    def activation(self, config: dict) -> str:
        """The activation name transformers builds this MLP with (ACT2FN key), from config.json."""
        for key in self.act_keys:
            if config.get(key):
                name = config[key]
                # Gemma's legacy "gelu" means the tanh approximation; transformers' GemmaConfig rewrites it too.
                return "gelu_pytorch_tanh" if self is GEMMA and name == "gelu" else name
        return self.default_act

    # --- planner / LoRA -----------------------------------------------------------------------------------------

    def mlp_lora_dims(self, hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
        """{module name: (in_features, out_features)} of the MLP projections."""
        dims = {"down_proj": (ffn, hidden)}
        if self.fused:
            return {"gate_up_proj": (hidden, 2 * ffn), **dims}
        return {"gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), **dims}

    def lora_targets(self, targets) -> list[str]:
        """The user's LoRA target names on this family's modules: a fused model has one module for several names
        (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
        fused_names = {}
        if self.fused:
            fused_names.update(gate_proj="gate_up_proj", up_proj="gate_up_proj")
        if self.attention_fused:
            fused_names.update(q_proj="qkv_proj", k_proj="qkv_proj", v_proj="qkv_proj")
        out = []
        for t in targets:
            t = fused_names.get(t, t)
            if t not in out:
                out.append(t)
        return out


LLAMA = MLPLayout()
GEMMA = MLPLayout(default_act="gelu_pytorch_tanh")
GEMMA2 = MLPLayout(act_keys=("hidden_activation", "hidden_act"), default_act="gelu_pytorch_tanh", plain_logits=False)
SCALED_LOGITS = MLPLayout(plain_logits=False)  # Llama's MLP; logits scaled after the head (Granite, Cohere)
PHI3 = MLPLayout(fused=True, act_attr="activation_fn", attention_fused=True)
GLM = MLPLayout(fused=True, act_attr="activation_fn")

# Each entry is exercised by tests/test_arch.py on a tiny random checkpoint built with transformers.
ARCHITECTURES: dict[str, MLPLayout] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "olmo": LLAMA, "olmo2": LLAMA,
    "granite": SCALED_LOGITS, "helium": LLAMA, "smollm3": LLAMA, "cohere": SCALED_LOGITS,
    "gemma": GEMMA, "gemma2": GEMMA2, "gemma3_text": GEMMA2,
    "phi3": PHI3, "glm": GLM,
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

# Why the others are refused: EMoE splits a dense gated MLP; these already route, or have no gate to score with.
ALREADY_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx", "deepseek_v2", "deepseek_v3", "phimoe",
               "granitemoe", "granitemoeshared", "jamba", "jetmoe", "gpt_oss", "llama4", "llama4_text", "minimax",
               "qwen3_next", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "switch_transformers")
NO_GATE = ("gpt2", "gpt_neox", "gpt_neo", "gptj", "phi", "falcon", "opt", "bloom", "mpt", "starcoder2", "gpt_bigcode",
           "codegen", "stablelm")


def mlp_layout(model_type: str | None) -> MLPLayout:
    """The layout for ``model_type``; ValueError (one line, saying why) for anything not in the table."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type in ALREADY_MOE:
        why = "it is already a mixture-of-experts model (EMoE splits the dense MLP of a dense model)"
    elif model_type in NO_GATE:
        why = "its MLP has no gate projection (EMoE scores neurons with the gated MLP's gate pre-activations)"
    else:
        why = "EMoE needs a gated MLP (gate/up/down) from the architecture table"
    raise ValueError(f"model_type '{model_type}' is not supported: {why} (supported: {supported})")


def layout_of(model) -> MLPLayout:
    """The layout of a loaded model, from ``model.config.model_type`` (a config without one: the Llama layout, as
    ``validate_settings`` accepts it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LLAMA if model_type is None else mlp_layout(model_type)
