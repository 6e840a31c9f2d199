"""``emoe-llm train``: start the training recipe under the DeepSpeed launcher (or torchrun) on this node.

    emoe-llm train --nproc 2 --config configs/tiny_cpu.yaml train.max_steps=10
    emoe-llm train --nproc 8 --ds_config ds_configs/z3_offload.json --config configs/llama2_7b_emoe.yaml
    emoe-llm train --launcher torchrun --nproc 8 --config ... --dry-run     # print the command only

becomes ``deepspeed --num_gpus N --master_port P --module emoe_llm.train --ds_config ... --config ... key=value``
(the installed package, no repo checkout needed). ``--nproc 1`` needs no launcher: it runs the recipe as one process
(``env RANK=0 WORLD_SIZE=1 ... python -m emoe_llm.train ...``), ~7 s sooner on 2 cores than the deepspeed launcher,
which imports DeepSpeed twice, in two processes, before the first rank starts. For several nodes use the Slurm
scripts in ``slurm/``.

Kept on purpose, and kept thin: it only fills in ``--nproc`` (all visible GPUs, or 2 CPU ranks) and a free
``--master_port``, prints the launcher command, and runs ``deepspeed`` / ``torchrun`` (for one process it ``exec``s
the recipe in its place), and ``--dry-run`` shows the plain command to run by hand. The recipe never re-launches
itself: ``deepspeed ... train.py`` and ``torchrun ... train.py`` work the same.

What it adds around a launcher is signals (``supervise``): the launcher runs in a process group of its own, and
SIGTERM, SIGINT or SIGUSR1 to ``emoe-llm train`` (or to its process group: Ctrl-C, ``kill -TERM -PGID``) becomes the
stop file named in ``EMOE_LLM_STOP_FILE``, which every rank polls once per step (stop.py): they checkpoint that step
and exit 0, the launcher exits 0, and so does this command. Sent to the launcher itself, DeepSpeed's single-node
runner would die alone and launch.py would kill the ranks 30 s after a signal and exit 1. A second SIGINT kills the
launcher and everything under it at once (no checkpoint), exit 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

PASSTHROUGH = True

_LAUNCH_HELP = """\
usage: emoe-llm train [--nproc N] [--launcher deepspeed|torchrun|none] [--master-port P] [--dry-run]
                      --config RECIPE.yaml [--ds_config DS.json] [key=value ...]

Launcher options (consumed here):
  --nproc N          processes (GPUs) on this node; default: all visible GPUs, or 2 on a CPU-only machine
  --launcher L       deepspeed (the default for 2+ processes), torchrun, or none (one process, no launcher:
                     --nproc 1 only, and its default)
  --master-port P    rendezvous port (default: a free one)
  --dry-run          print the command and exit

Everything else goes to the recipe (python -m emoe_llm.train):
  --config FILE      recipe YAML (configs/*.yaml)
  --ds_config FILE   DeepSpeed JSON (default ds_configs/z3.json)
  key=value          recipe overrides, e.g. train.lr=1e-5 model.mode=dense output_dir=runs/x resume=none
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:  # argv is passed through untouched (PASSTHROUGH)
    parser.usage = _LAUNCH_HELP


def launcher_executable(name: str) -> str:
    """``deepspeed`` / ``torchrun`` of *this* Python environment (``.venv/bin/emoe-llm`` may run without the venv on
    PATH, e.g. from ``make demo``), else the one on PATH."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else (shutil.which(name) or name)


def free_port() -> int:
    """A TCP port free right now on this host, for a --master_port (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_nproc() -> int:
    if not any(Path(dev).exists() for dev in ("/dev/nvidiactl", "/dev/kfd")):
        return 2  # no GPU driver: 2 CPU ranks, without importing torch (~2.5 s) to be told so
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2


def build_command(argv: list[str]) -> list[str]:
    """Split launcher options from recipe arguments and build the launcher command line."""
    nproc, launcher, port, rest = None, None, None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        key, _, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if key in ("--nproc", "--nproc_per_node", "--num_gpus", "--launcher", "--master-port", "--master_port"):
            value = inline or (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                raise SystemExit(f"emoe-llm train: error: {key} needs a value")
            i += 1 if inline else 2
            if key == "--launcher":
                if value not in ("deepspeed", "torchrun", "none"):
                    raise SystemExit(f"emoe-llm train: error: --launcher must be deepspeed, torchrun or none, got "
                                     f"{value}")
                launcher = value
            elif not value.isdigit() or int(value) < 1:
                raise SystemExit(f"emoe-llm train: error: {key} needs a positive integer, got {value!r}")
            elif key in ("--master-port", "--master_port"):
                port = int(value)
            else:
                nproc = int(value)
            continue
        rest.append(a)
        i += 1
    if not any(r == "--config" or r.startswith("--config=") for r in rest):
        raise SystemExit("emoe-llm train: error: --config RECIPE.yaml is required (see configs/)\n\n" + _LAUNCH_HELP)
    nproc = nproc or _default_nproc()
    port = port or free_port()
    launcher = launcher or ("none" if nproc == 1 else "deepspeed")
    if launcher == "none":
        if nproc != 1:
            raise SystemExit(f"emoe-llm train: error: --launcher none runs one process; --nproc is {nproc} (use "
                             "deepspeed or torchrun)")
        # what a launcher would set for its one rank (deepspeed.init_distributed reads them), then the recipe itself
        ranks = ["RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "LOCAL_WORLD_SIZE=1", "MASTER_ADDR=127.0.0.1",
                 f"MASTER_PORT={port}"]
        return ["env", *ranks, sys.executable, "-m", "emoe_llm.train", *rest]
    if launcher == "deepspeed":
        exe = launcher_executable("deepspeed")
        return [exe, "--num_gpus", str(nproc), "--master_port", str(port), "--module", "emoe_llm.train", *rest]
    exe = launcher_executable("torchrun")
    return [exe, "--nproc_per_node", str(nproc), "--master_port", str(port), "-m", "emoe_llm.train", *rest]


def check_args(argv: list[str]) -> None:
    """Parse a whole `emoe-llm train` command line without running it: the launcher options here, the rest with the
    recipe's own parser (SystemExit on an error, as a real run)."""
    from .recipe import parse_args

    cmd = build_command([a for a in argv if a != "--dry-run"])
    module = cmd.index("emoe_llm.train")
    parse_args(cmd[module + 1:])


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_LAUNCH_HELP)
        return 0
    dry = "--dry-run" in argv
    cmd = build_command([a for a in argv if a != "--dry-run"])
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry:
        return 0
    sys.stdout.flush()
    # This environment's tools first on the ranks' PATH, as in an activated venv: DeepSpeed JIT-builds its CPU ops with
    # the first `ninja` found, and a second ninja (a system one) rebuilds them from scratch each time it alternates.
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    if cmd[0] == "env":  # one process, no launcher: the recipe replaces us, and signals reach it directly
        os.execvp(cmd[0], cmd)
    return supervise(cmd)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, everything under it (torchrun starts its ranks in process groups of their own) and its group."""
    try:
        import psutil  # a DeepSpeed dependency
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def supervise(cmd: list[str]) -> int:
    """Run the launcher ``cmd`` in a process group of its own and turn a stop signal into the ranks' stop file (module
    docstring). Returns the launcher's exit code (128 + N when it died of signal N)."""
    from .stop import STOP_FILE_ENV, STOP_SIGNALS

    stop_file = Path(tempfile.gettempdir()) / f"emoe-llm-stop-{os.getpid()}"
    stop_file.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env={**os.environ, STOP_FILE_ENV: str(stop_file)}, start_new_session=True)
    aborted = []

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and stop_file.exists():
            print(f"[emoe-llm] second {name}: killing the launcher and every rank now (no checkpoint)", flush=True)
            aborted.append(signum)
            kill_tree(proc.pid)
            return
        tmp = stop_file.with_name(stop_file.name + ".tmp")
        tmp.write_text(name + "\n")
        os.replace(tmp, stop_file)  # a rank reads the signal's name or nothing, never half of it
        print(f"[emoe-llm] {name}: every rank checkpoints at the end of this step and exits (Ctrl-C again: abort "
              "without a checkpoint)", flush=True)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        rc = proc.wait()  # PEP 475: retried after each handled signal
    finally:
        stop_file.unlink(missing_ok=True)
    if aborted:
        return 128 + signal.SIGINT
    return rc if rc >= 0 else 128 - rc
