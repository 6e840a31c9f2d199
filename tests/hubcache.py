"""A Hugging Face Hub cache built on disk, the layout huggingface_hub's `snapshot_download` writes and reads: blobs/
(content), snapshots/<commit>/ (symlinks to the blobs) and refs/main (the commit main points at). With HF_HOME at its
parent and HF_HUB_OFFLINE=1 the real `snapshot_download` resolves ids from it, no network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def make_hub_cache(cache: Path, repo_id: str, files: dict, *, repo_type: str = "model", commit: str = "a" * 40,
                   main: bool = True) -> Path:
    """Put ``files`` ({relative path: bytes or a file to copy}) into the cache as ``repo_id`` at ``commit``; with
    ``main`` refs/main points at it. Returns the snapshot dir."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, target.parent), target)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snap


def cache_checkpoint(cache: Path, repo_id: str, checkpoint: Path, **kwargs) -> Path:
    """A local checkpoint dir (every top-level file) as a Hub model repo in the cache."""
    return make_hub_cache(cache, repo_id, {f.name: f for f in Path(checkpoint).iterdir() if f.is_file()}, **kwargs)
