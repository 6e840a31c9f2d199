"""How the tests start N local ranks: the command line and the environment.

Most multi-rank tests start their ranks with ``torchrun`` (what ``emoe-llm train --launcher torchrun`` and the Slurm
scripts run): it is up in ~2 s, where the ``deepspeed`` launcher imports DeepSpeed twice, in two processes one after
the other, before the first rank starts (~7 s on 2 cores) and polls its ranks once a second. The engine is DeepSpeed
ZeRO-3 either way. The ``deepspeed`` launcher keeps its own tests: the bare ``deepspeed ... train.py`` command, the
demo (``emoe-llm train``'s default at 2 ranks), the bad-input runs a user sees through it, every run whose exit code
is asserted (torchrun turns a rank's exit code into its own 1) and every run a test kills (torchrun starts each rank
in a session of its own, out of reach of a kill of the launcher's process group).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from emoe_llm.train.launch import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def rank_command(target: str | os.PathLike, *args: str, nproc: int = 2, module: bool = False,
                 launcher: str = "torchrun") -> list[str]:
    """``torchrun --nproc_per_node N --master_port P [-m] target args`` (or the ``deepspeed`` launcher's form)."""
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port,
                *(["--module"] if module else []), str(target), *args]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port,
            *(["-m"] if module else []), str(target), *args]


def rank_env(**extra: str) -> dict:
    """This environment, the repo on PYTHONPATH (tests/dist scripts import emoe_llm), the venv's tools first on PATH
    (its ninja builds DeepSpeed's CPU op; a system ninja would rebuild it), one OpenMP thread per rank (the ranks share
    the cores; torchrun sets this, the deepspeed launcher does not, and the two must train alike)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    tools = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PATH": tools, "OMP_NUM_THREADS": "1", **extra}


def tiny_fp32_workspace(root: Path) -> tuple[Path, Path]:
    """(the tiny dense checkpoint, a ZeRO-3 JSON with bf16 off) under ``root``: what the multi-rank CPU runs train."""
    import json

    from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint

    dense = save_tiny_checkpoint(root / "tiny_dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    fp32 = json.loads((REPO / "ds_configs" / "z3.json").read_text())
    fp32["bf16"] = {"enabled": False}
    (root / "z3_fp32.json").write_text(json.dumps(fp32))
    return dense, root / "z3_fp32.json"
