"""``emoe-llm eval``: MMLU (k-shot, answer-letter log-likelihood) on any HF causal-LM checkpoint.

    emoe-llm eval runs/x/final --tasks mmlu --split val --shots 5
    emoe-llm eval runs/x/final --mode dense --subjects abstract_algebra,anatomy --limit 20 --output acc.json

``--mode auto`` (default) evaluates a trained export the way it was trained: the recipe records the training mode in
config.json (``emoe_trained``: dense or emoe, N, k, layers), so a dense baseline is scored dense and an EMoE run masked.
A converted checkpoint that was never trained here runs masked ('emoe' block), anything else dense. ``--mode emoe``
/ ``--mode dense`` override it. The paper's four cells, one command each:

    emoe-llm eval runs/llama2_7b_dense/final               # dense -> dense   (the baseline)
    emoe-llm eval runs/llama2_7b_dense/final --mode emoe   # dense -> masked  (LoRA2EMoE-style: mask at test only)
    emoe-llm eval runs/llama2_7b_emoe/final                # EMoE  -> masked  (EMoE)
    emoe-llm eval runs/llama2_7b_emoe/final --mode dense   # EMoE  -> dense   (EMoE2LoRA-style: mask at train only)

Every result JSON records the mode used, why (``mode_source``), the training record, and k / layers when masked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from emoe_llm.emoe.settings import TRAINED_KEY, resolve_eval_mode
from emoe_llm.tiny import DATA_DIR
from emoe_llm.fileio import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="HF checkpoint dir (e.g. runs/x/final)")
    parser.add_argument("--tasks", default="mmlu", help="comma-separated tasks; available: mmlu")
    parser.add_argument("--mmlu-dir", default=str(DATA_DIR / "eval" / "mmlu"),
                        help="dir with dev/ and val/ (or test/) CSVs (default: the shipped data/eval/mmlu)")
    parser.add_argument("--split", default="val", help="val | test | dev (default val)")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev/ (default 5)")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")
    parser.add_argument("--limit", type=int, default=0, help="at most N questions per subject (0 = all)")
    parser.add_argument("--mode", choices=("auto", "dense", "emoe"), default="auto",
                        help="auto (default): as the checkpoint was trained (config.json 'emoe_trained'); "
                             "dense / emoe override it")
    parser.add_argument("--top-k", type=int, default=None, help="override the checkpoint's EMoE top-k (mode emoe)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="prompt budget in tokens (default: the model's)")
    parser.add_argument("--device", default="auto",
                        help="auto (all visible GPUs via device_map=auto, else cpu) | cpu | cuda | cuda:1")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: the checkpoint's dtype on GPU, fp32 on CPU")
    parser.add_argument("--output", default=None,
                        help="results JSON (default: <checkpoint parent>/eval/<name>_mmlu_<split>_<mode>.json)")
    parser.add_argument("--no-progress", action="store_true")


def check_checkpoint_files(path: str) -> None:
    """The weight files are complete (every shard the index names exists, every header fits its file, every tensor
    the architecture needs is there), checked from the headers alone with convert's checks: a truncated download
    fails here naming the shard instead of deep inside from_pretrained."""
    from emoe_llm.convert.errors import ConversionError
    from emoe_llm.convert.source import SAFE_INDEX, SAFE_SINGLE, check_required_tensors, open_source

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root / 'config.json'} not found: expected an HF checkpoint dir")
    if not ((root / SAFE_INDEX).is_file() or (root / SAFE_SINGLE).is_file()):
        return  # pickle weights: transformers checks them itself (with weights_only)
    try:
        check_required_tensors(open_source(root))
    except ConversionError as e:
        raise ValueError(f"checkpoint {root} is incomplete or corrupt: {e}") from None


def load_for_eval(path: str, *, mode: str, device: str, dtype: str, top_k: int | None = None):
    """(model, tokenizer, info) -- plain transformers, EMoE masking added for mode emoe. ``info``: the resolved
    ``mode``, ``mode_source``, the checkpoint's training record and, when masked, the ``top_k`` / ``layers`` used."""
    import torch
    from transformers import AutoModelForCausalLM

    from emoe_llm.data import load_tokenizer

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: expected an HF checkpoint dir")
    config = json.loads(cfg_path.read_text())
    has_emoe = bool(config.get("emoe"))
    mode, source = resolve_eval_mode(config, mode)
    info = {"mode": mode, "mode_source": source, "trained": config.get(TRAINED_KEY)}
    if mode == "emoe" and not has_emoe:
        raise ValueError(f"--mode emoe: {cfg_path} has no 'emoe' block (not a converted checkpoint); use --mode dense")
    shard = device == "auto" and torch.cuda.device_count() > 1  # e.g. 30B in bf16 over several GPUs
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype)
    if torch_dtype is None:
        torch_dtype = "auto" if device.startswith("cuda") else torch.float32
    if shard:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    if mode == "emoe":
        from emoe_llm.emoe import enable_emoe

        settings = enable_emoe(model, top_k=top_k)
        info.update(top_k=settings.top_k, n_experts=settings.n_experts, layers=list(settings.layers))
    tokenizer = load_tokenizer(path)
    return model, tokenizer, info


def run(args: argparse.Namespace) -> int:
    from .inputs import check_eval_inputs
    from .mmlu import evaluate_mmlu, format_report, read_mmlu

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t != "mmlu"]
    if unknown:
        print(f"emoe-llm eval: error: unknown task(s) {unknown}; available: mmlu", file=sys.stderr)
        return 2
    try:
        # Everything cheap first (CSVs, shard headers): a bad row must not cost the minutes a 7B load takes.
        check_eval_inputs(args.checkpoint, batch_size=args.batch_size, top_k=args.top_k, max_length=args.max_length)
        questions = read_mmlu(args.mmlu_dir, split=args.split, shots=args.shots, subjects=args.subjects,
                              limit=args.limit)
        check_checkpoint_files(args.checkpoint)
        model, tokenizer, info = load_for_eval(args.checkpoint, mode=args.mode, device=args.device, dtype=args.dtype,
                                               top_k=args.top_k)
    except (FileNotFoundError, ValueError) as e:
        print(f"emoe-llm eval: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        result = evaluate_mmlu(model, tokenizer, args.mmlu_dir, split=args.split, shots=args.shots,
                               subjects=args.subjects, limit=args.limit, batch_size=args.batch_size,
                               max_length=args.max_length, progress=not args.no_progress, questions=questions)
    except (FileNotFoundError, ValueError) as e:
        print(f"emoe-llm eval: error: {e}", file=sys.stderr)
        return 2
    result["checkpoint"] = str(Path(args.checkpoint).resolve())
    result.update(info)
    mode = info["mode"]
    result["seconds"] = round(time.perf_counter() - t0, 2)
    ckpt = Path(args.checkpoint).resolve()
    out = Path(args.output) if args.output else ckpt.parent / "eval" / f"{ckpt.name}_mmlu_{args.split}_{mode}.json"
    print(f"MMLU {args.split}, {args.shots}-shot, mode {mode} ({info['mode_source']}): {args.checkpoint}")
    print(format_report(result))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2, allow_nan=False))
        print(f"wrote {out}")
    except OSError as e:
        print(f"emoe-llm eval: error: could not write {out}: {e} (use --output)", file=sys.stderr)
        return 1
    return 0
