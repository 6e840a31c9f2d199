"""How a training run ends when something raises: one line from the rank that failed, silence from the others.

Without this, an error on one rank prints a traceback per rank and then every other rank's collective fails with
gloo's "Connection closed by peer" / NCCL noise, burying the one line that matters. Here:

  * the first rank to fail (decided atomically through the process group's TCPStore) prints
    ``[emoe-llm] error: <message>`` to stderr -- naming its rank for a crash -- and, for an unexpected exception, the
    traceback below it in the same log; a bad-input error (ConfigError, DataError, a missing file) needs no traceback;
  * every other rank exits quietly, whether it failed the same way or because its peer went away;
  * the process ends with ``os._exit`` right away: the launcher (deepspeed / torchrun / srun --kill-on-bad-exit)
    sees the non-zero exit and stops the remaining ranks; a rank on another node notices in its next collective,
    at the latest after ``train.dist_timeout_minutes``;
  * an ``output_dir`` this run created and left empty (no file written yet) is removed.

Exit codes: 2 bad input (the message says what to fix), 1 anything else.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

from emoe_llm.data import DataError, TemplateError
from emoe_llm.dirlock import LOCK_NAME, DirBusyError

from .checkpoint import CheckpointError
from .config import ConfigError

_FAILED_KEY = "emoe_llm/failed_ranks"
_created_output_dir: Path | None = None


def note_output_dir(path: Path, *, created: bool) -> None:
    """Remember an output_dir this launch created, so a failure can remove it again while it is still empty."""
    global _created_output_dir
    _created_output_dir = Path(path) if created else None


# OS errors of the machine, not of the code: a full disk, a read-only or forbidden path, a quota. The message names
# the path (OSError's filename, or ours: checkpoint.save_checkpoint says what was kept), so no traceback.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# what a collective raises on the surviving ranks when a peer died (kill -9, OOM killer): the dead rank's log or the
# launcher says why; the survivors' traceback only buries it
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
             "NCCL communicator was aborted", "Connection refused")


def is_input_error(e: BaseException) -> bool:
    """Errors whose message alone tells the user what to fix (the traceback would only hide it)."""
    if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS:
        return True
    return isinstance(e, (ConfigError, DataError, TemplateError, FileNotFoundError, DirBusyError,
                          CheckpointError))


def is_peer_gone(e: BaseException) -> bool:
    """A collective failed because another rank went away (not this rank's fault)."""
    return isinstance(e, (RuntimeError, OSError, ConnectionError)) and any(m in str(e) for m in PEER_GONE)


def handle_failure(e: BaseException) -> int:
    """Report ``e`` as described in the module docstring; returns the exit code when no process group is up (before
    ``init_distributed`` every rank fails the same way and rank 0 alone speaks); otherwise does not return."""
    code = 2 if is_input_error(e) else 1
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if int(os.environ.get("RANK", "0")) == 0:
            _report(e, rank=None, code=code)
            _remove_empty_output_dir()  # rank 0 may have created it (to lock it) before the process group was up
        return code
    rank = dist.get_rank()
    if _first_to_fail():
        _report(e, rank=rank, code=code)
        _remove_empty_output_dir()
    else:
        if rank == 0:
            _remove_empty_output_dir()
        # Let the launcher see the failing rank's exit (and code) first: it reports whichever exit it polls first.
        time.sleep(3)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: destroying a process group whose peers are gone can hang or spam


def _first_to_fail() -> bool:
    """True for exactly one rank: the first whose failure reached the store. A rank that cannot reach the store any
    more (rank 0, its host, is gone) is not first: rank 0 failed before it and reported."""
    # c10d logs a failed store call (peer gone) to fd 2 with a C++ stack: that is exactly the noise to avoid here.
    saved_stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        store = _get_default_store()
        store.set_timeout(timedelta(seconds=30))
        return store.add(_FAILED_KEY, 1) == 1
    except Exception:  # noqa: BLE001 - store unreachable: its host (rank 0) died first
        return False
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)


def _report(e: BaseException, *, rank: int | None, code: int) -> None:
    message = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS and e.filename and str(e.filename) not in message:
        message = f"{e.strerror}: {e.filename}"
    if code == 1 and is_peer_gone(e):
        where = f"rank {rank}" if rank is not None else "this rank"
        print(f"[emoe-llm] error ({where}): another rank went away during a collective "
              f"({next(m for m in PEER_GONE if m in str(e))}); its own log or the launcher's says why",
              file=sys.stderr, flush=True)
        return
    if code == 1:  # an unexpected exception: say where, and keep the traceback below the one line
        message = f"{type(e).__name__}: {message}"
    where = f" (rank {rank})" if rank is not None and code == 1 else ""
    print(f"[emoe-llm] error{where}: {message}", file=sys.stderr, flush=True)
    if code == 1:
        print("".join(traceback.format_exception(e)).rstrip(), file=sys.stderr, flush=True)


def _remove_empty_output_dir() -> None:
    path = _created_output_dir
    if path is None or not path.is_dir():
        return
    if any((p.is_file() or p.is_symlink()) and p.name != LOCK_NAME for p in path.rglob("*")):
        return  # logs, checkpoints, a converted model: evidence worth keeping
    shutil.rmtree(path, ignore_errors=True)
