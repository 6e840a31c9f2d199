"""Streaming dense -> EMoE conversion of an HF safetensors checkpoint; never holds the model.

    summary = convert_checkpoint("Llama-2-7b-hf", "Llama-2-7b-emoe", n_experts=64, top_k=16, layers="28,30")

Two passes over SRC:
  1. cluster: for each layer to permute, read only its gate weight (the gate rows of a fused gate/up tensor,
     ``emoe_llm.arch``), run ``emoe.cluster_labels`` (same seed and
     same input dtype as ``apply_emoe`` on the loaded model, so the result is identical) and keep the labels (d_ff
     int64) on disk in the workspace;
  2. write: one output shard per input shard, same names; every tensor is streamed through in 64 MB chunks (cast if
     ``dtype`` asks), except the neuron-indexed MLP tensors of permuted layers, which are read one at a time,
     permuted with ``index_select`` and written from memory.
Peak memory is therefore about one layer's clustering working set, whatever the model size. Everything goes into
``.<DST>.emoe-partial`` beside DST and is renamed onto DST at the very end; finished layers and shards are recorded
there so ``resume=True`` continues an interrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import emoe
from .errors import ConversionError
from .names import check_mlp_layout, mlp_tensor_names, source_layout
from .safetensors_io import DTYPE_CODES, OutputEntry, ShardWriter
from .source import SAFE_INDEX, SAFE_SINGLE, SourceCheckpoint, check_required_tensors, open_source
from .workspace import Workspace

OUTPUT_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUMMARY_FILE = "emoe_conversion.json"


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    n_experts: int,
    top_k: int,
    layers,
    permute_layers=None,
    seed: int = 0,
    method: str = "kmeans",
    n_init: int = 3,
    max_iter: int = 30,
    device: str = "cpu",
    dtype: str = "keep",
    overwrite: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    on_step: Callable[[str, dict], None] | None = None,
    source_record: dict | None = None,
) -> dict:
    """Convert the dense checkpoint SRC into the EMoE checkpoint DST (see module docstring).

    Args:
        layers: EMoE layers ("28,30", "28:2", "all" or a list); they go into config.json's ``emoe.layers``.
        permute_layers: the layers to cluster and permute (same forms as ``layers``; default: ``layers``), recorded
            as ``emoe.permuted_layers``. "all" lets the EMoE layer set be changed later without re-converting.
        device: where to cluster ("cpu", "cuda", "cuda:1"); weights are streamed on CPU either way.
        dtype: "keep" the stored dtypes, or cast floating tensors to "bf16" / "fp16" / "fp32" (clustering always
            runs in fp32 on the stored values).
        overwrite: replace a non-empty DST (only once the new one is complete).
        resume: continue the partial conversion an interrupted run left beside DST.
        allow_pickle: accept ``pytorch_model*.bin`` (loaded with ``torch.load(weights_only=True)``).
        on_step: called as ``on_step("layer"|"shard", info)`` after each layer/shard is safely recorded.
        source_record: where SRC came from (``hub.Resolved.record()``: the Hub id and commit), kept in the summary
            and in the resume key, so a partial conversion of one commit is never finished from another.

    Returns:
        The summary dict, also written to ``DST/emoe_conversion.json``.

    Raises:
        ConversionError: bad input or options; DST is left untouched and no partial output remains.
    """
    start = time.perf_counter()
    log = _logger(progress)
    if not Path(src).is_dir():
        open_source(src)  # raises, with the download hint when SRC looks like a Hub id (before resolve() hides it)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    _check_paths(src, dst, overwrite=overwrite)
    if dtype not in OUTPUT_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got '{dtype}'")
    if method not in emoe.CLUSTER_METHODS:
        raise ConversionError(f"method must be one of {', '.join(emoe.CLUSTER_METHODS)}, got '{method}'")
    for name, value in (("n_init (k-means restarts)", n_init), ("max_iter (k-means iterations)", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # before the partial dir exists
            raise ConversionError(f"{name} must be a positive integer, got {value!r}")
    _check_device(device)
    source = open_source(src, allow_pickle=allow_pickle)
    settings = _plan(source, n_experts=n_experts, top_k=top_k, layers=layers, permute_layers=permute_layers,
                     seed=seed, method=method)
    out_dtype = OUTPUT_DTYPES[dtype]
    key = {
        "src": str(src), "src_files": source.files_signature(), "n_experts": n_experts, "seed": seed,
        "method": method, "n_init": n_init, "max_iter": max_iter, "permuted_layers": settings.permuted_layers,
        "dtype": dtype, "device": str(device), "source": source_record or {"path": str(src)},
    }
    try:
        ws = Workspace.open(dst, key, resume=resume, log=log)
    except OSError as e:  # read-only or full filesystem, no permission: nothing was started
        raise ConversionError(os_error_message(e, dst.parent)) from None
    try:
        _check_disk_space(source, ws, out_dtype)
    except ConversionError:
        _keep_or_discard(ws)
        raise
    counters = {"bytes_read": 0}
    try:
        _cluster_layers(source, ws, settings, n_init=n_init, max_iter=max_iter, device=device, progress=progress,
                        counters=counters, on_step=on_step)
        settings.clustering = {k: ws.layers[k] for k in sorted(ws.layers, key=int)}
        counters["cluster_seconds"] = time.perf_counter() - start
        out_bytes = _write_shards(source, ws, settings, out_dtype, progress=progress, counters=counters,
                                  on_step=on_step)
        counters["write_seconds"] = time.perf_counter() - start - counters["cluster_seconds"]
        _write_metadata_files(source, ws, settings, out_dtype, out_bytes)
        summary = _summary(source, dst, settings, dtype, counters, out_bytes, start)
        summary["source"] = source_record or {"path": str(src)}
        (ws.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        ws.finalize(dst, overwrite=overwrite)
    except ConversionError:
        ws.discard()  # bad input found mid-way: nothing here is worth resuming
        raise
    except OSError as e:  # disk full, filesystem turned read-only, quota: finished shards stay for --resume
        kept = _keep_or_discard(ws)
        raise ConversionError(
            os_error_message(e, ws.path) + (f"; finished work is kept in {ws.path}: fix this, then rerun with --resume"
                                            if kept else "")
        ) from None
    except BaseException:
        ws.release()
        log(f"conversion stopped; finished work is kept in {ws.path}; rerun with --resume to continue")
        raise
    return summary


def _keep_or_discard(ws: Workspace) -> bool:
    """Release the lock, keeping the workspace only if it holds finished layers/shards worth a --resume."""
    if ws.layers or ws.shards:
        ws.release()
        return True
    ws.discard()
    return False


def os_error_message(e: OSError, where: Path) -> str:
    """One line for a failed write: which path, what the filesystem said, what to do."""
    path = e.filename or where
    what = {
        errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }.get(e.errno, e.strerror or str(e))
    hint = {
        errno.ENOSPC: "free space there", errno.EDQUOT: "free space there",
        errno.EROFS: "choose a DST on a writable filesystem", errno.EACCES: "choose a DST you can write",
        errno.EPERM: "choose a DST you can write",
    }.get(e.errno, "check the destination filesystem")
    return f"cannot write {path}: {what} ({hint})"


# --- checks and plan ------------------------------------------------------------------------------------------------

def _check_paths(src: Path, dst: Path, *, overwrite: bool) -> None:
    if src == dst or src in dst.parents or dst in src.parents:
        raise ConversionError(f"DST {dst} must not be SRC {src}, inside it, or contain it")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"DST {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(
            f"DST {dst} is not empty; pass --overwrite to replace it (after the new one is done), "
            "or check it with `emoe-llm verify SRC DST`"
        )
    if not dst.parent.is_dir():
        raise ConversionError(f"the parent directory of DST ({dst.parent}) does not exist")


def _check_disk_space(source: SourceCheckpoint, ws: Workspace, out_dtype) -> None:
    # Fail in the first second rather than after an hour of writing a 65 GB model into a full disk.
    todo = sum(
        sum(OutputEntry(n, _out_dtype_code(m, out_dtype), m.shape).nbytes for n, m in source.tensors.items()
            if m.shard == shard)
        for shard in source.shards if output_shard_name(shard) not in ws.shards
    )
    free = shutil.disk_usage(ws.path).free
    if todo > free:
        raise ConversionError(
            f"not enough disk space beside DST: the conversion still needs {todo / 2**30:.2f} GiB, "
            f"{ws.path.parent} has {free / 2**30:.2f} GiB free"
        )


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConversionError(f"invalid device '{device}': {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConversionError(f"device '{device}' requested but CUDA is not available; use --device cpu")


def _plan(source: SourceCheckpoint, *, n_experts, top_k, layers, permute_layers, seed, method) -> emoe.EMoESettings:
    config = source.config
    if config.get("emoe"):
        raise ConversionError(f"{source.root / 'config.json'} already has an 'emoe' block: SRC is already converted")
    n_layers = config["num_hidden_layers"]
    try:
        layer_list = emoe.parse_layer_spec(layers, n_layers)
        permuted = emoe.parse_layer_spec(permute_layers, n_layers) if permute_layers is not None else list(layer_list)
        missing = sorted(set(layer_list) - set(permuted))
        if missing:
            raise ValueError(f"EMoE layers {missing} are not in permute_layers {permuted}: every EMoE layer must be "
                             "clustered")
        emoe.validate_settings(n_experts=n_experts, top_k=top_k, layers=layer_list, d_ff=config["intermediate_size"],
                               n_layers=n_layers, model_type=config.get("model_type"))
    except ValueError as e:
        raise ConversionError(f"{source.root}: {e}") from None
    check_mlp_layout(source, permuted)
    check_required_tensors(source)
    return emoe.EMoESettings(n_experts=n_experts, top_k=top_k, layers=layer_list, permuted_layers=permuted, seed=seed,
                             method=method)


# --- pass 1: clustering ---------------------------------------------------------------------------------------------

def _cluster_layers(source, ws: Workspace, settings, *, n_init, max_iter, device, progress, counters, on_step):
    todo = [i for i in settings.permuted_layers if not ws.has_layer(i)]
    bar = _bar(progress, total=len(settings.permuted_layers), initial=len(settings.permuted_layers) - len(todo),
               desc="clustering", unit="layer")
    for layer in todo:
        gate = _read_gate(source, layer)  # stored dtype, as apply_emoe sees it after from_pretrained(dtype="auto")
        counters["bytes_read"] += gate.numel() * gate.element_size()
        labels, stats = emoe.cluster_labels(gate, settings.n_experts, seed=settings.seed, method=settings.method,
                                            n_init=n_init, max_iter=max_iter, device=device)
        del gate
        ws.save_layer(layer, labels, stats)
        bar.update(1)
        bar.set_postfix_str(f"layer {layer} inertia {stats.get('inertia', '-')}")
        if on_step is not None:
            on_step("layer", {"layer": layer, **stats})
    bar.close()


def _read_gate(source: SourceCheckpoint, layer: int) -> torch.Tensor:
    """(d_ff, d) gate rows of one layer: the whole gate tensor, or the first half of a fused gate/up tensor."""
    names = mlp_tensor_names(layer, source)
    if "gate" in names:
        return source.read(names["gate"])
    return source.read(names["gate_up"])[: source.config["intermediate_size"]].clone()


# --- pass 2: shards -------------------------------------------------------------------------------------------------

def output_shard_name(shard: str) -> str:
    """Output file for an input weight file: safetensors names are kept; pickle ones become safetensors."""
    if shard.endswith(".safetensors"):
        return shard
    stem = shard[: -len(".bin")] if shard.endswith(".bin") else shard
    return stem.replace("pytorch_model", "model", 1) + ".safetensors"


def _out_dtype_code(meta, out_dtype: torch.dtype | None) -> str:
    return DTYPE_CODES[out_dtype] if out_dtype is not None and meta.is_floating else meta.dtype


def _write_shards(source, ws: Workspace, settings, out_dtype, *, progress, counters, on_step) -> dict[str, int]:
    """Write every output shard not already in the workspace; returns {shard: data bytes}."""
    layout = source_layout(source)
    permuted = {}  # tensor name -> (layer, role)
    for layer in settings.permuted_layers:
        for role, name in mlp_tensor_names(layer, source).items():
            permuted[name] = (layer, role)
    total = sum(m.nbytes for m in source.tensors.values())
    bar = _bar(progress, total=total, desc="writing", unit="B", unit_scale=True, unit_divisor=1024)
    data_bytes = {}
    for shard in source.shards:
        names = source.names_in(shard)
        out_name = output_shard_name(shard)
        metas = [source.tensors[n] for n in names]
        entries = [OutputEntry(m.name, _out_dtype_code(m, out_dtype), m.shape) for m in metas]
        data_bytes[out_name] = sum(e.nbytes for e in entries)
        shard_in_bytes = sum(source.tensors[n].nbytes for n in names)
        if out_name in ws.shards:
            bar.update(shard_in_bytes)
            continue
        bar.set_postfix_str(out_name)
        labels_cache: dict[int, torch.Tensor] = {}
        with ShardWriter(ws.tmp_shard_path(out_name), entries) as writer:
            for name in writer.order:
                meta = source.tensors[name]
                if name in permuted:
                    layer, role = permuted[name]
                    if layer not in labels_cache:
                        labels_cache[layer] = emoe.expert_permutation(ws.load_labels(layer), settings.n_experts)
                    index = layout.neuron_index(role, labels_cache[layer])
                    tensor = source.read(name).index_select(layout.neuron_axis(role), index)
                    writer.write_tensor(name, tensor if out_dtype is None or not meta.is_floating
                                        else tensor.to(out_dtype))
                    del tensor
                else:
                    writer.write_chunks(name, source.iter_bytes(name, out_dtype if meta.is_floating else None))
                counters["bytes_read"] += meta.nbytes
                bar.update(meta.nbytes)
        size = ws.commit_shard(out_name)
        if on_step is not None:
            on_step("shard", {"shard": out_name, "bytes": size})
    bar.close()
    return data_bytes


# --- config, index, other files, summary ----------------------------------------------------------------------------

def _write_metadata_files(source, ws: Workspace, settings, out_dtype, data_bytes: dict[str, int]) -> None:
    config = dict(source.config)
    config["emoe"] = settings.to_dict()
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    (ws.path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards = [output_shard_name(s) for s in source.shards]
    if len(shards) > 1 or shards[0] != SAFE_SINGLE:
        metadata = {**source.index_metadata, "total_size": sum(data_bytes.values())}
        weight_map = {n: output_shard_name(m.shard) for n, m in sorted(source.tensors.items())}
        (ws.path / SAFE_INDEX).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")
    for name in source.other_files():
        shutil.copy2(source.root / name, ws.path / name)
    for sub in sorted(p.name for p in source.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        source.notes.append(f"subdirectory {sub}/ of SRC was not copied (e.g. original/ consolidated weights)")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image so far.

    Linux: VmHWM from /proc/self/status, the high-water mark of this address space (getrusage's maxrss would also
    count the parent's RSS at fork time). Elsewhere: getrusage (macOS reports bytes, others KiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _summary(source, dst: Path, settings, dtype: str, counters, data_bytes, start) -> dict:
    return {
        "src": str(source.root),
        "dst": str(dst),
        "source_format": source.format,
        "dtype": dtype,
        "emoe": settings.to_dict(),
        "seconds": round(time.perf_counter() - start, 3),
        "cluster_seconds": round(counters["cluster_seconds"], 3),  # this run only (a resumed run skips done layers)
        "write_seconds": round(counters["write_seconds"], 3),
        "bytes_read": counters["bytes_read"],
        "bytes_written": sum(data_bytes.values()),
        "shards": len(data_bytes),
        "peak_rss_bytes": peak_rss_bytes(),
        "inertia": {k: v.get("inertia") for k, v in settings.clustering.items()},
        "notes": source.notes,
    }


def format_summary(summary: dict) -> str:
    """The human-readable end-of-run report."""
    gib = 1024**3
    e = summary["emoe"]
    lines = [
        f"converted {summary['src']} -> {summary['dst']} in {summary['seconds']:.1f} s "
        f"(clustering {summary['cluster_seconds']:.1f} s, writing {summary['write_seconds']:.1f} s)",
        f"  EMoE: {e['n_experts']} experts, top-{e['top_k']}, layers {e['layers']}; "
        f"clustered+permuted {len(e['permuted_layers'])} layers ({e['method']}, seed {e['seed']})",
        f"  read {summary['bytes_read'] / gib:.2f} GiB, wrote {summary['bytes_written'] / gib:.2f} GiB "
        f"in {summary['shards']} shard(s), dtype {summary['dtype']}, "
        f"peak RSS {summary['peak_rss_bytes'] / gib:.2f} GiB",
        "  clustering inertia per layer: "
        + ", ".join(f"{k}: {v:.4g}" if isinstance(v, (int, float)) else f"{k}: -"
                    for k, v in summary["inertia"].items()),
    ]
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def _logger(progress: bool):
    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)
    return log


def _bar(progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, file=sys.stderr, dynamic_ncols=True, **kwargs)
