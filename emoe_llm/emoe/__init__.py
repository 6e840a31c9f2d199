"""The EMoE method: balanced clustering of MLP neurons, function-preserving permutation, avg-k top-k masking."""

from .clustering import ClusterResult, balanced_kmeans, exact_balanced_assign, random_balanced_labels
from .mlp import EMoEMLP
from .model import (
    apply_emoe,
    cluster_labels,
    decoder_layers,
    disable_emoe,
    emoe_modules,
    enable_emoe,
    load_emoe_model,
    pop_expert_load,
)
from .permute import expert_permutation, permute_mlp_, permute_mlp_tensors
from .settings import (
    CLUSTER_METHODS,
    SUPPORTED_MODEL_TYPES,
    TRAINED_KEY,
    EMoESettings,
    parse_layer_spec,
    resolve_eval_mode,
    trained_record,
    validate_settings,
)

__all__ = [
    "ClusterResult", "balanced_kmeans", "exact_balanced_assign", "CLUSTER_METHODS", "random_balanced_labels", "EMoEMLP", "apply_emoe", "cluster_labels",
    "decoder_layers", "disable_emoe", "emoe_modules", "enable_emoe", "load_emoe_model", "pop_expert_load",
    "expert_permutation", "permute_mlp_", "permute_mlp_tensors", "SUPPORTED_MODEL_TYPES", "EMoESettings",
    "parse_layer_spec", "validate_settings", "TRAINED_KEY", "trained_record", "resolve_eval_mode",
]
