"""Turn a loaded ``*ForCausalLM`` into an EMoE model, and back.

    model = AutoModelForCausalLM.from_pretrained(path)
    apply_emoe(model, n_experts=64, top_k=16, layers=[28, 30])   # cluster + permute + EMoE MLPs, config.emoe set
    model.save_pretrained(out)                                    # a plain checkpoint of the same family + "emoe" block

    model = load_emoe_model(out)              # EMoE forward (masking) from a converted checkpoint
    AutoModelForCausalLM.from_pretrained(out) # dense inference of the same weights

For large checkpoints use ``emoe-llm convert`` (streaming, never holds the model) instead of ``apply_emoe``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..arch import layout_of
from .clustering import balanced_kmeans, random_balanced_labels
from .mlp import EMoEMLP
from .permute import expert_permutation, permute_mlp_
from .settings import CLUSTER_METHODS, EMoESettings, parse_layer_spec, validate_settings


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of an HF causal LM (also through peft / DeepSpeed wrappers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module) > 0:
            if hasattr(module[0], "mlp"):
                return module
    raise TypeError(f"{type(model).__name__}: no decoder 'layers' with an 'mlp' found; is this a *ForCausalLM?")


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; pass a transformers *ForCausalLM")
    return config


def cluster_labels(
    gate_weight: torch.Tensor,
    n_experts: int,
    *,
    seed: int = 0,
    method: str = "kmeans",
    n_init: int = 3,
    max_iter: int = 30,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, dict]:
    """Expert label of every neuron of one layer (from its (d_ff, d) gate weight) and the clustering stats."""
    if method in ("kmeans", "kmeans_exact"):
        result = balanced_kmeans(gate_weight, n_experts, seed=seed, n_init=n_init, max_iter=max_iter, device=device,
                                 assign="exact" if method == "kmeans_exact" else "fast")
        return result.labels, result.stats()
    if method == "random":
        return random_balanced_labels(gate_weight.shape[0], n_experts, seed=seed), {"method": "random"}
    raise ValueError(f"unknown clustering method '{method}' (expected one of {', '.join(CLUSTER_METHODS)})")


@torch.no_grad()
def apply_emoe(
    model: nn.Module,
    *,
    n_experts: int,
    top_k: int,
    layers,
    seed: int = 0,
    method: str = "kmeans",
    permute_layers=None,
    n_init: int = 3,
    max_iter: int = 30,
    device: str | torch.device | None = None,
    enable: bool = True,
) -> EMoESettings:
    """Cluster and permute the MLP neurons of ``layers`` in place, record the ``emoe`` block in ``model.config``,
    and (``enable=True``) swap those layers' MLPs for :class:`EMoEMLP`.

    Args:
        layers: EMoE layers: a list of ints, "28,30", "START:EVERY" (paper style, "28:2") or "all".
        permute_layers: layers to cluster/permute (default: ``layers``); e.g. "all" as the official code does, so
            the EMoE layer set can be changed later without re-clustering. Must include ``layers``.
        method: "kmeans" (EMoE), "kmeans_exact" (EMoE with the optimal balanced assignment, slower) or "random"
            (the random-split ablation).
        device: where to run the clustering (e.g. "cuda"); weights stay where they are.
    """
    config = _model_config(model)
    if getattr(config, "emoe", None):
        raise ValueError("this model is already an EMoE model (config has an 'emoe' block); load the original")
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    layer_list = parse_layer_spec(layers, n_layers)
    permuted = parse_layer_spec(permute_layers, n_layers) if permute_layers is not None else list(layer_list)
    missing = sorted(set(layer_list) - set(permuted))
    if missing:
        raise ValueError(f"EMoE layers {missing} would not be clustered; permute_layers must include every EMoE layer")
    d_ff = getattr(config, "intermediate_size", None)
    validate_settings(
        n_experts=n_experts, top_k=top_k, layers=layer_list, d_ff=d_ff, n_layers=n_layers,
        model_type=getattr(config, "model_type", None),
    )
    layout = layout_of(model)
    stats = {}
    for idx in permuted:
        mlp = blocks[idx].mlp
        gate = layout.gate_weight(mlp)
        if getattr(gate, "ds_numel", None) is not None or gate.numel() == 0:
            raise RuntimeError("apply_emoe needs a model whose parameters are not ZeRO-3 partitioned; "
                               "convert the checkpoint first (emoe-llm convert) and load it under zero.Init")
        labels, stats[str(idx)] = cluster_labels(
            gate, n_experts, seed=seed, method=method, n_init=n_init, max_iter=max_iter, device=device
        )
        permute_mlp_(mlp, expert_permutation(labels, n_experts), layout)
    settings = EMoESettings(
        n_experts=n_experts, top_k=top_k, layers=layer_list, permuted_layers=permuted, seed=seed, method=method,
        clustering=stats,
    )
    config.emoe = settings.to_dict()
    if enable:
        enable_emoe(model)
    return settings


def enable_emoe(model: nn.Module, *, top_k: int | None = None, layers=None) -> EMoESettings:
    """Swap the MLPs of the EMoE layers named in ``model.config.emoe`` for :class:`EMoEMLP` (no clustering).

    Works on partitioned (ZeRO-3 ``zero.Init``) models too: the Linear submodules are reused as they are.
    ``top_k`` / ``layers`` override the checkpoint's values (layers must have been permuted at conversion).
    """
    config = _model_config(model)
    block = getattr(config, "emoe", None)
    if not block:
        raise ValueError(
            "this checkpoint has no 'emoe' block in config.json: it was not converted. "
            "Run `emoe-llm convert SRC DST --experts N --top-k K --layers ...` first"
        )
    settings = EMoESettings.from_dict(block)
    blocks = decoder_layers(model)
    if layers is not None:
        settings.layers = parse_layer_spec(layers, len(blocks))
    if top_k is not None:
        settings.top_k = int(top_k)
    not_permuted = sorted(set(settings.layers) - set(settings.permuted_layers))
    if not_permuted:
        raise ValueError(
            f"layers {not_permuted} were not clustered when this checkpoint was converted "
            f"(clustered: {settings.permuted_layers}); re-convert with those layers"
        )
    validate_settings(
        n_experts=settings.n_experts, top_k=settings.top_k, layers=settings.layers,
        d_ff=config.intermediate_size, n_layers=len(blocks), model_type=getattr(config, "model_type", None),
    )
    layout = layout_of(model)
    disable_emoe(model)
    for idx in settings.layers:
        blocks[idx].mlp = EMoEMLP(blocks[idx].mlp, n_experts=settings.n_experts, top_k=settings.top_k, layer_idx=idx,
                                  layout=layout)
    config.emoe = settings.to_dict()
    return settings


def disable_emoe(model: nn.Module) -> None:
    """Put the dense MLPs back (same parameters): dense inference of an EMoE-trained model."""
    for block in decoder_layers(model):
        if isinstance(block.mlp, EMoEMLP):
            block.mlp = block.mlp.dense_mlp()


def emoe_modules(model: nn.Module) -> Iterator[EMoEMLP]:
    for module in model.modules():
        if isinstance(module, EMoEMLP):
            yield module


def pop_expert_load(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer: (N,) fraction of tokens routed to each expert} since the last call (for logging)."""
    out = {}
    for module in emoe_modules(model):
        load = module.pop_expert_load()
        if load is not None:
            out[module.layer_idx] = load
    return out


def load_emoe_model(path, *, mode: str = "emoe", top_k: int | None = None, layers=None, **from_pretrained_kwargs):
    """Load a converted checkpoint; ``mode="emoe"`` enables the expert masking, ``"dense"`` leaves it dense."""
    from transformers import AutoModelForCausalLM

    if from_pretrained_kwargs.get("trust_remote_code"):
        raise ValueError("load_emoe_model does not use trust_remote_code; EMoE checkpoints are plain transformers "
                         "models")
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    if mode == "emoe":
        enable_emoe(model, top_k=top_k, layers=layers)
    elif mode != "dense":
        raise ValueError(f"mode must be 'emoe' or 'dense', got '{mode}'")
    return model
