"""Read and write the safetensors format tensor by tensor with plain file I/O, never holding a whole shard.

The format is an 8-byte little-endian header length, a JSON header
``{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [start, end]}, "__metadata__": {..}}`` and the raw
tensor bytes. We parse it ourselves instead of going through ``safe_open``: its mmap keeps every page it touches
resident (and counted in RSS) until the file is closed, while ``readinto`` a buffer we own, then dropping it, keeps
the converter's memory bounded by what it holds on purpose. Page cache is not RSS.

Measured (``python benchmarks/convert_memory.py --readers``, BENCHMARKS.md §3): reading every byte of a 3.09 GiB,
7-shard checkpoint costs 0.13 GiB above the imports with this reader and 0.56 GiB (1.01x the largest shard) with
``safe_open`` + ``get_tensor``; with the 5 GB shards HF writes for 30B models that is ~5 GB per process.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 64 << 20  # copy-through granularity: bounded memory, large enough for full disk bandwidth
_MAX_HEADER_BYTES = 100 << 20  # same limit as the safetensors library


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code ("BF16"), shape and absolute byte range in the file."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_floating(self) -> bool:
        return self.torch_dtype.is_floating_point


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate one safetensors file's header: ({name: TensorInfo}, metadata).

    Raises ConversionError naming the file when it is truncated, not safetensors, or inconsistent.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ConversionError(f"{path}: corrupt safetensors file: only {size} bytes, no header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ConversionError(
                    f"{path}: corrupt safetensors file: header length {header_len} does not fit in a {size}-byte file"
                )
            header_bytes = f.read(header_len)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read shard: {e}") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors file: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry, data_start: int, file_size: int) -> TensorInfo:
    def bad(why: str) -> ConversionError:
        return ConversionError(f"{path}: corrupt safetensors file: tensor '{name}' {why}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("has no dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise bad(f"has unsupported dtype '{dtype}'")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected or begin < 0:
        raise bad(f"spans {end - begin} bytes but shape {shape} of {dtype} needs {expected}")
    if data_start + end > file_size:
        raise bad(f"ends at byte {data_start + end} but the file has only {file_size} bytes (truncated?)")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Load one tensor into memory we own (one copy, no mmap)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        with open(info.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:
            raise ConversionError(f"{info.path}: truncated: tensor '{info.name}' has {got} of {info.nbytes} bytes")
    return buf.view(info.torch_dtype).reshape(info.shape)


def iter_tensor_bytes(info: TensorInfo, out_dtype: torch.dtype | None = None, chunk_bytes: int = CHUNK_BYTES
                      ) -> Iterator[memoryview]:
    """Yield a tensor's raw bytes in bounded chunks, optionally cast to ``out_dtype`` chunk by chunk."""
    src_dtype = info.torch_dtype
    cast = out_dtype is not None and out_dtype != src_dtype
    step = max(src_dtype.itemsize, chunk_bytes // src_dtype.itemsize * src_dtype.itemsize)  # whole elements
    buf = torch.empty(min(step, info.nbytes), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(info.path, "rb") as f:
        f.seek(info.start)
        pos = info.start
        while pos < info.end:
            n = min(step, info.end - pos)
            got = f.readinto(view[:n])
            if got != n:
                raise ConversionError(f"{info.path}: truncated: tensor '{info.name}' ends early at byte {pos + got}")
            pos += n
            if cast:
                yield memoryview(buf[:n].view(src_dtype).to(out_dtype).view(torch.uint8).numpy())
            else:
                yield view[:n]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes (works for bf16, which numpy cannot represent)."""
    t = tensor.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class OutputEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class ShardWriter:
    """Write one safetensors file whose tensors (names, dtypes, shapes, order) are fixed up front.

    The header is written first; tensor bytes then stream in, in the declared order, from chunks or from tensors.
    Entries are stored largest itemsize first so every tensor stays aligned to its element size, as the safetensors
    library does. Use as a context manager; the file is complete only after ``close()`` checked every byte arrived.
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[OutputEntry], metadata: dict | None = None):
        self.path = Path(path)
        ordered = sorted(entries, key=lambda e: -DTYPES[e.dtype].itemsize)  # stable: keeps source order otherwise
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for e in ordered:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.order = [e.name for e in ordered]
        self._sizes = {e.name: e.nbytes for e in ordered}
        self._next = 0
        self.data_bytes = offset
        self._file = open(self.path, "wb")
        try:
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.bytes_written = 8 + len(raw)

    def write_chunks(self, name: str, chunks: Iterable[memoryview | bytes]) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path}: tensors must be written in header order: got '{name}', "
                               f"expected {expected}")
        written = 0
        for chunk in chunks:
            self._file.write(chunk)
            written += len(chunk)
        if written != self._sizes[name]:
            raise RuntimeError(f"{self.path}: tensor '{name}': wrote {written} bytes, header says {self._sizes[name]}")
        self.bytes_written += written
        self._next += 1

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.write_chunks(name, [tensor_bytes(tensor)])

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            if self._next != len(self.order):
                raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # a half-written shard is worth nothing and may fill the disk: remove it
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(self.path)  # write() errors (ENOSPC) name no file; the user needs to know which
            self._file.close()
            self.path.unlink(missing_ok=True)
