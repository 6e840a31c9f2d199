"""Run directory, metrics.jsonl, TensorBoard (rank 0 only).

    run/config.yaml           resolved recipe (after overrides)
    run/ds_config.json        the DeepSpeed dict actually used (auto values filled)
    run/git.txt, run/git.diff revision + uncommitted diff of the emoe-llm source tree
    run/environment.json      python / torch / transformers / deepspeed versions, CUDA, hostnames of all ranks
    run/launches.jsonl        one line per launch (time, resumed from, SLURM_JOB_ID, NODE_RANK, hosts): appended
    metrics.jsonl             one JSON object per logged optimizer step (and eval); appended on resume, never truncated.
                              A resumed run first appends {"event": "resume", "step": S}; steps > S logged before
                              the kill are then logged again -- readers keep the last record of each step
    tb/                       TensorBoard event files
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from ..fileio import atomic_write_text

LAUNCH_ENV_KEYS = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
    "SLURM_NNODES", "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_NODEID", "NODE_RANK", "GROUP_RANK", "RANK",
    "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
    "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "TORCHELASTIC_RUN_ID",
)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        return out.stdout if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_run_dir(output_dir: Path, *, config_yaml: str, ds_config: dict, hosts: list[str], resumed_from,
                  attention: dict | None = None) -> None:
    """Rank 0: snapshot what this launch ran with (``attention``: the implementation used, and why)."""
    import deepspeed
    import torch
    import transformers

    run = output_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", config_yaml)
    atomic_write_text(run / "ds_config.json", json.dumps(ds_config, indent=2))
    src = Path(__file__).resolve().parents[2]
    rev = _git(["rev-parse", "HEAD"], src)
    status = _git(["status", "--porcelain"], src)
    diff = _git(["diff", "HEAD"], src)
    atomic_write_text(run / "git.txt", f"source: {src}\nrevision: {(rev or 'unknown (not a git checkout)').strip()}\n"
                  f"dirty: {bool(status and status.strip())}\n")
    if diff:
        atomic_write_text(run / "git.diff", diff)
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "argv": sys.argv,
        "hosts_by_rank": hosts,
        "attention": attention,
        "env": {k: os.environ[k] for k in LAUNCH_ENV_KEYS if k in os.environ},
    }
    # versions from the installed metadata, never by importing: importing bitsandbytes (or peft, which imports it)
    # runs its CPU backend's set-up, which fetches a kernel from the Hub -- in every run, QLoRA or not
    from importlib.metadata import PackageNotFoundError, version

    for mod, dist_name in (("peft", "peft"), ("flash_attn", "flash-attn"), ("bitsandbytes", "bitsandbytes"),
                           ("datasets", "datasets"), ("accelerate", "accelerate"), ("wandb", "wandb")):
        try:
            env[mod] = version(dist_name)
        except PackageNotFoundError:
            pass
    atomic_write_text(run / "environment.json", json.dumps(env, indent=2))
    try:
        freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, timeout=60)
        if freeze.returncode == 0:
            atomic_write_text(run / "pip_freeze.txt", freeze.stdout)
    except (OSError, subprocess.TimeoutExpired):
        pass
    with open(run / "launches.jsonl", "a") as f:
        f.write(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": str(resumed_from) if resumed_from else None,
            "world_size": len(hosts), "hosts": sorted(set(hosts)), "revision": (rev or "").strip() or None,
            "env": env["env"],
        }) + "\n")




class MetricsLogger:
    """Rank 0 sink for metrics.jsonl + TensorBoard. On other ranks every method is a no-op."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0,
                 wandb=None, config: dict | None = None):
        self.enabled = enabled
        self.tb = None
        self.f = None
        self.wandb = None
        if not enabled:
            return
        if wandb is not None and wandb.mode != "disabled":
            self.wandb = open_wandb(output_dir, wandb, config or {})
        path = output_dir / "metrics.jsonl"
        self.f = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except Exception as e:  # tensorboard missing or broken: keep training
                print(f"[emoe-llm] tensorboard disabled: {e}", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record, default=_json_default) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in _flatten(record):
                if key in ("step", "epoch_float", "time") or not isinstance(value, (int, float)):
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            scalars = dict(wandb_scalars(record))
            if scalars:
                # the optimizer step is wandb's step too, so its charts line up with metrics.jsonl and TensorBoard
                self.wandb.log(scalars, step=record.get("step", 0))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def open_wandb(output_dir: Path, cfg, config: dict):
    """The wandb run of this output_dir: a new one, or (resume) the one whose id output_dir/run/wandb_id keeps."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logging.wandb is set but the wandb package is not installed: pip install "
                           "'emoe-llm[wandb]' (or remove logging.wandb)") from None
    id_file = output_dir / "run" / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # wandb-style 8 chars
    if not id_file.is_file():
        id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(id_file, run_id + "\n")
    (output_dir / "wandb").mkdir(exist_ok=True)
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or output_dir.name, mode=cfg.mode,
                      dir=str(output_dir), id=run_id, resume="allow", config=config)


def wandb_scalars(record: dict):
    """The numeric values of a metrics.jsonl record as wandb keys: nested dicts as a/b, per-expert load lists as
    expert_load/layer_28/03 (one chart per layer), non-finite values left out (as for TensorBoard)."""
    for key, value in _flatten(record):
        if key in ("step", "time"):
            continue
        if isinstance(value, list) and key.startswith("expert_load/"):
            width = len(str(len(value) - 1))
            for i, v in enumerate(value):
                yield f"{key}/{i:0{width}d}", v
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        yield key, value


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + "/")
        else:
            yield key, v


def _json_default(o):
    try:
        return float(o)
    except Exception:
        return str(o)
