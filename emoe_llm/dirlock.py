"""One writer per directory: an exclusive ``flock`` on ``DIR/.emoe-lock``, held for the life of the process.

Two training runs (or two studies) into one directory both used to run: every step logged twice, both rotating the
same ``step_*`` dirs (one deleting the other's checkpoint mid-write), both writing ``final/`` and ``COMPLETED``. Now
the second one is refused before it does any work, with one line naming the directory and the holder (pid, host,
start time, read back from the lock file, where the holder wrote them).

Why flock and not "create the file exclusively": the kernel drops a flock when its holder dies, kill -9 included, so
a lock left behind by a dead run is simply taken over (its file is still there, with the dead holder's details,
which are reported). On a filesystem without flock (some NFS mounts) the run goes on unlocked and says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".emoe-lock"


class DirBusyError(Exception):
    """Another live process holds the directory's lock (exit 2: the message says what to do)."""


class DirLock:
    """An exclusive lock on ``path / LOCK_NAME``. ``acquire`` creates ``path`` (``created`` says whether it did)."""

    def __init__(self, path: str | os.PathLike, *, what: str):
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self.what = what  # "output_dir" / "study dir": how the refusal names the directory
        self.fd: int | None = None
        self.created = False
        self.previous: dict | None = None  # the holder recorded in a lock taken over from a dead process

    def acquire(self) -> DirLock:
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirBusyError(f"{self.what} {self.path} is in use by another run ({describe(holder)}; lock "
                               f"{self.file}): wait for it to end, stop it, or use another {self.what}") from None
        except OSError as e:  # no flock on this filesystem: better an unlocked run than none
            os.close(fd)
            print(f"[emoe-llm] warning: cannot lock {self.file} ({e.strerror}); running without the one-run-per-"
                  f"{self.what} guard", flush=True)
            return self
        self.previous = _read_holder(fd) or None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # rewritten in place, under the lock: a second run reads who holds it (no rename: the lock is on this inode)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (the file stays: removing it would race with a run opening it to lock it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
