"""The one way a run gets its EMoE checkpoint (the recipe, ``emoe-llm convert`` and the Slurm jobs all call it):

    prepare_emoe_checkpoint(src, dst, n_experts=64, top_k=16, layers="28,30")

Only what changes the weights keys a conversion: N, the permuted layers, the clustering seed and method. top-k and
which permuted layers run as EMoE are training-time settings (``enable_emoe(top_k=, layers=)``), so changing them
reuses DST as it is -- no re-clustering.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .. import emoe, hub
from .convert import SUMMARY_FILE, convert_checkpoint
from .errors import ConversionError
from .source import load_config, open_source
from .verify import format_report, verify_checkpoint

WEIGHT_KEYS = ("n_experts", "permuted_layers", "seed", "method")  # the emoe-block fields that change weights


def conversion_key(src: str | Path, *, n_experts: int, layers, permute_layers=None, seed: int = 0,
                   method: str = "kmeans") -> dict:
    """The weight-changing settings a conversion of SRC with these options would record in its ``emoe`` block."""
    if not Path(src).is_dir():
        open_source(src)  # raises: not a directory (with the download hint when SRC looks like a Hub id)
    n_layers = load_config(Path(src))["num_hidden_layers"]  # raises naming config.json and what is wrong in it
    try:
        permuted = emoe.parse_layer_spec(permute_layers if permute_layers is not None else layers, n_layers)
    except ValueError as e:
        raise ConversionError(f"SRC {src}: {e}") from None
    return {"n_experts": n_experts, "permuted_layers": permuted, "seed": seed, "method": method}


def existing_key(dst: str | Path) -> dict | None:
    """The weight-changing settings of the conversion in DST, or None when DST holds none."""
    try:
        block = json.loads((Path(dst) / "config.json").read_text()).get("emoe")
    except (OSError, ValueError):
        return None
    if not block:
        return None
    settings = emoe.EMoESettings.from_dict(block)
    return {k: getattr(settings, k) for k in WEIGHT_KEYS}


def key_differences(have: dict, want: dict, *, permute_layers_given: bool) -> list[str]:
    """What differs between DST's conversion and the wanted one, e.g. ["seed 0 -> 1"]. Without an explicit
    permute_layers, a DST that permuted more layers than the EMoE ones still serves (extra permuted layers keep the
    dense function and only allow more EMoE layers later)."""
    out = []
    for k in WEIGHT_KEYS:
        if k == "permuted_layers" and not permute_layers_given and set(want[k]) <= set(have[k]):
            continue
        if have[k] != want[k]:
            out.append(f"{k} {have[k]} -> {want[k]}")
    return out


def prepare_emoe_checkpoint(src, dst, *, n_experts: int, top_k: int, layers, permute_layers=None, seed: int = 0,
                            method: str = "kmeans", verify: dict | None = None, overwrite: bool = False,
                            resume: bool = False, log: Callable[[str], None] = print, revision: str | None = None,
                            **convert_options) -> dict:
    """Make DST the EMoE conversion of SRC for these settings, doing as little as possible.

    DST is reused when its ``emoe`` block has the same N, permuted layers, seed and method (and, with ``verify`` --
    ``verify_checkpoint`` keyword arguments -- when it verifies against SRC). Otherwise SRC is converted into DST:
    an existing other DST is replaced only with ``overwrite``; ``resume`` continues an interrupted conversion.

    SRC may be a Hub id (``org/name``, pinned with ``revision``): it is resolved to its cached snapshot first, and the
    commit it resolved to keys the conversion too (recorded as ``source`` in DST/emoe_conversion.json), so a new
    upstream commit converts again instead of reusing a conversion of other weights.

    Returns {"action": "reused" | "converted", "key": ..., "verify": report or None, "summary": the conversion
    summary (``convert_checkpoint``'s) or None}.
    """
    try:
        resolved = hub.resolve(str(src), revision=revision)
    except hub.HubError as e:
        raise ConversionError(str(e)) from None
    if resolved.repo_id:
        log(f"{resolved.repo_id}: commit {resolved.commit} ({resolved.path})")
    src = resolved.path
    want = conversion_key(src, n_experts=n_experts, layers=layers, permute_layers=permute_layers, seed=seed,
                          method=method)
    have = existing_key(dst)
    changed = key_differences(have, want, permute_layers_given=permute_layers is not None) if have else None
    if have is not None and resolved.repo_id:
        changed += source_differences(dst, resolved)
    if have is not None:
        if not changed:
            report = _verify(src, dst, n_experts, layers, verify)
            if report is None or report["ok"]:
                log(f"conversion skipped: {dst} already is this conversion of {src} ({_describe(have)})"
                    + ("; it verifies" if report else ""))
                return {"action": "reused", "key": want, "verify": report, "summary": None}
            log(f"{dst} does not verify against {src}: converting again\n" + format_report(report))
        else:
            log(f"{dst} is another conversion ({', '.join(changed)}): converting again")
        if not overwrite:
            raise ConversionError(f"DST {dst} is not empty: it holds a different or broken conversion; pass "
                                  "--overwrite to replace it (after the new one is done)")
    log(f"converting {src} -> {dst} ({_describe(want)}, top_k {top_k})")
    summary = convert_checkpoint(src, dst, n_experts=n_experts, top_k=top_k, layers=layers,
                                 permute_layers=permute_layers, seed=seed, method=method, overwrite=overwrite,
                                 resume=resume, source_record=resolved.record(), **convert_options)
    report = _verify(src, dst, n_experts, layers, verify)
    if report is not None and not report["ok"]:
        raise ConversionError(f"the fresh conversion {dst} does not verify against {src}:\n" + format_report(report))
    log(f"converted{' and verified' if report else ''}: {dst}")
    return {"action": "converted", "key": want, "verify": report, "summary": summary}


def source_differences(dst, resolved: hub.Resolved) -> list[str]:
    """A conversion of a Hub id is keyed on the commit it was made from (DST/emoe_conversion.json ``source``)."""
    try:
        recorded = json.loads((Path(dst) / SUMMARY_FILE).read_text()).get("source") or {}
    except (OSError, ValueError):
        recorded = {}
    have = recorded.get("commit")
    return [] if have == resolved.commit else [f"source commit {have} -> {resolved.commit}"]


def _verify(src, dst, n_experts, layers, options: dict | None) -> dict | None:
    if options is None:
        return None
    return verify_checkpoint(src, dst, n_experts=n_experts, layers=layers, **options)


def _describe(key: dict) -> str:
    return (f"{key['n_experts']} experts, permuted layers {key['permuted_layers']}, seed {key['seed']}, "
            f"{key['method']}")
