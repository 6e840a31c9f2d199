"""Fine-tune a dense or EMoE Llama with DeepSpeed ZeRO-3. Reads top to bottom:

    config -> dist init -> data -> model (zero.Init) -> deepspeed.initialize -> resume -> loop -> save/export

Launch (one process per GPU; all three work the same):

    deepspeed --num_gpus 8 train.py --ds_config ds_configs/z3.json --config configs/llama2_7b_emoe.yaml
    torchrun --nproc_per_node 8 train.py --ds_config ds_configs/z3.json --config configs/llama2_7b_emoe.yaml
    emoe-llm train --nproc 8 --config configs/llama2_7b_emoe.yaml train.lr=1e-5 output_dir=runs/x

Loss normalisation: one optimizer step = grad_accum micro-batches on every rank. The loss of a micro-batch is
its *summed* token cross-entropy divided by the number of target tokens of the whole step over all ranks (counted
before the forward passes), so uneven masks and accumulation give exactly the gradient of one big batch. DeepSpeed
is told not to divide by grad_accum (``scale_wrt_gas=False``), and its gradient averaging over ranks is undone by
multiplying by the world size.

Preemption: SIGUSR1/SIGTERM or the file ``{output_dir}/STOP`` make every rank stop at the next optimizer-step
boundary (agreed with one all_reduce), save a checkpoint of that step, and exit 0 without writing COMPLETED. The run
removes a stale STOP file at start (rank 0, before the first barrier), so a restart simply continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import socket
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..fileio import atomic_write_text
from .config import (
    ConfigError,
    RecipeConfig,
    check_runnable,
    dump_config,
    ds_precision,
    ds_zero_stage,
    fill_ds_config,
    load_config,
    load_ds_config,
    resolve_batch,
)
from .failure import maybe_inject_fault, note_output_dir

IGNORE_INDEX = -100
DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "z3.json"
NAN_FAULT_ENV = "EMOE_LLM_INJECT_NAN_AT_STEP"  # testing hook: rank 0 gets a NaN loss at that optimizer step


def log0(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[emoe-llm] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="EMoE / dense fine-tuning with DeepSpeed ZeRO-3. Extra arguments are key=value recipe overrides "
        "(dots for nesting: train.lr=1e-5 model.mode=dense).",
    )
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
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


def pick_attn_implementation(requested: str, dtype: torch.dtype) -> str:
    if requested != "auto":
        if requested == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                raise ConfigError("model.attn_implementation=flash_attention_2 but flash-attn is not installed "
                                  "(pip install flash-attn, CUDA only); use auto or sdpa") from None
        return requested
    if torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def prepare_model_path(cfg: RecipeConfig, *, rank: int) -> Path:
    """The checkpoint to load. Converts a dense checkpoint on the fly (rank 0, once) when ``model.convert`` is set."""
    src = Path(cfg.model.path)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {src}/config.json not found (expected an HF checkpoint dir)")
    has_emoe = bool(json.loads((src / "config.json").read_text()).get("emoe"))
    # mode dense converts too: the permutation keeps the dense function, and the exported model can then be run
    # with the expert mask at inference (the paper's "LoRA2EMoE") and compared with the EMoE run key for key.
    if has_emoe or not cfg.model.convert:
        if cfg.model.mode == "emoe" and not has_emoe:
            raise ConfigError(
                f"model.mode=emoe but {src}/config.json has no 'emoe' block: convert it first "
                f"(emoe-llm convert {src} DST --experts N --top-k K --layers ...) or set model.convert="
                "{n_experts: N, top_k: K, layers: ...} to convert on the fly (small models)"
            )
        return src
    dst = Path(cfg.output_dir) / "converted"
    if rank == 0 and not (dst / "config.json").is_file():
        from emoe_llm.convert import convert_checkpoint

        c = dict(cfg.model.convert)
        log0(f"converting {src} -> {dst} (n_experts={c['n_experts']}, top_k={c['top_k']}, layers={c['layers']})")
        convert_checkpoint(src, dst, n_experts=int(c["n_experts"]), top_k=int(c["top_k"]), layers=c["layers"],
                           seed=int(c.get("seed", 0)), method=c.get("method", "kmeans"), overwrite=True,
                           progress=False)
    dist.barrier()
    return dst


def load_model(cfg: RecipeConfig, path: Path, *, dtype: torch.dtype, zero3: bool):
    """Build the model. Under ZeRO-3 the caller keeps an HfDeepSpeedConfig alive, so from_pretrained runs inside
    deepspeed.zero.Init and every rank only ever holds its own partition."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation=pick_attn_implementation(cfg.model.attn_implementation, dtype),
                  trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.quantize == "4bit":
        kwargs["quantization_config"] = qlora_quantization_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.config.use_cache = False
    if cfg.model.mode == "emoe":
        from emoe_llm.emoe import enable_emoe

        settings = enable_emoe(model, top_k=cfg.model.top_k, layers=cfg.model.layers)
        log0(f"EMoE: layers {settings.layers}, {settings.n_experts} experts, top-{settings.top_k}")
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    return model


def qlora_quantization_config(dtype: torch.dtype):
    if not torch.cuda.is_available():
        raise ConfigError("lora.quantize=4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA. "
                          "Use lora.quantize=none (plain LoRA) on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("lora.quantize=4bit (QLoRA) needs bitsandbytes: pip install 'emoe-llm[gpu]'") from None
    from transformers import BitsAndBytesConfig

    # quant_storage = compute dtype lets ZeRO-3 partition the packed 4-bit weights like ordinary 16-bit ones.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def add_lora(model, cfg: RecipeConfig):
    """peft LoRA on ``lora.target_modules``. EMoEMLP keeps gate_proj/up_proj/down_proj as submodules, so LoRA on
    them wraps the same Linears and the router (mean of gate_proj outputs) sees the adapted gate."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
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
    t = cfg.train
    warmup = t.warmup_steps or int(math.ceil(t.warmup_ratio * total_steps))

    def factor(step: int) -> float:  # step = optimizer steps done so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if t.lr_scheduler == "cosine" else 1.0 - progress
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), warmup


# ---------------------------------------------------------------------------------------------------------------------
# one optimizer step, evaluation


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: logits[:, t] predicts labels[:, t+1]. (B, T, V), (B, T) -> ()."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_inputs(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


MODEL_INPUT_KEYS = ("input_ids", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                    "max_length_k")


def model_inputs(batch: dict, device) -> dict:
    """The collator's batch minus labels (we compute the loss ourselves), on ``device``. Packed batches carry no
    attention_mask: transformers builds the block-diagonal mask from position_ids (or FA2 uses cu_seq_lens)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
            if k in MODEL_INPUT_KEYS}


def train_step(engine, micro_batches: list[dict], *, device, world: int, inject_nan: bool = False) -> dict:
    """Forward/backward ``grad_accum`` micro-batches and take one optimizer step (DeepSpeed steps at the boundary).

    Returns {"loss", "targets", "inputs", "nonfinite"}. With ``nonfinite`` the step was abandoned *before* any
    backward of the bad micro-batch and before the optimizer step: the weights are those of the previous step."""
    counts = torch.tensor([sum(count_targets(b) for b in micro_batches),
                           sum(count_inputs(b) for b in micro_batches)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    n_targets = max(1.0, counts[0].item())
    loss_sum = 0.0
    for i, batch in enumerate(micro_batches):
        out = engine(**model_inputs(batch, device), use_cache=False)
        ce = token_ce_sum(out.logits, batch["labels"].to(device))
        if inject_nan and i == 0:
            ce = ce * float("nan")
        # One tiny collective per micro-batch: every rank learns whether any rank went non-finite before anyone
        # runs backward, so all ranks skip it together (no ZeRO-3 hang) and the weights stay good.
        probe = torch.stack([ce.detach().double(), (~torch.isfinite(ce.detach())).double()])
        dist.all_reduce(probe)
        if probe[1].item() > 0:
            return {"loss": float("nan"), "targets": n_targets, "inputs": counts[1].item(), "nonfinite": True}
        loss_sum += probe[0].item()
        engine.backward(ce * (world / n_targets), scale_wrt_gas=False)
        engine.step()
    return {"loss": loss_sum / n_targets, "targets": n_targets, "inputs": counts[1].item(), "nonfinite": False}


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
    from emoe_llm.emoe import pop_expert_load

    loads = pop_expert_load(model)
    if not loads:
        return {}
    layers = sorted(loads)
    stacked = torch.stack([loads[i].float().to(device) for i in layers])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return {f"layer_{i}": [round(x, 5) for x in stacked[j].tolist()] for j, i in enumerate(layers)}


@torch.no_grad()
def export_probe(engine, batch: dict, device) -> dict:
    """Logits of the trained ZeRO-3 model on one batch, in its training mode and dense (k = N), for checking the
    export (``run/export_probe.pt``)."""
    from emoe_llm.emoe import emoe_modules

    engine.eval()
    inputs = model_inputs(batch, device)
    logits = engine(**inputs, use_cache=False).logits.float().cpu()
    mods = list(emoe_modules(engine.module))
    saved = [m.top_k for m in mods]
    for m in mods:
        m.top_k = m.n_experts  # k == N is exactly the dense MLP
    dense = engine(**inputs, use_cache=False).logits.float().cpu() if mods else logits
    for m, k in zip(mods, saved):
        m.top_k = k
    engine.train()
    return {"inputs": {k: v.cpu() for k, v in inputs.items()}, "logits": logits, "dense_logits": dense}


def _read_completed(output_dir: Path) -> dict | None:
    p = output_dir / "COMPLETED"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def _write_completed(output_dir: Path, info: dict) -> None:
    atomic_write_text(output_dir / "COMPLETED", json.dumps(info) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# stop requests (preemption)


class StopRequest:
    """SIGUSR1/SIGTERM handlers only set a flag; the STOP file is polled once per optimizer step."""

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.signal_name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def local(self) -> bool:
        return self.signal_name is not None or self.stop_file.exists()


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    # DeepSpeed still calls the torch 2.x collective names; one warning per call site per rank is noise in job logs.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_runnable(cfg)

    # ---- distributed init (deepspeed launcher, torchrun, or srun + torchrun all set RANK/WORLD_SIZE/...)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # nccl on GPUs, gloo on CPU; the timeout also bounds how long ranks wait for rank 0 to tokenize the data
    deepspeed.init_distributed(timeout=timedelta(minutes=cfg.train.dist_timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    output_dir = Path(cfg.output_dir)
    stop_file = output_dir / "STOP"
    config_yaml = dump_config(cfg)
    config_sha = hashlib.sha256(config_yaml.encode()).hexdigest()[:16]
    completed = _read_completed(output_dir)
    if completed is not None and cfg.resume != "none" and completed.get("config_sha") == config_sha:
        log0(f"{output_dir / 'COMPLETED'} exists for this exact recipe: nothing to do (final: {completed.get('final')})")
        return 0
    from .checkpoint import list_checkpoints

    if cfg.resume == "none" and list_checkpoints(output_dir):
        raise ConfigError(f"resume=none but {output_dir}/checkpoints holds checkpoints of an earlier run; use "
                          f"resume=auto to continue it, or a new output_dir (nothing is deleted for you)")
    created_output_dir = not output_dir.exists()
    dist.barrier()  # every rank has read the run state above before rank 0 changes it
    note_output_dir(output_dir, created=created_output_dir)  # a failed run removes it again while it is empty
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if stop_file.exists():  # left by the previous (preempted) run; this run is the restart
            stop_file.unlink()
            log0(f"removed stale {stop_file}")
        if completed is not None:  # a finished run that is being extended (e.g. more steps): final/ is redone
            (output_dir / "COMPLETED").unlink()
    dist.barrier()
    stop = StopRequest(stop_file)

    ds_config = fill_ds_config(load_ds_config(args.ds_config), cfg, world_size=world)
    micro, accum, global_bs = resolve_batch(cfg, world)
    precision = ds_precision(ds_config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    zero3 = ds_zero_stage(ds_config) == 3
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- data (rank 0 tokenizes and fills the cache first; the other ranks then read it)
    from emoe_llm.data import SFTCollator, build_sft_datasets, data_config_from_dict, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    data_cfg = data_config_from_dict(cfg.data)
    if rank != 0:
        dist.barrier()
    train_ds, eval_ds, data_stats = build_sft_datasets(data_cfg, tokenizer)
    if rank == 0:
        dist.barrier()
    attn = pick_attn_implementation(cfg.model.attn_implementation, dtype)
    collator = SFTCollator(pad_token_id=tokenizer.pad_token_id, flash_attn_kwargs=attn == "flash_attention_2")
    micro_per_rank, steps_per_epoch = count_steps(len(train_ds), micro=micro, accum=accum, world=world)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {len(train_ds)} rows, fewer than one global batch ({global_bs} = micro "
            f"{micro} x accum {accum} x {world} ranks); lower train.global_batch_size or add data"
        )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    log0(f"{len(train_ds)} train rows, {len(eval_ds) if eval_ds is not None else 0} eval rows; {world} ranks x "
         f"micro {micro} x accum {accum} = global batch {global_bs}; {steps_per_epoch} steps/epoch, "
         f"{total_steps} steps; ZeRO-{ds_zero_stage(ds_config)} {precision}")

    # ---- model: HfDeepSpeedConfig alive before from_pretrained => zero.Init, no rank holds the full model
    from transformers.integrations import HfDeepSpeedConfig

    model_path = prepare_model_path(cfg, rank=rank)
    dschf = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841  (must stay referenced)
    model = load_model(cfg, model_path, dtype=dtype, zero3=zero3)
    optimizer = build_optimizer(model, cfg, ds_config)
    scheduler, warmup = build_scheduler(optimizer, cfg, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    if zero3:  # evidence that zero.Init partitioned the model: each rank holds ~1/world of it
        local = sum(p.ds_tensor.numel() for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
        log0(f"ZeRO-3: rank 0 holds {local / max(1, n_params):.1%} of the parameters ({world} ranks)")
    log0(f"model {model_path}: {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable), mode {cfg.model.mode}"
         f"{', LoRA r=' + str(cfg.lora.r) if cfg.lora.enabled else ''}; warmup {warmup} steps")

    # ---- resume
    from .checkpoint import (
        export_hf,
        export_lora_adapter,
        find_resume_checkpoint,
        load_checkpoint,
        rotate_checkpoints,
        save_checkpoint,
    )
    from .runlog import MetricsLogger, write_run_dir

    resume_from = find_resume_checkpoint(cfg.resume, output_dir, world_size=world)
    step, epoch, step_in_epoch = 0, 0, 0
    tokens_seen = 0
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        tokens_seen = state.get("tokens_seen", 0)
        if state.get("steps_per_epoch") not in (None, steps_per_epoch):
            raise RuntimeError(f"{resume_from}: saved with {state['steps_per_epoch']} steps/epoch, this run has "
                               f"{steps_per_epoch}; the data or batch size changed, so the data position is invalid")
        log0(f"resumed from {resume_from}: step {step}, epoch {epoch}, step-in-epoch {step_in_epoch}")

    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if rank == 0:
        write_run_dir(output_dir, config_yaml=config_yaml, ds_config=ds_config, hosts=hosts, resumed_from=resume_from)
        (output_dir / "run" / "data_stats.json").write_text(json.dumps(data_stats, indent=2, default=str))
    metrics = MetricsLogger(output_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard, resume_step=step)
    if resume_from is not None:
        metrics.log({"event": "resume", "step": step, "checkpoint": str(resume_from)})

    def trainer_state() -> dict:
        return {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "steps_per_epoch": steps_per_epoch,
                "micro_batches_per_rank_done": step_in_epoch * accum, "total_steps": total_steps,
                "world_size": world, "global_batch_size": global_bs, "tokens_seen": tokens_seen, "seed": cfg.seed,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    last_saved = step if resume_from is not None else -1

    def save(reason: str) -> Path:
        nonlocal last_saved
        path = save_checkpoint(engine, output_dir, step=step, trainer_state=trainer_state(), config_yaml=config_yaml,
                               rank=rank)
        last_saved = step
        if rank == 0:
            removed = rotate_checkpoints(output_dir, cfg.train.keep_last)
            log0(f"saved {path} ({reason})" + (f"; removed {', '.join(p.name for p in removed)}" if removed else ""))
        return path

    # ---- loop
    bar = None
    if rank == 0 and cfg.logging.progress_bar and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    inject_at = int(os.environ.get(NAN_FAULT_ENV, "-1"))
    engine.train()
    t_last, tokens_since, steps_since = time.perf_counter(), 0.0, 0
    exit_code = 0
    stopped = None
    last_eval = [-1, None]  # (step, result) of the latest held-out eval
    while step < total_steps and stopped is None:
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        order = epoch_indices(len(train_ds), epoch=epoch, seed=cfg.seed, rank=rank, world=world,
                              per_rank=micro_per_rank * micro)
        while step_in_epoch < steps_per_epoch and step < total_steps:
            first = step_in_epoch * accum * micro
            micro_batches = [collator([train_ds[i] for i in order[first + j * micro: first + (j + 1) * micro]])
                             for j in range(accum)]
            lr = scheduler.get_last_lr()[0]
            maybe_inject_fault(rank, step + 1)
            result = train_step(engine, micro_batches, device=device, world=world,
                                inject_nan=(rank == 0 and step + 1 == inject_at))
            if result["nonfinite"]:
                if last_saved != step:
                    save("last good state before a non-finite loss")
                ckpt = output_dir / "checkpoints" / f"step_{step:08d}"
                msg = (f"non-finite loss at step {step + 1} (epoch {epoch}, step-in-epoch {step_in_epoch}); stopped "
                       f"before its backward pass. Last good checkpoint: {ckpt} (weights after step {step}). Lower "
                       f"train.lr / check the data, then resume with resume={ckpt}")
                log0("ERROR: " + msg)
                metrics.log({"event": "nonfinite_loss", "step": step + 1, "message": msg})
                exit_code, stopped = 3, "nan"
                break
            step += 1
            step_in_epoch += 1
            tokens_seen += int(result["inputs"])
            tokens_since += result["inputs"]
            steps_since += 1
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            record = None
            if step % cfg.train.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch,
                          "epoch_float": round(epoch + step_in_epoch / steps_per_epoch, 4),
                          "loss": result["loss"], "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_since / max(now - t_last, 1e-9), "target_tokens": result["targets"],
                          "tokens_seen": tokens_seen}
                record["step_time_s"] = round((now - t_last) / max(1, steps_since), 4)
                if torch.cuda.is_available():
                    record["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    torch.cuda.reset_peak_memory_stats()
                t_last, tokens_since, steps_since = now, 0.0, 0
                if cfg.model.mode == "emoe" and cfg.logging.expert_load:
                    load = gather_expert_load(engine.module, device)
                    if load:
                        record["expert_load"] = load
                        record["expert_load_max_over_mean"] = {
                            k: round(max(v) / (sum(v) / len(v)), 4) for k, v in load.items()}
            if eval_ds is not None and len(eval_ds) and cfg.train.eval_every_steps and \
                    step % cfg.train.eval_every_steps == 0:
                ev = evaluate(engine, eval_ds, collator, rank=rank, world=world,
                              micro=cfg.train.eval_micro_batch_size or micro, max_batches=cfg.train.eval_max_batches,
                              device=device)
                last_eval[:] = [step, ev]
                record = {**(record or {"step": step, "loss": result["loss"], "lr": lr}), **ev}
                log0(f"step {step}: eval loss {ev['eval_loss']:.4f} ppl {ev['eval_ppl']:.2f}")
            if record is not None:
                metrics.log(record)
                if bar is None:  # batch logs (Slurm, CI): one plain line per logged step instead of a progress bar
                    log0(f"step {step}/{total_steps} loss {result['loss']:.4f} lr {lr:.3e} gnorm {grad_norm:.3f} "
                         f"tok/s {record.get('tokens_per_s', 0):.0f}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}")
            if not math.isfinite(grad_norm) and cfg.train.max_grad_norm > 0:
                ckpt = output_dir / "checkpoints" / f"step_{last_saved:08d}" if last_saved >= 0 else None
                msg = (f"non-finite gradient norm at step {step}: the weights are no longer trustworthy. "
                       f"Last good checkpoint: {ckpt or 'none yet (train.save_every_steps)'}")
                log0("ERROR: " + msg)
                metrics.log({"event": "nonfinite_grad", "step": step, "message": msg})
                exit_code, stopped = 3, "nan"
                break
            # ---- periodic saves; stop requests agreed on by all ranks (one tiny all_reduce per step)
            epoch_end = step_in_epoch == steps_per_epoch
            if cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0 and step < total_steps:
                save(f"every {cfg.train.save_every_steps} steps")
            elif epoch_end and cfg.train.save_every_epoch and step < total_steps:
                save(f"end of epoch {epoch}")
            flag = torch.tensor([1.0 if stop.local() else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                if last_saved != step:
                    save("preemption")
                why = stop.signal_name or ("STOP file" if stop_file.exists() else "another rank")
                log0(f"preempted at step {step}, checkpoint saved ({why}); resume with resume=auto")
                metrics.log({"event": "preempted", "step": step, "reason": why})
                stopped = "preempted"
                break
    if bar is not None:
        bar.close()
    if stopped is not None:
        metrics.close()
        dist.barrier()
        return exit_code

    # ---- end: final checkpoint (so the run can be extended), held-out eval, consolidated HF export, COMPLETED
    if last_saved != step:
        save("end of training")
    if eval_ds is not None and len(eval_ds) and last_eval[0] != step:
        ev = evaluate(engine, eval_ds, collator, rank=rank, world=world, micro=cfg.train.eval_micro_batch_size or micro,
                      max_batches=cfg.train.eval_max_batches, device=device)
        last_eval[:] = [step, ev]
    if last_eval[1] is not None:
        ev = last_eval[1]
        metrics.log({"event": "final_eval", "step": step, **ev})
        log0(f"final eval loss {ev['eval_loss']:.4f} ppl {ev['eval_ppl']:.2f}")
    if cfg.train.export:
        probe_rows = [eval_ds[i] for i in range(min(2, len(eval_ds)))] if eval_ds is not None and len(eval_ds) else \
            [train_ds[i] for i in range(min(2, len(train_ds)))]
        probe = export_probe(engine, collator(probe_rows), device)
        base = engine.module
        hf_config = (base.get_base_model() if hasattr(base, "get_base_model") else base).config
        hf_config.use_cache = True
        hf_config.dtype = dtype
        final = export_hf(engine, output_dir / "final", config=hf_config, tokenizer=tokenizer, rank=rank,
                          max_shard_size=cfg.train.export_max_shard_size, lora_merge=True)
        if cfg.lora.enabled:
            export_lora_adapter(engine, output_dir / "final" / "adapter", rank=rank)
        if rank == 0:
            torch.save(probe, output_dir / "run" / "export_probe.pt")
            _write_completed(output_dir, {"step": step, "final": str(final), "config_sha": config_sha})
            log0(f"exported {final}; wrote {output_dir / 'COMPLETED'}")
    elif rank == 0:
        _write_completed(output_dir, {"step": step, "final": None, "config_sha": config_sha})
    metrics.close()
    dist.barrier()
    return 0


def cli(argv=None) -> int:
    """Entry point of train.py / ``python -m emoe_llm.train``: recipe errors print one clear line, not a traceback per
    rank."""
    try:
        return main(argv)
    except Exception as e:  # noqa: BLE001 - every failure ends as one line from one rank (see failure.py)
        from .failure import handle_failure

        return handle_failure(e)


if __name__ == "__main__":
    sys.exit(cli())
