"""Small file helpers shared by the commands."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, read in blocks (a checkpoint shard or a downloaded file need not fit in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def output_dir_error(path: str | os.PathLike, *, flag: str) -> str | None:
    """Why ``path`` cannot be (or become) a directory to write into, or None. Checked before any work: the nearest
    existing ancestor decides (a file there, or a directory this user cannot write, e.g. a read-only mount)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{flag} {path}: {probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK) or _read_only_mount(probe):
        return f"{flag} {path}: {probe} is not writable"
    return None


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)  # root passes os.access even on a read-only mount
    except OSError:
        return False


def write_files_atomically(out_dir: str | os.PathLike, writers: dict) -> list[Path]:
    """``writers``: {file name: fn(tmp_path)}. Every file is written under a temp name in ``out_dir`` first and all
    are renamed only once every one was written, so a failure (a full disk) leaves none of them half-written or
    mixed with an older set. The temp files, and ``out_dir`` when this call created it, are removed on failure."""
    out_dir = Path(out_dir)
    first_created = next((p for p in [out_dir, *out_dir.parents][::-1] if not p.exists()), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            tmps[name] = out_dir / f".{name}.tmp-{os.getpid()}{Path(name).suffix}"
            write(tmps[name])
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        if first_created is not None:
            import shutil

            shutil.rmtree(first_created, ignore_errors=True)
        raise
    for name, tmp in tmps.items():
        os.replace(tmp, out_dir / name)
    return [out_dir / name for name in writers]
