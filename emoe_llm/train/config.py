"""The training recipe's typed config tree: YAML + ``key=value`` overrides, unknown keys raise.

    cfg = load_config("configs/tiny_cpu.yaml", ["train.lr=1e-4", "model.mode=dense"])
    check_runnable(cfg)                       # paths, model dir, emoe section vs checkpoint: before any process group
    ds = fill_ds_config(json.load(open("ds_configs/z3.json")), cfg, world_size=8)

One tree, data section included (``cfg.data`` is the data package's ``DataConfig``). The coercer below is kept
rather than OmegaConf structured configs: OmegaConf cannot type unions such as ``emoe.layers`` ("28,30", "28:2",
"all" or a list) and a data source given as a bare path or a mapping, and the data section keeps its own stricter
checks (``emoe_llm.data.config``) so ``emoe-llm data`` validates a ``data:`` section the same way.

The DeepSpeed JSON holds ZeRO stage/offload/precision; batch sizes, grad clipping and accumulation come from the
recipe and are filled into the DS dict here (``"auto"`` values, or keys the JSON leaves out), with the check
micro_batch_size x grad_accum x world_size == global_batch_size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..checks import range_error
from ..emoe.settings import CLUSTER_METHODS
from ..data.config import BUILTIN_TEMPLATES, DataConfig, data_config_from_dict
from ..data.tokenizer import TOKENIZER_FILES


class ConfigError(ValueError):
    """A bad recipe: names the file/key and what was expected."""


@dataclass
class ModelConfig:
    path: str = ""
    """HF checkpoint dir or Hub id (org/name, fetched safetensors-only into the HF cache): a converted checkpoint
    (config.json has an 'emoe' block matching the emoe: section), or a dense one, which the run converts into
    output_dir/converted first (emoe: section set; small models)."""
    revision: str | None = None
    """with a Hub id: the branch, tag or commit sha to fetch (default main)"""
    hub_commit: str | None = None
    """set by the run, not in a recipe: the commit a Hub id resolved to (run/config.yaml records it; `path` is then
    the snapshot dir in the HF cache)"""
    mode: str = "emoe"
    """dense | emoe: the same loop either way, so baselines are apples to apples."""
    tokenizer: str | None = None
    """tokenizer dir (default: model.path)"""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 when installed on CUDA, else sdpa) | flash_attention_2 | sdpa | eager"""
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    load_dtype: str = "auto"
    """auto: the fp32 master weights start from the model as built in the training precision (bf16-rounded) |
    float32: from the checkpoint's stored values, as the official code (full fine-tuning, bf16/fp16 ZeRO-3)"""
    build_tiny_if_missing: bool = False
    """the demo recipes: when `path` does not exist, build the embedded tiny model there first (what `emoe-llm demo`
    builds: a random 4-layer Llama converted to EMoE), so the recipe runs on a fresh checkout. Only for the recipe's
    own path: a model.path given on the command line must exist"""


@dataclass
class EMoEConfig:
    """The method (``emoe:`` section). n_experts, permute_layers, seed and method decide the converted weights
    (changing them means converting again); top_k and layers are training-time settings (any k, any subset of the
    permuted layers, no re-clustering)."""

    n_experts: int = 0
    """N experts per EMoE layer (must divide intermediate_size)"""
    top_k: int = 0
    """k experts kept per token while training (1 <= k <= N; k = N is the dense model)"""
    layers: Any = None
    """layers that run as EMoE: "28,30", the paper's START:EVERY "28:2", "all", or a list"""
    permute_layers: Any = None
    """layers clustered and permuted at conversion (default: layers); "all" lets `layers` change later"""
    seed: int = 0
    """clustering seed"""
    method: str = "kmeans"
    """kmeans (EMoE; fast balanced assignment) | kmeans_exact (optimal balanced assignment in every Lloyd step, as
    k-means-constrained; slow at 30B widths) | random (the paper's random-split ablation)"""

    def __post_init__(self):
        # `emoe.layers=30` on the command line (or `layers: 30` in YAML) parses as an int: one layer
        for name in ("layers", "permute_layers"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, str(value))

    def conversion(self) -> dict:
        """The keyword arguments of ``emoe_llm.convert.prepare_emoe_checkpoint``."""
        return {"n_experts": self.n_experts, "top_k": self.top_k, "layers": self.layers,
                "permute_layers": self.permute_layers, "seed": self.seed, "method": self.method}


@dataclass
class TrainConfig:
    precision: str = "auto"
    """auto: the DeepSpeed JSON's bf16/fp16 on GPUs, fp32 on a machine without CUDA (bf16 matmuls are ~100x slower
    than fp32 on CPUs) | bf16 | fp16 | fp32: this precision whatever the JSON and the device say"""
    epochs: int = 3
    max_steps: int = 0
    """> 0: stop after this many optimizer steps (overrides epochs)"""
    micro_batch_size: int = 1
    """sequences (or packed rows) per rank per forward"""
    global_batch_size: int = 0
    """sequences per optimizer step over all ranks; 0 = micro_batch_size x grad_accum x world_size"""
    grad_accum: int = 0
    """micro-batches per optimizer step; 0 = derived from global_batch_size"""
    loss_norm: str = "token"
    """token: summed token losses / the step's target tokens (long answers weigh more) | sequence: each sequence's
    mean token loss, averaged over the step's sequences (the official HF-Trainer recipe; exact under packing)"""
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    lr_scheduler: str = "cosine"
    """cosine | linear | constant (all with linear warmup)"""
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    """> 0 overrides warmup_ratio"""
    min_lr_ratio: float = 0.0
    """final lr = lr * min_lr_ratio (cosine/linear)"""
    max_grad_norm: float = 1.0
    """0 disables clipping"""
    max_skipped_steps: int = 10
    """fp16: stop (exit 3) after this many optimizer steps in a row skipped by DeepSpeed's loss scaler (overflow);
    fewer are logged and counted. 0 = never stop for skips"""
    save_every_steps: int = 0
    """0 = only at the end of each epoch (and the end of training)"""
    save_every_epoch: bool = True
    keep_last: int = 2
    """checkpoints kept in checkpoints/ (0 = keep all)"""
    on_damaged_checkpoint: str = "refuse"
    """resume=auto finds a file of the latest checkpoint changed since it was saved (its manifest.json): refuse
    (exit 2, naming the file) | previous (set it aside as step_N.damaged-TIME and resume from the one before)"""
    stall_steps: int = 20
    """warn (log + a "stalled" event in metrics.jsonl) when the gradient norm is exactly 0, or the loss stays
    within 0.01% of ln(vocab) (uniform predictions), for this many steps in a row; 0 = never"""
    log_every_steps: int = 1
    eval_every_steps: int = 0
    """held-out loss every N optimizer steps (0 = only at the end); needs data.eval_split/eval_sources"""
    dataloader_workers: int = 1
    """processes collating training batches ahead of the step (0 = on the training thread)"""
    eval_max_batches: int = 0
    """0 = the whole held-out split"""
    eval_micro_batch_size: int = 0
    """0 = micro_batch_size"""
    export: bool = True
    """write final/ (consolidated HF safetensors + tokenizer) at the end"""
    export_max_shard_size: str = "5GB"
    dist_timeout_minutes: int = 60
    """collective timeout (also how long ranks wait while rank 0 tokenizes and caches the data)"""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    quantize: str = "none"
    """none | 4bit (QLoRA: bitsandbytes NF4; GPU, or CPU with bitsandbytes >= 0.49). The export always merges
    (final/ is a plain AutoModelForCausalLM, 4-bit weights dequantized); the adapter alone goes to final/adapter/."""


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases as a second tracker (pip install 'emoe-llm[wandb]'): rank 0 only, the run's resolved config,
    the same scalars as metrics.jsonl (per-expert load included). The run dir is output_dir/wandb; a resumed run
    continues the same wandb run (its id is kept in output_dir/run/wandb_id)."""

    project: str = "emoe-llm"
    name: str | None = None
    """the run's display name (default: output_dir's name)"""
    mode: str = "online"
    """online | offline (written under output_dir/wandb; upload later with `wandb sync`) | disabled"""
    entity: str | None = None


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: WandbConfig | None = None
    """set (e.g. logging.wandb.mode=offline) to log to wandb too"""
    progress_bar: bool = True
    """tqdm on rank 0 when stderr is a terminal; otherwise (and when false) one log line per logged step"""
    expert_load: bool = True
    """log per-expert token fractions of every EMoE layer"""


@dataclass
class RecipeConfig:
    output_dir: str = ""
    resume: str = "auto"
    """auto (latest complete checkpoint in output_dir/checkpoints, else start fresh) | none | a checkpoint dir"""
    seed: int = 42
    """the run's one seed: weight init of new parameters, the data order, the held-out split and mixing"""
    model: ModelConfig = field(default_factory=ModelConfig)
    emoe: EMoEConfig | None = None
    """needed for mode emoe; with a dense model.path the run converts it first"""
    data: DataConfig | None = None
    """the data pipeline's section (emoe_llm/data/config.py); its seed is the recipe's `seed`"""
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------------------------------------
# YAML + overrides -> typed tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4). Values are parsed as YAML (numbers, bools, null, [lists])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node: Any = tree
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, path[: i + 1])]
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, path)] = value
        else:
            node[last] = value
    return tree


def _list_index(node: list, part: str, path: list[str]) -> int:
    try:
        idx = int(part)
        node[idx]
        return idx
    except (ValueError, IndexError):
        raise ConfigError(
            f"override key '{'.'.join(path)}': '{part}' is not an index of a list of {len(node)}"
        ) from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # nan passes every `<= 0` check; 1e400 reads as inf
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value) if (tp is tuple or origin is tuple) else list(value)
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _from_dict(cls, d: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def config_from_dict(d: dict, *, source: str = "config") -> RecipeConfig:
    d = dict(d or {})
    data = d.pop("data", None)
    try:
        cfg = _from_dict(RecipeConfig, d, "")
        cfg.data = _data_section(data, seed=cfg.seed)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    validate_config(cfg, source=source)
    return cfg


def _data_section(data, *, seed: int) -> DataConfig | None:
    """The data package's own checks (``emoe-llm data`` applies the same), with the recipe's one seed."""
    if data is None:
        return None
    if isinstance(data, DataConfig):
        data = dataclasses.asdict(data)
        data.pop("seed")
    if not isinstance(data, dict):
        raise ConfigError(f"data: expected a section (mapping), got {data!r}")
    if "seed" in data:
        raise ConfigError("data.seed: a recipe has one seed, the top-level `seed` (it also drives the held-out split "
                          "and the mixing); remove data.seed")
    try:
        return data_config_from_dict({**data, "seed": seed})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RecipeConfig:
    """Read a YAML recipe, apply ``key=value`` overrides, and return the validated typed tree."""
    tree: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        source = str(path)
    apply_overrides(tree, list(overrides))
    return config_from_dict(tree, source=source)


def config_to_dict(cfg: RecipeConfig) -> dict:
    def clean(v):
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    tree = clean(dataclasses.asdict(cfg))
    if tree.get("data"):
        tree["data"].pop("seed", None)  # it is the top-level seed
    return tree


def dump_config(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def validate_config(cfg: RecipeConfig, *, source: str = "config") -> None:
    """Collect every bad value and raise once, naming the keys."""
    errors = []
    t = cfg.train
    if cfg.model.mode not in ("dense", "emoe"):
        errors.append(f"model.mode must be 'dense' or 'emoe', got '{cfg.model.mode}'")
    if cfg.model.attn_implementation not in ("auto", "flash_attention_2", "sdpa", "eager"):
        errors.append(f"model.attn_implementation must be auto|flash_attention_2|sdpa|eager, "
                      f"got '{cfg.model.attn_implementation}'")
    if cfg.emoe is not None:
        e = cfg.emoe
        if e.n_experts < 1:
            errors.append(f"emoe.n_experts must be >= 1, got {e.n_experts}")
        if not 1 <= e.top_k <= max(1, e.n_experts):
            errors.append(f"emoe.top_k must be in [1, emoe.n_experts={e.n_experts}], got {e.top_k}")
        if e.layers in (None, "", []):
            errors.append("emoe.layers is empty: e.g. '28,30', the paper's START:EVERY '28:2', or 'all'")
        if e.method not in CLUSTER_METHODS:
            errors.append(f"emoe.method must be one of {'|'.join(CLUSTER_METHODS)}, got '{e.method}'")
    elif cfg.model.mode == "emoe":
        errors.append("model.mode=emoe needs an emoe: section (n_experts, top_k, layers); or model.mode=dense")
    if cfg.model.load_dtype not in ("auto", "float32"):
        errors.append(f"model.load_dtype must be auto|float32, got '{cfg.model.load_dtype}'")
    elif cfg.model.load_dtype == "float32" and cfg.lora.enabled:
        errors.append("model.load_dtype=float32 sets the fp32 master weights of full fine-tuning; LoRA freezes the "
                      "base weights, so use model.load_dtype=auto")
    if t.loss_norm not in ("token", "sequence"):
        errors.append(f"train.loss_norm must be token|sequence, got '{t.loss_norm}'")
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        errors.append(f"train.precision must be auto|bf16|fp16|fp32, got '{t.precision}'")
    if t.lr_scheduler not in ("cosine", "linear", "constant"):
        errors.append(f"train.lr_scheduler must be cosine|linear|constant, got '{t.lr_scheduler}'")
    if t.on_damaged_checkpoint not in ("refuse", "previous"):
        errors.append(f"train.on_damaged_checkpoint must be refuse|previous, got '{t.on_damaged_checkpoint}'")
    if t.micro_batch_size < 1:
        errors.append(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    for name in ("epochs", "max_steps", "global_batch_size", "grad_accum", "warmup_steps", "save_every_steps",
                 "dataloader_workers", "max_skipped_steps",
                 "keep_last", "stall_steps", "eval_every_steps", "eval_max_batches", "eval_micro_batch_size"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.dist_timeout_minutes < 1:
        errors.append(f"train.dist_timeout_minutes must be >= 1, got {t.dist_timeout_minutes}")
    if t.log_every_steps < 1:
        errors.append(f"train.log_every_steps must be >= 1, got {t.log_every_steps}")
    if t.epochs == 0 and t.max_steps == 0:
        errors.append("set train.epochs > 0 or train.max_steps > 0")
    ranges = {"train.lr": (t.lr, {"gt": 0}), "train.weight_decay": (t.weight_decay, {"ge": 0}),
              "train.eps": (t.eps, {"gt": 0}), "train.warmup_ratio": (t.warmup_ratio, {"ge": 0, "lt": 1}),
              "train.min_lr_ratio": (t.min_lr_ratio, {"ge": 0, "le": 1}),
              "train.max_grad_norm": (t.max_grad_norm, {"ge": 0}),
              "lora.dropout": (cfg.lora.dropout, {"ge": 0, "lt": 1}), "lora.r": (cfg.lora.r, {"ge": 1}),
              "lora.alpha": (cfg.lora.alpha, {"gt": 0})}
    if len(t.betas) != 2:
        errors.append(f"train.betas must be two numbers, got {list(t.betas)}")
    else:
        ranges.update({f"train.betas[{i}]": (b, {"ge": 0, "lt": 1}) for i, b in enumerate(t.betas)})
    for key, (value, bounds) in ranges.items():
        error = range_error(value, **bounds)
        if error:
            errors.append(f"{key} {error}")
    if cfg.lora.quantize not in ("none", "4bit"):
        errors.append(f"lora.quantize must be 'none' or '4bit', got '{cfg.lora.quantize}'")
    if cfg.logging.wandb is not None and cfg.logging.wandb.mode not in WANDB_MODES:
        errors.append(f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {cfg.logging.wandb.mode!r}")
    if cfg.lora.quantize != "none" and not cfg.lora.enabled:
        errors.append("lora.quantize=4bit (QLoRA) needs lora.enabled=true")
    resume = cfg.resume
    if not resume:
        errors.append("resume must be 'auto', 'none' or a checkpoint path")
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))


def resolve_hub_ids(cfg: RecipeConfig) -> None:
    """model.path / model.tokenizer given as Hub ids become their snapshot dirs in the HF cache (fetched first unless
    HF_HUB_OFFLINE=1); model.hub_commit records the commit. Every rank resolves on its own before any process group:
    huggingface_hub locks each file it downloads, and a cached snapshot costs one lookup, no download."""
    from .. import hub

    if cfg.model.build_tiny_if_missing and not Path(cfg.model.path).exists():
        return  # the demo recipes' own path: built by the run, never a Hub id
    try:
        if hub.is_hub_id(cfg.model.path):
            resolved = hub.resolve(cfg.model.path, revision=cfg.model.revision)
            cfg.model.path, cfg.model.hub_commit = str(resolved.path), resolved.commit
        elif cfg.model.revision:
            raise hub.HubError(f"model.revision pins a Hub commit, but model.path {cfg.model.path} is a local path")
        if cfg.model.tokenizer and hub.is_hub_id(cfg.model.tokenizer):
            cfg.model.tokenizer = str(hub.resolve(cfg.model.tokenizer, allow_patterns=hub.TOKENIZER_FILES).path)
    except hub.HubError as e:
        raise ConfigError(f"model.path: {e}") from None
    if cfg.data is not None:
        from ..data.config import resolve_hub_source

        for key, sources in (("data.sources", cfg.data.sources), ("data.eval_sources", cfg.data.eval_sources)):
            for i, src in enumerate(sources):
                try:
                    resolve_hub_source(src)
                except ValueError as e:
                    raise ConfigError(f"{key}[{i}]: {e}") from None


def check_runnable(cfg: RecipeConfig) -> None:
    """What a launched run needs beyond a well-formed recipe, checked before any process group exists (every rank
    reaches the same verdict; rank 0 prints it): output_dir, the model dir and its tokenizer, the data files, the chat
    template, the resume checkpoint, and the emoe section against the checkpoint. Kept apart from ``load_config`` so
    shipped recipes validate on a machine without the models."""
    errors = []
    if not cfg.output_dir:
        errors.append("output_dir is empty (set it in the recipe or output_dir=... on the command line)")
    model = Path(cfg.model.path)
    if not cfg.model.path:
        errors.append("model.path is empty (an HF checkpoint dir)")
    elif not (model / "config.json").is_file():
        if not cfg.model.build_tiny_if_missing:  # else the run builds the embedded tiny model there first
            errors.append(f"model.path: {model / 'config.json'} not found (expected an HF checkpoint dir)")
    else:
        errors += _emoe_against_checkpoint(cfg, model)
    tokenizer = Path(cfg.model.tokenizer or cfg.model.path)
    if (cfg.model.tokenizer or (model / "config.json").is_file()) and not any((tokenizer / f).is_file() for f in TOKENIZER_FILES):
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        errors.append(f"{key}: no tokenizer in {tokenizer} (expected one of {', '.join(TOKENIZER_FILES)})")
    if cfg.data is None:
        errors.append("the data section is empty")
    else:
        for key, sources in (("data.sources", cfg.data.sources), ("data.eval_sources", cfg.data.eval_sources)):
            errors += [f"{key}[{i}].path: {s.path} does not exist" for i, s in enumerate(sources)
                       if not Path(s.path).exists()]
        template = cfg.data.template
        if template not in BUILTIN_TEMPLATES and not Path(template).is_file():
            errors.append(f"data.template: '{template}' is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)})"
                          " nor an existing .jinja file")
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_dir():
        errors.append(f"resume: checkpoint dir '{cfg.resume}' does not exist")
    if errors:
        raise ConfigError("; ".join(errors))


def _emoe_against_checkpoint(cfg: RecipeConfig, model: Path) -> list[str]:
    """The emoe section must fit the model (N divides d_ff, layers exist, k <= N) and, when model.path is already
    converted, be *its* conversion: same N, permuted layers, seed and method (k and the active layers may differ)."""
    if cfg.emoe is None:
        return []
    from ..convert.errors import ConversionError
    from ..convert.prepare import conversion_key, existing_key, key_differences
    from ..emoe.settings import parse_layer_spec, validate_settings

    hf = json.loads((model / "config.json").read_text())
    e = cfg.emoe
    try:
        layers = parse_layer_spec(e.layers, hf["num_hidden_layers"])
        validate_settings(n_experts=e.n_experts, top_k=e.top_k, layers=layers, d_ff=hf.get("intermediate_size"),
                          n_layers=hf["num_hidden_layers"], model_type=hf.get("model_type"))
        want = conversion_key(model, n_experts=e.n_experts, layers=e.layers, permute_layers=e.permute_layers,
                              seed=e.seed, method=e.method)
    except (ValueError, KeyError, ConversionError) as err:
        return [f"emoe (against {model / 'config.json'}): {err}"]
    if not set(layers) <= set(want["permuted_layers"]):
        return [f"emoe.layers {layers} are not all in emoe.permute_layers {want['permuted_layers']}"]
    have = existing_key(model)
    if have is None:
        return []  # a dense checkpoint: the run converts it into output_dir/converted first
    diffs = key_differences(have, want, permute_layers_given=e.permute_layers is not None)
    if diffs:
        return [f"model.path {model} is another EMoE conversion than the emoe: section asks for (checkpoint -> recipe: "
                f"{', '.join(diffs)}); convert the dense checkpoint again (emoe-llm convert DENSE DST --config RECIPE) "
                "or fix the recipe"]
    return []


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON


def load_ds_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds_config {path}: file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def resolve_batch(cfg: RecipeConfig, world_size: int) -> tuple[int, int, int]:
    """(micro, accum, global) with micro x accum x world == global, or a ConfigError saying what to change."""
    t = cfg.train
    micro = t.micro_batch_size
    if t.global_batch_size and t.grad_accum:
        if micro * t.grad_accum * world_size != t.global_batch_size:
            raise ConfigError(
                f"train.micro_batch_size ({micro}) x train.grad_accum ({t.grad_accum}) x world size ({world_size}) "
                f"= {micro * t.grad_accum * world_size}, but train.global_batch_size is {t.global_batch_size}; "
                f"set grad_accum=0 to derive it"
            )
        return micro, t.grad_accum, t.global_batch_size
    if t.global_batch_size:
        per_step = micro * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size ({micro}) "
                f"x world size ({world_size}) = {per_step}; change micro_batch_size or global_batch_size"
            )
        return micro, t.global_batch_size // per_step, t.global_batch_size
    accum = t.grad_accum or 1
    return micro, accum, micro * accum * world_size


def fill_ds_config(ds: dict, cfg: RecipeConfig, *, world_size: int) -> dict:
    """Fill batch sizes / clipping / precision-dependent values from the recipe into a copy of the DS dict.

    "auto" and missing values are filled; explicit values must agree with the recipe (else ConfigError)."""
    ds = json.loads(json.dumps(ds))
    micro, accum, global_bs = resolve_batch(cfg, world_size)
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": global_bs,
        "gradient_clipping": float(cfg.train.max_grad_norm),
    }
    for key, value in wanted.items():
        cur = ds.get(key, "auto")
        if cur == "auto":
            ds[key] = value
        elif key == "gradient_clipping" and float(cur) == value:
            ds[key] = value
        elif cur != value:
            raise ConfigError(
                f"DeepSpeed config sets {key}={cur} but the recipe gives {value}; set it to \"auto\" in the JSON "
                f"(the recipe owns batch sizes and clipping)"
            )
    zero = ds.setdefault("zero_optimization", {})
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            "DeepSpeed config has an 'optimizer'/'scheduler' block: the recipe builds AdamW and the LR schedule "
            "(train.lr, train.lr_scheduler); remove those blocks from the JSON"
        )
    hidden = None
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            hidden = hidden or _hidden_size_hint(cfg)
            if key == "reduce_bucket_size":
                zero[key] = hidden * hidden if hidden else int(5e8)
            elif key == "stage3_prefetch_bucket_size":
                zero[key] = int(0.9 * hidden * hidden) if hidden else int(5e7)
            else:
                zero[key] = 10 * hidden if hidden else int(1e5)
    for prec in ("bf16", "fp16"):
        block = ds.get(prec)
        if isinstance(block, dict) and block.get("enabled") == "auto":
            block["enabled"] = prec == "bf16"
    ds.setdefault("steps_per_print", 10**9)  # our own logging; keep DeepSpeed's per-step prints quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _hidden_size_hint(cfg: RecipeConfig) -> int | None:
    try:
        return int(json.loads((Path(cfg.model.path) / "config.json").read_text())["hidden_size"])
    except Exception:
        return None


def ds_precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def resolve_precision(ds: dict, requested: str, *, on_cpu: bool) -> tuple[dict, str | None]:
    """Make the DS dict's bf16/fp16 blocks say the precision this run uses; returns (ds, a note to log or None).

    ``auto`` keeps the JSON's choice on GPUs; on a CPU-only machine a bf16/fp16 JSON (z3.json is bf16, for
    GPUs) runs in fp32. An explicit ``bf16``/``fp16``/``fp32`` wins everywhere."""
    ds = json.loads(json.dumps(ds))
    in_json = ds_precision(ds)
    if requested == "auto":
        if not on_cpu or in_json == "fp32":
            return ds, None
        target = "fp32"
        note = (f"no CUDA on this machine: the DeepSpeed config asks for {in_json}, running in fp32 instead "
                f"({in_json} matmuls are ~100x slower than fp32 on CPUs); train.precision={in_json} keeps {in_json}")
    else:
        target = requested
        note = None if requested == in_json else f"train.precision={requested} overrides the DeepSpeed config's {in_json}"
    for prec in ("bf16", "fp16"):
        if prec == target or prec in ds:
            ds.setdefault(prec, {})["enabled"] = prec == target
    return ds, note


def ds_zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
