"""The source checkpoint: find its weight files, check them, and hand out single tensors on demand.

Supported layouts (HF ``save_pretrained``):
  - ``model.safetensors.index.json`` + shards, or a single ``model.safetensors``;
  - ``pytorch_model.bin[.index.json]`` only with ``allow_pickle=True``; loaded with ``torch.load(weights_only=True,
    mmap=True)``, one shard at a time (the memory bound is then one *shard*, not one layer).
Everything is validated before anything is written: a missing/corrupt shard or an index pointing at a missing file
fails here, naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConversionError
from .safetensors_io import (
    CHUNK_BYTES, DTYPE_CODES, DTYPES, TensorInfo, iter_tensor_bytes, read_header, read_tensor, tensor_bytes,
)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Files that are weights (never copied through as "other files"): the converter writes its own.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shard: str  # file name (relative to the checkpoint dir)
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def is_floating(self) -> bool:
        return DTYPES[self.dtype].is_floating_point


@dataclass
class SourceCheckpoint:
    root: Path
    config: dict
    format: str  # "safetensors" | "pickle"
    shards: list[str]  # weight files in order
    tensors: dict[str, TensorMeta]  # name -> meta, in the source's order (shard, then offset)
    index_metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)
    _pickle_cache: tuple[str, dict] | None = field(default=None, repr=False)

    def names_in(self, shard: str) -> list[str]:
        return [n for n, m in self.tensors.items() if m.shard == shard]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in memory, in its stored dtype."""
        if self.format == "safetensors":
            return read_tensor(self._infos[name])
        return self._pickle_shard(self.tensors[name].shard)[name].clone()

    def iter_bytes(self, name: str, out_dtype: torch.dtype | None = None) -> Iterator[memoryview]:
        """One tensor's bytes in bounded chunks (cast to ``out_dtype`` if given)."""
        if self.format == "safetensors":
            yield from iter_tensor_bytes(self._infos[name], out_dtype)
            return
        t = self._pickle_shard(self.tensors[name].shard)[name]
        step = max(1, CHUNK_BYTES // t.element_size())
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), step):
            part = flat[i:i + step]
            yield tensor_bytes(part if out_dtype is None else part.to(out_dtype))

    def files_signature(self) -> dict[str, list[int]]:
        """{file: [size, mtime_ns]} of config + weight files: resume only reuses work made from the same SRC."""
        out = {}
        for name in ["config.json", *self.shards]:
            st = (self.root / name).stat()
            out[name] = [st.st_size, st.st_mtime_ns]
        return out

    def other_files(self) -> list[str]:
        """Top-level non-weight files to copy through (tokenizer, generation config, README, ...)."""
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.name != "config.json" and not p.name.endswith(WEIGHT_SUFFIXES):
                out.append(p.name)
        return out

    def _pickle_shard(self, shard: str) -> dict:
        # Keep one shard loaded at a time (mmap-backed when the file is in the zip format).
        if self._pickle_cache is None or self._pickle_cache[0] != shard:
            self._pickle_cache = None
            self._pickle_cache = (shard, _torch_load(self.root / shard))
        return self._pickle_cache[1]


def open_source(path: str | os.PathLike, *, allow_pickle: bool = False) -> SourceCheckpoint:
    """Locate and validate a local HF checkpoint directory (see module docstring)."""
    root = Path(path)
    if not root.is_dir():
        hint = (" (a Hub id? emoe-llm convert and verify fetch one; or download it: hf download ID --local-dir DIR)"
                if not root.exists() and str(path).count("/") == 1 else "")
        raise ConversionError(f"SRC {root} is not a directory (expected a local HF checkpoint dir){hint}")
    config = load_config(root)
    if (root / SAFE_INDEX).is_file():
        weight_map, index_meta = _load_index(root / SAFE_INDEX)
        return _open_safetensors(root, config, weight_map, index_meta)
    if (root / SAFE_SINGLE).is_file():
        return _open_safetensors(root, config, None, {})
    pickle_files = [f for f in (PICKLE_INDEX, PICKLE_SINGLE) if (root / f).is_file()]
    if pickle_files:
        if not allow_pickle:
            raise ConversionError(
                f"{root} holds only pickle weights ({pickle_files[0]}); pickle files can run code when loaded, so "
                "they are refused. Pass --allow-pickle to load them with torch.load(weights_only=True), or convert "
                "the checkpoint to safetensors first"
            )
        return _open_pickle(root, config)
    raise ConversionError(
        f"{root}: no weights found: expected {SAFE_INDEX} or {SAFE_SINGLE} (or {PICKLE_SINGLE} with --allow-pickle)"
    )


def load_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise ConversionError(f"{root} is not an HF checkpoint dir: {path} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot parse: {e}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    for key in ("num_hidden_layers", "intermediate_size", "hidden_size"):
        if not isinstance(config.get(key), int):
            raise ConversionError(f"{path}: '{key}' is missing or not an integer; is this a decoder-only LM config?")
    return config


def _load_index(path: Path) -> tuple[dict[str, str], dict]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{path}: not a valid index (need a JSON object with 'weight_map'): {e!r}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{path}: 'weight_map' is empty or not an object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise ConversionError(f"{path}: tensor '{name}' maps to an invalid shard name {shard!r}")
    return weight_map, index.get("metadata") or {}


def _open_safetensors(root: Path, config: dict, weight_map: dict[str, str] | None, index_meta: dict
                      ) -> SourceCheckpoint:
    if weight_map is None:
        shards = [SAFE_SINGLE]
    else:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            names = [n for n, s in weight_map.items() if s == missing[0]]
            raise ConversionError(
                f"{root / SAFE_INDEX} points at missing file {missing[0]} (holding {len(names)} tensors, e.g. "
                f"'{names[0]}'); the checkpoint download is incomplete"
            )
    infos: dict[str, TensorInfo] = {}
    notes = []
    for shard in shards:
        header, _ = read_header(root / shard)
        wanted = header.keys() if weight_map is None else [n for n, s in weight_map.items() if s == shard]
        absent = [n for n in wanted if n not in header]
        if absent:
            raise ConversionError(
                f"{root / SAFE_INDEX} says '{absent[0]}' is in {shard}, but that shard does not contain it "
                f"({len(absent)} such tensors); the index and shards do not belong together"
            )
        # A tensor stored in a shard but missing from the index is still loaded by transformers 5 (it reads every
        # shard's header), so dropping it would change the model: copy it through and list it in DST's index.
        unlisted = [n for n in header if weight_map is not None and n not in weight_map]
        if unlisted:
            notes.append(f"{shard}: {len(unlisted)} tensor(s) not listed in the index were copied through and added "
                         f"to DST's index (e.g. '{unlisted[0]}')")
        for name in sorted([*wanted, *unlisted], key=lambda n: header[n].start):  # file order: sequential reads
            infos[name] = header[name]
    tensors = {n: TensorMeta(n, i.path.name, i.dtype, i.shape) for n, i in infos.items()}
    return SourceCheckpoint(root, config, "safetensors", shards, tensors, index_meta, notes, _infos=infos)


def _open_pickle(root: Path, config: dict) -> SourceCheckpoint:
    if (root / PICKLE_INDEX).is_file():
        weight_map, index_meta = _load_index(root / PICKLE_INDEX)
        shards = sorted(set(weight_map.values()))
    else:
        weight_map, index_meta, shards = None, {}, [PICKLE_SINGLE]
    tensors: dict[str, TensorMeta] = {}
    for shard in shards:
        if not (root / shard).is_file():
            raise ConversionError(f"{root / PICKLE_INDEX} points at missing file {shard}")
        state = _torch_load(root / shard)
        wanted = list(state) if weight_map is None else [n for n, s in weight_map.items() if s == shard]
        for name in wanted:
            t = state.get(name)
            if not isinstance(t, torch.Tensor):
                raise ConversionError(f"{root / shard}: tensor '{name}' is missing or not a tensor")
            if t.dtype not in DTYPE_CODES:
                raise ConversionError(f"{root / shard}: tensor '{name}' has unsupported dtype {t.dtype}")
            tensors[name] = TensorMeta(name, shard, DTYPE_CODES[t.dtype], tuple(t.shape))
        del state
    return SourceCheckpoint(root, config, "pickle", shards, tensors, index_meta)


def check_required_tensors(source: SourceCheckpoint) -> None:
    """Every parameter and persistent buffer the architecture in config.json declares is in the checkpoint.

    The model is built on the meta device (no memory, no weights), so this costs the same for 7B as for a tiny model.
    A config transformers cannot instantiate is left to the MLP layout checks.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**{k: v for k, v in source.config.items() if k != "emoe"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - unknown architecture: nothing to compare against
        return
    params = {n for n, _ in model.named_parameters()}  # tied weights appear once, under their first name
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    required = params | (set(model.state_dict()) - all_params)
    missing = sorted(required - set(source.tensors))
    if missing:
        raise ConversionError(
            f"{source.root}: {len(missing)} tensor(s) that {config.model_type} needs are not in its weight files, "
            f"e.g. '{missing[0]}'; the checkpoint is incomplete (re-download it)"
        )


def _torch_load(path: Path) -> dict:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a loadable weights file"
        raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state
