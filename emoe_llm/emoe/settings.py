"""EMoE settings: what a converted checkpoint is (the ``emoe`` block of config.json) and their validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..arch import SUPPORTED_MODEL_TYPES, mlp_layout  # noqa: F401 - re-exported: the families EMoE converts

FORMAT_VERSION = 1
# kmeans: balanced k-means with the fast assignment; kmeans_exact: with the optimal (min-cost-flow) assignment in
# every Lloyd step, as k-means-constrained in the official code; random: the paper's random-split ablation.
CLUSTER_METHODS = ("kmeans", "kmeans_exact", "random")


@dataclass
class EMoESettings:
    """The ``emoe`` block written into config.json.

    n_experts: N, experts per EMoE layer (d_ff / N neurons each).
    top_k: k, experts kept per token (k == N is exactly the dense model).
    layers: decoder layers that run as EMoE at train time (0-indexed).
    permuted_layers: layers whose neurons were clustered and permuted (a superset of ``layers``); any of them can
        be switched to EMoE later without re-clustering.
    seed / method: how the clusters were made ("kmeans" = balanced k-means on the gate rows, "kmeans_exact" = the
        same with the optimal balanced assignment in every step, "random" = the
        paper's random-split ablation).
    clustering: per-layer stats, {"28": {"inertia": ..., "iterations": ..., "swaps": ..., "seconds": ...}}.
    """

    n_experts: int
    top_k: int
    layers: list[int]
    permuted_layers: list[int] = field(default_factory=list)
    seed: int = 0
    method: str = "kmeans"
    clustering: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.layers = sorted(int(i) for i in self.layers)
        self.permuted_layers = sorted(int(i) for i in (self.permuted_layers or self.layers))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EMoESettings":
        if not isinstance(d, dict):
            raise ValueError(f"the 'emoe' block of config.json must be an object, got {type(d).__name__}")
        missing = [k for k in ("n_experts", "top_k", "layers") if k not in d]
        if missing:
            raise ValueError(f"the 'emoe' block of config.json is missing {', '.join(missing)}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def parse_layer_spec(spec: str | list[int] | tuple[int, ...] | None, n_layers: int) -> list[int]:
    """Turn a user's layer choice into a sorted list of layer indices.

    Accepted forms:
      - a list/tuple of ints, or "28,30" (explicit; negative indices count from the end, "-2,-4");
      - "all" (every layer);
      - "START:EVERY", the paper's split_start_layer/split_every_layer: "28:2" -> 28, 30 on a 32-layer model.
    """
    if spec is None or spec == "":
        raise ValueError("no EMoE layers given: pass a list like '28,30', 'START:EVERY' like '28:2', or 'all'")
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return list(range(n_layers))
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError(f"layer spec '{spec}': expected START:EVERY, e.g. '28:2'")
            try:
                start, every = int(parts[0]), int(parts[1])
            except ValueError:
                raise ValueError(f"layer spec '{spec}': START and EVERY must be integers") from None
            if every < 1:
                raise ValueError(f"layer spec '{spec}': EVERY must be >= 1")
            if not 0 <= start < n_layers:
                raise ValueError(f"layer spec '{spec}': start layer {start} is out of range for {n_layers} layers")
            return list(range(start, n_layers, every))
        try:
            items = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"layer spec '{spec}': expected comma-separated integers, 'START:EVERY' or 'all'") from None
    else:
        items = [int(t) for t in spec]
    out = []
    for i in items:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(f"EMoE layer {i} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        out.append(j)
    if not out:
        raise ValueError(f"layer spec '{spec}' selects no layers")
    if len(set(out)) != len(out):
        raise ValueError(f"layer spec '{spec}' repeats a layer")
    return sorted(out)


def validate_settings(
    *, n_experts: int, top_k: int, layers: list[int], d_ff: int, n_layers: int, model_type: str | None
) -> None:
    """Raise ValueError naming the first bad setting (architecture, N, k, layers)."""
    if model_type is not None:
        mlp_layout(model_type)  # raises, saying why, for an already-MoE or gate-less architecture
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
    if d_ff % n_experts:
        divisors = [n for n in (8, 16, 32, 64, 128, 256, 512) if d_ff % n == 0]
        raise ValueError(
            f"n_experts={n_experts} does not divide intermediate_size={d_ff}; experts must be equal-sized "
            f"(divisors that work: {divisors or 'none of the usual powers of two'})"
        )
    if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k!r} must satisfy 1 <= top_k <= n_experts={n_experts}")
    if not layers:
        raise ValueError("no EMoE layers selected")
    for i in layers:
        if not 0 <= i < n_layers:
            raise ValueError(f"EMoE layer {i} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")


# How a checkpoint was fine-tuned, written next to the ``emoe`` block of an exported config.json ("emoe_trained"):
# the mode, N / k / layers, and the prompt template, which the NLL eval tasks render their prompts with.
TRAINED_KEY = "emoe_trained"


def trained_record(mode: str, emoe_block: dict | None, *, lora: bool = False, template: str | None = None) -> dict:
    """``{"mode": "dense"|"emoe", "lora": bool, "template"[, "n_experts", "top_k", "layers"]}`` for an exported run
    (``template``: the recipe's data.template)."""
    if mode not in ("dense", "emoe"):
        raise ValueError(f"training mode must be 'dense' or 'emoe', got {mode!r}")
    record = {"mode": mode, "lora": bool(lora), "template": template}
    if mode == "emoe":
        settings = EMoESettings.from_dict(emoe_block or {})
        record.update(n_experts=settings.n_experts, top_k=settings.top_k, layers=list(settings.layers))
    return record


EVAL_MODES = ("auto", "dense", "emoe")  # how a checkpoint is scored: auto (= dense), plain, or masked


def resolve_eval_mode(config: dict, requested: str = "auto") -> tuple[str, str]:
    """(mode, why) for evaluating a checkpoint whose config.json is ``config``.

    ``requested`` "dense"/"emoe" wins; "auto" is dense for every checkpoint, as the paper's evaluation (a plain load
    of the saved checkpoint) and every plain loader score it; an EMoE-trained export says so in the reason."""
    if requested in ("dense", "emoe"):
        return requested, "requested (--mode)"
    if requested not in EVAL_MODES:
        raise ValueError(f"mode must be auto, dense or emoe, got {requested!r}")
    trained = config.get(TRAINED_KEY)
    how = (f"trained {trained['mode']}" if isinstance(trained, dict) and trained.get("mode") in ("dense", "emoe")
           else "converted, no training record" if config.get("emoe") else "a plain checkpoint")
    return "dense", (f"auto: every export is scored dense, as the paper's evaluation and a plain load do ({how}; "
                     "--mode emoe scores it masked)")
