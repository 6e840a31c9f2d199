"""The bad-input table: every surface (convert, verify, data, train, eval, Slurm scripts) x the bad inputs a user hits.

Each case builds a broken input in a fresh directory, runs the real command in-process (``emoe-llm ...`` through
``emoe_llm.cli.main``, ``train.py`` through ``emoe_llm.train.recipe.cli``; the Slurm scripts with bash) and asserts:
  * the message: exactly one ``error:`` line, matching the case's pattern, no traceback;
  * the exit code;
  * nothing lost: the sources hash the same before and after, no output under its final name, no partial dir or
    lock left that would block a retry;
  * the retry: after ``fix`` repairs the input, the same command succeeds (where a retry makes sense).
A couple of cases need real DeepSpeed ranks; they are at the end, marked slow.

docs/errors.md is this table (case -> message); ``python tests/test_bad_inputs.py`` prints it, and a test keeps the
two in sync.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emoe_llm.tiny import DATA_DIR  # noqa: E402

TOKENIZER = DATA_DIR / "tokenizers" / "tiny_llama3_style"
CONVERT = ["--experts", "8", "--top-k", "2", "--layers", "1,3", "--quiet"]


# ---------------------------------------------------------------------------------------------------- the table


@dataclass
class Run:
    """What a case set up: the command, what must survive it, what must not appear, how to fix the input."""

    argv: list[str]
    sources: list[Path] = field(default_factory=list)  # hashed before/after: must be untouched
    outputs: list[Path] = field(default_factory=list)  # must not exist after the failure
    fix: Callable[[], None] | None = None  # repair the input; the same argv must then succeed
    retry_argv: list[str] | None = None  # what to rerun after fix (default: argv)
    surface: str = "cli"  # cli (emoe-llm main) | train (recipe.cli) | bash (argv is a bash command line)
    env: dict = field(default_factory=dict)
    cwd: Path | None = None
    cleanup: Callable[[], None] | None = None


@dataclass
class Case:
    surface: str
    name: str
    what: str  # the bad input, in words (docs/errors.md)
    message: str  # regex the one error line must match
    code: int
    build: Callable[["World"], Run]
    slow: bool = False
    traceback: bool = False  # a crash (not bad input): the traceback follows the one line

    @property
    def id(self) -> str:
        return f"{self.surface}-{self.name}"


CASES: list[Case] = []


def case(surface: str, name: str, what: str, message: str, code: int = 2, slow: bool = False,
         traceback: bool = False):
    def register(build):
        CASES.append(Case(surface, name, what, message, code, build, slow, traceback))
        return build
    return register


# ---------------------------------------------------------------------------------------------------- fixtures


class World:
    """Per-test scratch dir plus module-wide read-only fixtures (a tiny sharded checkpoint, its conversion, MMLU)."""

    def __init__(self, tmp: Path, shared: dict):
        self.tmp = tmp
        self.shared = shared

    def src(self, name: str = "src") -> Path:
        """A private copy of the tiny dense checkpoint (100 KB shards) this test may break."""
        return Path(shutil.copytree(self.shared["dense"], self.tmp / name))

    def converted(self, name: str = "emoe") -> Path:
        return Path(shutil.copytree(self.shared["emoe"], self.tmp / name))

    def mmlu(self) -> Path:
        return Path(shutil.copytree(self.shared["mmlu"], self.tmp / "mmlu"))

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from emoe_llm.convert import convert_checkpoint
    from emoe_llm.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    dense = save_tiny_checkpoint(root / "dense", tokenizer_dir=TOKENIZER, max_shard_size="100KB", seed=5)
    emoe = root / "emoe"
    convert_checkpoint(dense, emoe, n_experts=8, top_k=2, layers="1,3", progress=False)
    mmlu = root / "mmlu"
    for sub in ("dev", "val"):
        (mmlu / sub).mkdir(parents=True)
        for subject in ("abstract_algebra", "anatomy"):
            rows = (DATA_DIR / "eval" / "mmlu" / sub / f"{subject}_{sub}.csv").read_text().splitlines(keepends=True)
            (mmlu / sub / f"{subject}_{sub}.csv").write_text("".join(rows[:3]))
    return {"dense": dense, "emoe": emoe, "mmlu": mmlu}


def tree_hash(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        # .emoe-lock: the one-run-per-dir lock (emoe_llm/dirlock.py) a run takes in its dir is not content
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and
                                                     p.name != ".emoe-lock")
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(path: Path) -> list[str]:
    """Partial conversions and locks beside an output that would block (or confuse) a retry."""
    if not path.parent.is_dir():
        return []
    return sorted(p.name for p in path.parent.iterdir()
                  if p.name.startswith(f".{path.name}.") and p.name.endswith((".emoe-partial", ".emoe-lock")))


def invoke(run: Run, capsys, argv: list[str]) -> tuple[int, str]:
    """Run the command; (exit code, everything it printed)."""
    if run.surface == "deepspeed":  # 2 real CPU ranks, as `emoe-llm train --nproc 2` runs them
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               str(REPO / "tests" / "dist" / "train_with_faults.py"), *argv]  # the recipe + monkeypatched faults
        env = {**os.environ, "PYTHONPATH": str(REPO), **run.env}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
        # the launcher's own log lines ("[2026-.. INFO] Killing subprocess ...") are not ours to judge
        ours = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("[20")]
        return proc.returncode, "\n".join(ours)
    if run.surface == "bash":
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        proc = subprocess.run(["bash", "-c", argv[0]], capture_output=True, text=True, cwd=run.cwd or REPO,
                              env={**env, **run.env}, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    with _env(run.env):
        from emoe_llm.cli import main
        from emoe_llm.train.recipe import cli as train_cli

        try:
            code = (train_cli if run.surface == "train" else main)(argv)
        except SystemExit as e:  # argparse, the train launcher
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = 2 if isinstance(e.code, str) else e.code
    out = capsys.readouterr()
    return code, out.out + out.err


@contextlib.contextmanager
def _env(extra: dict):
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"\berror\b[^:]*:|ERROR:|FAILED:", line)]


def check_case(c: Case, shared, tmp_path, capsys, monkeypatch):
    world = World(tmp_path, shared)
    world.monkeypatch = monkeypatch
    run = c.build(world)
    try:
        before = tree_hash(run.sources)
        code, output = invoke(run, capsys, run.argv)
        assert code == c.code, f"exit {code}, expected {c.code}; output:\n{output}"
        assert ("Traceback" in output) == c.traceback, output
        if c.code != 0:
            lines = error_lines(output)
            assert len(lines) == 1, f"expected one error line, got {lines}:\n{output}"
            assert re.search(c.message, lines[0]), f"{c.message!r} not in {lines[0]!r}"
            if c.traceback:  # the one line first, the traceback below it
                assert output.index(lines[0]) < output.index("Traceback"), output
            assert not re.search(r"Connection closed by peer|ProcessGroupGloo|NCCL error|TCPStore", output), output
        else:
            assert re.search(c.message, output), f"{c.message!r} not in:\n{output}"
        assert tree_hash(run.sources) == before, "a source was modified"
        for out in run.outputs:
            assert not out.exists(), f"{out} exists after a failed run: {sorted(p.name for p in out.iterdir())}"
            assert leftovers(out) == [] or c.name in RESUMABLE, f"left behind: {leftovers(out)}"
        if run.fix is not None:
            run.fix()
            code, output = invoke(run, capsys, run.retry_argv or run.argv)
            assert code == 0, f"the retry after fixing the input failed (exit {code}):\n{output}"
            for out in run.outputs:
                assert leftovers(out) == [], f"left behind after the retry: {leftovers(out)}"
    finally:
        if run.cleanup is not None:
            run.cleanup()


RESUMABLE = {"disk-full", "resume-mismatch"}  # a failure that keeps finished work beside DST on purpose, for --resume


# ---------------------------------------------------------------------------------------------------- convert


def _index(src: Path) -> dict:
    return json.loads((src / "model.safetensors.index.json").read_text())


def _shard_of(src: Path, tensor: str) -> Path:
    return src / _index(src)["weight_map"][tensor]


def _convert(w: World, src: Path, *extra: str, dst: Path | None = None) -> Run:
    dst = dst or w.tmp / "dst"
    return Run(["convert", str(src), str(dst), *CONVERT, *extra], sources=[src], outputs=[dst])


def _restore_src(w: World, src: Path) -> Callable[[], None]:
    def fix():
        shutil.rmtree(src)
        shutil.copytree(w.shared["dense"], src)
    return fix


@case("convert", "src-missing", "SRC does not exist", r"SRC .*missing-model is not a directory")
def _(w):
    run = _convert(w, w.tmp / "missing-model")
    run.sources = []
    return run


@case("convert", "hub-id-offline", "SRC is a Hub id that is not in the HF cache, with HF_HUB_OFFLINE=1",
      r"meta-llama/Llama-2-7b-hf is not a local directory, and as a Hub model id: HF_HUB_OFFLINE=1 and it is not in "
      r"the cache \(searched .*hf/hub; download it with `hf download meta-llama/Llama-2-7b-hf`")
def _(w):
    run = _convert(w, Path("meta-llama/Llama-2-7b-hf"))
    run.sources = []
    run.env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(w.tmp / "hf"), "HF_HUB_CACHE": ""}
    return run


@case("convert", "hub-revision-local", "--revision given with a local SRC dir",
      r"--revision/revision pins a Hub commit, but .*src is a local path")
def _(w):
    src = w.src()
    return _convert(w, src, "--revision", "main")


@case("convert", "no-config", "SRC has no config.json", r"config.json is missing")
def _(w):
    src = w.src()
    (src / "config.json").rename(w.tmp / "config.json.bak")
    run = _convert(w, src)
    run.fix = lambda: (w.tmp / "config.json.bak").rename(src / "config.json")
    return run


@case("convert", "config-not-json", "config.json is not JSON", r"config.json: cannot parse")
def _(w):
    src = w.src()
    (src / "config.json").write_text("{'hidden_size': 64,")
    run = _convert(w, src)
    run.fix = _restore_src(w, src)
    return run


@case("convert", "config-not-lm", "config.json lacks intermediate_size",
      r"'intermediate_size' is missing or not an int")
def _(w):
    src = w.src()
    cfg = json.loads((src / "config.json").read_text())
    del cfg["intermediate_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    return _convert(w, src)


@case("convert", "no-weights", "SRC has config.json but no weight files", r"no weights found: expected")
def _(w):
    src = w.tmp / "src"
    src.mkdir()
    shutil.copy2(w.shared["dense"] / "config.json", src)
    return _convert(w, src)


@case("convert", "index-missing-shard", "the index names a shard that is not there (incomplete download)",
      r"points at missing file model-\d{5}-of-\d{5}\.safetensors .*download is incomplete")
def _(w):
    src = w.src()
    shard = _shard_of(src, "model.layers.1.mlp.up_proj.weight")
    shard.rename(w.tmp / "shard.bak")
    run = _convert(w, src)
    run.fix = lambda: (w.tmp / "shard.bak").rename(shard)
    return run


@case("convert", "index-not-json", "model.safetensors.index.json is not JSON", r"index.json: not a valid index")
def _(w):
    src = w.src()
    (src / "model.safetensors.index.json").write_text("{")
    return _convert(w, src)


@case("convert", "index-wrong-shard", "the index puts a tensor in a shard that lacks it",
      r"says 'model.norm.weight' is in .*that shard does not contain it")
def _(w):
    src = w.src()
    index = _index(src)
    index["weight_map"]["model.norm.weight"] = next(s for s in index["weight_map"].values()
                                                    if s != index["weight_map"]["model.norm.weight"])
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return _convert(w, src)


@case("convert", "truncated-shard", "a shard is cut short",
      r"model-\d{5}-of-\d{5}\.safetensors: corrupt .* \(truncated\?\)")
def _(w):
    src = w.src()
    shard = _shard_of(src, "model.layers.3.mlp.down_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    run = _convert(w, src)
    run.fix = lambda: shard.write_bytes(data)
    return run


@case("convert", "garbage-shard", "a shard is not safetensors", r"corrupt safetensors file: header is not valid JSON")
def _(w):
    src = w.src()
    _shard_of(src, "model.embed_tokens.weight").write_bytes(b"\x10" + bytes(7) + b"not json at all!" + bytes(64))
    return _convert(w, src)


@case("convert", "empty-shard", "a shard is an empty file", r"corrupt safetensors file: only 0 bytes, no header")
def _(w):
    src = w.src()
    _shard_of(src, "model.norm.weight").write_bytes(b"")
    return _convert(w, src)


def _drop_tensor(src: Path, name: str, *, from_index: bool, from_shard: bool) -> None:
    from safetensors.torch import load_file, save_file

    shard = _shard_of(src, name)
    if from_shard:
        tensors = load_file(str(shard))
        del tensors[name]
        save_file(tensors, str(shard), metadata={"format": "pt"})
    if from_index:
        index = _index(src)
        del index["weight_map"][name]
        (src / "model.safetensors.index.json").write_text(json.dumps(index))


@case("convert", "tensor-missing", "a tensor the architecture needs is in neither index nor shards (issue #12.1)",
      r"tensor\(s\) that llama needs are not in .*'model.norm.weight'.*incomplete")
def _(w):
    src = w.src()
    _drop_tensor(src, "model.norm.weight", from_index=True, from_shard=True)
    run = _convert(w, src)
    run.fix = _restore_src(w, src)
    return run


@case("convert", "tensor-unlisted", "a tensor is in a shard but not in the index: copied through, exit 0 (#12.1)",
      r"not listed in the index were copied through", code=0)
def _(w):
    src = w.src()
    _drop_tensor(src, "model.norm.weight", from_index=True, from_shard=False)
    run = _convert(w, src)
    run.outputs = []

    def check_dst():  # DST has the tensor and its index lists it
        assert "model.norm.weight" in _index(w.tmp / "dst")["weight_map"]
    run.cleanup = check_dst
    return run


@case("convert", "mlp-names", "a non-Llama MLP (fc_in/fc_out)", r"EMoE needs a Llama-style SwiGLU MLP")
def _(w):
    from safetensors.torch import load_file, save_file

    src = w.src()
    rename = lambda n: n.replace("gate_proj", "fc_in").replace("down_proj", "fc_out")  # noqa: E731
    for shard in set(_index(src)["weight_map"].values()):
        tensors = load_file(str(src / shard))
        save_file({rename(n): t for n, t in tensors.items()}, str(src / shard), metadata={"format": "pt"})
    index = _index(src)
    index["weight_map"] = {rename(n): s for n, s in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return _convert(w, src)


@case("convert", "model-type", "an unsupported model_type", r"model_type 'gpt2' is not supported")
def _(w):
    src = w.src()
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    return _convert(w, src)


@case("convert", "already-moe", "SRC is already a mixture of experts (model_type mixtral)",
      r"model_type 'mixtral' is not supported: it is already a mixture-of-experts model")
def _(w):
    src = w.src()
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    return _convert(w, src)


@case("convert", "already-converted", "SRC is already an EMoE checkpoint", r"already has an 'emoe' block")
def _(w):
    return _convert(w, w.converted("src"))


@case("convert", "pickle", "SRC holds only pytorch_model.bin", r"only pickle weights .*--allow-pickle")
def _(w):
    import torch
    from safetensors.torch import load_file

    src = w.tmp / "pickled"
    src.mkdir()
    tensors = {}
    for shard in set(_index(w.shared["dense"])["weight_map"].values()):
        tensors.update(load_file(str(w.shared["dense"] / shard)))
    torch.save(tensors, src / "pytorch_model.bin")
    shutil.copy2(w.shared["dense"] / "config.json", src)
    run = _convert(w, src)
    run.retry_argv = [*run.argv, "--allow-pickle"]
    run.fix = lambda: None
    return run


@case("convert", "experts-divide", "--experts does not divide d_ff",
      r"n_experts=7 does not divide intermediate_size=256")
def _(w):
    run = _convert(w, w.src())
    run.argv[run.argv.index("--experts") + 1] = "7"
    run.retry_argv = _convert(w, w.tmp / "src").argv
    run.fix = lambda: None
    return run


@case("convert", "top-k", "--top-k larger than --experts", r"top_k=9 must satisfy")
def _(w):
    run = _convert(w, w.src())
    run.argv[run.argv.index("--top-k") + 1] = "9"
    return run


@case("convert", "layer-range", "--layers beyond the model's depth", r"EMoE layer 4 is out of range")
def _(w):
    run = _convert(w, w.src())
    run.argv[run.argv.index("--layers") + 1] = "4"
    return run


@case("convert", "layer-spec", "--layers is not a layer spec", r"layer")
def _(w):
    run = _convert(w, w.src())
    run.argv[run.argv.index("--layers") + 1] = "one,two"
    return run


@case("convert", "no-cuda", "--device cuda on a machine without CUDA", r"CUDA is not available; use --device cpu")
def _(w):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return _convert(w, w.src(), "--device", "cuda")


@case("convert", "dst-not-empty", "DST holds something else", r"DST .* is not empty; pass --overwrite")
def _(w):
    dst = w.tmp / "dst"
    w.file("dst/notes.txt", "mine")
    run = _convert(w, w.src(), dst=dst)
    run.sources = [w.tmp / "src", dst]  # DST's own content must survive too
    run.outputs = []
    run.retry_argv = [*run.argv, "--overwrite"]
    run.fix = lambda: None
    return run


@case("convert", "dst-is-file", "DST is a file", r"exists and is not a directory")
def _(w):
    dst = w.file("dst", "a file")
    run = _convert(w, w.src(), dst=dst)
    run.sources.append(dst)
    run.outputs = []
    return run


@case("convert", "dst-in-src", "DST inside SRC", r"must not be SRC .* inside it")
def _(w):
    src = w.src()
    return _convert(w, src, dst=src / "emoe")


@case("convert", "dst-parent-missing", "DST's parent directory does not exist", r"parent directory of DST")
def _(w):
    return _convert(w, w.src(), dst=w.tmp / "no" / "such" / "dst")


@case("convert", "locked", "another convert is writing the same DST",
      r"another emoe-llm convert is writing .* right now")
def _(w):
    import fcntl

    dst = w.tmp / "dst"
    lock = open(w.tmp / ".dst.emoe-lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    run = _convert(w, w.src(), dst=dst)
    run.outputs = []

    def fix():  # the other job ends (it removes its lock file as it unlocks)
        (w.tmp / ".dst.emoe-lock").unlink()
        lock.close()
    run.fix = fix
    return run


@case("convert", "resume-mismatch", "--resume with options other than the interrupted run's",
      r"cannot resume .*different SRC or with different options \(n_experts: 4 -> 8")
def _(w):
    from emoe_llm.convert import convert_checkpoint

    src, dst = w.src(), w.tmp / "dst"

    def stop(kind, info):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, dst, n_experts=4, top_k=2, layers="1,3", progress=False, on_step=stop)
    run = _convert(w, src, "--resume", dst=dst)
    run.outputs = [dst]
    run.retry_argv = [a for a in run.argv if a != "--resume"]  # starting over replaces the stale partial
    run.fix = lambda: None
    return run


def _mount_tmpfs(w: World, size: str) -> Path | None:
    """A small tmpfs (root only); None where mounting is not allowed (then the case simulates the error)."""
    mnt = w.tmp / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or os.environ.get("EMOE_TEST_NO_MOUNT"):  # the latter to test the fallbacks as root
        return None
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        return None
    return mnt


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@case("convert", "disk-full", "the disk fills up mid-write (ENOSPC); retry with --resume after freeing space (#12.2)",
      r"cannot write .*\.tmp: the disk is full \(free space there\); finished work "
      r"is kept in .*rerun with --resume")
def _(w):
    import emoe_llm.convert.convert as conv

    src = w.src()
    mnt = _mount_tmpfs(w, "1200k")  # the tiny model is ~2 MB: the write fails part-way
    # A disk that fills while we write (another job): the up-front space check sees enough room.
    w.monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    if mnt is None:  # no mount allowed here: the same OSError the kernel raises, from the shard writer
        from emoe_llm.convert import safetensors_io

        real = safetensors_io.ShardWriter.write_chunks
        calls = {"n": 0}

        def full(self, name, chunks):
            calls["n"] += 1
            if calls["n"] == 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, name, chunks)
        w.monkeypatch.setattr(safetensors_io.ShardWriter, "write_chunks", full)
        mnt = w.tmp / "mnt"
    dst = mnt / "dst"
    run = _convert(w, src, dst=dst)
    run.retry_argv = [*run.argv, "--resume"]

    def fix():
        partial = mnt / ".dst.emoe-partial"
        assert not list(partial.glob("*.tmp")), "a half-written shard was left in the partial dir"
        if os.path.ismount(mnt):
            subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        else:
            w.monkeypatch.undo()
    run.fix = fix
    run.cleanup = lambda: _umount(mnt)
    return run


@case("convert", "read-only-dst", "DST is on a read-only filesystem (#12.3)",
      r"cannot write .*: the filesystem is read-only \(choose a DST on a writable filesystem\)")
def _(w):
    src = w.src()
    mnt = _mount_tmpfs(w, "16m")
    if mnt is not None:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    else:
        import emoe_llm.convert.workspace as ws

        def read_only(dst):
            raise OSError(errno.EROFS, "Read-only file system", str(dst.parent / f".{dst.name}.emoe-lock"))
        w.monkeypatch.setattr(ws, "_lock_dst", read_only)
        mnt = w.tmp / "mnt"
    run = _convert(w, src, dst=mnt / "dst")

    def fix():
        if os.path.ismount(mnt):
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        else:
            w.monkeypatch.undo()
    run.fix = fix
    run.cleanup = lambda: _umount(mnt)
    return run


@case("convert", "not-enough-space", "the disk is too small from the start", r"not enough disk space beside DST")
def _(w):
    import emoe_llm.convert.convert as conv

    w.monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    run = _convert(w, w.src())
    run.fix = w.monkeypatch.undo
    return run


# ---------------------------------------------------------------------------------------------------- verify


def _verify(src: Path, dst: Path, *extra: str) -> Run:
    return Run(["verify", str(src), str(dst), "--no-logits", *extra], sources=[src, dst] if dst.exists() else [src])


@case("verify", "other-architecture", "DST was converted from another model: configs compared first (#12.4)",
      r"does not describe SRC's model: .*hidden_size: SRC 64, DST 128", code=1)
def _(w):
    from emoe_llm.convert import convert_checkpoint
    from emoe_llm.tiny import save_tiny_checkpoint

    other = save_tiny_checkpoint(w.tmp / "other", hidden_size=128, seed=1)
    convert_checkpoint(other, w.tmp / "other_emoe", n_experts=8, top_k=2, layers="1,3", progress=False)
    return _verify(w.shared["dense"], w.tmp / "other_emoe")


@case("verify", "dst-missing", "DST does not exist", r"is not a converted checkpoint \(no config.json\)", code=1)
def _(w):
    return _verify(w.shared["dense"], w.tmp / "nothing")


@case("verify", "dst-dense", "DST is a dense (unconverted) checkpoint", r"has no 'emoe' block", code=1)
def _(w):
    return _verify(w.shared["dense"], w.src("dense_copy"))


@case("verify", "dst-truncated", "one of DST's shards is truncated",
      r"DST is incomplete or corrupt: .*truncated", code=1)
def _(w):
    dst = w.converted()
    shard = _shard_of(dst, "model.layers.1.mlp.up_proj.weight")
    shard.write_bytes(shard.read_bytes()[:-64])
    return _verify(w.shared["dense"], dst)


@case("verify", "wrong-experts", "DST has other settings than asked for", r"DST has 8 experts, expected 4", code=1)
def _(w):
    return _verify(w.shared["dense"], w.shared["emoe"], "--experts", "4")


@case("verify", "src-missing", "SRC does not exist", r"SRC .* is not a directory")
def _(w):
    return _verify(w.tmp / "nothing", w.shared["emoe"])


# ---------------------------------------------------------------------------------------------------- data


def _data(path: Path, *extra: str) -> Run:
    return Run(["data", "--source", str(path), "--validate-only", *extra], sources=[path])


ALPACA = '{"instruction": "Name a colour.", "output": "Blue."}\n'


@case("data", "non-utf8-jsonl", "a .jsonl line in Latin-1 (#12.5)",
      r"bad\.jsonl: line 2: not UTF-8 text \(byte 0xe9 at column \d+\)")
def _(w):
    p = w.file("bad.jsonl", ALPACA.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n' + ALPACA.encode())
    run = _data(p)
    run.retry_argv = [*run.argv, "--skip-bad-rows"]  # skips just that line
    run.fix = lambda: None
    return run


@case("data", "non-utf8-skipped", "--skip-bad-rows skips the undecodable line, keeps the others (#12.5)",
      r"usable=2 read=3 skipped_bad_rows=1", code=0)
def _(w):
    p = w.file("bad.jsonl", ALPACA.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n' + ALPACA.encode())
    return _data(p, "--skip-bad-rows")


@case("data", "non-utf8-txt", "a .txt corpus line in Latin-1 (#12.5)", r"corpus\.txt: line 2: not UTF-8 text")
def _(w):
    return _data(w.file("corpus.txt", b"first document\nsecond caf\xe9\nthird\n"))


@case("data", "non-utf8-json", "a .json array file in Latin-1 (#12.5)", r"bad\.json: line 3: not UTF-8 text")
def _(w):
    return _data(w.file("bad.json", b'[\n {"instruction": "a", "output": "b"},\n'
                               b' {"instruction": "\xe9", "output": "c"}\n]'))


@case("data", "bad-json-line", "one .jsonl line is not JSON", r"bad\.jsonl: line 2: not valid JSON")
def _(w):
    p = w.file("bad.jsonl", ALPACA + '{"instruction": "a", "output": \n' + ALPACA)
    run = _data(p)
    run.fix = lambda: p.write_text(ALPACA * 2)
    return run


@case("data", "missing-field", "an alpaca row without output", r"line 2: missing field 'output'")
def _(w):
    return _data(w.file("bad.jsonl", ALPACA + '{"instruction": "a"}\n'))


@case("data", "unknown-role", "a ShareGPT turn from an unknown speaker", r"row 0: unknown role 'robot'")
def _(w):
    rows = [{"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    return _data(w.file("chat.json", json.dumps(rows)))


@case("data", "turn-order", "two user turns in a row", r"turns must alternate user/assistant")
def _(w):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}]
    return _data(w.file("chat.json", json.dumps(rows)))


@case("data", "empty-reply", "an empty assistant reply", r"empty response")
def _(w):
    return _data(w.file("bad.jsonl", '{"instruction": "a", "output": "  "}\n'))


@case("data", "empty-file", "an empty data file", r"empty\.jsonl: no usable rows")
def _(w):
    return _data(w.file("empty.jsonl", ""))


@case("data", "unsupported-type", "a .xlsx data file", r"unsupported file type '\.xlsx'; expected \.json")
def _(w):
    return _data(w.file("data.xlsx", b"PK\x03\x04"))


@case("data", "gzip-truncated", "a .jsonl.gz cut short (an interrupted download)", r"cut\.jsonl\.gz: cannot decompress")
def _(w):
    import gzip

    return _data(w.file("cut.jsonl.gz", gzip.compress((ALPACA * 400).encode())[:80]))


@case("data", "csv-extra-cells", "a .csv row with more cells than the header names",
      r"data\.csv: row 1: 4 cells, the header names 3")
def _(w):
    return _data(w.file("data.csv", "instruction,input,output\nhi,,there\na,b,c,d\n"))


@case("data", "dir-mixed-kinds", "a directory mixing JSON lines and CSV files",
      r"b\.csv: a CSV file in a directory of JSON files \(first: a\.jsonl\.gz\)")
def _(w):
    import gzip

    w.file("mixed/a.jsonl.gz", gzip.compress(ALPACA.encode()))
    w.file("mixed/b.csv", "instruction,input,output\nhi,,there\n")
    return _data(w.tmp / "mixed")


@case("data", "hub-dataset-offline", "a hub: data source not in the HF cache, with HF_HUB_OFFLINE=1",
      r"data source hub: org/absent is not a local directory, and as a Hub dataset id: HF_HUB_OFFLINE=1 and it is "
      r"not in the cache")
def _(w):
    cfg = w.file("recipe.yaml", "data:\n  sources: [{hub: org/absent, split: train}]\n")
    return Run(["data", "--config", str(cfg), "--validate-only"], sources=[cfg],
               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(w.tmp / "hf"), "HF_HUB_CACHE": ""})


@case("generate", "prompts-bad-line", "a --prompts line without a prompt field",
      r"prompts\.jsonl: line 2: field 'prompt' \(a string\) is missing")
def _(w):
    p = w.file("prompts.jsonl", '{"prompt": "hi"}\n{"text": "no prompt"}\n')
    return Run(["generate", str(w.shared["dense"]), "--prompts", str(p)], sources=[p])


@case("generate", "emoe-on-dense", "--mode emoe on a dense checkpoint",
      r"--mode emoe: .*config\.json has no 'emoe' block")
def _(w):
    return Run(["generate", str(w.shared["dense"]), "--prompt", "hi", "--mode", "emoe"])


@case("data", "source-missing", "the data file does not exist", r"missing\.jsonl: file not found")
def _(w):
    run = _data(w.tmp / "missing.jsonl")
    run.sources = []
    run.fix = lambda: w.file("missing.jsonl", ALPACA)
    return run


@case("data", "json-not-list", "a .json object with two lists", r"expected a JSON list of records")
def _(w):
    return _data(w.file("data.json", json.dumps({"train": [], "test": []})))


@case("data", "parquet-corrupt", "a .parquet file that is not parquet", r"not a readable parquet file")
def _(w):
    return _data(w.file("data.parquet", b"PAR1 but not really"))


@case("data", "unknown-format", "rows whose keys fit no known format", r"cannot detect the format .*\['prompt'\]")
def _(w):
    return _data(w.file("data.jsonl", '{"prompt": "a"}\n'))


@case("data", "unknown-template", "a template name that does not exist", r"template 'nonexistent' is neither one of")
def _(w):
    p = w.file("ok.jsonl", ALPACA * 2)
    return Run(["data", "--source", str(p), "--tokenizer", str(TOKENIZER), "--template", "nonexistent",
                "--cache-dir", str(w.tmp / "cache")], sources=[p])


@case("data", "tokenizer-missing", "the tokenizer dir does not exist", r"tokenizer not found: .*no-tokenizer")
def _(w):
    p = w.file("ok.jsonl", ALPACA * 2)
    return Run(["data", "--source", str(p), "--tokenizer", str(w.tmp / "no-tokenizer"), "--cache-dir",
                str(w.tmp / "cache")], sources=[p])


@case("data", "cache-read-only", "the data cache dir is on a read-only filesystem",
      r"cannot write .*cache.*: Read-only file system \(set --cache-dir")
def _(w):
    p = w.file("ok.jsonl", ALPACA * 4)
    mnt = _mount_tmpfs(w, "16m")
    if mnt is not None:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    else:  # no mount allowed here: the OSError the kernel raises, from mkdir
        mnt = w.tmp / "mnt"
        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if str(self).startswith(str(mnt)):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *a, **k)
        w.monkeypatch.setattr(Path, "mkdir", mkdir)
    run = Run(["data", "--source", str(p), "--tokenizer", str(TOKENIZER), "--template", "alpaca", "--cache-dir",
               str(mnt / "cache"), "--show", "0"], sources=[p])

    def fix():
        if os.path.ismount(mnt):
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        else:
            w.monkeypatch.undo()
    run.fix = fix
    run.cleanup = lambda: _umount(mnt)
    return run


@case("data", "config-yaml", "--config is not YAML", r"recipe\.yaml: not valid YAML")
def _(w):
    p = w.file("recipe.yaml", "data: [unclosed\n")
    return Run(["data", "--config", str(p), "--validate-only"], sources=[p])


@case("data", "config-unknown-key", "a typo in the data section", r"unknown key\(s\) \['tempalte'\]")
def _(w):
    src = w.file("ok.jsonl", ALPACA)
    p = w.file("recipe.yaml", f"data:\n  sources: [{{path: {src}}}]\n  tempalte: alpaca\n")
    return Run(["data", "--config", str(p), "--validate-only"], sources=[p, src])


# ---------------------------------------------------------------------------------------------------- eval


def _eval(w: World, ckpt: Path, mmlu: Path, *extra: str, before_weights: bool = True) -> Run:
    if before_weights:  # the CSV/shard checks must come before the (slow, on 7B) weight load (#12.12)
        import emoe_llm.eval.cli as eval_cli

        real = eval_cli.load_for_eval

        def must_not_load(*a, **k):
            raise AssertionError("the weights were loaded before the inputs were checked")
        w.monkeypatch.setattr(eval_cli, "load_for_eval", must_not_load)
        w.restore_load = lambda: w.monkeypatch.setattr(eval_cli, "load_for_eval", real)
    out = w.tmp / "results.json"
    return Run(["eval", str(ckpt), "--mmlu-dir", str(mmlu), "--num-fewshot", "1", "--limit", "1", "--tasks",
                "emoe_mmlu_anatomy", "--no-progress", "--device", "cpu", "--output", str(out), *extra],
               sources=[ckpt, mmlu], outputs=[out])


def _eval_fix(w: World, repair: Callable[[], None]) -> Callable[[], None]:
    def fix():
        repair()
        w.restore_load()
    return fix


@case("eval", "binary-csv", "an MMLU CSV that is binary (#12.9)", r"anatomy_val\.csv:1: (not UTF-8 text|contains NUL)")
def _(w):
    mmlu = w.mmlu()
    csv_path = mmlu / "val" / "anatomy_val.csv"
    good = csv_path.read_bytes()
    csv_path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    run = _eval(w, w.shared["emoe"], mmlu)
    run.sources = [w.shared["emoe"]]
    run.fix = _eval_fix(w, lambda: csv_path.write_bytes(good))
    return run


@case("eval", "latin1-csv", "an MMLU CSV in Latin-1", r"anatomy_val\.csv:2: not UTF-8 text \(byte 0xe9")
def _(w):
    mmlu = w.mmlu()
    csv_path = mmlu / "val" / "anatomy_val.csv"
    lines = csv_path.read_bytes().splitlines(keepends=True)
    csv_path.write_bytes(lines[0] + b"caf\xe9?,a,b,c,d,A\n")
    return _eval(w, w.shared["emoe"], mmlu)


@case("eval", "empty-split", "an empty MMLU split file: error, not nan% and NaN in the JSON (#12.10)",
      r"anatomy_val\.csv: no questions \(empty file\)")
def _(w):
    mmlu = w.mmlu()
    csv_path = mmlu / "val" / "anatomy_val.csv"
    good = csv_path.read_bytes()
    csv_path.write_bytes(b"")
    run = _eval(w, w.shared["emoe"], mmlu)
    run.sources = [w.shared["emoe"]]

    def check_json():
        out = w.tmp / "results.json"
        if out.exists():  # after the retry: strict JSON (no NaN)
            json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the results JSON"))
    run.fix = _eval_fix(w, lambda: csv_path.write_bytes(good))
    run.cleanup = check_json
    return run


@case("eval", "truncated-checkpoint", "a truncated checkpoint shard: named, before loading (#12.11)",
      r"incomplete or corrupt: .*model-\d{5}-of-\d{5}\.safetensors: corrupt safetensors file: .*truncated")
def _(w):
    ckpt = w.converted()
    shard = _shard_of(ckpt, "model.layers.3.mlp.down_proj.weight")
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    run = _eval(w, ckpt, w.shared["mmlu"])
    run.sources = [w.shared["mmlu"]]
    run.fix = _eval_fix(w, lambda: shard.write_bytes(good))
    return run


@case("eval", "missing-shard", "the checkpoint index names a missing shard", r"points at missing file")
def _(w):
    ckpt = w.converted()
    _shard_of(ckpt, "model.norm.weight").unlink()
    run = _eval(w, ckpt, w.shared["mmlu"])
    run.sources = [w.shared["mmlu"]]
    return run


@case("eval", "missing-tensor", "a tensor the model needs is not in the checkpoint",
      r"tensor\(s\) that llama needs are not in")
def _(w):
    ckpt = w.converted()
    _drop_tensor(ckpt, "model.norm.weight", from_index=True, from_shard=True)
    run = _eval(w, ckpt, w.shared["mmlu"])
    run.sources = [w.shared["mmlu"]]
    return run


@case("eval", "columns", "a CSV row with 5 columns", r"anatomy_val\.csv:\d+: expected 6 columns")
def _(w):
    mmlu = w.mmlu()
    with open(mmlu / "val" / "anatomy_val.csv", "a") as f:
        f.write("q,a,b,c,A\n")
    return _eval(w, w.shared["emoe"], mmlu)


@case("eval", "answer-letter", "an answer that is not A-D", r"answer must be one of A/B/C/D, got 'E'")
def _(w):
    mmlu = w.mmlu()
    (mmlu / "val" / "anatomy_val.csv").write_text("q,a,b,c,d,E\n")
    return _eval(w, w.shared["emoe"], mmlu)


@case("eval", "dev-missing", "the few-shot dev CSV is missing",
      r"task emoe_mmlu_anatomy: data file not found: .*anatomy_dev\.csv not found")
def _(w):
    mmlu = w.mmlu()
    dev = mmlu / "dev" / "anatomy_dev.csv"
    good = dev.read_bytes()
    dev.unlink()
    run = _eval(w, w.shared["emoe"], mmlu)
    run.fix = _eval_fix(w, lambda: dev.write_bytes(good))
    return run


@case("eval", "task-data-missing", "a user task (--include-path) whose data file is missing",
      r"task my_qa: data file not found: .*missing\.jsonl")
def _(w):
    tasks = w.tmp / "tasks"
    tasks.mkdir()
    data = tasks / "missing.jsonl"
    (tasks / "my_qa.yaml").write_text(f"task: my_qa\ndataset_path: json\n"
                                      f"dataset_kwargs:\n  data_files: {{test: {data}}}\n"
                                      "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                                      "doc_to_choice: ['yes', 'no']\ndoc_to_target: 0\n")
    run = _eval(w, w.shared["emoe"], w.shared["mmlu"], "--include-path", str(tasks))
    run.argv[run.argv.index("--tasks") + 1] = "my_qa"
    run.sources = [w.shared["emoe"]]
    run.fix = _eval_fix(w, lambda: data.write_text('{"q": "Is it?"}\n'))
    return run


@case("eval", "checkpoint-missing", "the checkpoint dir does not exist", r"nothing/config\.json not found")
def _(w):
    run = _eval(w, w.tmp / "nothing", w.shared["mmlu"])
    run.sources = [w.shared["mmlu"]]
    return run


@case("eval", "mode-emoe-dense", "--mode emoe on a dense checkpoint", r"has no 'emoe' block .*use --mode dense")
def _(w):
    return _eval(w, w.shared["dense"], w.shared["mmlu"], "--mode", "emoe")


@case("eval", "mode-twice", "--mode auto,dense: auto is dense for every checkpoint",
      r"--mode auto,dense names the same mode twice \(dense, dense for .*config\.json\)")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--mode", "auto,dense")


@case("eval", "modes-one-output", "--mode emoe,dense with an --output without {mode}",
      r"--output .*results\.json: with several modes it must contain \{mode\}")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--mode", "emoe,dense")


@case("eval", "mode-unknown", "--mode emoe,sparse",
      r"argument --mode: each mode must be auto, dense or emoe, got 'emoe,sparse'")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--mode", "emoe,sparse")


@case("eval", "unknown-task", "--tasks names an unknown task",
      r"unknown task\(s\) \['emoe_mmlu_anatomyy'\]; see emoe-llm eval --list-tasks")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--tasks", "emoe_mmlu_anatomyy")


@case("eval", "negative-shots", "--num-fewshot -1", r"argument --num-fewshot: must be >= 0, got -1")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--num-fewshot", "-1")


@case("eval", "batch-size-zero", "--batch-size 0", r"argument --batch-size: must be >= 1, got 0")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--batch-size", "0")


@case("eval", "limit-nan", "--limit nan", r"argument --limit: expected an integer, got 'nan'")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--limit", "nan")


@case("eval", "include-path-missing", "--include-path names no directory",
      r"--include-path .*nowhere is not a directory")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--include-path", str(w.tmp / "nowhere"))


# ---------------------------------------------------------------------------------------------------- train (pre-init)


def _train(w: World, *overrides: str, config: Path | None = None) -> Run:
    out = w.tmp / "run"
    return Run(["--config", str(config or REPO / "configs" / "tiny_cpu.yaml"), f"output_dir={out}", *overrides],
               surface="train", outputs=[out], env={"RANK": "0"})


@case("train", "config-missing", "--config names no file", r"--config .*nope\.yaml: file not found")
def _(w):
    return _train(w, config=w.tmp / "nope.yaml")


@case("train", "config-yaml", "the recipe is not YAML", r"recipe\.yaml: not valid YAML")
def _(w):
    return _train(w, config=w.file("recipe.yaml", "train: {lr: [1\n"))


@case("train", "unknown-key", "a typo in a recipe key", r"unknown config key\(s\) train\.lrr")
def _(w):
    return _train(w, "train.lrr=1e-4")


@case("train", "wrong-type", "a string where a number goes", r"train\.lr: expected a number, got 'fast'")
def _(w):
    return _train(w, "train.lr=fast")


@case("train", "override-syntax", "an override without =",
      r"unexpected argument\(s\) \['train\.lr'\]: overrides are key=value")
def _(w):
    return _train(w, "train.lr")


@case("train", "not-a-section", "an override into a value", r"'train\.lr' is a value, not a section")
def _(w):
    return _train(w, "train.lr.x=1")


def _converted(w: World) -> list[str]:
    """model.path = the shared tiny conversion, and the emoe: section that matches it (8 experts, layers 1,3)."""
    return [f"model.path={w.shared['emoe']}", "emoe.n_experts=8", "emoe.top_k=2", "emoe.layers=1,3"]


@case("train", "emoe-mismatch", "model.path is another EMoE conversion than the emoe: section asks for",
      r"model\.path .* is another EMoE conversion than the emoe: section asks for \(checkpoint -> recipe: "
      r"n_experts 8 -> 16")
def _(w):
    return _train(w, f"model.path={w.shared['emoe']}")


@case("train", "model-missing", "model.path is not a checkpoint dir: said before any rank starts (#12.8)",
      r"model\.path: .*nothing/config\.json not found \(expected an HF checkpoint dir\)")
def _(w):
    return _train(w, f"model.path={w.tmp / 'nothing'}")


@case("train", "template-pre-init", "an unknown data.template: said before tokenizing or any rank starts (#12.8)",
      r"data\.template: 'nonexistent' is neither a built-in template")
def _(w):
    return _train(w, *_converted(w), "data.template=nonexistent")


@case("train", "data-missing", "a data source that does not exist: said before any rank starts",
      r"data\.sources\[0\]\.path: nope\.jsonl does not exist")
def _(w):
    return _train(w, *_converted(w), "data.sources.0.path=nope.jsonl")


@case("train", "ds-config-missing", "--ds_config names no file", r"--ds_config .*z4\.json: file not found")
def _(w):
    run = _train(w, *_converted(w))
    run.argv += ["--ds_config", str(w.tmp / "z4.json")]
    return run


@case("train", "ds-config-json", "the DeepSpeed config is not JSON", r"ds\.json: not valid JSON")
def _(w):
    run = _train(w, *_converted(w))
    run.argv += ["--ds_config", str(w.file("ds.json", '{"zero_optimization": {"stage": 3},}'))]
    return run


@case("train", "empty-model-path", "model.path set to nothing", r"model\.path is empty")
def _(w):
    return _train(w, "model.path=")


@case("train", "launcher-nproc", "emoe-llm train --nproc two", r"--nproc needs a positive integer, got 'two'")
def _(w):
    return Run(["train", "--nproc", "two", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run"])


@case("train", "launcher-no-config", "emoe-llm train without --config", r"--config RECIPE\.yaml is required")
def _(w):
    run = Run(["train", "--nproc", "2", "--dry-run"])
    run.retry_argv = ["train", "--nproc", "2", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dry-run"]
    run.fix = lambda: None
    return run


def _hold_lock(w: World, path: Path) -> subprocess.Popen:
    """Another live process holding ``path``'s one-run lock (emoe_llm/dirlock.py), as a running job would."""
    code = (f"import time; from emoe_llm.dirlock import DirLock; DirLock({str(path)!r}, what='x').acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


@case("train", "output-dir-busy", "a second run into the output_dir of a live run: refused before any work, the live "
      "run's files untouched", r"output_dir .*/run is in use by another run \(pid \d+ on .*, started .*; lock "
      r".*\.emoe-lock\): wait for it to end, stop it, or use another output_dir")
def _(w):
    out = w.tmp / "run"
    w.file("run/metrics.jsonl", '{"step": 1, "loss": 7.0}\n')
    w.file("run/checkpoints/step_00000001/trainer_state.json", '{"step": 1}')
    holder = _hold_lock(w, out)
    run = Run(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"output_dir={out}"], surface="train",
              sources=[out / "metrics.jsonl", out / "checkpoints"], env={"RANK": "0"})
    run.cleanup = lambda: _stop(holder)
    return run


@case("train", "trainer-state-truncated", "the latest checkpoint's trainer_state.json cut short: named, nothing "
      "loaded", r"step_00000002/trainer_state\.json is not valid JSON \(.*\): the checkpoint .* is damaged; resume "
      r"from an earlier one")
def _(w):
    ckpt = w.file("run/checkpoints/step_00000002/trainer_state.json", '{"step": 2, "epo').parent
    return Run(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"output_dir={w.tmp / 'run'}",
                f"model.path={w.shared['dense']}"], surface="train", sources=[ckpt], env={"RANK": "0"})


# ---------------------------------------------------------------------------------------------------- values


# Recipe values: every float finite and in range, no empty path; one line, before anything is created.
VALUE_CASES = [
    ("lr-nan", "train.lr=nan", "passes a `<= 0` check", r"train\.lr: expected a finite number, got 'nan'"),
    ("lr-inf", "train.lr=inf", "", r"train\.lr: expected a finite number, got 'inf'"),
    ("lr-1e400", "train.lr=1e400", "reads as inf", r"train\.lr: expected a finite number, got '1e400'"),
    ("max-grad-norm-nan", "train.max_grad_norm=nan", "", r"train\.max_grad_norm: expected a finite number, got 'nan'"),
    ("epochs-inf", "train.epochs=inf", "", r"train\.epochs: expected an integer, got 'inf'"),
    ("betas-nan", "train.betas=[0.9,nan]", "", r"train\.betas\[1\] must be a finite number, got 'nan'"),
    ("dropout-range", "lora.dropout=1", "", r"lora\.dropout must be in \[0, 1\), got 1"),
    ("data-path-empty", "data.sources.0.path=", "Path('') is the cwd, which exists",
     r"data\.sources\[0\]\.path: expected a file or directory, got an empty path"),
]
for _name, _override, _why, _message in VALUE_CASES:
    case("train", _name, f"`{_override}`" + (f" ({_why})" if _why else ""), _message)(
        lambda w, override=_override: _train(w, override))

# Numeric flags: argparse's one line, exit 2, before anything is read or created.
FLAG_CASES = [
    ("plan", "gpu-mem-negative", ["plan", "--model", "llama-7b", "--gpu-mem-gb", "-80"],
     r"argument --gpu-mem-gb: must be > 0, got -80"),
    ("plan", "gpu-mem-nan", ["plan", "--model", "llama-7b", "--gpu-mem-gb", "nan"],
     r"argument --gpu-mem-gb: must be a finite number, got nan"),
    ("plan", "mfu-above-1", ["plan", "--model", "llama-7b", "--mfu", "5"],
     r"argument --mfu: must be in \(0, 1\], got 5"),
    ("plan", "mfu-zero", ["plan", "--model", "llama-7b", "--mfu", "0"], r"argument --mfu: must be in \(0, 1\], got 0"),
    ("plan", "margin-above-1", ["plan", "--model", "llama-7b", "--margin", "1.5"],
     r"argument --margin: must be in \[0, 1\), got 1\.5"),
    ("plan", "peak-tflops-negative", ["plan", "--model", "llama-7b", "--peak-tflops", "-1"],
     r"argument --peak-tflops: must be > 0, got -1"),
    ("plan", "table-bad", ["plan", "--model", "llama-7b", "--table", "0,-1,abc"],
     r"argument --table: expected positive node counts like 1,2,4,8, got '0,-1,abc'"),
    ("plan", "nodes-zero", ["plan", "--model", "llama-7b", "--nodes", "0"], r"argument --nodes: must be >= 1, got 0"),
    ("plan", "gpu-cpu-no-mem", ["plan", "--model", "llama-7b", "--gpu", "cpu"],
     r"--gpu cpu: give the memory one rank may use with --gpu-mem-gb"),
    ("plan", "overrides-no-config", ["plan", "--model", "llama-7b", "train.micro_batch_size=4"],
     r"recipe overrides \['train\.micro_batch_size=4'\] need the recipe they override: add --config"),
    ("plan", "n-experts-not-dividing", ["plan", "--config", str(REPO / "configs" / "llama2_7b_emoe.yaml"), "--model",
                                        "llama-7b", "emoe.n_experts=7", "emoe.top_k=2"],
     r"emoe \(against llama-7b\): n_experts=7 does not divide intermediate_size=11008"),
    ("verify", "atol-nan", ["verify", "a", "b", "--atol", "nan"], r"argument --atol: must be a finite number, got nan"),
    ("verify", "tokens-zero", ["verify", "a", "b", "--tokens", "0"], r"argument --tokens: must be >= 1, got 0"),
    ("data", "source-empty", ["data", "--source", "", "--validate-only"],
     r"argument --source: expected a path, got an empty string"),
    ("data", "max-seq-len-1", ["data", "--source", "x.jsonl", "--max-seq-len", "1"],
     r"argument --max-seq-len: must be >= 2, got 1"),
    ("demo", "nproc-zero", ["demo", "--nproc", "0"], r"argument --nproc: must be >= 1, got 0"),
    ("probe", "tokens-zero", ["probe", "CKPT", "--out", "OUT", "--tokens", "0"],
     r"argument --tokens: must be >= 1, got 0"),
    ("probe", "max-seq-len-zero", ["probe", "CKPT", "--out", "OUT", "--max-seq-len", "0"],
     r"argument --max-seq-len: must be >= 2, got 0"),
    ("probe", "budget-nan", ["probe", "CKPT", "--out", "OUT", "--budget", "nan"],
     r"argument --budget: must be a finite number, got nan"),
    ("probe", "max-layers-zero", ["probe", "CKPT", "--out", "OUT", "--max-layers", "0"],
     r"argument --max-layers: must be >= 1, got 0"),
]
for _surface, _name, _argv, _message in FLAG_CASES:
    _shown = " ".join(shlex.quote(a.replace(str(REPO) + "/", "")) for a in _argv)
    case(_surface, _name, f"`emoe-llm {_shown}`", _message)(lambda w, argv=_argv: Run(list(argv)))


@case("plan", "config-layers-zero", "--model a config.json with num_hidden_layers 0",
      r"num_hidden_layers must be a positive integer, got 0")
def _(w):
    config = json.loads((w.shared["dense"] / "config.json").read_text())
    return Run(["plan", "--model", str(w.file("config.json", json.dumps({**config, "num_hidden_layers": 0})))])


@case("plan", "config-hidden-negative", "--model a config.json with hidden_size -64",
      r"hidden_size must be a positive integer, got -64")
def _(w):
    config = json.loads((w.shared["dense"] / "config.json").read_text())
    return Run(["plan", "--model", str(w.file("config.json", json.dumps({**config, "hidden_size": -64})))])


@case("convert", "n-init-zero", "--n-init 0: refused before DST's partial dir exists",
      r"argument --n-init: must be >= 1, got 0")
def _(w):
    return _convert(w, w.src(), "--n-init", "0")


@case("convert", "max-iter-zero", "--max-iter 0: refused before DST's partial dir exists",
      r"argument --max-iter: must be >= 1, got 0")
def _(w):
    return _convert(w, w.src(), "--max-iter", "0")


# ---------------------------------------------------------------------------------------------------- plot, probe


def _metrics(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


STEP = {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "expert_load": {"layer_2": [0.5, 0.5, 0.5, 0.5]}}


def _plot(w: World, metrics: str | bytes, *extra: str) -> Run:
    run_dir = w.tmp / "run"
    w.file("run/metrics.jsonl", metrics)
    return Run(["plot", str(run_dir), *extra], sources=[run_dir / "metrics.jsonl"], outputs=[run_dir / "plots"])


@case("plot", "empty-metrics", "an empty metrics.jsonl: said before plots/ is created",
      r"metrics\.jsonl: no step records")
def _(w):
    return _plot(w, "")


@case("plot", "bad-middle-line", "a metrics.jsonl line in the middle that is not JSON",
      r"metrics\.jsonl: line 2: not valid JSON")
def _(w):
    return _plot(w, _metrics(STEP, "not json", {**STEP, "step": 2}))


@case("plot", "line-is-list", "a metrics.jsonl line that is a JSON list",
      r"metrics\.jsonl: line 1: expected a JSON object, got list")
def _(w):
    return _plot(w, _metrics([1, 2, 3], {**STEP, "step": 2}))


@case("plot", "step-not-int", 'a record with "step": "two"', r"line 1: 'step' must be an integer, got 'two'")
def _(w):
    return _plot(w, _metrics({**STEP, "step": "two"}))


@case("plot", "final-eval-no-loss", "a final_eval record without eval_loss",
      r"line 2: a final_eval record needs 'step' and a numeric 'eval_loss'")
def _(w):
    return _plot(w, _metrics(STEP, {"event": "final_eval", "step": 1}))


@case("plot", "latin1", "a metrics.jsonl line with a Latin-1 byte",
      r"metrics\.jsonl: line 2: not UTF-8 text \(byte 0xe9")
def _(w):
    return _plot(w, _metrics(STEP).encode() + b'{"step": 2, "loss": 1.0, "note": "caf\xe9"}\n')


@case("plot", "all-loss-nan", "every train loss NaN: the PNGs are written, with a note and a panel that says so",
      r"note: no finite train loss in .*metrics\.jsonl", code=0)
def _(w):
    run = _plot(w, _metrics({**STEP, "loss": float("nan")}, {**STEP, "step": 2, "loss": float("nan")}))
    run.outputs = []
    return run


@case("plot", "run-dir-missing", "RUN_DIR does not exist: nothing is created", r"RUN_DIR .*nothing does not exist")
def _(w):
    return Run(["plot", str(w.tmp / "nothing")], outputs=[w.tmp / "nothing"])


@case("plot", "run-dir-file", "RUN_DIR is a file", r"RUN_DIR .*run\.txt is not a directory")
def _(w):
    return Run(["plot", str(w.file("run.txt", "x"))])


@case("plot", "out-file", "--out is a file", r"--out .*taken: .*taken is a file, not a directory")
def _(w):
    run = _plot(w, _metrics(STEP), "--out", str(w.file("taken", "x")))
    run.sources.append(w.tmp / "taken")
    return run


@case("plot", "out-read-only", "--out on a read-only filesystem: said before anything is drawn",
      r"--out .*plots: .*mnt is not writable")
def _(w):
    mnt = _mount_tmpfs(w, "1m")
    if mnt is not None:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    else:  # no mount allowed here: the read-only flag statvfs would report
        mnt = w.tmp / "mnt"
        import emoe_llm.fileio as fileio

        w.monkeypatch.setattr(fileio, "_read_only_mount", lambda p: str(p).startswith(str(mnt)))
    run = _plot(w, _metrics(STEP), "--out", str(mnt / "plots"))
    run.outputs = [mnt / "plots"]
    run.cleanup = lambda: _umount(mnt)
    return run


@case("plot", "disk-full", "--out fills up after the first PNG: neither PNG is left, nor the --out it created",
      r"cannot write the plots: No space left on device")
def _(w):
    from emoe_llm.eval.plot_run import plot_run

    metrics = _metrics(STEP, {**STEP, "step": 2})
    sizes = [p.stat().st_size for p in plot_run(w.file("measure/metrics.jsonl", metrics).parent)]
    pages = -(-sizes[0] // 4096) + -(-sizes[1] // 8192)  # room for the first PNG and half the second
    mnt = _mount_tmpfs(w, f"{4 * pages}k")
    if mnt is None:  # no mount allowed here: the second savefig fails as a full disk would
        mnt = w.tmp / "mnt"
        from matplotlib.figure import Figure

        real, calls = Figure.savefig, []

        def savefig(self, fname, *a, **k):
            calls.append(fname)
            if len(calls) == 2:
                Path(fname).write_bytes(b"\x89PNG half")
                raise OSError(errno.ENOSPC, "No space left on device", str(fname))
            return real(self, fname, *a, **k)
        w.monkeypatch.setattr(Figure, "savefig", savefig)
    run = _plot(w, metrics, "--out", str(mnt / "plots"))
    run.outputs = [mnt / "plots"]
    run.cleanup = lambda: _umount(mnt)
    return run


def _probe(w: World, ckpt: Path, *extra: str) -> Run:
    out = w.tmp / "probe"
    return Run(["probe", str(ckpt), "--experts", "16", "--out", str(out), "--tokens", "20", "--layers", "3",
                "--device", "cpu", *extra], sources=[ckpt], outputs=[out])


def _without_tokenizer(w: World) -> Path:
    ckpt = w.src("no-tokenizer")
    for f in ckpt.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".model":
            f.unlink()
    return ckpt


@case("probe", "device-missing", "--device names a CUDA device this machine lacks: said before loading",
      r"--device cuda:99: (CUDA is not available on this machine|this machine has \d+ CUDA device)")
def _(w):
    return _probe(w, w.shared["dense"], "--device", "cuda:99")


@case("probe", "out-file", "--out is a file: said before computing",
      r"--out .*taken: .*taken is a file, not a directory")
def _(w):
    run = _probe(w, w.shared["dense"])
    run.argv[run.argv.index("--out") + 1] = str(w.file("taken", "x"))
    run.outputs = []
    return run


@case("probe", "no-tokenizer", "a checkpoint without tokenizer files: says which files are missing, and where",
      r"no tokenizer files in .*no-tokenizer \(expected one of tokenizer\.json, tokenizer\.model, "
      r"tokenizer_config\.json\)")
def _(w):
    return _probe(w, _without_tokenizer(w))


@case("probe", "ks-not-integers", "--ks 2,x", r"--ks '2,x': expected comma-separated integers")
def _(w):
    return _probe(w, w.shared["dense"], "--ks", "2,x")


@case("eval", "top-k-zero", "--top-k 0", r"argument --top-k: must be >= 1, got 0")
def _(w):
    return _eval(w, w.shared["emoe"], w.shared["mmlu"], "--top-k", "0")


@case("eval", "no-tokenizer", "a checkpoint without tokenizer files: named before any weights load",
      r"no tokenizer files in .*no-tokenizer \(expected one of tokenizer\.json")
def _(w):
    return _eval(w, _without_tokenizer(w), w.shared["mmlu"])


@case("data", "dir-of-jsonl", "a directory of .jsonl files is a valid source: read them all, in sorted order",
      r"format=alpaca usable=3 read=3", code=0)
def _(w):
    w.file("dir/b.jsonl", ALPACA * 2)
    w.file("dir/a.jsonl", ALPACA)
    return _data(w.tmp / "dir")


@case("data", "dir-without-data", "a directory with neither data files nor a save_to_disk dataset",
      r"dir: a directory without data files \(\.json, \.jsonl")
def _(w):
    w.file("dir/notes.md", "x")
    return _data(w.tmp / "dir")


@case("data", "ends-with-user", "messages ending with a user turn: the message names the turn's role",
      r"line 1: conversation does not end with an assistant turn \(the last turn, messages\[2\], has role 'user'\)")
def _(w):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "more"}]
    return _data(w.file("chat.jsonl", json.dumps({"messages": turns}) + "\n"))


# ---------------------------------------------------------------------------------------------------- train (ranks)


def _ranks(w: World, *overrides: str, faults: tuple[str, ...] = ()) -> Run:
    out = w.tmp / "run"
    dense = _dense_single(w)
    return Run([*faults, "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"output_dir={out}",
                f"model.path={dense}", "model.mode=dense", "logging.progress_bar=false", "train.max_steps=2",
                "train.save_every_steps=0", "train.eval_every_steps=0", "train.export=false",
                f"data.cache_dir={w.tmp / 'cache'}", *overrides],
               surface="deepspeed", outputs=[out])


@case("train", "rank1-crash", "an exception on rank 1 mid-run: its one line first, traceback below, rank 0 silent, "
      "all ranks end", r"^\[emoe-llm\] error \(rank 1\): RuntimeError: injected fault on rank 1 at step 2$", code=1,
      slow=True, traceback=True)
def _(w):
    run = _ranks(w, faults=("--raise-at-step", "2", "--raise-on-rank", "1"))
    run.outputs = []  # step 1 ran: its logs are kept
    return run


@case("train", "template-in-run", "a data template that does not exist, launched on 2 real ranks: one line (rank 0), "
      "no output_dir left (#12.6-8)", r"^\[emoe-llm\] error: .*template:? 'nonexistent'", slow=True)
def _(w):
    return _ranks(w, "data.template=nonexistent")


# ---------------------------------------------------------------------------------------------------- train (resume)


def _dense_single(w: World) -> Path:
    """The tiny dense checkpoint in one file, built once per module."""
    dense = w.shared.get("dense_single")
    if dense is None:
        from emoe_llm.tiny import save_tiny_checkpoint

        dense = w.shared["dense_single"] = save_tiny_checkpoint(w.tmp.parent / "dense_single",
                                                                 tokenizer_dir=TOKENIZER)
    return dense


def _finished_run(w: World) -> Path:
    """A copy of a finished 2-rank run of the tiny recipe (the dense model converted with its emoe: section: N=16,
    layers 2,3; 2 steps, global batch 8), trained once per module on real ranks; each case breaks its own copy."""
    done = w.shared.get("finished_run")
    if done is None:
        done = w.tmp.parent / "finished_run"
        run = Run(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"output_dir={done}",
                   f"model.path={_dense_single(w)}", "logging.progress_bar=false", "logging.tensorboard=false",
                   "train.max_steps=2", "train.save_every_steps=0", "train.eval_every_steps=0", "train.export=false",
                   f"data.cache_dir={w.tmp.parent / 'finished_cache'}"], surface="deepspeed")
        code, output = invoke(run, None, run.argv)
        assert code == 0 and (done / "COMPLETED").is_file(), output
        w.shared["finished_run"] = done
    return Path(shutil.copytree(done, w.tmp / "run"))


def _resume(w: World, *overrides: str, world: int = 2, breaks: Callable[[Path], None] | None = None) -> Run:
    """Resume (train.max_steps=4: extend) a copy of the finished run; the run dir must come out byte-identical."""
    out = _finished_run(w)
    if breaks is not None:
        breaks(out)
    return Run(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"output_dir={out}",
                f"model.path={_dense_single(w)}", f"data.cache_dir={w.tmp.parent / 'finished_cache'}",
                "train.max_steps=4", *overrides],
               surface="train", sources=[out], env={"RANK": "0", "WORLD_SIZE": str(world)})


CKPT = r"resume: .*run/checkpoints/step_00000002"


@case("train", "resume-other-conversion", "a run saved with N=16 resumed with an N=8 conversion as model.path",
      CKPT + r" was trained with another recipe \(emoe\.n_experts: checkpoint 16, this run 8; "
      r"emoe\.permute_layers: checkpoint 2,3, this run 1,3\)", slow=True)
def _(w):
    return _resume(w, *_converted(w))


@case("train", "resume-permute-all", "a resume with emoe.permute_layers=all (another conversion)",
      r"emoe\.permute_layers: checkpoint 2,3, this run 0,1,2,3", slow=True)
def _(w):
    return _resume(w, "emoe.permute_layers=all")


@case("train", "resume-wider-model", "a resume into a wider model (hidden 128)",
      r"config\.json hidden_size: checkpoint 64, this run 128", slow=True)
def _(w):
    from emoe_llm.tiny import save_tiny_checkpoint

    run = _resume(w)
    wide = save_tiny_checkpoint(w.tmp / "wide", tokenizer_dir=TOKENIZER, hidden_size=128)
    run.argv.append(f"model.path={wide}")
    return run


@case("train", "resume-mode", "a resume of an EMoE run with model.mode=dense",
      r"model\.mode: checkpoint emoe, this run dense", slow=True)
def _(w):
    return _resume(w, "model.mode=dense")


@case("train", "resume-lora", "a resume of a full fine-tune with LoRA on",
      r"lora\.enabled: checkpoint false, this run true", slow=True)
def _(w):
    return _resume(w, "lora.enabled=true")


@case("train", "resume-global-batch", "a resume at --nproc 1 with train.global_batch_size=4 into a run saved with 8: "
      "said before the universal-checkpoint conversion",
      CKPT + r": train\.global_batch_size: checkpoint 8, this run 4 \(at world size 1\)", slow=True)
def _(w):
    return _resume(w, "train.global_batch_size=4", world=1)


@case("train", "resume-world-size", "a resume at 3 ranks of a recipe that leaves the global batch free: the saved 8 "
      "does not divide",
      CKPT + r" at world size 3: train\.global_batch_size \(8\) is not divisible by train\.micro_batch_size \(2\) x "
      r"world size \(3\)", slow=True)
def _(w):
    return _resume(w, "train.global_batch_size=0", world=3)


@case("train", "resume-missing-rank-file", "a checkpoint without rank 1's optimizer file: refused, COMPLETED kept",
      CKPT + r" is incomplete: zero_pp_rank_1_mp_rank_00_optim_states\.pt \(rank 1\) missing", slow=True)
def _(w):
    def drop(out: Path):
        (out / "checkpoints" / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return _resume(w, breaks=drop)


@case("train", "resume-data-changed", "a resume on other training data (fewer rows: another number of steps per "
      "epoch): refused on the real ranks before any weights load, the run dir kept as it was",
      r"^\[emoe-llm\] error: resume: .*step_00000002: steps per epoch: checkpoint \d+, this run \d+; the training "
      r"data changed", slow=True)
def _(w):
    run = _resume(w, "logging.progress_bar=false", "logging.tensorboard=false", "train.save_every_steps=0",
                  "train.eval_every_steps=0", "train.export=false", "data.sources.0.max_rows=200")
    run.surface, run.env = "deepspeed", {}
    return run


@case("train", "resume-corrupt-rank-file", "rank 1's optimizer file truncated: the manifest check on the real ranks "
      "names it before anything loads; the finished run's COMPLETED and every file are kept",
      r"^\[emoe-llm\] error: resume: checkpoint .*step_00000002 is damaged: .*zero_pp_rank_1_mp_rank_00_optim_states"
      r"\.pt has 100 bytes, \d+ when saved \(truncated or overwritten\); not resumed", slow=True)
def _(w):
    def truncate(out: Path):
        f = out / "checkpoints" / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[:100])
    run = _resume(w, "logging.progress_bar=false", "logging.tensorboard=false", "train.save_every_steps=0",
                  "train.eval_every_steps=0", "train.export=false", breaks=truncate)
    run.surface, run.env = "deepspeed", {}
    return run


@case("train", "resume-overwritten-rank-file", "4,000 bytes overwritten inside rank 1's optimizer file, the size "
      "unchanged: refused by its sha256, never resumed silently",
      r"^\[emoe-llm\] error: resume: checkpoint .*step_00000002 is damaged: .*zero_pp_rank_1_mp_rank_00_optim_states"
      r"\.pt does not match its sha256 in .*manifest\.json \(changed since it was saved\); not resumed "
      r"\(train\.on_damaged_checkpoint=previous resumes from the one before instead\)", slow=True)
def _(w):
    def overwrite(out: Path):
        f = out / "checkpoints" / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        with open(f, "r+b") as fh:
            fh.seek(f.stat().st_size // 2)
            fh.write(os.urandom(4_000))
    run = _resume(w, "logging.progress_bar=false", "logging.tensorboard=false", "train.save_every_steps=0",
                  "train.eval_every_steps=0", "train.export=false", breaks=overwrite)
    run.surface, run.env = "deepspeed", {}
    return run


# ---------------------------------------------------------------------------------------------------- Slurm scripts


def _slurm(w: World, script: str, **env) -> Run:
    out = w.tmp / "out"
    base = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "localhost", "OUTPUT_DIR": str(out),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return Run([f"bash {REPO / 'slurm' / script}"], surface="bash", env={**base, **env})


@case("slurm", "outside-job", "a job script run with bash instead of sbatch", r"not inside a Slurm job")
def _(w):
    run = _slurm(w, "llama7b.sh")
    run.env.pop("SLURM_JOB_ID")
    return run


@case("slurm", "no-model", "MODEL unset and no converted checkpoint", r"set MODEL=/path/to/the/dense/hf/checkpoint")
def _(w):
    run = _slurm(w, "llama7b.sh", EMOE_MODEL=str(w.tmp / "not-converted"))
    run.outputs = [w.tmp / "out"]  # the OUTPUT_DIR the job created is gone again
    return run


@case("slurm", "recipe-missing", "RECIPE names no file: refused before the conversion and before srun",
      r"RECIPE=configs/llama2_7b_emoee\.yaml: file not found")
def _(w):
    run = _slurm(w, "llama7b.sh", RECIPE="configs/llama2_7b_emoee.yaml", MODEL=str(w.shared["dense"]),
                 EMOE_MODEL=str(w.tmp / "emoe"))
    run.outputs = [w.tmp / "out", w.tmp / "emoe"]
    return run


@case("slurm", "ds-config-missing", "DS_CONFIG names no file", r"DS_CONFIG=ds_configs/z4\.json: file not found")
def _(w):
    run = _slurm(w, "llama30b.sh", DS_CONFIG="ds_configs/z4.json", MODEL=str(w.shared["dense"]),
                 EMOE_MODEL=str(w.tmp / "emoe"))
    run.outputs = [w.tmp / "out", w.tmp / "emoe"]
    return run


@case("slurm", "recipe-invalid", "a recipe that cannot run on this allocation: one line, before srun",
      r"ERROR: configs/llama2_7b_emoe\.yaml \+ ds_configs/z3\.json with .*train\.lrr")
def _(w):
    script = (f"set -euo pipefail; OUTPUT_DIR={w.tmp / 'out'}; source {REPO / 'slurm' / 'common.sh'}; "
              "emoe_snapshot configs/llama2_7b_emoe.yaml ds_configs/z3.json train.lrr=1")
    run = _slurm(w, "common.sh")
    run.argv = [script]
    return run


@case("slurm", "model-not-hf", "MODEL is neither an HF checkpoint dir nor a Hub id",
      r"MODEL=.*empty-dir is neither an HF checkpoint dir \(no config\.json\) nor a Hub id")
def _(w):
    (w.tmp / "empty-dir").mkdir()
    run = _slurm(w, "llama7b.sh", MODEL=str(w.tmp / "empty-dir"), EMOE_MODEL=str(w.tmp / "emoe"))
    run.outputs = [w.tmp / "out", w.tmp / "emoe"]
    return run


# ---------------------------------------------------------------------------------------------------- study


STUDY = f"""\
base: {REPO / 'configs' / 'tiny_cpu.yaml'}
overrides: [train.max_steps=2]
seeds: [1, 2]
arms:
  dense: {{model.mode: dense}}
  emoe: {{model.mode: emoe}}
baseline: dense
primary: emoe_nll_alpaca_heldout/nll_per_token
eval: {{tasks: [emoe_nll_alpaca_heldout], limit: 4}}
"""


def _study(w: World, text: str, *extra: str) -> Run:
    """`emoe-llm study` on a study file; the retry after the fix is a dry run (it validates the same way)."""
    study = w.file("study.yaml", text)
    out = w.tmp / "study_out"
    argv = ["study", str(study), "--out", str(out), *extra]
    return Run(argv, sources=[study], outputs=[out], retry_argv=[*argv, "--dry-run"],
               fix=lambda: study.write_text(STUDY))


@case("study", "study-dir-busy", "a second study into the dir of a live one: refused before it records or runs "
      "anything", r"emoe-llm study: error: study dir .*/study_out is in use by another run \(pid \d+ on .*\)")
def _(w):
    study = w.file("study.yaml", STUDY)
    out = w.tmp / "study_out"
    holder = _hold_lock(w, out)
    run = Run(["study", str(study), "--out", str(out)], sources=[study])
    run.cleanup = lambda: _stop(holder)
    return run


@case("study", "unknown-arm-key", "an arm overrides a key the recipe does not have: names the arm, creates nothing",
      r"study\.yaml: arm 'emoe': .*unknown config key\(s\) model\.mdoe")
def _(w):
    return _study(w, STUDY.replace("emoe: {model.mode: emoe}", "emoe: {model.mdoe: emoe}"))


@case("study", "bad-arm-value", "an arm sets a bad value", r"arm 'emoe': .*model\.mode must be 'dense' or 'emoe', "
      r"got 'sparse'")
def _(w):
    return _study(w, STUDY.replace("emoe: {model.mode: emoe}", "emoe: {model.mode: sparse}"))


@case("study", "baseline-not-an-arm", "the baseline is not one of the arms", r"baseline 'dense2' is not an arm; "
      r"arms: dense, emoe")
def _(w):
    return _study(w, STUDY.replace("baseline: dense", "baseline: dense2"))


@case("study", "no-primary-metric", "the study names no primary metric: the one comparison it is for is chosen "
      "before it runs", r"study\.yaml: 'primary' is missing")
def _(w):
    return _study(w, STUDY.replace("primary: emoe_nll_alpaca_heldout/nll_per_token\n", ""))


@case("study", "changed-study", "the study file changed after cells ran: refused unless the cells are named or "
      "--force", r"differs from the study .*study_out ran .* for cell\(s\) emoe-s1, emoe-s2: name them with --cells")
def _(w):
    from emoe_llm.study.run import record_study
    from emoe_llm.study.spec import load_study

    run = _study(w, STUDY)
    record_study(load_study(run.argv[1]), w.tmp / "study_out", [])  # what the first run recorded
    Path(run.argv[1]).write_text(STUDY.replace("emoe: {model.mode: emoe}", "emoe: {model.mode: emoe, emoe.top_k: 2}"))
    run.sources, run.outputs = [w.tmp / "study_out", Path(run.argv[1])], []
    run.fix, run.retry_argv = lambda: None, [*run.argv, "--force", "--dry-run"]
    return run


@case("study", "report-not-a-study", "emoe-llm report on a directory that is no study dir",
      r"study\.json not found: is .* a study dir")
def _(w):
    (w.tmp / "runs").mkdir()
    return Run(["report", str(w.tmp / "runs")])


# ---------------------------------------------------------------------------------------------------- the tests


FAST = [c for c in CASES if not c.slow]


@pytest.mark.parametrize("c", FAST, ids=[c.id for c in FAST])
def test_bad_input(c, shared, tmp_path, capsys, monkeypatch):
    check_case(c, shared, tmp_path, capsys, monkeypatch)


SLOW = [c for c in CASES if c.slow]


@pytest.mark.slow
@pytest.mark.parametrize("c", SLOW, ids=[c.id for c in SLOW])
def test_bad_input_across_ranks(c, shared, tmp_path, capsys, monkeypatch):
    check_case(c, shared, tmp_path, capsys, monkeypatch)


def test_table_size_and_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60
    assert {c.surface for c in CASES} >= {"convert", "verify", "data", "train", "eval", "slurm", "study"}


def test_save_tiny_checkpoint_copies_only_tokenizer_files(tmp_path):
    """A tokenizer_dir that also holds a model (another checkpoint) must not overwrite the tiny model's files."""
    from emoe_llm.tiny import save_tiny_checkpoint

    other = save_tiny_checkpoint(tmp_path / "other", tokenizer_dir=TOKENIZER, hidden_size=128)
    tiny = save_tiny_checkpoint(tmp_path / "tiny", tokenizer_dir=other)
    assert json.loads((tiny / "config.json").read_text())["hidden_size"] == 64
    assert (tiny / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (tiny / "tokenizer.json").read_bytes() == (TOKENIZER / "tokenizer.json").read_bytes()


def markdown() -> str:
    lines = [
        "# Bad inputs: what each one says",
        "",
        "Every row is a test case in `tests/test_bad_inputs.py` (regenerate this file with",
        "`python tests/test_bad_inputs.py > docs/errors.md`). Each case checks the one error line (a regex, shown",
        "here), the exit code, that sources are untouched and no partial output or lock is left behind, and, where",
        "the case has a fix, that the same command succeeds once the input is fixed.",
        "",
        "Exit codes: 0 ok, 1 `verify` found DST wrong / an unexpected crash in training, 2 bad input.",
        "",
        "Numbers, in recipes and on every command line, go through `emoe_llm/checks.py`: finite first (NaN passes any",
        "`<= 0` check, and `1e400` reads as inf), then the range the value needs.",
        "",
        "| case | bad input | exit | message (regex) |",
        "|---|---|---|---|",
    ]
    for c in CASES:
        msg = c.message.replace("|", "\\|")
        lines.append(f"| `{c.id}` | {c.what} | {c.code} | `{msg}` |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current():
    doc = (REPO / "docs" / "errors.md").read_text()
    assert doc == markdown(), "docs/errors.md is stale: python tests/test_bad_inputs.py > docs/errors.md"


if __name__ == "__main__":
    sys.stdout.write(markdown())
