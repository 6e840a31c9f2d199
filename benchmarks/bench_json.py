"""What every benchmark adds for scripts/gpu_check.sh: ``--json OUT`` (the figures plus machine, date and versions, in
one file written atomically) and ``--print-config`` (parse the command line, print the resolved settings as JSON, exit:
how ``gpu_check.sh --dry-run`` proves a GPU command line is valid on a CPU machine)."""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `python benchmarks/x.py` from anywhere

from emoe_llm.fileio import atomic_write_text  # noqa: E402


def add_json_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="also write the results (and machine, date, versions) to OUT")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as JSON and exit (checks a command line without running it)")


def print_config_and_exit(args: argparse.Namespace) -> None:
    """For --print-config: the resolved arguments as one JSON line, then exit 0."""
    print(json.dumps({k: v for k, v in sorted(vars(args).items())}, default=str))
    raise SystemExit(0)


def environment(device: torch.device | str | None = None) -> dict:
    device = torch.device(device) if device is not None else torch.device("cpu")
    env = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    for name in ("transformers", "deepspeed"):
        mod = sys.modules.get(name)
        if mod is not None:
            env[name] = getattr(mod, "__version__", None)
    return env


def write_json(path: str | None, payload: dict, device=None) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"environment": environment(device), **payload}, indent=2, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)  # stdout ends with the figure line
