"""A real, throw-away Slurm cluster for the tests: slurmctld + N emulated nodes (one slurmd each) + munged, from the
Debian packages, all on this machine, driven by tools/slurm_local.sh.

    with SlurmCluster(tmp_dir, nodes=2) as cluster:          # installs the packages first when missing (apt, root)
        out = cluster.run(["sbatch", "--wait", "slurm/local_cpu.sh"])

Nodes are n1..nN; each slurmd runs in its own mount + UTS namespace, so inside a job `hostname` is the node name and
n1..nN resolve (to 127.0.0.1). The daemons are stopped by the PIDs the script recorded, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "tools" / "slurm_local.sh"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (the reason says why); tests skip on it."""


def slurm_installed() -> bool:
    return all(shutil.which(d, path=SBIN_PATH) for d in DAEMONS)


def ensure_slurm_installed(timeout: float = 900) -> None:
    """apt-get install slurmctld slurmd slurm-client munge when missing (CI machines start bare)."""
    if slurm_installed():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm packages are missing and installing them needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("the Slurm packages are missing and there is no apt-get to install them")
    proc = subprocess.run(["bash", str(SLURM_LOCAL), "install"], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": SBIN_PATH})
    if proc.returncode != 0 or not slurm_installed():
        raise RuntimeError(f"installing Slurm failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")


def _free_port_block(n: int, start: int = 16817, stop: int = 30000, step: int = 97) -> int:
    """First port p in [start, stop) such that p .. p+n-1 can all be bound on 127.0.0.1 right now."""
    for base in range(start, stop, step):
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in [{start}, {stop})")


def clean_env(**extra: str) -> dict:
    """os.environ without the SLURM_* of any outer job, plus the python of this test run first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), SBIN_PATH])
    env.update(extra)
    return env


class SlurmCluster:
    """Start/stop a local cluster under ``base_dir`` (config, state, logs, pid files, munge key)."""

    def __init__(self, base_dir: str | os.PathLike, *, nodes: int = 2, cpus_per_node: int = 2):
        self.dir = Path(base_dir)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.conf = self.dir / "etc" / "slurm.conf"
        self.script_env: dict = {}

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        ensure_slurm_installed()
        base = _free_port_block(self.nodes + 1)
        self.script_env = clean_env(
            SLURM_LOCAL_DIR=str(self.dir), SLURM_LOCAL_NODES=str(self.nodes),
            SLURM_LOCAL_CPUS=str(self.cpus_per_node), SLURM_LOCAL_CTLD_PORT=str(base),
            SLURM_LOCAL_SLURMD_PORT=str(base + 1),
        )
        proc = self._script("start", timeout=120)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"starting the local Slurm cluster failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return self

    def daemon_pids(self) -> dict[str, int]:
        run = self.dir / "run"
        return {f.name.removesuffix(".ci.pid"): int(f.read_text()) for f in sorted(run.glob("*.ci.pid"))
                if f.read_text().strip().isdigit()}

    def stop(self) -> dict[str, int]:
        """Stop every daemon by its recorded PID; returns the PIDs that were running (for the caller to check)."""
        pids = self.daemon_pids() if (self.dir / "run").is_dir() else {}
        if self.script_env:
            self._script("stop", timeout=120)
        return pids

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _script(self, action: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SLURM_LOCAL), action], capture_output=True, text=True,
                              timeout=timeout, env=self.script_env)

    # -- client commands ------------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict:
        """Environment for sbatch/squeue/scancel against this cluster (jobs inherit it: sbatch --export=ALL)."""
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, args: list[str], *, timeout: float = 60, check: bool = True, **env_extra: str):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=self.env(**env_extra))
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                               f"{self.diagnostics()}")
        return proc

    def hosts_mode(self) -> str:
        f = self.dir / "run" / "hosts_mode"
        return f.read_text().strip() if f.exists() else "unknown"

    def diagnostics(self, lines: int = 30) -> str:
        """Tails of the daemon logs, for failure messages."""
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)


def pid_alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
