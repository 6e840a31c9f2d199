"""What the checkpoint manifest costs: sha256 of a checkpoint's files vs writing them (emoe_llm/train/checkpoint.py).

    python benchmarks/checkpoint_hash.py                 # 1 GiB in 4 shard files under $TMPDIR
    python benchmarks/checkpoint_hash.py --gib 4 --files 8 --dir /scratch/x

Writes ``--files`` tensors with torch.save (how DeepSpeed writes its shards), then times ``_hash_share`` -- what one
rank runs in ``write_manifest``: its share of the files, ``HASH_THREADS`` at a time -- as 1 rank (every file) and
as 2 ranks (half each, one after the other; on a real node they run at once, on separate cores). The files were
just written, so they are read back from the page cache, as right after a save.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from emoe_llm.train import checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt-hash-", dir=args.dir))
    try:
        numel = int(args.gib * 2**30 / 4 / args.files)
        tensors = [torch.randn(numel) for _ in range(args.files)]  # made before the clock starts
        t0 = time.perf_counter()
        for i, t in enumerate(tensors):
            torch.save({"state": t}, root / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt")
        write_s = time.perf_counter() - t0
        del tensors
        names = checkpoint.manifest_files(root)
        gib = sum((root / n).stat().st_size for n in names) / 2**30
        t0 = time.perf_counter()
        checkpoint._hash_share(root, names, rank=0, world=1)
        one_rank_s = time.perf_counter() - t0
        shares = []
        for r in range(2):
            t0 = time.perf_counter()
            checkpoint._hash_share(root, names, rank=r, world=2)
            shares.append(time.perf_counter() - t0)
        two_rank_s = max(shares)  # ranks hash their shares at the same time
        print(f"{gib:.2f} GiB in {len(names)} files: torch.save {write_s:.2f} s ({gib / write_s:.2f} GiB/s); sha256, "
              f"1 rank x {checkpoint.HASH_THREADS} threads: {one_rank_s:.2f} s ({gib / one_rank_s:.2f} GiB/s, "
              f"{one_rank_s / gib:.2f} s/GiB, {one_rank_s / write_s:.0%} of the write); 2 ranks: the slower half "
              f"{two_rank_s:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
