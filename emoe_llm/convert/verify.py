"""Check a converted checkpoint against its source, streaming, for any model size.

    report = verify_checkpoint("Llama-2-7b-hf", "Llama-2-7b-emoe")
    assert report["ok"], report["failures"]

Checks, cheapest first (every failure is collected, not just the first):
  1. structure: DST's config has a valid ``emoe`` block and otherwise equals SRC's; DST's index is complete (every
     tensor in a shard that exists, every shard parses); same tensor names and shapes as SRC; dtypes as converted;
  2. copied tensors are byte-identical to SRC (after the recorded ``--dtype`` cast), streamed in chunks;
  3. every permuted layer's MLP computes the same function: on random inputs the gated-MLP output of DST's tensors
     (the family's layout and activation, ``emoe_llm.arch``) equals SRC's (float64, one tensor in memory at a
     time), and DST's neurons are a permutation of SRC's;
  4. small models (``max_logits_bytes``): the dense logits of the whole model are equal on random tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import emoe
from .convert import OUTPUT_DTYPES, SUMMARY_FILE
from .errors import ConversionError
from .names import check_mlp_layout, mlp_tensor_names, source_layout
from .safetensors_io import DTYPE_CODES
from .source import SourceCheckpoint, open_source

_ROW_CHUNK = 4096  # rows upcast to float64 at a time: bounds memory for 30B-wide layers


def verify_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    n_experts: int | None = None,
    layers=None,
    check_copied: bool = True,
    check_logits: bool = True,
    max_logits_bytes: int = 2 << 30,
    n_tokens: int = 16,
    seed: int = 0,
    atol: float = 1e-4,
    allow_pickle: bool = False,
) -> dict:
    """Verify DST against SRC (see module docstring). ``n_experts`` and ``layers``, when given, must fit DST's
    ``emoe`` block: the same N, and every one of ``layers`` clustered and permuted (top-k and which of the permuted
    layers run as EMoE are training-time settings, so they are not checked).

    Returns:
        {"ok": bool, "failures": [str], "checks": {name: detail}}.
    Raises:
        ConversionError: SRC itself cannot be read.
    """
    report = {"ok": True, "failures": [], "checks": {}}

    def fail(msg: str) -> None:
        report["ok"] = False
        report["failures"].append(msg)

    source = open_source(src, allow_pickle=allow_pickle)
    dst = Path(dst)
    if not (dst / "config.json").is_file():
        fail(f"DST {dst} is not a converted checkpoint (no config.json)")
        return report
    try:
        target = open_source(dst)
    except ConversionError as e:
        fail(f"DST is incomplete or corrupt: {e}")
        return report
    settings = _check_config(source, target, fail, n_experts=n_experts, layers=layers)
    if settings is None:
        return report
    out_dtype = OUTPUT_DTYPES.get(_recorded_dtype(dst), None)
    if not _check_structure(source, target, out_dtype, fail):
        return report
    _check_index_total(target, fail)
    report["checks"]["structure"] = f"{len(target.tensors)} tensors in {len(target.shards)} shard(s)"
    permuted = {name for i in settings.permuted_layers for name in mlp_tensor_names(i, source).values()}
    if check_copied:
        copied = [n for n in source.tensors if n not in permuted]
        bad = [n for n in copied if not _same_bytes(source, target, n, out_dtype)]
        for name in bad[:5]:
            fail(f"'{name}' differs from SRC but should be copied unchanged")
        report["checks"]["copied_tensors"] = f"{len(copied) - len(bad)}/{len(copied)} byte-identical"
    layer_diffs = {}
    for layer in settings.permuted_layers:
        diff, is_permutation = _compare_mlp(source, target, layer, n_tokens=n_tokens, seed=seed + layer,
                                            cast=out_dtype)
        layer_diffs[str(layer)] = diff
        if not is_permutation:
            fail(f"layer {layer}: DST's MLP neurons are not a permutation of SRC's")
        elif diff > atol:
            fail(f"layer {layer}: MLP output differs from SRC by {diff:.3g} (> {atol})")
    report["checks"]["mlp_max_rel_diff"] = layer_diffs
    size = sum(m.nbytes for m in source.tensors.values())
    if check_logits and size <= max_logits_bytes:
        diff = _compare_logits(source.root, dst, n_tokens=n_tokens, seed=seed, cast=out_dtype)
        report["checks"]["logits_max_rel_diff"] = diff
        if diff > atol:
            fail(f"dense logits differ from SRC by {diff:.3g} (> {atol})")
    elif check_logits:
        report["checks"]["logits"] = f"skipped: model is {size / 2**30:.1f} GiB > {max_logits_bytes / 2**30:.1f} GiB"
    return report


def format_report(report: dict) -> str:
    lines = [f"  {name}: {detail}" for name, detail in report["checks"].items()]
    lines += [f"  FAILED: {msg}" for msg in report["failures"]]
    return ("verify OK\n" if report["ok"] else "verify FAILED\n") + "\n".join(lines)


# --- structure ------------------------------------------------------------------------------------------------------

_DTYPE_KEYS = ("dtype", "torch_dtype")


def _check_config(source, target, fail, *, n_experts, layers) -> emoe.EMoESettings | None:
    # Architecture first: DST made from another model would otherwise be reported as a bad 'emoe' block.
    strip = lambda c: {k: v for k, v in c.items() if k != "emoe" and k not in _DTYPE_KEYS}  # noqa: E731
    src_cfg, dst_cfg = strip(source.config), strip(target.config)
    if src_cfg != dst_cfg:
        keys = sorted(k for k in set(src_cfg) | set(dst_cfg) if src_cfg.get(k) != dst_cfg.get(k))
        diffs = "; ".join(f"{k}: SRC {src_cfg.get(k, '(absent)')!r}, DST {dst_cfg.get(k, '(absent)')!r}"
                          for k in keys[:6])
        fail(f"DST's config.json does not describe SRC's model: {diffs}" + (" ..." if len(keys) > 6 else "")
             + "; DST was converted from another checkpoint")
        return None
    block = target.config.get("emoe")
    if not block:
        fail(f"{target.root / 'config.json'} has no 'emoe' block: DST is not a converted checkpoint")
        return None
    try:
        settings = emoe.EMoESettings.from_dict(block)
        emoe.validate_settings(n_experts=settings.n_experts, top_k=settings.top_k, layers=settings.layers,
                               d_ff=target.config["intermediate_size"], n_layers=target.config["num_hidden_layers"],
                               model_type=target.config.get("model_type"))
        check_mlp_layout(source, settings.permuted_layers)
    except (ValueError, ConversionError) as e:
        fail(f"{target.root / 'config.json'}: invalid 'emoe' block: {e}")
        return None
    if not set(settings.layers) <= set(settings.permuted_layers):
        fail(f"emoe.layers {settings.layers} are not all in emoe.permuted_layers {settings.permuted_layers}")
    if n_experts is not None and settings.n_experts != n_experts:
        fail(f"DST has {settings.n_experts} experts, expected {n_experts}")
    if layers is not None:
        want = emoe.parse_layer_spec(layers, target.config["num_hidden_layers"])
        if not set(want) <= set(settings.permuted_layers):
            fail(f"layers {sorted(set(want) - set(settings.permuted_layers))} are not permuted in DST (permuted: "
                 f"{settings.permuted_layers}); they cannot run as EMoE without re-clustering")
    return settings


def _recorded_dtype(dst: Path) -> str:
    try:
        return json.loads((dst / SUMMARY_FILE).read_text()).get("dtype", "keep")
    except (OSError, json.JSONDecodeError):
        return "keep"


def _check_structure(source, target, out_dtype, fail) -> bool:
    ok = True
    missing = [n for n in source.tensors if n not in target.tensors]
    extra = [n for n in target.tensors if n not in source.tensors]
    if missing:
        ok = False
        fail(f"DST lacks {len(missing)} tensors of SRC, e.g. '{missing[0]}'")
    if extra:
        ok = False
        fail(f"DST has {len(extra)} tensors SRC does not, e.g. '{extra[0]}'")
    for name, meta in source.tensors.items():
        got = target.tensors.get(name)
        if got is None:
            continue
        want_dtype = DTYPE_CODES[out_dtype] if out_dtype is not None and meta.is_floating else meta.dtype
        if got.shape != meta.shape or got.dtype != want_dtype:
            ok = False
            fail(f"'{name}': DST has {got.dtype}{list(got.shape)}, expected {want_dtype}{list(meta.shape)}")
    return ok


def _check_index_total(target: SourceCheckpoint, fail) -> None:
    total = target.index_metadata.get("total_size")
    actual = sum(m.nbytes for m in target.tensors.values())
    if total is not None and total != actual:
        fail(f"{target.root}: index metadata total_size is {total} but the tensors hold {actual} bytes")


def _same_bytes(source: SourceCheckpoint, target: SourceCheckpoint, name: str, out_dtype) -> bool:
    cast = out_dtype if source.tensors[name].is_floating else None
    a_chunks, b_chunks = source.iter_bytes(name, cast), target.iter_bytes(name)
    a_rest, b_rest = b"", b""
    # Chunk boundaries differ only if itemsizes differ; compare through a small carry-over buffer.
    for a in a_chunks:
        a_rest += bytes(a)
        while len(b_rest) < len(a_rest):
            b = next(b_chunks, None)
            if b is None:
                return False
            b_rest += bytes(b)
        n = min(len(a_rest), len(b_rest))
        if a_rest[:n] != b_rest[:n]:
            return False
        a_rest, b_rest = a_rest[n:], b_rest[n:]
    return not a_rest and not b_rest and next(b_chunks, None) is None


# --- function checks ------------------------------------------------------------------------------------------------

def _read(ckpt: SourceCheckpoint, name: str, cast: torch.dtype | None) -> torch.Tensor:
    # SRC is compared after the conversion's --dtype cast, so a bf16 DST is held to the bf16-rounded SRC.
    w = ckpt.read(name)
    return w if cast is None else w.to(cast)


def _rows_times(ckpt: SourceCheckpoint, name: str, x: torch.Tensor, cast=None) -> torch.Tensor:
    """``W @ x`` in float64 for a stored (rows, cols) weight, upcasting a few thousand rows at a time."""
    w = _read(ckpt, name, cast)
    out = torch.cat([w[i:i + _ROW_CHUNK].to(torch.float64) @ x for i in range(0, w.shape[0], _ROW_CHUNK)])
    del w
    return out


def _mlp_output(ckpt: SourceCheckpoint, layer: int, x: torch.Tensor, cast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(intermediate h (d_ff, t), output y (d, t)) of one layer's gated MLP for inputs x (d, t)."""
    from transformers.activations import ACT2FN

    layout = source_layout(ckpt)
    names = mlp_tensor_names(layer, ckpt)

    def project(role: str) -> torch.Tensor:
        out = _rows_times(ckpt, names[role], x, cast)
        if f"{role}_bias" in names:
            out += _read(ckpt, names[f"{role}_bias"], cast).to(torch.float64)[:, None]
        return out

    gate, up = project("gate_up").chunk(2, dim=0) if layout.fused else (project("gate"), project("up"))
    h = ACT2FN[layout.activation(ckpt.config)](gate) * up
    del gate, up
    y = _rows_times(ckpt, names["down"], h, cast)
    down_bias = layout.down_bias_name(layer)
    if down_bias in ckpt.tensors:
        y += _read(ckpt, down_bias, cast).to(torch.float64)[:, None]
    return h, y


def _compare_mlp(source, target, layer: int, *, n_tokens: int, seed: int, cast) -> tuple[float, bool]:
    """(max relative output difference, whether DST's neuron activations are a permutation of SRC's)."""
    d = source.config["hidden_size"]
    x = torch.randn(d, n_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h_src, y_src = _mlp_output(source, layer, x, cast)
    h_dst, y_dst = _mlp_output(target, layer, x)
    # A permutation of neurons permutes h's rows; sorting each token's column must give the same values.
    is_perm = torch.allclose(h_src.sort(dim=0).values, h_dst.sort(dim=0).values, rtol=1e-9, atol=1e-12)
    scale = y_src.abs().max().clamp_min(1e-30)
    return float((y_src - y_dst).abs().max() / scale), bool(is_perm)


def _compare_logits(src: Path, dst: Path, *, n_tokens: int, seed: int, cast) -> float:
    from transformers import AutoModelForCausalLM

    logits = []
    tokens = None
    for path in (src, dst):
        # both loaded in the converted dtype (SRC rounded like DST was), then run in fp32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=cast or torch.float32).float()
        model.eval()
        if tokens is None:
            gen = torch.Generator().manual_seed(seed)
            tokens = torch.randint(model.config.vocab_size, (2, n_tokens), generator=gen)
        with torch.no_grad():
            logits.append(model(input_ids=tokens).logits.to(torch.float64))
        del model
    scale = logits[0].abs().max().clamp_min(1e-30)
    return float((logits[0] - logits[1]).abs().max() / scale)
