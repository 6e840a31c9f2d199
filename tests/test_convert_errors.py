"""Bad inputs to emoe-llm convert: each gives an error naming the problem and leaves neither DST nor a partial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emoe_llm.cli import main as cli_main
from emoe_llm.convert import ConversionError, convert_checkpoint, verify_checkpoint
from emoe_llm.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", max_shard_size="100KB", seed=7)


@pytest.fixture
def src(pristine, tmp_path) -> Path:
    """A private copy each test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def load_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(set(weight_map(path).values())):
        out.update(load_file(str(path / shard)))
    return out


def convert_fails(src: Path, match: str, **options) -> None:
    dst = src.parent / "dst"
    kwargs = dict(n_experts=8, top_k=2, layers="1,3", progress=False)
    kwargs.update(options)
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(src, dst, **kwargs)
    assert not dst.exists()
    assert sorted(p.name for p in src.parent.iterdir()) == ["src"], "no partial output may remain"


def test_index_points_at_missing_shard(src):
    shard = weight_map(src)["model.layers.1.mlp.up_proj.weight"]
    (src / shard).unlink()
    convert_fails(src, rf"points at missing file {shard}")


def test_index_names_tensor_absent_from_shard(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    other = next(s for s in index["weight_map"].values() if s != index["weight_map"]["model.norm.weight"])
    index["weight_map"]["model.norm.weight"] = other
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_fails(src, rf"'model.norm.weight' is in {other}, but that shard does not contain it")


def test_truncated_shard(src):
    shard = src / weight_map(src)["model.layers.3.mlp.down_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    convert_fails(src, rf"{shard.name}: corrupt safetensors file: tensor .* \(truncated\?\)")


def test_garbage_shard(src):
    shard = src / weight_map(src)["model.embed_tokens.weight"]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    convert_fails(src, rf"{shard.name}: corrupt safetensors file: header is not valid JSON")


def test_non_llama_mlp_names(src):
    # a GPT-style MLP (fc_in/fc_out) where EMoE expects gate/up/down
    for shard in set(weight_map(src).values()):
        tensors = load_file(str(src / shard))
        renamed = {n.replace("gate_proj", "fc_in").replace("down_proj", "fc_out"): t for n, t in tensors.items()}
        save_file(renamed, str(src / shard), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n.replace("gate_proj", "fc_in").replace("down_proj", "fc_out"): s
                           for n, s in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_fails(src, r"'model.layers.1.mlp.gate_proj.weight' not found. EMoE needs a Llama-style SwiGLU MLP.*fc_in")


def test_experts_must_divide_d_ff(src):
    convert_fails(src, r"n_experts=7 does not divide intermediate_size=256", n_experts=7)


def test_bad_options(src):
    convert_fails(src, r"top_k=9 must satisfy", top_k=9)
    convert_fails(src, r"EMoE layer 4 is out of range", layers="4")
    convert_fails(src, r"dtype must be one of", dtype="int8")
    if not torch.cuda.is_available():
        convert_fails(src, r"device 'cuda' requested but CUDA is not available", device="cuda")


def test_unsupported_model_type_and_already_converted(src):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    convert_fails(src, r"model_type 'gpt2' is not supported")
    (src / "config.json").write_text(json.dumps({**config, "emoe": {"n_experts": 8, "top_k": 2, "layers": [1]}}))
    convert_fails(src, r"already has an 'emoe' block")
    (src / "config.json").unlink()
    convert_fails(src, r"config.json is missing")


def write_pickle_checkpoint(src: Path, out: Path) -> Path:
    """The old HF layout (pytorch_model-0000i-of-00002.bin + index), as 2023-era Llama-30B repos ship."""
    out.mkdir()
    tensors = load_all(src)
    names = sorted(tensors)
    index = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        shard = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, out / shard)
        index.update({n: shard for n in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    shutil.copy2(src / "config.json", out / "config.json")
    return out


def test_pickle_refused_unless_allowed(src, tmp_path):
    pickled = write_pickle_checkpoint(src, tmp_path / "pickled")
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError, match=r"only pickle weights \(pytorch_model.bin.index.json\).*--allow-pickle"):
        convert_checkpoint(pickled, dst, n_experts=8, top_k=2, layers="1", progress=False)
    assert not dst.exists()
    assert cli_main(["convert", str(pickled), str(dst), "--experts", "8", "--top-k", "2", "--layers", "1",
                     "--quiet"]) == 2

    summary = convert_checkpoint(pickled, dst, n_experts=8, top_k=2, layers="1", progress=False, allow_pickle=True)
    assert summary["source_format"] == "pickle"
    assert sorted(p.name for p in dst.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                  "model-00002-of-00002.safetensors"]
    reference = tmp_path / "reference"
    convert_checkpoint(src, reference, n_experts=8, top_k=2, layers="1", progress=False)
    got, want = load_all(dst), load_all(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert verify_checkpoint(pickled, dst, allow_pickle=True)["ok"]
