"""The wheels that scripts/gpu_check.sh installs on the GPU machine, which reaches no package registry.

The target GPU image (Python 3.12, torch 2.11 + CUDA 13, transformers, peft, pyarrow, ...) lacks deepspeed, datasets and bitsandbytes and a few of their dependencies. They travel as wheels in a gitignored
folder (default .whl/) next to the working tree:

    python scripts/gpu_wheels.py fetch [DIR]    # download (cp312 manylinux x86_64) + build deepspeed + slim bnb
    python scripts/gpu_wheels.py check [DIR]    # every wheel present once, valid zip, installable on the device

Versions: the ones installed in this venv (the versions the CPU suite runs), except bitsandbytes (not installed on a
CPU box: BNB_VERSION). ``deepspeed`` is an sdist on PyPI: ``pip wheel --no-deps`` builds a pure-Python wheel here
(its CUDA ops JIT-compile with the device's nvcc if ever needed; ZeRO-3 with torch's fused AdamW needs none).
The bitsandbytes wheel carries one native library per CUDA/ROCm/XPU version (43 MB); only the CPU and CUDA 13.x ones
are kept (the target's torch is a CUDA 13 build), so all wheels plus the repo stay under a 64 MiB transfer budget.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".whl"
TARGET_PYTHON = (3, 12)  # python3 on the target GPU image (Python 3.12.3)
TARGET_GLIBC = (2, 35)  # conservative: the image's glibc is at least this (Ubuntu 24.04 ships 2.39)
BNB_VERSION = "0.50.2"
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # native libraries kept in the slimmed bnb wheel
TRAVEL_LIMIT = 64 * 2**20  # transfer budget for the working tree + wheels copied to the GPU machine

# distribution name -> why it travels (all of them are missing from the device image)
REQUIRED = {
    "deepspeed": "ZeRO-3 training",
    "hjson": "deepspeed dependency",
    "pydantic": "deepspeed dependency",
    "pydantic_core": "pydantic dependency (native, cp312)",
    "annotated_types": "pydantic dependency",
    "typing_inspection": "pydantic dependency",
    "datasets": "the recipe's data pipeline",
    "dill": "datasets dependency",
    "multiprocess": "datasets dependency (py312 build)",
}
OPTIONAL = {"bitsandbytes": "QLoRA (lora.quantize=4bit); its gpu test is skipped without it"}
# Packages the target GPU image already has, as normalised names: every
# dependency of a carried wheel must be carried or be one of these.
IMAGE_PACKAGES = set("""
accelerate aiohttp attrs certifi charset-normalizer einops filelock fsspec hf-xet httpx huggingface-hub jinja2 msgpack
ninja numpy nvidia-ml-py packaging pandas peft pillow protobuf psutil py-cpuinfo pyarrow pytest pyyaml regex requests
safetensors sentencepiece tensorboard tiktoken tokenizers torch tqdm transformers triton typing-extensions urllib3
xxhash
""".split())


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_tags() -> set:
    """Wheel tags pip on the device (CPython 3.12, x86_64 manylinux, glibc >= TARGET_GLIBC) accepts."""
    from packaging import tags

    major, minor = TARGET_PYTHON
    plats = [f"manylinux_{TARGET_GLIBC[0]}_{m}_x86_64" for m in range(TARGET_GLIBC[1], 4, -1)]
    plats += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    cp = f"cp{major}{minor}"
    out = set(tags.cpython_tags((major, minor), abis=[cp, "abi3", "none"], platforms=plats))
    out |= set(tags.compatible_tags((major, minor), interpreter=cp, platforms=plats))
    return out


def wheel_requirements(path: Path) -> list[str]:
    """Requires-Dist names of a wheel, without the ones behind an ``extra`` marker."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.append(norm(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip(), maxsplit=1)[0]))
    return names


def travel_bytes(repo: Path) -> int:
    """Bytes of what is copied to the GPU machine: tracked + untracked-not-ignored files (symlinks count as links)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for rel in filter(None, out.decode().split("\0")):
        p = repo / rel
        if p.is_symlink():
            continue
        if p.is_file():
            total += p.stat().st_size
    return total


def check(wheel_dir: Path, *, repo: Path | None = REPO, require_optional: bool = False) -> list[str]:
    """Problems with ``wheel_dir`` (empty list: good). Prints one line per wheel."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    problems = []
    if not wheel_dir.is_dir():
        return [f"{wheel_dir}: no such folder (run `make gpu-wheels` or `python scripts/gpu_wheels.py fetch`)"]
    accepted = device_tags()
    found: dict[str, list[Path]] = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        try:
            name, version, _, wheel_tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename as e:
            problems.append(f"{path.name}: not a valid wheel file name ({e})")
            continue
        found.setdefault(norm(name), []).append(path)
        if not wheel_tags & accepted:
            problems.append(f"{path.name}: tags {sorted(str(t) for t in wheel_tags)} do not install on the device "
                            f"(CPython {TARGET_PYTHON[0]}.{TARGET_PYTHON[1]}, manylinux x86_64)")
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    problems.append(f"{path.name}: corrupt member {bad}")
                if not any(n.endswith(".dist-info/METADATA") for n in z.namelist()):
                    problems.append(f"{path.name}: no .dist-info/METADATA")
        except zipfile.BadZipFile as e:
            problems.append(f"{path.name}: not a zip archive ({e})")
            continue
        print(f"  ok {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
    for name, why in {**REQUIRED, **(OPTIONAL if require_optional else {})}.items():
        if norm(name) not in found:
            problems.append(f"missing wheel: {name} ({why})")
    for name in OPTIONAL:
        if norm(name) not in found and not require_optional:
            print(f"  note: no {name} wheel: {OPTIONAL[name]}")
    for name, paths in found.items():
        if len(paths) > 1:
            problems.append(f"{len(paths)} wheels of {name} ({', '.join(p.name for p in paths)}): keep one, two "
                            "versions stop the whole install")
    carried = set(found)
    for name, paths in found.items():
        if len(paths) != 1:
            continue
        try:
            reqs = wheel_requirements(paths[0])
        except (zipfile.BadZipFile, StopIteration):
            continue
        missing = [r for r in reqs if r not in carried and r not in IMAGE_PACKAGES]
        if missing:
            problems.append(f"{paths[0].name} needs {missing}: neither carried nor in the device image")
    if repo is not None:
        wheels = sum(p.stat().st_size for p in wheel_dir.glob("*.whl"))
        tree = travel_bytes(repo)
        print(f"  travel size: wheels {wheels / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
              f"{(wheels + tree) / 2**20:.1f} MiB (limit {TRAVEL_LIMIT // 2**20} MiB)")
        if wheels + tree > TRAVEL_LIMIT:
            problems.append(f"wheels + working tree = {(wheels + tree) / 2**20:.1f} MiB, over the transfer budget of "
                            f"{TRAVEL_LIMIT // 2**20} MiB")
    return problems


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_wheel(path: Path, keep_native) -> Path:
    """Rewrite ``path`` without the native libraries that ``keep_native`` rejects (RECORD updated to match)."""
    tmp = path.with_suffix(".slim-tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = [i for i in src.infolist() if not (i.filename.endswith(".so") and not keep_native(i.filename))]
        record_name = next(i.filename for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info.filename == record_name:
                continue
            data = src.read(info)
            dst.writestr(info, data)
            lines.append(_record_line(info.filename, data))
        lines.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(lines) + "\n")
    tmp.replace(path)
    return path


PIP_PLATFORM = ["--python-version", f"{TARGET_PYTHON[0]}.{TARGET_PYTHON[1]}", "--implementation", "cp",
                *[a for n in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                              "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
                  for a in ("--platform", n)]]


def fetch(wheel_dir: Path, *, with_bnb: bool = True) -> None:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for old in wheel_dir.glob("*.whl"):
        old.unlink()  # one version of each: start clean
    pins = [f"{name}=={metadata.version(name)}" for name in REQUIRED if name != "deepspeed"]
    if with_bnb:
        pins.append(f"bitsandbytes=={BNB_VERSION}")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *PIP_PLATFORM, "-d", str(wheel_dir),
                    *pins], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
                    f"deepspeed=={metadata.version('deepspeed')}"], check=True)
    for bnb in wheel_dir.glob("bitsandbytes-*.whl"):
        before = bnb.stat().st_size
        slim_wheel(bnb, lambda member: bool(BNB_KEEP.search(member)))
        print(f"slimmed {bnb.name}: {before / 2**20:.1f} -> {bnb.stat().st_size / 2**20:.1f} MiB (kept CPU + CUDA 13)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["fetch", "check"])
    p.add_argument("dir", nargs="?", default=str(DEFAULT_DIR), help="wheel folder (default: .whl in the repo)")
    p.add_argument("--no-bnb", action="store_true", help="fetch: skip bitsandbytes (QLoRA test then skips)")
    p.add_argument("--require-bnb", action="store_true", help="check: a bitsandbytes wheel must be there")
    p.add_argument("--no-size-check", action="store_true", help="check: skip the 64 MiB travel-size check")
    args = p.parse_args(argv)
    wheel_dir = Path(args.dir)
    if args.command == "fetch":
        fetch(wheel_dir, with_bnb=not args.no_bnb)
    problems = check(wheel_dir, repo=None if args.no_size_check else REPO, require_optional=args.require_bnb)
    for line in problems:
        print(f"wheel check: {line}", file=sys.stderr)
    print(f"wheel check: {'FAILED' if problems else 'ok'} ({wheel_dir})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
