"""Give back the shared-memory segment DeepSpeed's CPU comm op leaves behind.

When every rank is on one machine, DeepSpeed's CPU communication op (csrc/cpu/comm/shm.cpp) creates
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (~67 MB) per rank and never unlinks
it. /dev/shm is RAM: every CPU run leaked 67 MB per rank until reboot, and a test suite's worth of runs filled the
machine until the OOM killer took a rank mid-step. Once ``init_distributed`` has returned on every rank, each rank has
mapped all its peers' segments, so after a barrier each rank removes its own name; the memory stays mapped and is
freed when the last rank exits, crash or not.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def deepspeed_shm_segment(rank: int) -> Path:
    """The name shm.cpp gives this rank's segment (uid, MASTER_ADDR, MASTER_PORT and the global rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm() -> None:
    """Collective: call on every rank right after ``deepspeed.init_distributed``."""
    if not dist.is_initialized():
        return
    dist.barrier()  # every rank has opened its peers' segments
    deepspeed_shm_segment(dist.get_rank()).unlink(missing_ok=True)
