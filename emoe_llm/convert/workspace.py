"""The temp dir a conversion writes into, its resume manifest, and the final atomic rename onto DST.

Layout of ``.<DST name>.emoe-partial/`` (beside DST, so the final ``rename`` stays on one filesystem):
    emoe_partial.json          manifest: what SRC/options this work belongs to, finished layers and shards
    labels/layer_<i>.safetensors   expert label of every neuron of a finished layer (d_ff int64)
    <shard>.safetensors        finished output shards (written as <shard>.tmp, renamed when complete)
The manifest is rewritten atomically after every finished layer or shard, so whatever point a Ctrl-C hits,
``--resume`` redoes at most the one step that was running.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConversionError

MANIFEST = "emoe_partial.json"
MANIFEST_FORMAT = 1


def partial_dir_for(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.emoe-partial"


class Workspace:
    """A partial conversion on disk: ``key`` identifies SRC + the options that change the output weights."""

    def __init__(self, path: Path, key: dict):
        self.path = path
        self.key = key
        self.layers: dict[str, dict] = {}  # "28" -> clustering stats
        self.shards: dict[str, int] = {}  # output shard -> size in bytes
        self._lock = None

    @classmethod
    def open(cls, dst: Path, key: dict, *, resume: bool, log=print) -> "Workspace":
        """Start a fresh workspace, or with ``resume`` pick up the finished steps of a matching one.

        Holds an exclusive lock on DST until ``finalize``/``discard``/``release``: two jobs converting into the same
        DST (a Slurm job submitted twice) must not write the same files.
        """
        lock = _lock_dst(dst)
        try:
            ws = cls._open_locked(dst, key, resume=resume, log=log)
        except BaseException:
            _unlock(lock)
            raise
        ws._lock = lock
        return ws

    @classmethod
    def _open_locked(cls, dst: Path, key: dict, *, resume: bool, log) -> "Workspace":
        path = partial_dir_for(dst)
        if path.exists():
            manifest = _read_manifest(path)
            if resume and manifest is not None:
                if manifest.get("key") != key:
                    raise ConversionError(_mismatch_message(path, manifest.get("key") or {}, key))
                for stale in [*path.glob("*.tmp"), *path.glob("labels/*.tmp")]:
                    stale.unlink()  # a write a hard kill interrupted: it only takes disk space from the space check
                ws = cls(path, key)
                ws.layers = dict(manifest.get("layers", {}))
                ws.shards = {s: n for s, n in manifest.get("shards", {}).items() if _has_size(path / s, n)}
                log(f"resuming {path}: {len(ws.layers)} layers clustered, {len(ws.shards)} shards written")
                return ws
            if manifest is None and any(path.iterdir()):
                raise ConversionError(f"{path} exists but is not an emoe-llm partial conversion; remove it yourself")
            log(f"removing the earlier partial conversion {path}" + ("" if resume else " (pass --resume to reuse it)"))
            shutil.rmtree(path)
        elif resume:
            log(f"nothing to resume at {path}; starting from scratch")
        path.mkdir(parents=True)
        (path / "labels").mkdir()
        ws = cls(path, key)
        ws.save()
        return ws

    def save(self) -> None:
        data = {"format": MANIFEST_FORMAT, "key": self.key, "layers": self.layers, "shards": self.shards}
        tmp = self.path / (MANIFEST + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
        except OSError as e:  # disk full: name the file (write errors carry none)
            e.filename = e.filename or str(tmp)
            raise
        os.replace(tmp, self.path / MANIFEST)

    # --- layers -------------------------------------------------------------------------------------------------
    def labels_path(self, layer: int) -> Path:
        return self.path / "labels" / f"layer_{layer}.safetensors"

    def has_layer(self, layer: int) -> bool:
        return str(layer) in self.layers and self.labels_path(layer).is_file()

    def save_layer(self, layer: int, labels: torch.Tensor, stats: dict) -> None:
        tmp = self.labels_path(layer).with_suffix(".tmp")
        save_file({"labels": labels.to(torch.int64).contiguous()}, str(tmp))
        os.replace(tmp, self.labels_path(layer))
        self.layers[str(layer)] = stats
        self.save()

    def load_labels(self, layer: int) -> torch.Tensor:
        return load_file(str(self.labels_path(layer)))["labels"]

    # --- shards -------------------------------------------------------------------------------------------------
    def tmp_shard_path(self, shard: str) -> Path:
        return self.path / (shard + ".tmp")

    def commit_shard(self, shard: str) -> int:
        final = self.path / shard
        os.replace(self.tmp_shard_path(shard), final)
        self.shards[shard] = final.stat().st_size
        self.save()
        return self.shards[shard]

    # --- the end ------------------------------------------------------------------------------------------------
    def finalize(self, dst: Path, *, overwrite: bool) -> None:
        """Move the finished conversion onto DST in one rename, then drop the bookkeeping.

        The manifest goes last, so a crash at any point here leaves either a resumable workspace or a complete DST.
        """
        shutil.rmtree(self.path / "labels")  # a resume without them only re-clusters (has_layer checks the files)
        old = None
        if dst.exists():
            if any(dst.iterdir()):
                if not overwrite:  # re-checked: DST may have appeared while we worked
                    raise ConversionError(f"DST {dst} is not empty; pass --overwrite to replace it")
                old = dst.parent / f".{dst.name}.emoe-old"
                if old.exists():
                    shutil.rmtree(old)
                os.rename(dst, old)
            else:
                dst.rmdir()
        os.rename(self.path, dst)
        _fsync_dir(dst.parent)
        (dst / MANIFEST).unlink()
        if old is not None:
            shutil.rmtree(old)
        self.release()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Let another run use this DST (the partial work, if any, stays for --resume)."""
        _unlock(self._lock)
        self._lock = None


def _lock_dst(dst: Path):
    import fcntl

    path = dst.parent / f".{dst.name}.emoe-lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConversionError(f"another emoe-llm convert is writing {dst} right now (lock {path} is held)") from None
        except OSError:
            return fd, path  # filesystem without flock support (some NFS mounts): go on unlocked
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, path
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder unlinked the file between our open and flock: lock the new one


def _unlock(lock) -> None:
    if lock is not None:
        fd, path = lock
        path.unlink(missing_ok=True)  # while still holding it, so no one locks a file about to vanish
        os.close(fd)


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _mismatch_message(path: Path, old: dict, new: dict) -> str:
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return (
        f"cannot resume {path}: it was made from a different SRC or with different options "
        f"({'; '.join(diffs)[:500]}). Rerun without --resume to start over"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
