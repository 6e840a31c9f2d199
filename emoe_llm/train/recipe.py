"""Fine-tune a dense or EMoE Llama with DeepSpeed ZeRO-3. Reads top to bottom:

    main: load_config -> setup (dist init, data, model under zero.Init, deepspeed.initialize, resume)
          -> fit (the loop) -> finish (final checkpoint, eval, HF export, COMPLETED)

Launch (one process per GPU; all three work the same):

    deepspeed --num_gpus 8 train.py --ds_config ds_configs/z3.json --config configs/llama2_7b_emoe.yaml
    torchrun --nproc_per_node 8 train.py --ds_config ds_configs/z3.json --config configs/llama2_7b_emoe.yaml
    emoe-llm train --nproc 8 --config configs/llama2_7b_emoe.yaml train.lr=1e-5 output_dir=runs/x

Loss normalisation: one optimizer step = grad_accum micro-batches on every rank. The loss of a micro-batch is
its *summed* token cross-entropy divided by the number of target tokens of the whole step over all ranks (counted
before the forward passes), so uneven masks and accumulation give exactly the gradient of one big batch. DeepSpeed
is told not to divide by grad_accum (``scale_wrt_gas=False``), and its gradient averaging over ranks is undone by
multiplying by the world size.

Preemption: SIGUSR1/SIGTERM/SIGINT, the file ``{output_dir}/STOP`` or the launcher going away (stop.py) make every
rank stop at the next optimizer-step boundary (agreed with one all_reduce), save a checkpoint of that step, and exit 0
without writing COMPLETED. The run removes a stale STOP file once its resume has loaded (rank 0), so a restart simply
continues. Rank 0 holds ``{output_dir}/.emoe-lock`` for the run's life: one run per output_dir (dirlock.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from ..arch import layout_of
from ..cli import exit_after
from ..convert.prepare import prepare_emoe_checkpoint
from ..data import SFTCollator, build_sft_datasets, load_tokenizer
from ..data.collator import count_real_tokens
from ..emoe import TRAINED_KEY, enable_emoe, pop_expert_load, trained_record
from ..dirlock import DirLock, describe
from ..fileio import atomic_write_text, output_dir_error
from ..tiny import build_demo_model
from . import checkpoint, chunked_loss, compat
from .config import (
    ConfigError,
    RecipeConfig,
    check_runnable,
    config_to_dict,
    dump_config,
    ds_precision,
    ds_zero_stage,
    fill_ds_config,
    load_config,
    load_ds_config,
    resolve_batch,
    resolve_hub_ids,
    resolve_precision,
)
from .loss import count_sequences, sequence_ce_sum
from .master_weights import load_fp32_master
from .failure import handle_failure, note_output_dir
from .runlog import MetricsLogger, write_run_dir
from .schedule import warmup_then_decay
from .shm import release_deepspeed_shm
from .stall import StallWatch
from .stop import StopRequest, init_dataloader_worker

IGNORE_INDEX = -100
DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "z3.json"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"  # the tiny CPU demo recipe
NONFINITE_EXIT = 3  # exit code of a run stopped by a non-finite loss or gradient norm


def log0(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[emoe-llm] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="EMoE / dense fine-tuning with DeepSpeed ZeRO-3. Extra arguments are key=value recipe overrides "
        "(dots for nesting: train.lr=1e-5 model.mode=dense).",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="recipe YAML (configs/*.yaml); default: configs/tiny_cpu.yaml, the tiny CPU demo recipe")
    p.add_argument("--ds_config", "--deepspeed", dest="ds_config", default=str(DEFAULT_DS_CONFIG),
                   help="DeepSpeed JSON (ZeRO stage, offload, precision); default: the repo's ds_configs/z3.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"unexpected argument(s) {bad}: overrides are key=value, e.g. train.lr=1e-5")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# data order: a deterministic, resumable per-rank schedule (no sampler state to save: (epoch, step) says it all)


def epoch_indices(n_rows: int, *, epoch: int, seed: int, rank: int, world: int, per_rank: int) -> list[int]:
    """This rank's row indices for ``epoch``: a seeded permutation, dealt round-robin, ``per_rank`` long."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=g)[: per_rank * world]
    return perm[rank::world].tolist()


def count_steps(n_rows: int, *, micro: int, accum: int, world: int) -> tuple[int, int]:
    """(micro-batches per rank per epoch, optimizer steps per epoch); leftovers are dropped (every rank and every
    step sees full batches, which keeps ZeRO-3 collectives in lock-step)."""
    micro_per_rank = n_rows // (micro * world)
    return micro_per_rank, micro_per_rank // accum


# ---------------------------------------------------------------------------------------------------------------------
# model


def choose_attention(requested: str, dtype: torch.dtype, *, path: Path | None = None) -> tuple[str, str]:
    """(attention implementation, why): what the run uses, in words for the log and run/environment.json. ``auto``:
    FlashAttention-2 on a GPU in 16-bit when flash-attn imports, else SDPA, else eager (a family whose transformers
    class cannot run SDPA, checked on ``path``)."""
    if requested != "auto":
        if requested == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                raise ConfigError("model.attn_implementation=flash_attention_2 but flash-attn is not installed "
                                  "(pip install flash-attn, CUDA only); use auto or sdpa") from None
        return requested, f"model.attn_implementation={requested}"
    if not torch.cuda.is_available():
        choice, why = "sdpa", "auto: no GPU (FlashAttention-2 is CUDA only)"
    elif dtype not in (torch.bfloat16, torch.float16):
        choice, why = "sdpa", f"auto: {str(dtype).removeprefix('torch.')} training (FlashAttention-2 needs bf16/fp16)"
    else:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2", "auto: GPU, 16-bit, flash-attn importable"
        except ImportError as e:  # not installed, or a wheel built for another torch / CUDA
            first = (str(e).splitlines() or [""])[0]
            choice, why = "sdpa", f"auto: flash-attn does not import ({type(e).__name__}: {first})"
    if path is not None and not supports_sdpa(path):
        return "eager", why.replace("auto:", "auto: the model class has no SDPA support, and", 1)
    return choice, why


def pick_attn_implementation(requested: str, dtype: torch.dtype) -> str:
    return choose_attention(requested, dtype)[0]


def supports_sdpa(path: Path) -> bool:
    """Whether transformers' class for the checkpoint's config can run SDPA attention (unknown classes: assume so)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(str(path)))]
    except (KeyError, ValueError, OSError):
        return True
    return bool(getattr(model_class, "_supports_sdpa", True))


def prepare_model_path(cfg: RecipeConfig, *, rank: int) -> Path:
    """Collective. The checkpoint to load: model.path when it is converted (check_runnable made sure it is the emoe:
    section's conversion) or when there is no emoe: section; else rank 0 converts it into output_dir/converted (kept
    and reused while N, the permuted layers, seed and method stay the same; small models only)."""
    src = Path(cfg.model.path)
    if cfg.emoe is None or json.loads((src / "config.json").read_text()).get("emoe"):
        return src
    # mode dense converts too: the permutation keeps the dense function, and the exported model can then be run
    # with the expert mask at inference (the paper's "LoRA2EMoE") and compared with the EMoE run key for key.
    dst = Path(cfg.output_dir) / "converted"
    if rank == 0:
        prepare_emoe_checkpoint(src, dst, **cfg.emoe.conversion(), overwrite=True, progress=False, log=log0)
    dist.barrier()
    return dst


def load_model(cfg: RecipeConfig, path: Path, *, dtype: torch.dtype, attn: str | None = None):
    """Build the model. Under ZeRO-3 the caller keeps an HfDeepSpeedConfig alive, so from_pretrained runs inside
    deepspeed.zero.Init and every rank only ever holds its own partition. ``attn``: setup's ``choose_attention``."""
    if attn is None:
        attn = choose_attention(cfg.model.attn_implementation, dtype, path=path)[0]
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.quantize == "4bit":
        kwargs["quantization_config"] = qlora_quantization_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if cfg.lora.quantize == "4bit":
        keep_4bit_layout(model)
    model.config.use_cache = False
    if cfg.model.mode == "emoe":
        settings = enable_emoe(model, top_k=cfg.emoe.top_k, layers=cfg.emoe.layers)
        log0(f"EMoE: layers {settings.layers}, {settings.n_experts} experts, top-{settings.top_k}")
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    try:
        plain_logits = layout_of(model).plain_logits
    except ValueError:  # a family outside the table (dense runs): keep the plain loss
        plain_logits = False
    if chunked_loss.install(model, plain_logits=plain_logits):
        log0("loss: chunked LM-head cross-entropy (no (tokens, vocab) logits in training steps)")
    else:
        log0("loss: plain cross-entropy on the logits (the family transforms them after the LM head, or the head is "
             "not a bias-free Linear)")
    return model


def qlora_quantization_config(dtype: torch.dtype):
    """NF4 base weights (double-quantised), computing in ``dtype``: bf16 on a GPU, fp32 on CPU, where bitsandbytes
    >= 0.49 runs its 4-bit kernels too."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("lora.quantize=4bit (QLoRA) needs bitsandbytes (a dependency of emoe-llm): "
                          "pip install 'bitsandbytes>=0.49'") from None
    if not torch.cuda.is_available() and _version_tuple(bitsandbytes.__version__) < (0, 49):
        raise ConfigError(f"lora.quantize=4bit (QLoRA) on CPU needs bitsandbytes >= 0.49 (its CPU 4-bit kernels); "
                          f"installed: {bitsandbytes.__version__}")
    from transformers import BitsAndBytesConfig

    # quant_storage = compute dtype: the packed 4-bit weights are then tensors of the same dtype as every other
    # parameter, which ZeRO-3 needs to flatten, partition and all-gather them with the rest (transformers loads a
    # quantized model outside zero.Init; deepspeed.initialize partitions it).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def keep_4bit_layout(model) -> None:
    """Turn off bitsandbytes' CPU inference fast path. On a CPU with AVX512-BF16 the first eval-mode forward of a
    Linear4bit repacks its weight into a kernel layout (replacing the parameter's data, which under ZeRO-3 is a
    gathered partition that must keep its shape) and computes in bf16. Without it, evaluation, the export probe and
    training all run the same fp32 dequantize-and-matmul."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


@contextlib.contextmanager
def without_bitsandbytes():
    """peft imports bitsandbytes whenever it is installed (peft.helpers at import, LoRA's layer dispatch in
    get_peft_model), and importing bitsandbytes >= 0.49 on a CPU with AVX512-BF16 fetches a 4-bit kernel from the Hub
    (kernels-community/quantization-bitsandbytes; "Failed to load CPU gemm_4bit_forward" where that is refused or
    offline). A LoRA run without QLoRA quantizes nothing: here bitsandbytes reads as not installed (a None entry in
    sys.modules: find_spec says None, import raises ImportError). Afterwards peft's cached answer is cleared, so a
    later QLoRA model in the same process still finds it."""
    if "bitsandbytes" in sys.modules:  # already imported: nothing left to avoid
        yield
        return
    sys.modules["bitsandbytes"] = None
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        from peft.import_utils import is_bnb_4bit_available, is_bnb_available

        is_bnb_available.cache_clear()
        is_bnb_4bit_available.cache_clear()


def add_lora(model, cfg: RecipeConfig):
    """peft LoRA on ``lora.target_modules``, named as on Llama and mapped onto the family's modules by the
    architecture table (Phi-3: q/k/v -> qkv_proj, gate/up -> gate_up_proj). EMoEMLP keeps the MLP's projections as
    submodules, so LoRA on them wraps the same Linears and the router (mean of the gate rows' outputs) sees the
    adapted gate."""
    with contextlib.nullcontext() if cfg.lora.quantize == "4bit" else without_bitsandbytes():
        from peft import LoraConfig, get_peft_model

        targets = layout_of(model).lora_targets(cfg.lora.target_modules)
        lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def build_optimizer(model, cfg: RecipeConfig, ds_config: dict):
    """AdamW with no weight decay on biases and norms. DeepSpeedCPUAdam when the optimizer is offloaded."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    t = cfg.train
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, **({"fused": True} if fused else {}))


def build_scheduler(optimizer, cfg: RecipeConfig, total_steps: int):
    """(LambdaLR, warmup steps): linear warmup, then cosine or linear decay to ``lr * min_lr_ratio`` at
    ``total_steps`` (``constant``: no decay); see schedule.py."""
    t = cfg.train
    warmup = t.warmup_steps or int(math.ceil(t.warmup_ratio * total_steps))
    scheduler = warmup_then_decay(optimizer, total_steps=total_steps, warmup=warmup, kind=t.lr_scheduler,
                                  min_lr_ratio=t.min_lr_ratio)
    return scheduler, warmup


# ---------------------------------------------------------------------------------------------------------------------
# one optimizer step, evaluation


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: logits[:, t] predicts labels[:, t+1]. (B, T, V) logits, or the (B, T)
    per-token losses of the chunked LM head (training), and (B, T) labels -> ()."""
    if logits.dim() == 2:
        return logits.sum()
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_inputs(batch: dict, pad_token_id: int | None = None) -> int:
    """Real (not padding) tokens of a collated batch: what tokens/s and tokens_seen count (packed batches carry no
    attention mask: their padding segment is found instead, given the pad id)."""
    mask = batch.get("attention_mask")
    if mask is not None or pad_token_id is None:
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return count_real_tokens(batch, pad_token_id)


MODEL_INPUT_KEYS = ("input_ids", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                    "max_length_k")


def model_inputs(batch: dict, device) -> dict:
    """The collator's batch minus labels (we compute the loss ourselves), on ``device``. Packed batches carry no
    attention_mask: transformers builds the block-diagonal mask from position_ids (or FA2 uses cu_seq_lens)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
            if k in MODEL_INPUT_KEYS}


def train_step(engine, micro_batches: list[dict], *, device, world: int, loss_norm: str = "token",
               pad_token_id: int | None = None) -> dict:
    """Forward/backward ``grad_accum`` micro-batches and take one optimizer step (DeepSpeed steps at the boundary).

    ``loss_norm``: "token" divides the summed token losses by the step's target tokens over all ranks; "sequence"
    averages each sequence's mean token loss over the step's sequences (the official recipe; loss.py). Returns
    {"loss", "targets", "inputs", "sequences", "nonfinite"}. With ``nonfinite`` the step was abandoned *before* any
    backward of the bad micro-batch and before the optimizer step: the weights are those of the previous step."""
    # the step's target tokens (and inputs, sequences) counted once, on the CPU batches, with one all_reduce and one
    # host sync per step; the loss of each micro-batch is then divided by the step's total
    counts = torch.tensor([sum(count_targets(b) for b in micro_batches),
                           sum(count_inputs(b, pad_token_id) for b in micro_batches),
                           sum(count_sequences(b) for b in micro_batches) if loss_norm == "sequence" else 0],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    targets, inputs, sequences = counts.tolist()
    n_targets = max(1.0, targets)
    denom = n_targets if loss_norm == "token" else max(1.0, sequences)
    info = {"targets": n_targets, "inputs": inputs, "sequences": sequences}
    loss_sum = 0.0
    chunked = chunked_loss.installed(engine.module)
    for batch in micro_batches:
        labels = batch["labels"].to(device)
        # chunked: the model returns per-token losses, never the (tokens, vocab) logits (chunked_loss.py)
        with chunked_loss.targets(engine.module, labels) if chunked else contextlib.nullcontext():
            out = engine(**model_inputs(batch, device), use_cache=False)
        if loss_norm == "token":
            ce = token_ce_sum(out.logits, labels)
        else:
            ce = sequence_ce_sum(out.logits, labels, batch["position_ids"].to(device))
        # One tiny collective per micro-batch: every rank learns whether any rank went non-finite before anyone
        # runs backward, so all ranks skip it together (no ZeRO-3 hang) and the weights stay good.
        probe = torch.stack([ce.detach().double(), (~torch.isfinite(ce.detach())).double()])
        dist.all_reduce(probe)
        ce_value, n_bad = probe.tolist()  # the micro-batch's one host sync (the step's counts had theirs above)
        if n_bad > 0:
            return {"loss": float("nan"), **info, "nonfinite": True}
        loss_sum += ce_value
        engine.backward(ce * (world / denom), scale_wrt_gas=False)
        engine.step()
    return {"loss": loss_sum / denom, **info, "nonfinite": False}


@torch.no_grad()
def evaluate(engine, eval_ds, collator, *, rank: int, world: int, micro: int, max_batches: int, device) -> dict:
    """Held-out loss over the whole eval split (or ``max_batches`` per rank). Every rank runs the same number of
    forwards (ZeRO-3 needs it): the rank-shards are padded with fully masked rows that count no tokens."""
    engine.eval()
    n = len(eval_ds)
    per_rank = math.ceil(n / world)
    idx = list(range(rank, n, world))
    idx += [-1] * (per_rank - len(idx))
    n_batches = math.ceil(per_rank / micro)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(n_batches):
        rows = []
        for i in idx[b * micro:(b + 1) * micro]:
            if i >= 0:
                rows.append(eval_ds[i])
            else:  # padding row: a copy of row 0 with no targets
                row = dict(eval_ds[0])
                row["labels"] = [IGNORE_INDEX] * len(row["labels"])
                rows.append(row)
        batch = collator(rows)
        out = engine(**model_inputs(batch, device), use_cache=False)
        total[0] += token_ce_sum(out.logits, batch["labels"].to(device)).double()
        total[1] += count_targets(batch)
    dist.all_reduce(total)
    engine.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


def gather_expert_load(model, device) -> dict:
    """{"layer_28": [N fractions], ...} averaged over ranks (every rank has the same EMoE layers)."""
    loads = pop_expert_load(model)
    if not loads:
        return {}
    layers = sorted(loads)
    stacked = torch.stack([loads[i].float().to(device) for i in layers])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return {f"layer_{i}": [round(x, 5) for x in stacked[j].tolist()] for j, i in enumerate(layers)}


# ---------------------------------------------------------------------------------------------------------------------
# the state a checkpoint restores, and what setup builds around it


@dataclass
class TrainState:
    """Where the run is: exactly what ``checkpoints/step_*/trainer_state.json`` holds. ``(epoch, step_in_epoch)`` is
    the whole data position (the order is a seeded permutation per epoch); the last six fields record the layout and
    the recipe identity (model, conversion, mode, LoRA: ``compat``) the checkpoint was saved with, so a resume can
    check it before loading anything."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # fp16: optimizer steps the loss scaler skipped (overflow), counted in ``step``
    steps_per_epoch: int = 0
    total_steps: int = 0
    world_size: int = 1
    global_batch_size: int = 0
    seed: int = 0
    recipe_identity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Run:
    """Everything ``setup`` builds for the loop (nothing here needs restoring on resume: that is ``TrainState``)."""

    cfg: RecipeConfig
    rank: int
    world: int
    device: torch.device
    output_dir: Path
    dtype: torch.dtype
    micro: int
    accum: int
    engine: Any
    scheduler: Any
    tokenizer: Any
    collator: Any
    train_ds: Any
    eval_ds: Any
    metrics: MetricsLogger
    stop: StopRequest
    config_yaml: str
    keepalive: Any = None  # HfDeepSpeedConfig: transformers' ZeRO-3 integration needs it referenced for the run
    last_saved: int = -1  # step of the newest checkpoint written or resumed from
    last_eval: tuple = (-1, None)  # (step, result) of the latest held-out eval


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------------
# setup


def config_sha(cfg: RecipeConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]


def read_completed(output_dir: Path) -> dict | None:
    p = output_dir / "COMPLETED"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def nothing_to_do(cfg: RecipeConfig) -> bool:
    """Before any process group: True when output_dir already holds the finished run of this exact recipe. Refuses
    resume=none over an earlier run's checkpoints (nothing is deleted for you)."""
    output_dir = Path(cfg.output_dir)
    completed = read_completed(output_dir)
    if completed is not None and cfg.resume != "none" and completed.get("config_sha") == config_sha(cfg):
        log0(f"{output_dir / 'COMPLETED'} exists for this exact recipe: nothing to do "
             f"(final: {completed.get('final')})")
        return True
    if cfg.resume == "none" and checkpoint.list_checkpoints(output_dir):
        raise ConfigError(f"resume=none but {output_dir}/checkpoints holds checkpoints of an earlier run; use "
                          f"resume=auto to continue it, or a new output_dir (nothing is deleted for you)")
    return False


def init_distributed(cfg: RecipeConfig, local_rank: int | None) -> tuple[int, int, torch.device]:
    """deepspeed launcher, torchrun, or srun + torchrun all set RANK/WORLD_SIZE/...; nccl on GPUs, gloo on CPU. The
    timeout also bounds how long ranks wait for rank 0 to tokenize the data."""
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    if torch.cuda.is_available():
        # before the process group: NCCL's communicator (and older torch/DeepSpeed pairs that guess it) then use
        # this rank's GPU, not GPU 0 on every rank
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    # train.dist_timeout_minutes is the one timeout knob: DeepSpeed's DEEPSPEED_TIMEOUT is not read when a timeout
    # is passed here
    deepspeed.init_distributed(timeout=timedelta(minutes=cfg.train.dist_timeout_minutes))
    release_deepspeed_shm()  # DeepSpeed leaves a 67 MB /dev/shm segment per rank behind otherwise
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    accel.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(accel.device_name(local_rank))


_run_lock: DirLock | None = None  # rank 0 holds it from setup to close (the kernel drops it on any exit)


def lock_output_dir(cfg: RecipeConfig) -> None:
    """Rank 0, before any process group or work: one run per output_dir (``dirlock``). A second run exits 2 here;
    the launcher then stops its other ranks, which are still waiting for rank 0 to rendezvous."""
    global _run_lock
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if _run_lock is not None and _run_lock.fd is not None:
        if _run_lock.path == Path(cfg.output_dir):
            return  # this process holds it already (an in-process run after one that failed)
        release_output_dir()
    error = output_dir_error(cfg.output_dir, flag="output_dir")
    if error:  # a read-only mount or a file in the way: one line, before anything is created
        raise ConfigError(error)
    lock = DirLock(cfg.output_dir, what="output_dir").acquire()
    note_output_dir(lock.path, created=lock.created)
    if lock.previous and lock.previous.get("pid") != os.getpid():
        log0(f"took over the lock of {lock.path} from a run that is gone ({describe(lock.previous)})")
    _run_lock = lock


def release_output_dir() -> None:
    global _run_lock
    if _run_lock is not None:
        _run_lock.release()
        _run_lock = None


def prepare_output_dir(cfg: RecipeConfig, *, rank: int) -> Path:
    """Collective. Rank 0 creates output_dir (what a restart must not see is removed only once the resume worked:
    ``clear_restart_markers``)."""
    output_dir = Path(cfg.output_dir)
    created = not output_dir.exists() or (_run_lock is not None and _run_lock.created)
    dist.barrier()  # every rank has read the run state (nothing_to_do) before rank 0 changes it
    note_output_dir(output_dir, created=created)  # a failed run removes it again while it is still empty
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return output_dir


def clear_restart_markers(output_dir: Path, *, rank: int) -> None:
    """Collective, after the resume loaded: rank 0 removes a stale STOP (the previous run was preempted; this one is
    the restart) and COMPLETED (a finished run being extended, e.g. more steps). Not before: a refused or failed
    resume leaves the run dir as it was."""
    if rank == 0:
        if (output_dir / "STOP").exists():
            (output_dir / "STOP").unlink()
            log0(f"removed stale {output_dir / 'STOP'}")
        (output_dir / "COMPLETED").unlink(missing_ok=True)
    dist.barrier()


def ensure_tiny_model(path: Path, *, conversion: dict | None, rank: int) -> None:
    """Collective. The demo recipes on a fresh checkout: rank 0 builds the embedded tiny EMoE model at ``path``."""
    if rank == 0 and not (path / "config.json").is_file():
        log0(f"{path} not found: building the embedded tiny model there (model.build_tiny_if_missing)")
        build_demo_model(path, conversion=conversion)
    dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data(cfg: RecipeConfig, *, rank: int):
    """(tokenizer, train_ds, eval_ds or None, data_stats). Rank 0 tokenizes and fills the cache first; the other
    ranks then read it."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    if rank != 0:
        dist.barrier()
    train_ds, eval_ds, data_stats = build_sft_datasets(cfg.data, tokenizer)
    if rank == 0:
        dist.barrier()
    return tokenizer, train_ds, eval_ds, data_stats


def plan_steps(cfg: RecipeConfig, n_rows: int, *, micro: int, accum: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    _, steps_per_epoch = count_steps(n_rows, micro=micro, accum=accum, world=world)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {n_rows} rows, fewer than one global batch ({micro * accum * world} = micro "
            f"{micro} x accum {accum} x {world} ranks); lower train.global_batch_size or add data"
        )
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    return steps_per_epoch, total


def build_engine(cfg: RecipeConfig, ds_config: dict, *, dtype: torch.dtype, total_steps: int, rank: int,
                 attn: str | None = None):
    """(engine, scheduler, keepalive). The HfDeepSpeedConfig exists before from_pretrained, so under ZeRO-3 the model
    is built inside zero.Init and no rank ever holds the full weights."""
    model_path = prepare_model_path(cfg, rank=rank)
    keepalive = HfDeepSpeedConfig(ds_config) if ds_zero_stage(ds_config) == 3 else None
    model = load_model(cfg, model_path, dtype=dtype, attn=attn)
    optimizer = build_optimizer(model, cfg, ds_config)
    scheduler, warmup = build_scheduler(optimizer, cfg, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    if cfg.model.load_dtype == "float32" and dtype != torch.float32 and keepalive is not None:
        n = load_fp32_master(engine, model_path)
        log0(f"fp32 master weights of {n} tensors set from {model_path} (model.load_dtype=float32)")
    params = list(engine.module.parameters())
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
    if keepalive is not None:  # evidence that zero.Init partitioned the model: each rank holds ~1/world of it
        local = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
        log0(f"ZeRO-3: rank 0 holds {local / max(1, n_params):.1%} of the parameters ({dist.get_world_size()} ranks)")
        packed = [p for p in params if getattr(p, "quant_state", None) is not None]
        if packed:  # QLoRA: transformers loads 4-bit models outside zero.Init; deepspeed.initialize partitions them
            held = sum(p.ds_tensor.numel() for p in packed if hasattr(p, "ds_tensor"))
            log0(f"QLoRA: {len(packed)} NF4 weights, rank 0 holds {held / sum(p.ds_numel for p in packed):.1%} of "
                 "their packed storage")
    log0(f"model {model_path}: {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable), mode {cfg.model.mode}"
         f"{', LoRA r=' + str(cfg.lora.r) if cfg.lora.enabled else ''}; warmup {warmup} steps")
    return engine, scheduler, keepalive


def elastic_resume(cfg: RecipeConfig, ds_config: dict, *, world: int,
                   ckpt: Path | None = None) -> tuple[Path | None, bool]:
    """Before any process group (every rank reaches the same verdict): the checkpoint to resume from, and whether it
    was saved at another world size. If so, the engine is told to load DeepSpeed's universal format (converted by
    ``checkpoint.prepare_universal`` next, still before any process group) and, when the recipe does not fix the
    global batch, the saved one is kept (micro x accum x world re-derived), so the data position (the samples
    consumed: step x global batch of one seeded order) and the LR schedule carry over unchanged. A checkpoint this
    run cannot continue (another model, conversion, mode, LoRA, global batch; missing rank files) is refused here
    (``compat.check_resume``), before anything is loaded."""
    ckpt = ckpt or checkpoint.find_resume_checkpoint(cfg.resume, cfg.output_dir)
    if ckpt is None:
        return None, False
    saved = checkpoint.read_trainer_state(ckpt)
    elastic = saved.get("world_size", world) != world
    if elastic and not cfg.train.global_batch_size and saved.get("global_batch_size"):
        cfg.train.global_batch_size, cfg.train.grad_accum = int(saved["global_batch_size"]), 0
    compat.check_resume(ckpt, saved, cfg, world=world)
    if not elastic:
        return ckpt, False
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    log0(f"{ckpt} was saved with {saved.get('world_size')} ranks, this run has {world}: resuming through DeepSpeed's "
         f"universal checkpoint, global batch {cfg.train.global_batch_size or saved.get('global_batch_size')}")
    return ckpt, True


def verified_checkpoint(cfg: RecipeConfig, ds_config: dict, ckpt: Path | None, elastic: bool, *, rank: int,
                        world: int) -> tuple[Path | None, bool]:
    """Collective, before anything loads: ``ckpt`` when its files are those its manifest lists (hashed in parallel
    over the ranks). A damaged one is refused with one line naming the file, or, with resume=auto and
    ``train.on_damaged_checkpoint=previous``, set aside and the previous complete checkpoint is tried (and said)."""
    while ckpt is not None:
        problem = checkpoint.verify_checkpoint(ckpt, rank=rank)
        if problem is None:
            return ckpt, elastic
        fallback = cfg.resume == "auto" and cfg.train.on_damaged_checkpoint == "previous"
        previous = checkpoint.previous_checkpoint(cfg.output_dir, ckpt) if fallback else None
        if previous is None:
            why = ("no earlier complete checkpoint to fall back to" if fallback else
                   "train.on_damaged_checkpoint=previous resumes from the one before instead" if cfg.resume == "auto"
                   else f"resume={cfg.resume} names it")
            raise checkpoint.CheckpointError(f"resume: checkpoint {ckpt} is damaged: {problem}; not resumed ({why})")
        dist.barrier()  # every rank has its verdict before rank 0 renames the directory
        if rank == 0:
            aside = checkpoint.set_aside(ckpt)
            log0(f"WARNING: checkpoint {ckpt} is damaged: {problem}; moved it to {aside.name} and resuming from "
                 f"{previous} instead (train.on_damaged_checkpoint=previous)")
        dist.barrier()
        ckpt, elastic = elastic_resume(cfg, ds_config, world=world, ckpt=previous)
    return None, False


def resume(engine, ckpt: Path | None, state: TrainState, *, elastic: bool, rank: int) -> Path | None:
    """Collective. Restore weights, optimizer, scheduler and RNG from ``ckpt`` (its universal form, made by setup
    before the process group, when ``elastic``), and the data position into ``state``. Returns the checkpoint, or
    None for a fresh start."""
    if ckpt is None:
        return None
    saved = TrainState.from_dict(checkpoint.load_checkpoint(engine, ckpt, universal=elastic))
    state.step, state.epoch, state.step_in_epoch = saved.step, saved.epoch, saved.step_in_epoch
    state.tokens_seen, state.skipped_steps = saved.tokens_seen, saved.skipped_steps
    log0(f"resumed from {ckpt}: step {state.step}, epoch {state.epoch}, step-in-epoch {state.step_in_epoch}"
         + (f" (universal checkpoint, {saved.world_size} -> {state.world_size} ranks)" if elastic else ""))
    return ckpt


def check_data_position(ckpt: Path | None, steps_per_epoch: int) -> None:
    """Before any weights load: the saved (epoch, step-in-epoch) only means the same samples with the same number of
    steps per epoch (the data changed otherwise)."""
    if ckpt is None:
        return
    saved = checkpoint.read_trainer_state(ckpt).get("steps_per_epoch")
    if saved not in (None, steps_per_epoch):
        raise ConfigError(f"resume: {ckpt}: steps per epoch: checkpoint {saved}, this run {steps_per_epoch}; the "
                          f"training data changed, so the saved data position is invalid (resume with the same data, "
                          f"or start a new output_dir)")


def setup(cfg: RecipeConfig, ds_config: dict, *, local_rank: int | None = None) -> tuple[Run, TrainState]:
    """Collective: every rank calls it with the same recipe. Returns the run and its state (fresh or resumed)."""
    lock_output_dir(cfg)  # first: a second run into a live run's output_dir stops here, having read nothing
    # the resume is checked first, before any process group: a refusal costs nothing and changes nothing
    ckpt, elastic = elastic_resume(cfg, ds_config, world=int(os.environ.get("WORLD_SIZE", "1")))
    if elastic:  # before the process group: converting can take longer than any collective timeout
        checkpoint.prepare_universal(ckpt, rank=int(os.environ.get("RANK", "0")), log=log0)
    rank, world, device = init_distributed(cfg, local_rank)
    if not elastic:  # an elastic resume's checkpoint was verified by rank 0 before its conversion
        ckpt, elastic = verified_checkpoint(cfg, ds_config, ckpt, elastic, rank=rank, world=world)
    output_dir = prepare_output_dir(cfg, rank=rank)
    stop = StopRequest(output_dir / "STOP")
    if cfg.model.build_tiny_if_missing:
        ensure_tiny_model(Path(cfg.model.path), conversion=cfg.emoe.conversion() if cfg.emoe else None, rank=rank)
    ds_config = fill_ds_config(ds_config, cfg, world_size=world)
    ds_config, note = resolve_precision(ds_config, cfg.train.precision, on_cpu=device.type == "cpu")
    if note:
        log0(note)
    micro, accum, global_bs = resolve_batch(cfg, world)
    precision = ds_precision(ds_config)
    seed_everything(cfg.seed)
    tokenizer, train_ds, eval_ds, data_stats = build_data(cfg, rank=rank)
    eval_ds = eval_ds if eval_ds is not None and len(eval_ds) else None
    attn, attn_why = choose_attention(cfg.model.attn_implementation, DTYPES[precision], path=Path(cfg.model.path))
    log0(f"attention: {attn} ({attn_why})")
    collator = SFTCollator(pad_token_id=tokenizer.pad_token_id, flash_attn_kwargs=attn == "flash_attention_2")
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_ds), micro=micro, accum=accum, world=world)
    check_data_position(ckpt, steps_per_epoch)
    log0(f"{len(train_ds)} train rows, {len(eval_ds) if eval_ds is not None else 0} eval rows; {world} ranks x "
         f"micro {micro} x accum {accum} = global batch {global_bs}; {steps_per_epoch} steps/epoch, "
         f"{total_steps} steps; ZeRO-{ds_zero_stage(ds_config)} {precision}")
    state = TrainState(steps_per_epoch=steps_per_epoch, total_steps=total_steps, world_size=world,
                       global_batch_size=global_bs, seed=cfg.seed)
    engine, scheduler, keepalive = build_engine(cfg, ds_config, dtype=DTYPES[precision], total_steps=total_steps,
                                                rank=rank, attn=attn)
    state.recipe_identity = compat.planned_identity(cfg)  # the model is in place now: what it names is what loaded
    resumed_from = resume(engine, ckpt, state, elastic=elastic, rank=rank)
    clear_restart_markers(output_dir, rank=rank)

    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    config_yaml = dump_config(cfg)
    if rank == 0:
        write_run_dir(output_dir, config_yaml=config_yaml, ds_config=ds_config, hosts=hosts, resumed_from=resumed_from,
                      attention={"implementation": attn, "why": attn_why})
        atomic_write_text(output_dir / "run" / "data_stats.json", json.dumps(data_stats, indent=2, default=str))
    metrics = MetricsLogger(output_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard, resume_step=state.step,
                            wandb=cfg.logging.wandb, config=config_to_dict(cfg))
    if resumed_from is not None:
        metrics.log({"event": "resume", "step": state.step, "checkpoint": str(resumed_from)})
    run = Run(cfg=cfg, rank=rank, world=world, device=device, output_dir=output_dir, dtype=DTYPES[precision],
              micro=micro, accum=accum, engine=engine, scheduler=scheduler, tokenizer=tokenizer, collator=collator,
              train_ds=train_ds, eval_ds=eval_ds, metrics=metrics, stop=stop, config_yaml=config_yaml,
              keepalive=keepalive, last_saved=state.step if resumed_from is not None else -1)
    return run, state


# ---------------------------------------------------------------------------------------------------------------------
# the loop


def fit(run: Run, state: TrainState) -> str:
    """Train until ``state.total_steps``. Returns "done", "preempted" (a stop request; checkpoint saved) or
    "nonfinite" (a non-finite loss or gradient norm; the last good checkpoint is named in the log)."""
    t = run.cfg.train
    meter = Throughput()
    stall = StallWatch(t.stall_steps, vocab_size(run.engine.module))
    batches = None  # this epoch's remaining micro-batches
    skipped_in_a_row = 0  # fp16 steps the loss scaler skipped since the last applied one
    run.engine.train()
    with progress_bar(run, state) as bar:
        while state.step < state.total_steps:
            if state.step_in_epoch == state.steps_per_epoch:
                state.epoch, state.step_in_epoch, batches = state.epoch + 1, 0, None
            if batches is None:
                batches = epoch_batches(run, state)
            lr = run.scheduler.get_last_lr()[0]
            result = train_step(run.engine, [next(batches) for _ in range(run.accum)], device=run.device,
                                loss_norm=run.cfg.train.loss_norm, world=run.world,
                                pad_token_id=run.collator.pad_token_id)
            grad_norm = run.engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            verdict = "nonfinite" if result["nonfinite"] else step_verdict(
                applied=run.engine.was_step_applied(), grad_norm=grad_norm, max_grad_norm=t.max_grad_norm)
            if verdict == "nonfinite":
                return stop_on_nonfinite(run, state, "loss" if result["nonfinite"] else "grad")
            state.step += 1
            state.step_in_epoch += 1
            if verdict == "skipped":
                skipped_in_a_row += 1
                if note_skipped_step(run, state, skipped_in_a_row):
                    return "nonfinite"
            else:
                skipped_in_a_row = 0
            state.tokens_seen += int(result["inputs"])
            meter.add(result["inputs"])

            stalled = stall.update(step=state.step, loss=result["loss"], grad_norm=grad_norm)
            if stalled is not None:  # every rank saw the same loss and norm: no collective needed to agree
                log0("WARNING: " + stalled["message"])
                run.metrics.log(stalled)
            record = None
            if state.step % t.log_every_steps == 0 or state.step == state.total_steps:
                record = step_record(run, state, result, lr=lr, grad_norm=grad_norm, meter=meter)
            if t.eval_every_steps and state.step % t.eval_every_steps == 0 and run.eval_ds is not None:
                ev = held_out_eval(run, state)
                record = {**(record or {"step": state.step, "loss": result["loss"], "lr": lr}), **ev}
            if record is not None:
                run.metrics.log(record)
                if bar is None:  # batch logs (Slurm, CI): one plain line per logged step instead of a progress bar
                    log0(f"step {state.step}/{state.total_steps} loss {result['loss']:.4f} lr {lr:.3e} "
                         f"gnorm {grad_norm:.3f} tok/s {record.get('tokens_per_s', 0):.0f}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}")

            if state.step < state.total_steps:  # the last step's checkpoint is finish()'s
                if t.save_every_steps and state.step % t.save_every_steps == 0:
                    save(run, state, f"every {t.save_every_steps} steps")
                elif t.save_every_epoch and state.step_in_epoch == state.steps_per_epoch:
                    save(run, state, f"end of epoch {state.epoch}")
            why = stop_vote(run)
            if why is not None:
                return preempt(run, state, why)
    return "done"


def vocab_size(model) -> int | None:
    config = getattr(model, "config", None)  # a peft model forwards .config to its base model
    return getattr(config, "vocab_size", None)


def epoch_batches(run: Run, state: TrainState):
    """Iterator over this rank's collated micro-batches from ``state.step_in_epoch`` to the end of the epoch: a torch
    DataLoader (collation in ``train.dataloader_workers`` processes, pinned memory on CUDA) over the deterministic
    per-rank order, so a resumed run sees exactly the batches the uninterrupted one did."""
    micro, workers = run.micro, run.cfg.train.dataloader_workers
    order = epoch_indices(len(run.train_ds), epoch=state.epoch, seed=run.cfg.seed, rank=run.rank, world=run.world,
                          per_rank=state.steps_per_epoch * run.accum * micro)
    batches = [order[i:i + micro] for i in range(state.step_in_epoch * run.accum * micro, len(order), micro)]
    # the workers ignore the stop signals: a signal to the process group must not kill them under their rank (stop.py)
    return iter(DataLoader(run.train_ds, batch_sampler=batches, collate_fn=run.collator, num_workers=workers,
                           pin_memory=run.device.type == "cuda", prefetch_factor=4 if workers else None,
                           worker_init_fn=init_dataloader_worker if workers else None))


class Throughput:
    """Input tokens and steps since the last logged step."""

    def __init__(self):
        self.t_last, self.tokens, self.steps = time.perf_counter(), 0.0, 0

    def add(self, tokens: float) -> None:
        self.tokens += tokens
        self.steps += 1

    def lap(self) -> tuple[float, float]:
        """(tokens/s, seconds per step) since the previous lap."""
        now = time.perf_counter()
        out = self.tokens / max(now - self.t_last, 1e-9), (now - self.t_last) / max(1, self.steps)
        self.t_last, self.tokens, self.steps = now, 0.0, 0
        return out


def progress_bar(run: Run, state: TrainState):
    """tqdm on rank 0 when stderr is a terminal; otherwise a context that yields None."""
    if run.rank != 0 or not run.cfg.logging.progress_bar or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=state.total_steps, initial=state.step, desc="train", dynamic_ncols=True)


def step_record(run: Run, state: TrainState, result: dict, *, lr: float, grad_norm: float, meter: Throughput) -> dict:
    """One metrics.jsonl line for an optimizer step (collective when expert load is logged)."""
    tokens_per_s, step_time = meter.lap()
    record = {"step": state.step, "epoch": state.epoch,
              "epoch_float": round(state.epoch + state.step_in_epoch / state.steps_per_epoch, 4),
              "loss": result["loss"], "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
              "target_tokens": result["targets"], "tokens_seen": state.tokens_seen, "step_time_s": round(step_time, 4)}
    if torch.cuda.is_available():
        record["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()
    if run.cfg.model.mode == "emoe" and run.cfg.logging.expert_load:
        load = gather_expert_load(run.engine.module, run.device)
        if load:
            record["expert_load"] = load
            record["expert_load_max_over_mean"] = {k: round(max(v) / (sum(v) / len(v)), 4) for k, v in load.items()}
    return record


def held_out_eval(run: Run, state: TrainState) -> dict:
    """Collective. The held-out loss now (remembered, so finish() does not redo it for the same step)."""
    t = run.cfg.train
    ev = evaluate(run.engine, run.eval_ds, run.collator, rank=run.rank, world=run.world,
                  micro=t.eval_micro_batch_size or run.micro, max_batches=t.eval_max_batches, device=run.device)
    run.last_eval = (state.step, ev)
    log0(f"step {state.step}: eval loss {ev['eval_loss']:.4f} ppl {ev['eval_ppl']:.2f}")
    return ev


def save(run: Run, state: TrainState, reason: str) -> Path:
    """Collective. Checkpoint the current step, then (rank 0) drop the ones beyond ``train.keep_last``."""
    path = checkpoint.save_checkpoint(run.engine, run.output_dir, step=state.step, trainer_state=state.to_dict(),
                                      config_yaml=run.config_yaml, rank=run.rank)
    run.last_saved = state.step
    if run.rank == 0:
        removed = checkpoint.rotate_checkpoints(run.output_dir, run.cfg.train.keep_last)
        log0(f"saved {path} ({reason})" + (f"; removed {', '.join(p.name for p in removed)}" if removed else ""))
    return path


def stop_vote(run: Run) -> str | None:
    """Collective (one tiny all_reduce per step): why the run should stop now, when any rank was asked to."""
    why = run.stop.reason()
    flag = torch.tensor([0.0 if why is None else 1.0], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    return why or "another rank"


def preempt(run: Run, state: TrainState, why: str) -> str:
    if run.last_saved != state.step:
        save(run, state, "preemption")
    log0(f"preempted at step {state.step}, checkpoint saved ({why}); resume with resume=auto")
    run.metrics.log({"event": "preempted", "step": state.step, "reason": why})
    return "preempted"


def step_verdict(*, applied: bool, grad_norm: float, max_grad_norm: float) -> str:
    """What the optimizer step just taken means: "applied"; "skipped" (the engine did not apply it: with fp16 dynamic
    loss scaling an overflowing step is skipped, its gradient norm reported as inf and the scale lowered -- routine,
    not a diverged run); or "nonfinite" (a non-finite gradient norm of a step that *was* applied: the weights are
    now bad)."""
    if not applied:
        return "skipped"
    if max_grad_norm > 0 and not math.isfinite(grad_norm):
        return "nonfinite"
    return "applied"


def note_skipped_step(run: Run, state: TrainState, in_a_row: int) -> bool:
    """Log and count a step the loss scaler skipped (``state.step`` is the step just consumed). True when it is the
    ``train.max_skipped_steps``-th in a row: the scale is not recovering, and the run stops (exit 3)."""
    state.skipped_steps += 1
    scale = getattr(getattr(run.engine, "optimizer", None), "loss_scale", None)
    run.metrics.log({"event": "skipped_step", "step": state.step, "in_a_row": in_a_row,
                     "skipped_steps": state.skipped_steps, "loss_scale": float(scale) if scale is not None else None})
    limit = run.cfg.train.max_skipped_steps
    if limit and in_a_row >= limit:
        msg = (f"fp16: {in_a_row} optimizer steps in a row skipped by the loss scaler (overflow), the last at step "
               f"{state.step}; the loss scale is not recovering. Use bf16 (train.precision=bf16), lower train.lr, or "
               f"raise train.max_skipped_steps")
        log0("ERROR: " + msg)
        run.metrics.log({"event": "skipped_steps_stop", "step": state.step, "message": msg})
        return True
    log0(f"step {state.step}: skipped by the fp16 loss scaler (overflow; {in_a_row} in a row, "
         f"{state.skipped_steps} in total)")
    return False


def stop_on_nonfinite(run: Run, state: TrainState, what: str) -> str:
    """The one non-finite path. ``what`` is "loss" (caught on every rank before its backward pass: the weights are
    those after ``state.step``, saved here as the last good checkpoint) or "grad" (a non-finite gradient norm, seen
    after the optimizer step ran: the last checkpoint written before it is the last good one)."""
    if what == "loss" and run.last_saved != state.step:
        save(run, state, "last good state before a non-finite loss")
    good = checkpoint.checkpoint_path(run.output_dir, run.last_saved) if run.last_saved >= 0 else None
    msg = (f"non-finite {'loss' if what == 'loss' else 'gradient norm'} at step {state.step + 1} (epoch {state.epoch}, "
           f"step-in-epoch {state.step_in_epoch}). Last good checkpoint: "
           f"{good or 'none yet (train.save_every_steps)'}. Lower train.lr / check the data, then resume with "
           f"resume={good or 'none'}")
    log0("ERROR: " + msg)
    run.metrics.log({"event": f"nonfinite_{what}", "step": state.step + 1, "message": msg})
    return "nonfinite"


# ---------------------------------------------------------------------------------------------------------------------
# the end


def finish(run: Run, state: TrainState) -> None:
    """Collective. A final checkpoint (so the run can be extended), the held-out eval, the consolidated HF export,
    then COMPLETED."""
    if run.last_saved != state.step:
        save(run, state, "end of training")
    if run.eval_ds is not None and run.last_eval[0] != state.step:
        held_out_eval(run, state)
    if run.last_eval[1] is not None:
        ev = run.last_eval[1]
        run.metrics.log({"event": "final_eval", "step": state.step, **ev})
        log0(f"final eval loss {ev['eval_loss']:.4f} ppl {ev['eval_ppl']:.2f}")
    final = export(run) if run.cfg.train.export else None
    if run.rank == 0:
        atomic_write_text(run.output_dir / "COMPLETED", json.dumps(
            {"step": state.step, "final": str(final) if final else None, "config_sha": config_sha(run.cfg)}) + "\n")
        log0((f"exported {final}; " if final else "") + f"wrote {run.output_dir / 'COMPLETED'}")


def export(run: Run) -> Path | None:
    """Collective. final/: the merged, consolidated HF checkpoint (+ final/adapter/ for LoRA). Returns it on rank 0."""
    base = run.engine.module
    hf_config = (base.get_base_model() if hasattr(base, "get_base_model") else base).config
    if getattr(hf_config, "quantization_config", None) is not None:
        # QLoRA: final/ holds dequantized, merged weights, a plain checkpoint; the running model keeps its config
        hf_config = copy.deepcopy(hf_config)
        del hf_config.quantization_config
    hf_config.use_cache = True
    hf_config.dtype = run.dtype
    # how this run was trained (mode, N/k/layers, prompt template): `emoe-llm eval` reads the template for its NLL tasks
    setattr(hf_config, TRAINED_KEY, trained_record(run.cfg.model.mode, getattr(hf_config, "emoe", None),
                                                   lora=run.cfg.lora.enabled, template=run.cfg.data.template))
    final = checkpoint.export_hf(run.engine, run.output_dir / "final", config=hf_config, tokenizer=run.tokenizer,
                                 rank=run.rank, max_shard_size=run.cfg.train.export_max_shard_size)
    if run.cfg.lora.enabled:
        checkpoint.export_lora_adapter(run.engine, run.output_dir / "final" / "adapter", rank=run.rank)
    return final


def load_recipe(args: argparse.Namespace) -> tuple[RecipeConfig, dict]:
    """The whole recipe and the DeepSpeed JSON, checked before any process group exists: types, unknown keys,
    template, paths, model dir, the emoe: section against the checkpoint, and the batch layout for the launcher's
    WORLD_SIZE. Every rank reaches the same verdict; ``cli`` prints it once."""
    cfg = load_config(args.config, args.overrides)
    if any(o.partition("=")[0].strip() == "model.path" for o in args.overrides):
        cfg.model.build_tiny_if_missing = False  # a model.path typed on the command line must exist, not be built
    resolve_hub_ids(cfg)
    check_runnable(cfg)
    ds_config = load_ds_config(args.ds_config)
    fill_ds_config(ds_config, cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return cfg, ds_config


def close(run: Run, outcome: str) -> int:
    """Collective. Flush the logs and agree on the exit code."""
    run.metrics.close()
    run.stop.restore()
    dist.barrier()
    release_output_dir()  # after every rank is done with output_dir
    return NONFINITE_EXIT if outcome == "nonfinite" else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, ds_config = load_recipe(args)
    if nothing_to_do(cfg):
        return 0
    run, state = setup(cfg, ds_config, local_rank=args.local_rank)
    outcome = fit(run, state)
    if outcome == "done":
        finish(run, state)
    return close(run, outcome)


def cli(argv=None, *, entry=None) -> int:
    """Entry point of train.py / ``python -m emoe_llm.train`` (``entry`` defaults to ``main``): recipe errors print
    one clear line, not a traceback per rank."""
    # DeepSpeed still calls the torch 2.x collective names; one warning per call site per rank is noise in job logs.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    try:
        return (entry or main)(argv)
    except Exception as e:  # noqa: BLE001 - every failure ends as one line from one rank (see failure.py)
        return handle_failure(e)


if __name__ == "__main__":
    exit_after(cli())
