"""``emoe-llm plan``: will this job fit, how fast will it go, and how many nodes? Answered before you sbatch.

    emoe-llm plan --model llama-30b --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 \\
        --config configs/llama30b_emoe.yaml --ds-config ds_configs/z3.json
    emoe-llm plan --config configs/llama2_7b_emoe.yaml --table 1,2,4,8     # one row per node count

Per GPU it adds up:
  * model states (16-bit params, gradients, fp32 master + Adam moments) per ZeRO stage and offload. For a 16-bit
    full fine-tune these come from DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs``,
    ``estimate_zero2_model_states_mem_needs``); fp32 (CPU) and LoRA runs, which those do not cover, use the same
    byte counts with fp32 or frozen-base terms;
  * activations for micro batch x seq len, with or without gradient checkpointing (one decoder layer's activations
    are live during its recomputation), plus the loss: the chunked LM-head cross-entropy (one token chunk / one
    vocabulary block at a time, train/chunked_loss.py), or, for families that transform the logits after the head,
    the logits and the fp32 cross-entropy on them;
  * the EMoE mask's extra: a saved (tokens, N) 0/1 mask per EMoE layer and, in 16-bit runs on CPU only, one transient
    fp32 copy of the (tokens, d_ff) gate output for the expert scores (on CUDA the fp32 mean reads the 16-bit values:
    emoe_llm/emoe/mlp.py); nothing of size (tokens, d_ff) is kept;
  * ZeRO-3 communication buckets and a fixed runtime overhead (CUDA context, NCCL buffers, allocator slack);
  * the ZeRO-3 optimizer step's transient buffers: DeepSpeed concatenates each sub-group's gradient partitions into a
    new fp32 tensor (``_prepare_fp32_grad_for_sub_group``), and the training loop still holds the last micro batch's
    logits. On a GPU the caching allocator reuses the train pass's freed blocks, so the larger of the two phases
    counts; on CPU (``--gpu cpu``) step buffers of 32 MiB or more are fresh mmaps while the train pass's freed memory
    stays in glibc's free lists, so they add up, and torch's single-tensor AdamW (the recipe uses ``fused=True`` only
    on CUDA) adds two sub-group-sized temporaries (docs/planning.md, BENCHMARKS.md section 5).
It then says whether that fits with a margin, the largest micro batch that fits, CPU memory per node for offload,
and step time / tokens/s from the model FLOPs (6 N per token, 8 N with recomputation, plus attention) at an MFU
figure: the one measured in BENCHMARKS.md (a ``plan-mfu: 0.xx`` line) when there is one, else a stated assumption.

Exit status: 0 = fits, 1 = does not fit (the message says what to change), 2 = usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .arch import LLAMA, mlp_layout
from .checks import arg_number, positive_int
from .emoe.settings import parse_layer_spec, validate_settings

GiB = 2**30

# Llama-family shapes (config.json values of the public checkpoints).
PRESETS = {
    "llama-7b": dict(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "llama-13b": dict(hidden=5120, ffn=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
    "llama-30b": dict(hidden=6656, ffn=17920, layers=60, heads=52, kv_heads=52, vocab=32000),
    "llama-65b": dict(hidden=8192, ffn=22016, layers=80, heads=64, kv_heads=64, vocab=32000),
    "llama-3-8b": dict(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
}
# The paper's EMoE settings for the presets (README): 7B-class N=64 on 2 layers, 30B N=256.
PRESET_EMOE = {"llama-30b": (256, 2), "llama-65b": (256, 2)}

# Dense bf16 tensor-core peak per GPU (vendor datasheets), and memory.
GPUS = {
    "a100-40gb": (312.0, 40), "a100-80gb": (312.0, 80), "h100-80gb": (989.0, 80), "h200": (989.0, 141),
    "l40s": (362.0, 48), "cpu": (1.0, 0),
}
ASSUMED_MFU = 0.40  # a typical ZeRO-3 bf16 fine-tune figure on A100/H100; stated in the output when used
GPU_RUNTIME_OVERHEAD_GB = 2.0  # CUDA context + NCCL buffers + allocator slack (stated assumption)
# glibc malloc serves a request of at least its mmap threshold with a fresh mmap (and returns it on free); the
# threshold adapts upwards but never beyond DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB on 64-bit. Smaller requests come from
# the heap's free lists.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
REPO_ROOT = Path(__file__).resolve().parents[1]


class PlanError(ValueError):
    """A bad plan request: names the option/file and what was expected."""


@dataclass
class ModelShape:
    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    emoe_layers: int = 0
    n_experts: int = 0
    head_dim: int = 0  # 0 = hidden / heads; Gemma sets it (e.g. 256 with hidden 3072 and 16 heads)
    model_type: str = "llama"  # the architecture-table entry: which MLP projections exist (fused or not)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.head_size * self.heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.kv_heads

    def layer_params(self) -> int:
        # q and o (hidden x q_dim), k and v (hidden x kv_dim), the gated MLP's three d_ff x hidden matrices (fused or
        # not), two norms
        h, kv = self.hidden, self.kv_dim
        return 2 * h * self.q_dim + 2 * h * kv + 3 * h * self.ffn + 2 * h

    def n_params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def largest_layer_params(self) -> int:
        """Largest single module (DeepSpeed's 'largest layer'): the embedding / lm_head, or an MLP projection."""
        return max(self.vocab * self.hidden, self.hidden * self.ffn)


@dataclass
class Setup:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    cpu_mem_gb: float = 0.0  # per node; 0 = not checked
    peak_tflops: float = 312.0
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    gradient_checkpointing: bool = True
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_targets: tuple = ("q_proj", "v_proj")
    reduce_bucket: int = 0  # elements; 0 = hidden^2 (the recipe's "auto")
    prefetch_bucket: int = 0  # elements; 0 = 0.9 hidden^2
    max_live_parameters: int = int(1e9)  # ZeRO-3 stage3_max_live_parameters (DeepSpeed's default)
    sub_group_size: int = int(1e9)  # ZeRO-3 sub_group_size: elements per optimizer sub-group (DeepSpeed's default)
    device: str = "cuda"  # cuda | cpu: which allocator/optimizer terms apply (CPU runs: benchmarks/plan_check.py)
    runtime_overhead_gb: float = GPU_RUNTIME_OVERHEAD_GB
    margin: float = 0.10
    mfu: float | None = None
    steps: int = 0  # total optimizer steps of the recipe (0 = unknown)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Plan:
    model: str
    n_params: int
    trainable_params: int
    world: int
    per_gpu: dict = field(default_factory=dict)  # component -> bytes
    model_states_source: str = ""
    total_bytes: int = 0
    usable_bytes: int = 0
    fits: bool = False
    max_micro_batch: int = 0
    cpu_per_node_bytes: int = 0
    flops_per_step: float = 0.0
    mfu: float = 0.0
    mfu_source: str = ""
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    wall_time_s: float = 0.0
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# model shape


def shape_from_config(config: dict, *, name: str = "config.json", emoe: dict | None = None) -> ModelShape:
    try:
        heads = int(config["num_attention_heads"])
        shape = ModelShape(
            name=name, hidden=int(config["hidden_size"]), ffn=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)), head_dim=int(config.get("head_dim") or 0),
            model_type=str(config.get("model_type") or "llama"))
        mlp_layout(shape.model_type)
    except KeyError as e:
        raise PlanError(f"{name}: missing {e.args[0]!r} (expected a config.json of a gated-MLP decoder)") from None
    except TypeError as e:
        raise PlanError(f"{name}: expected integer sizes: {e}") from None
    except ValueError as e:
        raise PlanError(f"{name}: {e}") from None
    for key, value in (("hidden_size", shape.hidden), ("intermediate_size", shape.ffn),
                       ("num_hidden_layers", shape.layers), ("num_attention_heads", shape.heads),
                       ("num_key_value_heads", shape.kv_heads), ("vocab_size", shape.vocab)):
        if value < 1:
            raise PlanError(f"{name}: {key} must be a positive integer, got {value}")
    block = emoe or config.get("emoe")
    if block:
        apply_emoe_block(shape, block, name=name)
    return shape


def apply_emoe_block(shape: ModelShape, block: dict, *, name: str) -> None:
    """N and the number of EMoE layers from an ``emoe`` block (a converted config.json's or the recipe's section)."""
    try:  # the method's own parser: "28,30", the paper's "28:2", "all" or a list
        layers = block.get("layers")
        shape.emoe_layers = len(parse_layer_spec(layers, shape.layers)) if layers else 0
    except ValueError as e:
        raise PlanError(f"{name}: emoe.layers: {e}") from None
    shape.n_experts = int(block.get("n_experts", 0))


def load_shape(model: str, *, emoe_override: dict | None = None) -> ModelShape:
    """A preset name, a config.json, a checkpoint dir holding one, or a Hub id (only its config.json is read)."""
    if model in PRESETS:
        shape = ModelShape(name=model, **PRESETS[model])
        if isinstance(emoe_override, dict):  # the recipe's emoe: section, not the preset's paper default
            apply_emoe_block(shape, emoe_override, name="recipe")
        elif emoe_override is not False:
            shape.n_experts, shape.emoe_layers = PRESET_EMOE.get(model, (64, 2))
        return shape
    from . import hub

    if hub.is_hub_id(model):  # a Hub id: its config.json is all a plan needs (no weights are fetched)
        try:
            model = str(hub.resolve(model, allow_patterns=["config.json"]).path)
        except hub.HubError as e:
            raise PlanError(f"--model {e}") from None
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"--model {model}: not a preset ({', '.join(PRESETS)}) and no config.json there")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON: {e}") from None
    return shape_from_config(config, name=str(path), emoe=emoe_override or None)


def lora_params(shape: ModelShape, r: int, targets) -> int:
    """Adapter parameters of LoRA rank r on ``targets`` (Llama names, mapped onto the family's fused modules)."""
    layout = mlp_layout(shape.model_type) if shape.model_type else LLAMA
    h = shape.hidden
    dims = {"q_proj": (h, shape.q_dim), "k_proj": (h, shape.kv_dim), "v_proj": (h, shape.kv_dim),
            "qkv_proj": (h, shape.q_dim + 2 * shape.kv_dim), "o_proj": (shape.q_dim, h),
            **layout.mlp_lora_dims(h, shape.ffn)}
    return shape.layers * sum(r * (dims[t][0] + dims[t][1]) for t in layout.lora_targets(targets) if t in dims)


# ---------------------------------------------------------------------------------------------------------------------
# memory


def model_states(shape: ModelShape, s: Setup, trainable: int) -> tuple[dict, int, str]:
    """Per-GPU bytes of params / grads / optimizer states, and CPU bytes per node (offload). Returns
    (components, cpu_per_node, source)."""
    P, W, n = shape.n_params(), s.world, s.gpus_per_node
    largest = shape.largest_layer_params()
    a = 2 if s.precision in ("bf16", "fp16") else 4
    mixed = a == 2
    full = not s.lora
    if mixed and full and s.zero_stage in (1, 2, 3):
        # DeepSpeed's own estimators (16-bit mixed precision, Adam, additional_buffer_factor 1.5 for CPU).
        if s.zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            cpu, gpu, gather = estimate_zero3_model_states_mem_needs(
                P, largest, num_gpus_per_node=n, num_nodes=s.nodes, cpu_offload=s.offload_optimizer or s.offload_param,
                cpu_offload_params=s.offload_param, zero_init=True)
            parts = {"model states (ZeRO-3 partitions)": gpu - gather, "gathered layer (ZeRO-3)": gather}
            return parts, cpu, "deepspeed estimate_zero3_model_states_mem_needs"
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=n, num_nodes=s.nodes,
                                                         cpu_offload=s.offload_optimizer)
        return {f"model states (ZeRO-{s.zero_stage})": gpu}, cpu, "deepspeed estimate_zero2_model_states_mem_needs"
    # The same byte counts for what those estimators leave out: fp32 training and LoRA (frozen base params in the
    # model dtype; only adapter params carry grads and Adam states). fp32 under ZeRO: 4 param + 4 grad + 4 master +
    # 8 Adam. DeepSpeed keeps a separate fp32 master partition even when the model is fp32: stage 3 would alias it
    # only if `tensor.device == self.device`, which compares a torch.device with a str and is always False (0.19.8;
    # stages 1/2 always clone). Measured on CPU: five partition-sized fp32 tensors (param, master, grad, 2 x Adam).
    base = P if full else P + trainable
    # mixed: fp32 master + moments + fp32 grads; fp32: moments, + the master under ZeRO
    opt_bytes = (4 + 8 + 4) if mixed else (8 + 4 if s.zero_stage >= 1 else 8)
    shard = lambda x, stage: x / W if s.zero_stage >= stage else x  # noqa: E731
    params = shard(a * base, 3)
    grads = shard(a * trainable if mixed else 4 * trainable, 2)
    opt = shard(opt_bytes * trainable, 1)
    cpu = 0
    if s.offload_optimizer:
        cpu += opt * n * 1.5
        opt = 0
    if s.offload_param and s.zero_stage == 3:
        cpu += params * n * 1.5
        params = 0
    parts = {"parameters": params, "gradients": grads, "optimizer states": opt}
    if s.zero_stage == 3:
        parts["gathered layer (ZeRO-3)"] = (a + (a if full else 0)) * largest
    return {k: int(v) for k, v in parts.items()}, int(cpu), "emoe_llm.plan byte counts (fp32 or LoRA)"


def activation_bytes(shape: ModelShape, s: Setup, micro: int) -> dict:
    """Activation memory of one micro batch, forward + backward, SDPA/flash attention (no seq^2 term)."""
    a = 2 if s.precision in ("bf16", "fp16") else 4
    tok = micro * s.seq_len
    h, q, kv, f = shape.hidden, shape.q_dim, shape.kv_dim, shape.ffn
    # Saved for backward per token in one decoder layer: attention (norm in/out, q k v, rotated q k, attention out,
    # o_proj in) + MLP (norm in/out, gate out, up out, act(gate), masked product = down_proj input); RMSNorm keeps an
    # fp32 copy of its input in 16-bit runs. q-sized tensors are q_dim wide (= hidden except with Gemma's head_dim).
    per_token_layer = a * (3 * h + 4 * q + 3 * kv + 4 * f) + (2 * 4 * h if a < 4 else 0)
    layer = tok * per_token_layer
    if s.gradient_checkpointing:
        layers = shape.layers * tok * a * h + layer  # layer inputs kept, one layer recomputed at a time
    else:
        layers = shape.layers * layer
    if chunked_loss_used(shape):
        out = {"activations (decoder layers)": layers, "chunked LM-head loss": chunked_loss_bytes(shape, tok, a)}
    else:
        # logits (model dtype), the fp32 shifted copy for the loss, log-softmax saved, and its gradient
        out = {"activations (decoder layers)": layers, "logits + cross-entropy": tok * shape.vocab * (a + 12)}
    if shape.emoe_layers and shape.n_experts:
        # the expert scores' fp32 mean reads 16-bit input directly on CUDA; CPU reductions cast a (tokens, d_ff) copy
        cast = tok * f * 4 if a < 4 and s.device == "cpu" else 0
        out["EMoE mask"] = shape.emoe_layers * tok * shape.n_experts * a + cast
    return {k: int(v) for k, v in out.items()}


def chunked_loss_used(shape: ModelShape) -> bool:
    """The recipe fuses the LM head with the loss (train/chunked_loss.py) unless the family transforms the logits."""
    return (mlp_layout(shape.model_type) if shape.model_type else LLAMA).plain_logits


def chunked_loss_bytes(shape: ModelShape, tok: int, a: int) -> int:
    """The chunked LM-head loss of ``tok`` tokens (``a``: bytes of the compute dtype). Forward, one token chunk at a
    time: its logits in the compute dtype, their fp32 copy and logsumexp's fp32 temporary; backward, one vocabulary
    block at a time over all tokens: the block's logits (compute dtype) and fp32 softmax, the gradient's cast, plus
    the fp32 hidden-state gradient. The two phases do not overlap; per-token losses, logsumexps and targets (17 bytes
    a token) live throughout. Measured against the full loss: benchmarks/loss_memory.py (BENCHMARKS.md)."""
    from .train.chunked_loss import TOKEN_CHUNK, VOCAB_BLOCK

    forward = min(TOKEN_CHUNK, tok) * shape.vocab * (a + 8)
    backward = tok * min(VOCAB_BLOCK, shape.vocab) * (2 * a + 4) + tok * shape.hidden * 4
    return int(max(forward, backward) + 17 * tok)


def comm_buffers(shape: ModelShape, s: Setup) -> int:
    if s.zero_stage < 2:
        return 0
    a = 2 if s.precision in ("bf16", "fp16") else 4
    reduce = s.reduce_bucket or shape.hidden * shape.hidden
    prefetch = (s.prefetch_bucket or int(0.9 * shape.hidden * shape.hidden)) if s.zero_stage == 3 else 0
    return int(a * (reduce + prefetch))


def step_bytes(shape: ModelShape, s: Setup, trainable: int, micro: int) -> dict:
    """Transient memory of the ZeRO-3 optimizer step (after the backward pass).

    * DeepSpeed's stage-3 step (``_prepare_fp32_grad_for_sub_group``) flattens one optimizer sub-group's gradient
      partitions into a new tensor and converts it to fp32: ``flatten(grads).to(fp32)``, so 16-bit runs briefly hold
      the 16-bit and the fp32 copy (2 + 4 bytes per element), fp32 runs one copy (4 bytes). A sub-group is at most
      ``sub_group_size`` elements of this rank's partition (trainable / world). Freed after that sub-group's update.
    * The training loop's ``out`` (train_step) holds the micro batch's logits (model dtype) through backward and step
      when the family keeps the plain loss (with the chunked loss it holds per-token losses only).
    * CPU only: torch's single-tensor AdamW (the recipe asks for ``fused=True`` on CUDA only) computes
      ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``: two sub-group-sized fp32 temporaries.
    With optimizer offload the step runs in DeepSpeedCPUAdam on CPU buffers (counted in the CPU figure), so none of
    this is on the GPU; ZeRO-1/2 steps are not modelled here."""
    if s.zero_stage != 3 or s.offload_optimizer:
        return {}
    a = 2 if s.precision in ("bf16", "fp16") else 4
    n_sg = sub_group_elements(s, trainable)
    out = {"optimizer step: flat fp32 gradient": (a + 4 if a < 4 else 4) * n_sg}
    if not chunked_loss_used(shape):  # the chunked loss hands the loop per-token losses, not logits
        out["optimizer step: logits held by the loop"] = a * micro * s.seq_len * shape.vocab
    if s.device == "cpu":
        out["optimizer step: AdamW temporaries (CPU)"] = 2 * 4 * n_sg
    return {k: int(v) for k, v in out.items()}


def sub_group_elements(s: Setup, trainable: int) -> int:
    """Elements in this rank's largest ZeRO-3 optimizer sub-group: its partition (trainable / world), split into
    sub-groups of at most ``sub_group_size``."""
    part = -(-trainable // s.world)
    return min(s.sub_group_size, part) if s.sub_group_size > 0 else part


def memory_bytes(shape: ModelShape, s: Setup, trainable: int, fixed: dict, micro: int) -> dict:
    """Per-GPU components for a micro batch; they add up to the peak.

    The train pass (forward + backward: activations, logits, EMoE mask, on top of ``fixed``) and the optimizer step
    (step_bytes) do not overlap in time. On a GPU the caching allocator reuses the train pass's freed blocks for the
    step, so only the part of the step above the train pass counts. On CPU the same holds while the step's buffers
    (4 bytes x the sub-group each) are below glibc's mmap threshold: they come from the free lists the train pass left
    (measured on the tiny model: 31.8 MiB buffers, the step peaked 0.03 GiB above its start). From 32 MiB up each is a
    fresh mmap, while the train pass's freed memory stays in glibc's free lists (measured on SmolLM2: malloc_trim
    after backward released 0.54-0.73 GiB), so the two add up; the logits held by the loop are then already in the
    train pass's logits term."""
    act = activation_bytes(shape, s, micro)
    step = step_bytes(shape, s, trainable, micro)
    if s.device == "cpu" and step and 4 * sub_group_elements(s, trainable) >= GLIBC_MMAP_THRESHOLD_MAX:
        step.pop("optimizer step: logits held by the loop", None)
        return {**fixed, **act, **step}
    extra = sum(step.values()) - sum(act.values())
    if s.zero_stage == 3:  # the live parameters are released at the start of the step (_partition_all_parameters)
        extra -= fixed.get("ZeRO-3 live parameters", 0)
    parts = {**fixed, **act}
    if step:
        parts["optimizer step above the train pass"] = max(0, int(extra))
    return parts


def measured_mfu(benchmarks: Path = REPO_ROOT / "BENCHMARKS.md") -> float | None:
    """A measured MFU recorded as a ``plan-mfu: 0.xx`` line in BENCHMARKS.md (from benchmarks/train_throughput.py)."""
    try:
        m = re.search(r"^\s*plan-mfu:\s*([0-9.]+)", benchmarks.read_text(), re.MULTILINE)
    except OSError:
        return None
    return float(m.group(1)) if m else None


def make_plan(shape: ModelShape, s: Setup) -> Plan:
    if s.nodes < 1 or s.gpus_per_node < 1 or s.micro_batch < 1 or s.seq_len < 1:
        raise PlanError("nodes, gpus-per-node, micro batch and seq len must all be >= 1")
    if s.precision not in ("bf16", "fp16", "fp32"):
        raise PlanError(f"precision must be bf16|fp16|fp32, got {s.precision!r}")
    if s.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"ZeRO stage must be 0-3, got {s.zero_stage}")
    P = shape.n_params()
    trainable = lora_params(shape, s.lora_r, s.lora_targets) if s.lora else P
    states, cpu, source = model_states(shape, s, trainable)
    fixed = dict(states)
    fixed["communication buckets"] = comm_buffers(shape, s)
    if s.zero_stage == 3:
        # ZeRO-3 keeps up to stage3_max_live_parameters gathered (with a large stage3_max_reuse_distance, the ones
        # the backward pass will use again stay gathered after the forward): an upper bound, in the model dtype.
        fixed["ZeRO-3 live parameters"] = (2 if s.precision in ("bf16", "fp16") else 4) * min(
            s.max_live_parameters, P)
    fixed["runtime overhead"] = int(s.runtime_overhead_gb * GiB)
    plan = Plan(model=shape.name, n_params=P, trainable_params=trainable, world=s.world, model_states_source=source)
    plan.per_gpu = memory_bytes(shape, s, trainable, fixed, s.micro_batch)
    plan.total_bytes = sum(plan.per_gpu.values())
    plan.usable_bytes = int(s.gpu_mem_gb * GiB * (1 - s.margin))
    plan.fits = plan.total_bytes <= plan.usable_bytes
    plan.cpu_per_node_bytes = cpu
    if s.cpu_mem_gb and (s.offload_optimizer or s.offload_param) and cpu > s.cpu_mem_gb * GiB * (1 - s.margin):
        plan.fits = False
        plan.notes.append(f"offload needs {cpu / GiB:.0f} GiB of CPU memory per node, more than "
                          f"{s.cpu_mem_gb:g} GiB: use more nodes")
    # largest micro batch: every micro-batch-dependent term grows with it (linearly, or less: the chunked loss's
    # forward tile stops growing at one token chunk), so the total is monotonic; bracket it by doubling
    total = lambda m: sum(memory_bytes(shape, s, trainable, fixed, m).values())  # noqa: E731
    hi = 1
    while total(hi) <= plan.usable_bytes and hi < 2**20:
        hi *= 2
    lo = 0
    while lo < hi:  # largest m in [0, hi] with total(m) <= usable
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= plan.usable_bytes else (lo, mid - 1)
    plan.max_micro_batch = lo
    # time: 6N per token (forward 2N + backward 4N; LoRA skips the weight gradients: 4N), +2N with recomputation,
    # plus attention 12 L h s (QK^T and AV: forward 4 L h s, backward twice that; +4 L h s recomputed)
    fwd = 2 * P
    bwd = 2 * P if s.lora else 4 * P
    per_token = fwd + bwd + (fwd if s.gradient_checkpointing else 0)
    per_token += 4 * shape.layers * shape.q_dim * s.seq_len * (3 + (1 if s.gradient_checkpointing else 0))
    tokens_per_step = s.micro_batch * s.grad_accum * s.world * s.seq_len
    plan.flops_per_step = per_token * tokens_per_step
    if s.mfu is not None:
        plan.mfu, plan.mfu_source = s.mfu, "--mfu"
    elif (m := measured_mfu()) is not None:
        plan.mfu, plan.mfu_source = m, "measured (BENCHMARKS.md plan-mfu)"
    else:
        plan.mfu, plan.mfu_source = ASSUMED_MFU, "assumed (no measured MFU in BENCHMARKS.md yet)"
    plan.step_time_s = plan.flops_per_step / (s.world * s.peak_tflops * 1e12 * plan.mfu)
    plan.tokens_per_s = tokens_per_step / plan.step_time_s
    plan.wall_time_s = plan.step_time_s * s.steps if s.steps else 0.0
    if not plan.fits and not plan.notes:
        plan.notes.append(_advice(plan, s, fixed=sum(fixed.values()), one_row=total(1) - sum(fixed.values())))
    return plan


def _advice(plan: Plan, s: Setup, *, fixed: int, one_row: int) -> str:
    """What to change, naming the real cause: the micro batch, one row's activations, or the model states."""
    if plan.max_micro_batch >= 1:
        return (f"lower train.micro_batch_size to {plan.max_micro_batch} (and raise grad accumulation), or use more "
                f"nodes")
    if fixed <= plan.usable_bytes:
        return (f"the model states fit ({fixed / GiB:.2f} GiB), but one row of {s.seq_len} tokens needs "
                f"{one_row / GiB:.2f} GiB of activations on top: lower data.max_seq_len (--seq-len)"
                + ("" if s.gradient_checkpointing else " or turn on model.gradient_checkpointing"))
    if s.zero_stage < 3:
        return "the model states alone do not fit: use ZeRO-3 (ds_configs/z3.json) or more nodes"
    if not s.offload_optimizer:
        return "the model states alone do not fit: use more nodes, or ds_configs/z3_offload.json (CPU offload)"
    return "does not fit even with offload: use more nodes or LoRA"


# ---------------------------------------------------------------------------------------------------------------------
# recipe / DeepSpeed config -> Setup


def setup_from_recipe(args, s: Setup) -> tuple[Setup, str | None, dict | None]:
    """Fill the Setup from --config (+ overrides) and --ds-config. Returns (setup, model path, emoe block)."""
    model_path, emoe = None, None
    if args.config:
        from emoe_llm.train.config import ConfigError, load_config, resolve_batch

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise PlanError(str(e)) from None
        t = cfg.train
        s.micro_batch = args.micro_batch or t.micro_batch_size
        s.gradient_checkpointing = cfg.model.gradient_checkpointing
        s.lora, s.lora_r, s.lora_targets = cfg.lora.enabled, cfg.lora.r, tuple(cfg.lora.target_modules)
        s.seq_len = args.seq_len or int(cfg.data.max_seq_len if cfg.data is not None else s.seq_len)
        try:
            cfg.train.micro_batch_size = s.micro_batch
            _, s.grad_accum, global_bs = resolve_batch(cfg, s.world)
        except ConfigError as e:
            raise PlanError(f"{args.config} at {s.world} GPUs: {e}") from None
        if t.max_steps:
            s.steps = t.max_steps
        elif args.train_rows:
            s.steps = t.epochs * (args.train_rows // global_bs)
        model_path = cfg.model.path or None
        if cfg.model.mode == "dense":
            emoe = False
        elif cfg.emoe is not None:  # the recipe's emoe: section decides N and the layers that run masked
            emoe = {"n_experts": cfg.emoe.n_experts, "top_k": cfg.emoe.top_k, "layers": cfg.emoe.layers}
    if args.ds_config:
        try:
            ds = json.loads(Path(args.ds_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"--ds-config {args.ds_config}: {e}") from None
        zero = ds.get("zero_optimization", {})
        s.zero_stage = int(zero.get("stage", 0))
        s.offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
        s.offload_param = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
        s.precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get(
            "enabled") else "fp32"
        for key, attr in (("reduce_bucket_size", "reduce_bucket"), ("stage3_prefetch_bucket_size", "prefetch_bucket"),
                          ("stage3_max_live_parameters", "max_live_parameters"), ("sub_group_size", "sub_group_size")):
            if isinstance(zero.get(key), (int, float)):
                setattr(s, attr, int(zero[key]))
    return s, model_path, emoe


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}), a config.json or a checkpoint dir "
                                        "(default: the recipe's model.path)")
    parser.add_argument("--config", help="recipe YAML: micro batch, seq len, gradient checkpointing, LoRA, steps")
    parser.add_argument("--ds-config", help="DeepSpeed JSON: ZeRO stage, offload, precision (default: ZeRO-3 bf16)")
    parser.add_argument("--nodes", type=positive_int, default=1)
    parser.add_argument("--gpus-per-node", type=positive_int, default=8)
    parser.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), help="peak TFLOPS and memory preset")
    parser.add_argument("--gpu-mem-gb", type=arg_number(gt=0),
                        help="memory per GPU in GiB (default: from --gpu; required with --gpu cpu)")
    parser.add_argument("--cpu-mem-gb", type=arg_number(ge=0), default=0.0,
                        help="CPU memory per node in GiB, checked for offload (default: not checked)")
    parser.add_argument("--peak-tflops", type=arg_number(gt=0), help="dense bf16 peak per GPU (default: from --gpu)")
    parser.add_argument("--mfu", type=arg_number(gt=0, le=1),
                        help=f"model FLOPs utilisation, in (0, 1] (default: measured, else {ASSUMED_MFU})")
    parser.add_argument("--micro-batch", type=positive_int, help="override train.micro_batch_size")
    parser.add_argument("--seq-len", type=positive_int, help="override data.max_seq_len")
    parser.add_argument("--train-rows", type=positive_int,
                        help="training rows, for the wall time of the recipe's epochs")
    parser.add_argument("--margin", type=arg_number(ge=0, lt=1), default=0.10,
                        help="fraction of GPU memory kept free, in [0, 1) (default 0.10)")
    parser.add_argument("--runtime-overhead-gb", type=arg_number(ge=0), default=GPU_RUNTIME_OVERHEAD_GB,
                        help="fixed per-process memory: CUDA context, NCCL, allocator slack (default %(default)s)")
    parser.add_argument("--table", type=_node_counts,
                        help="node counts, e.g. 1,2,4,8: print one row per count (markdown)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")


def _node_counts(text: str) -> list[int]:
    """--table: positive node counts, e.g. "1,2,4,8"."""
    counts = [x.strip() for x in text.split(",") if x.strip()]
    if not counts or not all(x.isdigit() and int(x) >= 1 for x in counts):
        raise argparse.ArgumentTypeError(f"expected positive node counts like 1,2,4,8, got {text!r}")
    return [int(x) for x in counts]


def check_args(args) -> None:
    """What argparse's types cannot see: combinations of options."""
    if args.gpu == "cpu" and not args.gpu_mem_gb:
        raise PlanError("--gpu cpu: give the memory one rank may use with --gpu-mem-gb (a CPU has no fixed GPU memory)")
    if args.overrides and not args.config:
        raise PlanError(f"recipe overrides {args.overrides} need the recipe they override: add --config RECIPE.yaml")


def _setup(args, nodes: int) -> tuple[ModelShape, Setup]:
    gpu_tflops, gpu_mem = GPUS[args.gpu]
    s = Setup(nodes=nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gb=args.gpu_mem_gb or gpu_mem,
              peak_tflops=args.peak_tflops or gpu_tflops, margin=args.margin, cpu_mem_gb=args.cpu_mem_gb,
              mfu=args.mfu, runtime_overhead_gb=args.runtime_overhead_gb,
              device="cpu" if args.gpu == "cpu" else "cuda")
    if args.micro_batch:
        s.micro_batch = args.micro_batch
    if args.seq_len:
        s.seq_len = args.seq_len
    s, model_path, emoe = setup_from_recipe(args, s)
    model = args.model or model_path
    if not model:
        raise PlanError("give --model (a preset or a config.json) or a --config whose model.path has a config.json")
    shape = load_shape(model, emoe_override=emoe)
    if isinstance(emoe, dict):  # the checks `emoe-llm train` applies to the recipe's emoe: section
        try:
            validate_settings(n_experts=emoe["n_experts"], top_k=emoe["top_k"], d_ff=shape.ffn, n_layers=shape.layers,
                              layers=parse_layer_spec(emoe["layers"], shape.layers), model_type=None)
        except ValueError as e:
            raise PlanError(f"{args.config}: emoe (against {shape.name}): {e}") from None
    return shape, s


def format_plan(plan: Plan, s: Setup) -> str:
    gb = lambda b: f"{b / GiB:7.2f} GiB"  # noqa: E731
    lines = [f"{plan.model}: {plan.n_params / 1e9:.2f}B params ({plan.trainable_params / 1e9:.3f}B trainable); "
             f"{s.nodes} node(s) x {s.gpus_per_node} GPU(s) = {s.world}; ZeRO-{s.zero_stage} {s.precision}"
             f"{' offload_optimizer' if s.offload_optimizer else ''}{' offload_param' if s.offload_param else ''}; "
             f"micro {s.micro_batch} x seq {s.seq_len}, gradient checkpointing "
             f"{'on' if s.gradient_checkpointing else 'off'}{', LoRA r=' + str(s.lora_r) if s.lora else ''}",
             "per GPU:"]
    lines += [f"  {name:<36}{gb(v)}" for name, v in plan.per_gpu.items()]
    lines.append(f"  {'total':<36}{gb(plan.total_bytes)}   (usable {plan.usable_bytes / GiB:.1f} of "
                 f"{s.gpu_mem_gb:g} GiB at {s.margin:.0%} margin)")
    lines.append(f"  model states from: {plan.model_states_source}")
    if plan.cpu_per_node_bytes and (s.offload_optimizer or s.offload_param):
        lines.append(f"CPU memory per node for offload: {plan.cpu_per_node_bytes / GiB:.1f} GiB")
    lines.append(f"largest micro batch that fits: {plan.max_micro_batch}")
    lines.append(f"step: {plan.flops_per_step / 1e15:.1f} PFLOP at MFU {plan.mfu:.2f} ({plan.mfu_source}), "
                 f"{s.peak_tflops:g} TFLOPS peak -> {plan.step_time_s:.2f} s/step, {plan.tokens_per_s:,.0f} tokens/s")
    if plan.wall_time_s:
        lines.append(f"recipe: {s.steps} steps -> {plan.wall_time_s / 3600:.1f} h")
    lines.append(("FITS" if plan.fits else "DOES NOT FIT") + (f": {plan.notes[0]}" if plan.notes else ""))
    return "\n".join(lines)


def run(args) -> int:
    try:
        check_args(args)
        if args.table:
            counts = args.table
            print("| nodes x GPUs | per GPU (GiB) | fits | max micro | CPU/node offload (GiB) | s/step | tokens/s | "
                  "recipe wall time |")
            print("|---|---|---|---|---|---|---|---|")
            worst = 0
            for n in counts:
                try:
                    shape, s = _setup(args, n)
                except PlanError as e:  # e.g. the global batch does not split over this many GPUs
                    print(f"| {n} x {args.gpus_per_node} | - | no | - | - | - | - | - |  {e}")
                    worst = 1
                    continue
                p = make_plan(shape, s)
                print(f"| {n} x {s.gpus_per_node} | {p.total_bytes / GiB:.1f} | {'yes' if p.fits else 'no'} | "
                      f"{p.max_micro_batch} | "
                      f"{p.cpu_per_node_bytes / GiB if s.offload_optimizer or s.offload_param else 0:.0f} | "
                      f"{p.step_time_s:.2f} | {p.tokens_per_s:,.0f} | "
                      f"{f'{p.wall_time_s / 3600:.1f} h' if p.wall_time_s else '-'} |")
                worst = worst or (0 if p.fits else 1)
            return worst
        shape, s = _setup(args, args.nodes)
        plan = make_plan(shape, s)
    except PlanError as e:
        print(f"emoe-llm plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"setup": asdict(s), **asdict(plan)}, indent=2, default=str))
    else:
        print(format_plan(plan, s))
    return 0 if plan.fits else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="emoe-llm plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
