"""Stop requests: what makes every rank checkpoint the current step and exit 0 (recipe.stop_vote / preempt).

A rank asks to stop when

  * it gets SIGTERM, SIGUSR1 or SIGINT (the handler only sets a flag; the loop looks at it once per optimizer step).
    After the first SIGINT, SIGINT is back to its default action, so a second Ctrl-C kills the process at once --
    even while it is blocked in a collective, where a Python handler would only run once the collective returns;
  * ``{output_dir}/STOP`` exists (the Slurm scripts' trap touches it: a file on the shared dir reaches every node);
  * the file named by ``EMOE_LLM_STOP_FILE`` exists: ``emoe-llm train`` runs the launcher in a process group of its own
    and turns a signal it gets into this file, so neither the launcher nor its children see the signal (launch.py
    answers one by killing the ranks 30 s later and exiting 1);
  * a launcher process above it is gone. DeepSpeed's runner forwards signals only for multi-node runs: a SIGTERM
    to a bare ``deepspeed`` ends the runner alone, and its launch.py and ranks used to train on to the end. Each
    rank remembers its launcher ancestors (deepspeed runner, deepspeed.launcher.launch, torchrun, emoe-llm) at
    start and checks once per step that they are still there. Ancestors that are not launchers (a shell, nohup,
    srun) are not watched: a logout must not stop a run.

DataLoader workers (``init_dataloader_worker``, their ``worker_init_fn``) ignore all three signals: a signal to the
process group reaches them too, and a worker that died of it took its rank down ("DataLoader worker (pid ...) is
killed by signal: Terminated") instead of letting the rank checkpoint. Their parent decides when they end. When
the parent is killed outright (SIGKILL, the OOM killer), the worker's fd-passing thread (multiprocessing's
resource_sharer) loses its peer mid-handshake; that ConnectionError is the rank's death, already reported by the
survivors in one line, so the worker drops it instead of printing a traceback, and exits with its parent.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_FILE_ENV = "EMOE_LLM_STOP_FILE"
# command-line fragments that mark a launcher process (argv elements, matched by suffix)
_LAUNCHER_ARGS = ("bin/deepspeed", "deepspeed.launcher.launch", "deepspeed.launcher.runner", "bin/torchrun",
                  "torch.distributed.run", "bin/emoe-llm")


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """The stop signals are the rank's business, not its workers'."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def init_dataloader_worker(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: ignore the stop signals; a helper thread whose peer (the rank) went away ends
    quietly (torch's worker loop notices the dead parent by itself and exits)."""
    import threading

    ignore_stop_signals(worker_id)
    default_hook = threading.excepthook

    def drop_lost_peer(args):
        if not issubclass(args.exc_type, (ConnectionError, EOFError)):
            default_hook(args)

    threading.excepthook = drop_lost_peer


def launcher_ancestors(pid: int | None = None) -> list:
    """psutil.Process objects of the launchers directly above ``pid`` (this process): the chain of parents as long as
    each is a launcher (deepspeed: launch.py, then the runner; torchrun: itself)."""
    try:
        import psutil  # a DeepSpeed dependency
    except ImportError:
        return []
    out = []
    try:
        proc = psutil.Process(pid or os.getpid()).parent()
        while proc is not None and _is_launcher(proc.cmdline()):
            out.append(proc)
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    return out


def _is_launcher(cmdline: list[str]) -> bool:
    return any(arg == name or arg.endswith(name) for arg in cmdline[:4] for name in _LAUNCHER_ARGS) or \
        any(arg in ("deepspeed", "torchrun", "emoe-llm") for arg in cmdline[:2])


def _gone(proc) -> bool:
    import psutil

    try:  # is_running compares the start time too (a reused pid is not our launcher); a zombie has exited
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class StopRequest:
    """Installed by ``setup`` on every rank; ``local()`` is polled once per optimizer step."""

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        external = os.environ.get(STOP_FILE_ENV)
        self.external_file = Path(external) if external else None
        self.signal_name: str | None = None
        self.launchers = launcher_ancestors()
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum, frame):
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C aborts at once, no checkpoint

    def reason(self) -> str | None:
        """Why this rank wants to stop, or None."""
        if self.signal_name is not None:
            return self.signal_name
        if self.stop_file.exists():
            return "STOP file"
        if self.external_file is not None and self.external_file.exists():
            return (self.external_file.read_text().strip() or "a signal") + " to emoe-llm train"
        gone = next((p for p in self.launchers if _gone(p)), None)
        if gone is not None:
            return f"launcher pid {gone.pid} exited"
        return None

    def local(self) -> bool:
        return self.reason() is not None

    def restore(self) -> None:
        """Put back the handlers found at start (an in-process run must not leave its handlers behind)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
