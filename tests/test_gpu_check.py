"""scripts/gpu_check.sh --dry-run on CPU: the carried wheels are checked and every step's GPU command line parses, so
the one prepared device run (issue #15) does not fail on a typo. Fake (but pip-installable) wheels stand in for the
real ones, which are downloaded by `make gpu-wheels` and never committed."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def load_script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_wheels = load_script_module("gpu_wheels")


def fake_wheel(folder: Path, name: str, version: str = "1.0", tag: str = "py3-none-any", requires=()) -> Path:
    """A minimal valid wheel (installable by pip) of a package ``name`` with one empty module."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": "",
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\n"
                                      f"Name: {name}\nVersion: {version}\n"
                                      + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = []
    for member, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def fake_wheels(folder: Path) -> Path:
    folder.mkdir()
    for name in gpu_wheels.REQUIRED:
        fake_wheel(folder, name, requires=["torch>=2.0", "packaging"] if name == "deepspeed" else ())
    return folder


@pytest.fixture
def wheels(tmp_path):
    return fake_wheels(tmp_path / "wheels")


def dry_run(results: Path, wheels: Path, *extra, script=SCRIPT, timeout=600):
    env = {**os.environ, "GPU_CHECK_REPO": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(script), str(results), "--dry-run", "--wheels", str(wheels), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_dry_run(tmp_path_factory):
    """One `--dry-run --tiny` run (a dozen Python processes), read by the two tests below: the wheel and command-line
    checks every dry run does, then the four steps at CPU size."""
    root = tmp_path_factory.mktemp("gpu_check")
    return root / "results", dry_run(root / "results", fake_wheels(root / "wheels"), "--tiny", timeout=1200)


@pytest.mark.slow
def test_dry_run_checks_wheels_and_every_step_command_line(tiny_dry_run):
    results, proc = tiny_dry_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "wheel check: ok" in out and "distributions" in out
    n_collected = int(out.split("collects ")[1].split()[0])
    assert n_collected >= 6, out  # bf16, clustering x2, recipe emoe + dense, QLoRA
    parsed = {}
    for line in out.splitlines():
        if "  parses: " in line:
            settings = json.loads(line.split("  parses: ", 1)[1])
            parsed[Path(settings["json"]).stem] = settings
    assert set(parsed) == {"step_overhead", "train_throughput", "clustering"}, out
    # the GPU sizes the issue asks for
    assert parsed["step_overhead"]["preset"] == "7b-slice" and parsed["step_overhead"]["dtype"] == "bfloat16"
    assert (parsed["step_overhead"]["hidden"], parsed["step_overhead"]["ffn"]) == (4096, 11008)
    tt = parsed["train_throughput"]
    assert (tt["preset"], tt["dtype"], tt["seq"]) == ("llama-3.2-1b", "bfloat16", 2048)
    assert tt["peak_tflops"] == 989 and tt["extra_peak_tflops"] == 790
    assert parsed["clustering"]["shapes"] == "30b" and parsed["clustering"]["devices"] == ["cuda"]
    assert "dry run ok" in out
    with tarfile.open(results / "logs.tar.gz") as tar:
        assert "logs/collect.log" in tar.getnames()


@pytest.mark.slow  # the whole script: a dozen Python processes
def test_dry_run_fails_on_a_broken_step_command_line(tmp_path, wheels):
    broken = tmp_path / "gpu_check.sh"
    text = SCRIPT.read_text()
    assert "--micro-rounds 15" in text
    broken.write_text(text.replace("--micro-rounds 15", "--micro-roundz 15"))
    proc = dry_run(tmp_path / "results", wheels, script=broken)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "command line BROKEN" in out and "--micro-roundz" in out and "dry run FAILED" in out


def test_dry_run_fails_at_once_without_wheels(tmp_path):
    proc = dry_run(tmp_path / "results", tmp_path / "nowhere", timeout=60)
    assert proc.returncode != 0
    assert "no such folder" in proc.stderr + proc.stdout and "dry run FAILED" in proc.stdout
    assert "step " not in proc.stdout  # stopped before checking any step's command line


def test_wheel_check_rejects_wrong_platform_duplicates_and_missing(tmp_path, wheels):
    assert gpu_wheels.check(wheels, repo=None) == []
    (wheels / "dill-1.0-py3-none-any.whl").unlink()
    fake_wheel(wheels, "dill", tag="cp311-cp311-manylinux_2_17_x86_64")  # the CPU box's Python, not the device's
    fake_wheel(wheels, "hjson", version="2.0")  # a second version
    fake_wheel(wheels, "datasets", tag="py3-none-macosx_11_0_arm64")
    (wheels / "multiprocess-1.0-py3-none-any.whl").unlink()
    (wheels / "garbage-1.0-py3-none-any.whl").write_text("not a zip")
    fake_wheel(wheels, "needy", requires=["left-pad>=1"])
    problems = "\n".join(gpu_wheels.check(wheels, repo=None))
    assert "dill-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: tags" in problems
    assert "2 wheels of hjson" in problems
    assert "macosx_11_0_arm64" in problems
    assert "missing wheel: multiprocess" in problems
    assert "garbage-1.0-py3-none-any.whl: not a zip" in problems
    assert "needs ['left-pad']" in problems


def test_slimmed_wheel_keeps_only_cpu_and_cuda13_libraries(tmp_path):
    path = fake_wheel(tmp_path, "bitsandbytes", tag="py3-none-manylinux_2_24_x86_64")
    with zipfile.ZipFile(path, "a") as z:
        for lib in ("cpu", "cuda121", "cuda128", "cuda130", "cuda132", "rocm64"):
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\0" * 100)
    gpu_wheels.slim_wheel(path, lambda m: bool(gpu_wheels.BNB_KEEP.search(m)))
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert z.testzip() is None
        record = z.read("bitsandbytes-1.0.dist-info/RECORD").decode()
    libs = {n.split("libbitsandbytes_")[1][:-3] for n in names if n.endswith(".so")}
    assert libs == {"cpu", "cuda130", "cuda132"}
    assert all(n in record for n in names) and "cuda121" not in record


@pytest.mark.slow
def test_dry_run_tiny_runs_every_step_through_json_and_summary(tiny_dry_run):
    """--tiny: the four steps at CPU size, each writing its JSON, then summary.json with every step's figures."""
    results, proc = tiny_dry_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["ok"] and [s["name"] for s in summary["steps"]] == ["pytest_gpu", "step_overhead",
                                                                        "train_throughput", "clustering"]
    figs = summary["figures"]
    assert figs["pytest_gpu"]["skipped"] == figs["pytest_gpu"]["total"] >= 6  # no CUDA here
    assert figs["step_overhead"]["emoe_dense_step_ratio"] > 0 and figs["step_overhead"]["target"] == 1.03
    assert figs["train_throughput"]["peak_tflops"] == 989 and set(figs["train_throughput"]["mfu"]) == {"dense", "emoe"}
    assert figs["clustering"]["seconds_per_layer"] > 0
    env = json.loads((results / "env.json").read_text())
    assert env["cuda_available"] is False and env["packages"]["torch"]
    assert sorted(p.name for p in results.iterdir()) == sorted(
        ["env.json", "summary.json", "pytest_gpu.json", "step_overhead.json", "train_throughput.json",
         "clustering.json", "logs.tar.gz"])
