"""The `emoe-llm` entry point: installed console script, help, and subcommand dispatch."""

import shutil
import subprocess
import sys
from pathlib import Path

from emoe_llm.cli import SUBCOMMANDS, main


def test_console_script_help_lists_every_subcommand():
    exe = shutil.which("emoe-llm", path=str(Path(sys.executable).parent))
    assert exe, "emoe-llm console script is not installed in this environment (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert name in out.stdout


def test_unknown_subcommand_is_an_error(capsys):
    try:
        code = main(["frobnicate"])
    except SystemExit as e:  # argparse exits 2 on an invalid choice
        code = e.code
    assert code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_subcommand_module_has_the_dispatch_interface():
    import importlib

    for name, (module_name, _) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(getattr(module, "add_arguments", None)), f"{module_name}.add_arguments missing"
        assert callable(getattr(module, "run", None)), f"{module_name}.run missing"
