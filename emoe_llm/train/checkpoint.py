"""Checkpoints of a ZeRO-3 run and the final consolidated HF export.

Layout under ``output_dir``:

    checkpoints/step_00000120/        DeepSpeed save_checkpoint (sharded params + optimizer + scheduler, per rank)
        trainer_state.json            step, epoch, data position, world size, ... -- written LAST: a checkpoint
                                      without it is incomplete (killed mid-save) and never resumed from
        manifest.json                 every other file's size and sha256, written just before trainer_state.json
                                      (hashed in parallel: each rank hashes every world-th file); a resume checks
                                      it first (``verify_checkpoint``) and never loads a file that changed since
        rng_state_rank{r}.pt          each rank's python / numpy / torch RNG state
        config.yaml                   the resolved recipe
    final/                            consolidated safetensors + config.json (with the 'emoe' block) + tokenizer
    COMPLETED                         written by rank 0 only after final/ is complete

        universal/                    the same checkpoint in DeepSpeed's universal format, made once (atomically) the
                                      first time it is resumed at another world size, before any process group
                                      exists (``prepare_universal``)

ZeRO shards only load at the data-parallel world size they were saved with; at another one the run resumes through
DeepSpeed's universal checkpoint (``ds_to_universal`` + ``checkpoint.load_universal``), which re-partitions the
weights and the optimizer states for the new world size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ..fileio import atomic_write_text, sha256_file

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
HASH_THREADS = 4  # per rank: hashlib releases the GIL, so a rank hashes several files at once (~1.1 GB/s each)


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed as it is (a file changed since it was saved, unreadable state): exit 2,
    one line naming the file."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """``output_dir/checkpoints/step_00000120``: the one place checkpoint paths are built."""
    return checkpoint_dir(output_dir) / step_tag(step)


def list_checkpoints(output_dir: str | os.PathLike, *, complete_only: bool = True) -> list[Path]:
    """Checkpoint dirs sorted by step (oldest first)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and STEP_DIR.match(p.name) and (not complete_only or (p / STATE_FILE).is_file()):
            out.append(p)
    return sorted(out, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def read_trainer_state(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt} is not a complete checkpoint of this recipe (killed while saving?)"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint {ckpt} is damaged; resume from an "
                              "earlier one (resume=PATH) or restore the file") from None


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """resume: 'auto' -> the latest complete checkpoint in output_dir (or None); 'none' -> None; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        ckpt = ckpts[-1] if ckpts else None
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"resume: checkpoint dir '{resume}' does not exist")
    if ckpt is None:
        return None
    read_trainer_state(ckpt)  # a complete checkpoint, or a clear error
    return ckpt


UNIVERSAL_DIR = "universal"


UNIVERSAL_FAILED = ".universal.failed"  # rank 0's error, for the ranks waiting on the conversion


def universal_workers() -> tuple[int, int]:
    """(extract, merge) processes for ``ds_to_universal``. Extracting reads each saved rank's shards independently
    (CPU and disk bound: one per core, up to 8); merging holds every rank's slices of one parameter at once, so half
    as many."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    extract = max(1, min(8, cpus))
    return extract, max(1, extract // 2)


def _universal_done(out: Path) -> bool:
    return (out / "zero" / "optimizer_state.pt").is_file()


def convert_to_universal(ckpt: Path, *, workers: tuple[int, int] | None = None, log=print) -> Path:
    """``ckpt/universal``: ``ckpt`` converted with ``deepspeed.checkpoint.ds_to_universal`` into a temp dir that is
    renamed into place, so a run killed while converting leaves no half checkpoint and the next resume converts
    again. The source files are not modified. Needs no process group. Logs the size, time and seconds per GB."""
    import subprocess
    import sys

    out = ckpt / UNIVERSAL_DIR
    if _universal_done(out):
        return out
    extract, merge = workers or universal_workers()
    size = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
    tmp = ckpt / f".{UNIVERSAL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(tmp), "--num_extract_workers", str(extract), "--num_merge_workers", str(merge)]
    log(f"converting {ckpt} ({size / 1e9:.2f} GB) to DeepSpeed's universal checkpoint, {extract} extract / {merge} "
        f"merge workers")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not _universal_done(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    (ckpt / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer file; we pass the tag
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    seconds = time.perf_counter() - t0
    log(f"converted in {seconds:.0f} s ({seconds / max(size / 1e9, 1e-9):.1f} s/GB)")
    return out


def launch_id() -> str:
    """Names this launch (the same on every rank of it, different for a requeue): what the waiting ranks compare
    rank 0's failure marker with, so a marker left by an earlier attempt is not mistaken for this one's."""
    keys = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
    return "/".join(os.environ.get(k, "") for k in keys)


def prepare_universal(ckpt: Path, *, rank: int, poll_s: float = 5.0, log=print) -> Path:
    """Before any process group exists: rank 0 converts ``ckpt`` (``convert_to_universal``, several workers) while
    the other ranks wait for ``ckpt/universal`` on the shared file system. No collective is open meanwhile, so the
    conversion of a 30B checkpoint's optimizer states (~390 GB) is not bounded by the process-group timeout. If rank
    0 fails, it leaves its error in ``ckpt/.universal.failed`` and every waiting rank stops with it."""
    out, failed = ckpt / UNIVERSAL_DIR, ckpt / UNIVERSAL_FAILED
    me = launch_id()
    if rank == 0:
        failed.unlink(missing_ok=True)
        try:
            # the manifest is checked first, by rank 0 alone (no process group yet): a damaged checkpoint is
            # refused, not converted; the other ranks stop with the same line
            problem = verify_checkpoint(ckpt, rank=0)
            if problem is not None:
                raise CheckpointError(f"resume: checkpoint {ckpt} is damaged: {problem}; not converted to a "
                                      "universal checkpoint, not resumed")
            return convert_to_universal(ckpt, log=log)
        except Exception as e:
            atomic_write_text(failed, json.dumps({"launch": me, "error": str(e)[-2000:]}))
            raise
    while not _universal_done(out):
        if failed.is_file():
            try:
                marker = json.loads(failed.read_text())
            except (OSError, json.JSONDecodeError):
                marker = {}
            if marker.get("launch") == me:
                raise RuntimeError(f"rank 0 could not convert {ckpt} to a universal checkpoint: "
                                   f"{marker.get('error', '?').splitlines()[0]}")
        time.sleep(poll_s)
    return out


def rng_state() -> dict:
    """python / numpy / torch RNG, every visible GPU's (``cuda``) and this rank's own device's (``cuda_own``: the one
    that matters, restored onto this rank's device wherever it is numbered on the next node)."""
    cuda = torch.cuda.is_available()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
        "cuda_own": torch.cuda.get_rng_state() if cuda else None,
    }


def cuda_states_to_restore(saved: list, device_count: int) -> tuple[list[tuple[int, torch.Tensor]], int]:
    """The (device index, state) pairs of a checkpoint's per-GPU RNG states that exist on this node, and how many
    saved states have no device here (a node whose processes see fewer GPUs, e.g. one per task under Slurm)."""
    kept = [(i, state) for i, state in enumerate(saved[:device_count])]
    return kept, max(0, len(saved) - device_count)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is None or not torch.cuda.is_available():
        return
    kept, missing = cuda_states_to_restore(state["cuda"], torch.cuda.device_count())
    for device, device_state in kept:
        torch.cuda.set_rng_state(device_state, device)
    if state.get("cuda_own") is not None:  # this rank's device (torch.cuda.set_device(LOCAL_RANK) ran at start)
        torch.cuda.set_rng_state(state["cuda_own"])
    if missing:
        warnings.warn(f"the checkpoint holds the RNG state of {len(state['cuda'])} GPUs, this process sees "
                      f"{torch.cuda.device_count()}: restored {len(kept)} (and this rank's own device's), "
                      f"{missing} have no device here and were skipped", RuntimeWarning, stacklevel=2)


def save_checkpoint(engine, output_dir, *, step: int, trainer_state: dict, config_yaml: str, rank: int) -> Path:
    """Collective: every rank must call it. Returns the checkpoint dir."""
    path = checkpoint_path(output_dir, step)
    if rank == 0 and path.exists():  # a half-written dir from a killed run at the same step
        shutil.rmtree(path)
    dist.barrier()
    try:
        engine.save_checkpoint(str(path.parent), tag=path.name, client_state={"trainer_state": trainer_state})
        torch.save(rng_state(), path / f"rng_state_rank{dist.get_rank()}.pt")
    except (RuntimeError, OSError) as e:
        raise _save_error(e, path, output_dir) from None
    dist.barrier()
    if rank == 0:
        (path / "config.yaml").write_text(config_yaml)
    write_manifest(path, rank=rank)
    if rank == 0:
        _write_json_atomic(path / STATE_FILE, trainer_state)
    dist.barrier()
    return path


# --------------------------------------------------------------------------------------------------------------------
# the manifest: sizes and hashes of a checkpoint's files


def manifest_files(ckpt: Path) -> list[str]:
    """The files a manifest covers, relative to ``ckpt``: all but the two written after it and the universal
    conversion a later resume may add (it is made from the verified files, atomically)."""
    out = []
    for p in ckpt.rglob("*"):
        rel = p.relative_to(ckpt)
        if not p.is_file() or rel.parts[0] == UNIVERSAL_DIR or rel.parts[0].startswith(f".{UNIVERSAL_DIR}.tmp-"):
            continue
        if str(rel) not in (STATE_FILE, MANIFEST_FILE):
            out.append(str(rel))
    return sorted(out)


def _hash_share(ckpt: Path, names: list[str], *, rank: int, world: int) -> dict:
    """{name: {"size", "sha256"}} for this rank's share (every world-th file), several files at a time."""
    from concurrent.futures import ThreadPoolExecutor

    mine = names[rank::world]

    def one(name):
        p = ckpt / name
        return name, {"size": p.stat().st_size, "sha256": sha256_file(p)}

    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(mine)))) as pool:
        return dict(pool.map(one, mine))


def _gather_shares(ckpt: Path, names: list[str] | None, *, rank: int) -> dict:
    """Collective (or alone without a process group): every rank hashes its share of ``names`` (rank 0's list),
    the results are merged on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return _hash_share(ckpt, names or manifest_files(ckpt), rank=0, world=1)
    box = [names if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    world = dist.get_world_size()
    try:
        share = _hash_share(ckpt, box[0], rank=rank, world=world)
    except OSError as e:  # a file vanished or cannot be read: reported as that file's problem, on every rank
        share = {"__error__": f"{e.filename}: {e.strerror}"}
    shares = [None] * world
    dist.all_gather_object(shares, share)
    merged = {}
    for sh in shares:
        merged.update(sh)
    return merged


def write_manifest(ckpt: Path, *, rank: int) -> None:
    """Collective. ``ckpt/manifest.json``: every file's size and sha256 (rank 0 writes it, temp file + rename)."""
    names = manifest_files(ckpt) if rank == 0 else None
    hashed = _gather_shares(ckpt, names, rank=rank)
    if "__error__" in hashed:
        raise OSError(f"hashing checkpoint {ckpt}: {hashed['__error__']}")
    if rank == 0:
        _write_json_atomic(ckpt / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "algorithm": "sha256",
                                                  "files": hashed})


def verify_checkpoint(ckpt: Path, *, rank: int) -> str | None:
    """Collective. None when every file the manifest lists is there with its size and hash (or when the checkpoint
    predates manifests); else what is wrong, naming the file. Sizes are checked before anything is hashed."""
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        return None  # saved before checkpoints carried a manifest: nothing to check against
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"{path} is damaged (not the JSON manifest a save writes)"
    for name, want in sorted(files.items()):
        p = ckpt / name
        if not p.is_file():
            return f"{p} is missing (listed in {path})"
        if p.stat().st_size != want["size"]:
            return f"{p} has {p.stat().st_size} bytes, {want['size']} when saved (truncated or overwritten)"
    hashed = _gather_shares(ckpt, sorted(files), rank=rank)
    if "__error__" in hashed:
        return f"cannot read {hashed['__error__']}"
    for name in sorted(files):
        if hashed[name]["sha256"] != files[name]["sha256"]:
            return f"{ckpt / name} does not match its sha256 in {path} (changed since it was saved)"
    return None


def previous_checkpoint(output_dir, ckpt: Path) -> Path | None:
    """The newest complete checkpoint older than ``ckpt``."""
    older = [p for p in list_checkpoints(output_dir) if _step_of(p) < _step_of(ckpt)]
    return older[-1] if older else None


def set_aside(ckpt: Path) -> Path:
    """Rank 0: rename a damaged checkpoint out of the ``step_*`` names (kept for a look, never resumed or rotated,
    and not deleted by a later save of the same step)."""
    aside = ckpt.with_name(f"{ckpt.name}.damaged-{int(time.time())}")
    os.replace(ckpt, aside)
    return aside


def _step_of(ckpt: Path) -> int:
    return int(STEP_DIR.match(ckpt.name).group(1))


def _save_error(e: BaseException, path: Path, output_dir) -> BaseException:
    """What a failed save says. PyTorch's zip writer reports a full disk as "[enforce fail at inline_container.cc]
    unexpected pos ..." (no errno, no path): when the filesystem has (almost) no room left, that is ENOSPC, and the
    line names the checkpoint being written and the last complete one, which is kept."""
    errno_ = getattr(e, "errno", None)
    try:
        st = os.statvfs(path if path.exists() else path.parent)
        nearly_full = st.f_bavail * st.f_frsize < 64 * 2**20
    except OSError:
        nearly_full = False
    if errno_ not in (errno.ENOSPC, errno.EDQUOT) and not nearly_full:
        return e
    done = list_checkpoints(output_dir)
    kept = f"the last complete checkpoint, {done[-1]}, is kept" if done else "no complete checkpoint exists yet"
    return OSError(errno.ENOSPC, f"No space left on device while writing checkpoint {path} ({kept}; the partial "
                                 f"{path.name} is ignored by resume=auto); free space, then resume")


def load_checkpoint(engine, ckpt: Path, *, universal: bool = False) -> dict:
    """Collective. Restores module / optimizer / scheduler (DeepSpeed) and this rank's RNG; returns trainer_state.

    ``universal``: load ``ckpt/universal`` (see ``prepare_universal``); the engine must have been built with
    ``checkpoint.load_universal`` in its config."""
    state = read_trainer_state(ckpt)
    load_dir, tag = (ckpt, UNIVERSAL_DIR) if universal else (ckpt.parent, ckpt.name)
    try:
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:  # torch.load of a damaged file, say
        hint = "" if (ckpt / MANIFEST_FILE).is_file() else " (it has no manifest.json to say which file is damaged)"
        raise CheckpointError(f"resume: loading {ckpt} failed{hint}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    rng_file = ckpt / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def rotate_checkpoints(output_dir, keep_last: int) -> list[Path]:
    """Rank 0: delete the oldest complete checkpoints beyond ``keep_last`` (and incomplete ones older than those)."""
    if keep_last <= 0:
        return []
    complete = list_checkpoints(output_dir)
    removed = []
    for p in complete[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if complete[-keep_last:]:
        oldest_kept = int(STEP_DIR.match(complete[-keep_last:][0].name).group(1))
        for p in list_checkpoints(output_dir, complete_only=False):
            if not (p / STATE_FILE).is_file() and int(STEP_DIR.match(p.name).group(1)) < oldest_kept:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------------------------------
# Final export: HF safetensors shards filled one ZeRO-3 gather at a time on rank 0


@contextlib.contextmanager
def _gathered(params: list):
    """Full tensors of ZeRO-3 partitioned ``params`` inside the block (read-only: changes are dropped on exit)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _plain_weight(param) -> torch.Tensor:
    """A parameter as a plain checkpoint stores it: a bitsandbytes 4-bit weight (QLoRA's frozen base) dequantized
    to its original shape and dtype, anything else as it is."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        return param.data
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(param.data, quant_state)


def _merged_base_weight(layer) -> torch.Tensor:
    """``W`` of a peft LoRA layer with its adapters merged by peft itself (``LoraLayer.merge``, the step
    ``merge_and_unload`` takes per layer: LoRA, rsLoRA and DoRA alike), then undone, so the model stays as trained.

    A 4-bit base (QLoRA) is dequantized and the adapters' deltas added in full precision: peft's own merge would
    quantize the sum to NF4 again, and its new weight object would not be the ZeRO-3 parameter."""
    base = layer.get_base_layer()
    if getattr(base.weight, "quant_state", None) is not None:
        if any(layer.use_dora.get(name) for name in layer.active_adapters):
            raise NotImplementedError("exporting DoRA on a 4-bit base is not supported; use plain LoRA with QLoRA")
        merged = _plain_weight(base.weight).clone()
        for name in layer.active_adapters:
            if name in layer.lora_A:
                merged += layer.get_delta_weight(name).to(merged.dtype)
        return merged
    original = base.weight.data.clone()
    layer.merge()
    merged = base.weight.data.detach().clone()
    base.weight.data = original
    layer.merged_adapters.clear()
    return merged


def _export_tensors(model) -> dict:
    """{hf_key: (params to gather, fn() -> tensor)} in state-dict order; peft LoRA layers export their merged
    weight under the plain HF key (``.base_layer.`` and the adapters drop out)."""
    from peft.tuners.lora import LoraLayer

    peft_prefix = "base_model.model."
    modules = dict(model.named_modules())
    out = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        key = name.removeprefix(peft_prefix)
        if ".lora_" in key:
            continue  # merged into the base weight below (and saved by the adapter export)
        owner = modules.get(name.rsplit(".", 2)[0]) if name.endswith(".base_layer.weight") else None
        key = key.replace(".base_layer.", ".")
        if isinstance(owner, LoraLayer):
            out[key] = (list(owner.parameters()), lambda owner=owner: _merged_base_weight(owner))
        else:
            out[key] = ([param], lambda param=param: _plain_weight(param))
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():  # none in Llama; keeps other architectures complete
        if name in persistent and buf is not None:
            out[name.removeprefix(peft_prefix)] = ([], lambda buf=buf: buf)
    return out


def _shape(params: list, fn) -> tuple[torch.Size, torch.dtype]:
    if not params:  # a buffer: never partitioned
        t = fn()
        return t.shape, t.dtype
    p = params[0]
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:  # packed 4-bit storage: the plain weight's shape and dtype are in its quant state
        return quant_state.shape, quant_state.dtype
    return getattr(p, "ds_shape", p.shape), p.dtype


@torch.no_grad()
def export_hf(engine_or_model, out_dir, *, config, tokenizer, rank: int, max_shard_size="5GB",
              dtype: torch.dtype | None = None) -> Path | None:
    """Collective. Write the (LoRA-merged) model as HF safetensors into ``out_dir`` (temp dir + rename), with
    ``config`` (its 'emoe' block included) and ``tokenizer`` beside it.

    huggingface_hub's ``split_torch_state_dict_into_shards`` plans the shards and the index from shapes alone (meta
    tensors); each shard is then filled one tensor at a time -- gathered from its ZeRO-3 partitions, copied to CPU on
    rank 0, released -- and written. So rank 0 holds at most one shard, never the whole model, which a gathered
    state dict (``save_torch_state_dict``, or DeepSpeed's 16-bit consolidation on rank 0) would need: 60 GB of bf16
    weights for Llama-30B."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    model = getattr(engine_or_model, "module", engine_or_model)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp-export")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tensors = _export_tensors(model)
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    meta = {}
    for key, (params, fn) in tensors.items():
        shape, src_dtype = _shape(params, fn)
        meta[key] = torch.empty(shape, dtype=dtype or src_dtype, device="meta")
    plan = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size,
                                              filename_pattern="model{suffix}.safetensors")
    for filename, keys in plan.filename_to_tensors.items():
        shard = {}
        for key in keys:
            params, fn = tensors[key]
            with _gathered(params):
                if rank == 0:
                    shard[key] = fn().detach().to("cpu", dtype or None, copy=True).contiguous()
        if rank == 0:
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
        del shard
    if rank == 0:
        if plan.is_sharded:
            _write_json_atomic(tmp / "model.safetensors.index.json",
                               {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename})
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None


@torch.no_grad()
def export_lora_adapter(engine_or_model, out_dir, *, rank: int) -> Path | None:
    """Collective. Write the peft adapter (``get_peft_model_state_dict``: peft's key names, DoRA magnitudes included,
    + adapter_config.json) so ``PeftModel.from_pretrained(base, out_dir)`` loads it on the converted base."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = getattr(engine_or_model, "module", engine_or_model)
    if not hasattr(model, "peft_config"):
        return None
    out_dir = Path(out_dir)
    with _gathered([p for n, p in model.named_parameters() if ".lora_" in n]):  # small: the adapters only
        if rank == 0:
            state = {k: v.detach().to("cpu", copy=True).contiguous()
                     for k, v in get_peft_model_state_dict(model).items()}
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp-export")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` onto ``out_dir`` (an older one is moved aside first, then deleted)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{int(time.time())}")
        os.replace(out_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, out_dir)
