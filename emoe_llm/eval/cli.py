"""``emoe-llm eval``: EleutherAI's lm-evaluation-harness on an HF causal-LM checkpoint, dense or with the EMoE mask.

    emoe-llm eval runs/x/final --tasks emoe_mmlu,emoe_nll_alpaca_heldout
    emoe-llm eval runs/x/final --tasks my_task --include-path my_tasks/ --limit 50 --output my.json
    emoe-llm eval --list-tasks

The model is loaded once (plain transformers, EMoE masking added in mode emoe) and handed to lm-eval as a built
``PreTrainedModel`` (``HFLM(pretrained=model)``); ``--tasks`` takes lm-eval task names: the tasks shipped in
``emoe_llm/eval/tasks`` (``--list-tasks``), lm-eval's own, and those in ``--include-path`` directories. Offline:
the command sets ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``, so a task whose data is not local fails.

``--mode auto`` (default) scores every checkpoint dense: the weights as a plain ``AutoModelForCausalLM`` load sees
them, which is what the paper's evaluation computed (OpenCompass on the saved checkpoint; the EMoE mask is a
training-time device). ``--mode emoe`` scores it with the expert mask (the checkpoint's 'emoe' block: N, k, layers).
The JSON records the mode and why (``mode``, ``mode_source``). The paper's four cells, one command each:

    emoe-llm eval runs/llama2_7b_dense/final               # dense -> dense   (the baseline)
    emoe-llm eval runs/llama2_7b_dense/final --mode emoe   # dense -> masked  (LoRA2EMoE-style: mask at test only)
    emoe-llm eval runs/llama2_7b_emoe/final                # EMoE  -> dense   (EMoE as the paper reports it)
    emoe-llm eval runs/llama2_7b_emoe/final --mode emoe    # EMoE  -> masked  (mask at train and test)

The NLL tasks render their prompts with the template the checkpoint was trained with (``emoe_trained.template``
in config.json: the Alpaca prompt for ``alpaca``, the tokenizer's chat template for ``auto``), so the held-out
score is in distribution; ``--nll-template`` overrides it. Beside each JSON, ``<output>.samples.jsonl`` holds one
record per (task, document) -- what a study's paired statistics are computed from.

``--mode emoe,dense`` scores both in one process (imports, task index and task data paid once; the weights are loaded
again for each mode), one JSON each: ``--output`` then names them with ``{mode}`` (``eval/{mode}.json``).

The result JSON keeps lm-eval's ``results`` (and ``groups``) dicts unchanged, beside the mode used and why
(``mode_source``), the training record, k / layers when masked, the settings, the seconds and the versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from emoe_llm.checks import nonnegative_int, positive_int
from emoe_llm.emoe.settings import EVAL_MODES, TRAINED_KEY, resolve_eval_mode
from emoe_llm.eval.inputs import check_eval_inputs
from emoe_llm.fileio import atomic_write_text

DEFAULT_TASKS = "emoe_mmlu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="HF checkpoint dir (e.g. runs/x/final) or a Hub id")
    parser.add_argument("--revision", metavar="REV", help="with a Hub id: the branch, tag or commit (default main)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"comma-separated lm-eval task or group names (default {DEFAULT_TASKS}; see --list-tasks)")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a directory of your own lm-eval task YAMLs (repeatable), as lm-eval's --include_path")
    parser.add_argument("--list-tasks", action="store_true", help="list the tasks shipped with emoe-llm and exit")
    parser.add_argument("--num-fewshot", type=nonnegative_int, default=None,
                        help="shots per question (default: each task's own, e.g. 5 for emoe_mmlu)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="at most N documents per task (default: all; for quick checks only)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="documents per forward (default 8)")
    parser.add_argument("--mode", type=_modes, default=["auto"],
                        help="auto (default): dense, as the paper's evaluation and any plain loader score an export; "
                             "emoe: with the expert mask; several, comma-separated (emoe,dense), are scored one after "
                             "the other in this process")
    parser.add_argument("--nll-template", default=None, metavar="TEMPLATE",
                        help="prompt format of the NLL tasks (alpaca, auto, llama2, llama3, alpaca_merged or a Jinja "
                             "file; default: the template the checkpoint was trained with, config.json "
                             "'emoe_trained', else alpaca)")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="override the checkpoint's EMoE top-k (mode emoe)")
    parser.add_argument("--mmlu-dir", default=None,
                        help="another directory of Hendrycks MMLU CSVs (dev/, val/, test/) for the emoe_mmlu tasks "
                             "(default: the shipped data/eval/mmlu)")
    parser.add_argument("--mmlu-split", choices=("val", "test"), default="val",
                        help="the split the emoe_mmlu tasks score (test: with the full MMLU CSVs in --mmlu-dir)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="context budget in tokens (default: the model's)")
    parser.add_argument("--device", default="auto",
                        help="auto (one GPU when the model fits on it, else all visible GPUs via device_map=auto; "
                             "cpu without GPUs) | cpu | cuda | cuda:1")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: the checkpoint's dtype on GPU, fp32 on CPU")
    parser.add_argument("--output", default=None,
                        help="results JSON (default: <checkpoint parent>/eval/<checkpoint name>_<mode>.json); "
                             "'{mode}' in it is replaced by the mode (needed with several modes)")
    parser.add_argument("--no-progress", action="store_true", help="quieter: lm-eval logs errors only")


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",")]
    if any(m not in EVAL_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"each mode must be {', '.join(EVAL_MODES[:-1])} or {EVAL_MODES[-1]}, got "
                                         f"{text!r}")
    return modes


def resolve_modes(path: str, requested: list[str]) -> list[tuple[str, str]]:
    """(mode, why) of each mode to score, resolved (auto -> dense) and checked before anything loads:
    distinct, and emoe only on a checkpoint with an 'emoe' block."""
    cfg_path = Path(path) / "config.json"
    config = json.loads(cfg_path.read_text())
    resolved = [resolve_eval_mode(config, m) for m in requested]
    modes = [mode for mode, _ in resolved]
    if len(set(modes)) != len(modes):
        raise ValueError(f"--mode {','.join(requested)} names the same mode twice ({', '.join(modes)} for "
                         f"{cfg_path})")
    if "emoe" in modes and not config.get("emoe"):
        raise ValueError(f"--mode emoe: {cfg_path} has no 'emoe' block (not a converted checkpoint); use --mode dense")
    return resolved


def nll_template(path: str, requested: str | None) -> tuple[str, str]:
    """(template, why) the NLL tasks render their prompts with: --nll-template, else the training record's."""
    if requested:
        return requested, "requested (--nll-template)"
    trained = json.loads((Path(path) / "config.json").read_text()).get(TRAINED_KEY)
    if isinstance(trained, dict) and trained.get("template"):
        return trained["template"], f"the training template ({TRAINED_KEY}.template in config.json)"
    return "alpaca", f"no training template recorded ({TRAINED_KEY}.template): the official Alpaca prompt"


def samples_path(path: Path) -> Path:
    """The per-document records beside a results JSON: eval/emoe.json -> eval/emoe.samples.jsonl."""
    return path.with_name(path.name.removesuffix(".json") + ".samples.jsonl")


def sample_records(samples: dict) -> list[dict]:
    """lm-eval's logged samples -> one record per (task, document): ``task``, ``doc_id`` (the task's document
    index, the same in every run) and each metric's value for that document (``<metric>[<filter>]`` for a filter
    other than none). A metric a task scores as a (total, weight) pair -- nll_per_token: (summed NLL, target
    tokens) -- gives ``<metric>`` = total / weight and ``<metric>_weight``, so a report can weight documents."""
    records: dict[tuple[str, int], dict] = {}
    for task, examples in samples.items():
        for example in examples:
            rec = records.setdefault((task, example["doc_id"]), {"task": task, "doc_id": example["doc_id"]})
            filt = example.get("filter", "none")
            for metric in example.get("metrics", []):
                name = metric + ("" if filt == "none" else f"[{filt}]")
                value = example.get(metric)
                if isinstance(value, (list, tuple)) and len(value) == 2:
                    total, weight = map(float, value)
                    rec[name], rec[f"{name}_weight"] = (total / weight if weight else None), weight
                elif isinstance(value, (int, float)):  # bools too: exact_match may be True/False
                    rec[name] = float(value)
    return [records[k] for k in sorted(records)]


def output_path(output: str | None, ckpt: Path, mode: str, n_modes: int) -> Path:
    if output is None:
        return ckpt.parent / "eval" / f"{ckpt.name}_{mode}.json"
    if n_modes > 1 and "{mode}" not in output:
        raise ValueError(f"--output {output}: with several modes it must contain {{mode}} (e.g. eval/{{mode}}.json), "
                         "one file per mode")
    return Path(output.replace("{mode}", mode))


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


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ONE_GPU_HEADROOM = 0.8  # weights up to 80% of one GPU's memory stay on one GPU; the rest is for activations / KV


def weight_bytes(path: str | Path, config: dict, dtype) -> int:
    """Bytes of the checkpoint's weights once loaded in ``dtype`` (a torch dtype, or "auto": as stored): the
    safetensors files' sizes, scaled from the stored dtype."""
    root = Path(path)
    stored = sum(f.stat().st_size for f in root.glob("*.safetensors")) or sum(
        f.stat().st_size for f in root.glob("*.bin"))
    stored_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    target = str(dtype).removeprefix("torch.") if dtype != "auto" else stored_dtype
    return int(stored * DTYPE_BYTES.get(target, 4) / DTYPE_BYTES.get(stored_dtype, 4))


def eval_placement(model_bytes: int, gpu_bytes: list[int]) -> str:
    """Where ``--device auto`` puts the model: "cpu" without GPUs; "cuda:0" when it fits on one GPU (a model that
    fits runs fastest there: ``device_map="auto"`` over eight would run it layer by layer across them, one GPU busy
    at a time); "auto" (shard over all of them) only when it does not."""
    if not gpu_bytes:
        return "cpu"
    if len(gpu_bytes) == 1 or model_bytes <= ONE_GPU_HEADROOM * gpu_bytes[0]:
        return "cuda:0"
    return "auto"


def load_for_eval(path: str, *, mode: str, mode_source: str, device: str, dtype: str, top_k: int | None = None):
    """(model, tokenizer, info) -- plain transformers, EMoE masking added for mode emoe (a mode ``resolve_modes``
    gave). ``info``: ``mode``, ``mode_source``, the checkpoint's training record and, when masked, the ``top_k`` /
    ``layers`` used."""
    import torch
    from transformers import AutoModelForCausalLM

    from emoe_llm.data import load_tokenizer

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: expected an HF checkpoint dir")
    config = json.loads(cfg_path.read_text())
    info = {"mode": mode, "mode_source": mode_source, "trained": config.get(TRAINED_KEY)}
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype)
    shard = False
    if device == "auto":
        gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        device = eval_placement(weight_bytes(path, config, torch_dtype or "auto"), gpus)
        shard = device == "auto"  # e.g. 30B in bf16: over several GPUs
        info["placement"] = "device_map=auto over all GPUs" if shard else device
    if torch_dtype is None:
        torch_dtype = "auto" if device.startswith("cuda") or shard else torch.float32
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


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns on every task with a ``custom_dataset`` loader (all the shipped ones): noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(include_paths=(), metadata: dict | None = None, *, quiet: bool = False,
                 lm_eval_tasks: bool = True):
    """lm-eval's TaskManager over the shipped tasks, the user's directories and (``lm_eval_tasks``) lm-eval's own,
    whose index takes ~20 s to build on a small machine. Offline: no hub call."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager

    # lm-eval's records go to the root logger's handlers (the current stderr), not a handler of their own.
    logging.getLogger("lm_eval").setLevel(logging.ERROR if quiet else logging.WARNING)
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropCustomDatasetNotice) for f in task_log.filters):
        task_log.addFilter(_DropCustomDatasetNotice())

    from .tasks import TASKS_DIR

    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)], include_defaults=lm_eval_tasks,
                       metadata=metadata)


def load_tasks(manager, names: list[str]) -> list:
    """Build every task (reads its data) before any weights load: a missing file fails in seconds, naming the task."""
    built = []
    for name in names:
        try:
            loaded = manager.load(name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"task {name}: data file not found: {e}") from None
        except ValueError as e:
            raise ValueError(f"task {name}: {e}") from None
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        built.extend([top] if top is not None else loaded["tasks"].values())  # a tag: its tasks
    return built


def _json_safe(obj):
    """lm-eval writes nan for an undefined stderr (e.g. one document): strict JSON gets null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def format_report(results: dict) -> str:
    lines = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            lines.append(f"  {metrics.get('alias', task):<40} {key:<28} {value:.4f}")
    return "\n".join(lines)


def list_tasks() -> str:
    from .tasks import SHIPPED

    width = max(map(len, SHIPPED))
    return "\n".join(f"{name:<{width}}  {text}" for name, text in SHIPPED.items())


def run(args: argparse.Namespace) -> int:
    if args.list_tasks:
        print(list_tasks())
        return 0
    if not args.checkpoint:
        print("emoe-llm eval: error: give a checkpoint dir (or --list-tasks)", file=sys.stderr)
        return 2
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        print("emoe-llm eval: error: --tasks is empty; see emoe-llm eval --list-tasks", file=sys.stderr)
        return 2
    for d in args.include_path:
        if not Path(d).is_dir():
            print(f"emoe-llm eval: error: --include-path {d} is not a directory", file=sys.stderr)
            return 2
    from emoe_llm import hub

    try:
        args.checkpoint = str(hub.resolve(args.checkpoint, revision=getattr(args, "revision", None)).path)
    except hub.HubError as e:
        print(f"emoe-llm eval: error: {e}", file=sys.stderr)
        return 2
    ckpt = Path(args.checkpoint).resolve()
    metadata = {"tokenizer": str(ckpt), "mmlu_split": args.mmlu_split}
    try:
        metadata["nll_template"], template_source = nll_template(args.checkpoint, args.nll_template)
    except (OSError, ValueError):
        template_source = None  # no readable config.json: check_eval_inputs below says so
    if args.mmlu_dir:
        metadata["mmlu_dir"] = str(Path(args.mmlu_dir).resolve())
    try:
        # Everything cheap first (task names, task data, shard headers): a bad row must not cost the minutes a 7B
        # load takes.
        check_eval_inputs(args.checkpoint)
        check_checkpoint_files(args.checkpoint)
        manager = task_manager(args.include_path, metadata, quiet=args.no_progress, lm_eval_tasks=False)
        if any(n not in manager.all_tasks for n in names):  # not shipped nor the user's: lm-eval's own task list
            manager = task_manager(args.include_path, metadata, quiet=args.no_progress)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; see emoe-llm eval --list-tasks (shipped) or lm-eval's "
                             "task list, or add your YAMLs with --include-path")
        tasks = load_tasks(manager, names)
        modes = resolve_modes(args.checkpoint, args.mode)
        paths = {mode: output_path(args.output, ckpt, mode, len(modes)) for mode, _ in modes}
    except (FileNotFoundError, ValueError) as e:
        print(f"emoe-llm eval: error: {e}", file=sys.stderr)
        return 2
    for mode, source in modes:
        rc = evaluate_mode(args, ckpt, names, manager, tasks, mode=mode, mode_source=source, path=paths[mode],
                           template=(metadata.get("nll_template"), template_source))
        if rc:
            return rc
    return 0


def evaluate_mode(args: argparse.Namespace, ckpt: Path, names: list[str], manager, tasks: list, *, mode: str,
                  mode_source: str, path: Path, template: tuple[str | None, str | None] = (None, None)) -> int:
    """Load the checkpoint in ``mode``, score ``tasks`` with lm-eval, write the per-document records and then the
    results JSON to ``path`` (the JSON last: a study takes it as the sign that both are there)."""
    try:
        model, tokenizer, info = load_for_eval(args.checkpoint, mode=mode, mode_source=mode_source,
                                               device=args.device, dtype=args.dtype, top_k=args.top_k)
    except (FileNotFoundError, ValueError) as e:
        print(f"emoe-llm eval: error: {e}", file=sys.stderr)
        return 2
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from emoe_llm import __version__

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                  limit=args.limit, log_samples=True)
    records = sample_records(out.pop("samples", {}))
    result = {"results": out["results"]}
    if out.get("groups"):
        result["groups"] = out["groups"]
    for key in ("group_subtasks", "n-shot", "n-samples", "higher_is_better", "versions"):
        if key in out:
            result[key] = out[key]
    result.update(info)
    result.update(checkpoint=str(ckpt), tasks=names, include_path=[str(Path(d).resolve()) for d in args.include_path],
                  nll_template={"name": template[0], "source": template[1]}, samples=samples_path(path).name,
                  num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                  seconds=round(time.perf_counter() - t0, 2), lm_eval_version=lm_eval.__version__,
                  emoe_llm_version=__version__)
    print(f"{', '.join(names)}, mode {info['mode']} ({info['mode_source']}): {args.checkpoint}")
    print(format_report({**out["results"], **out.get("groups", {})}))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(samples_path(path), "".join(json.dumps(_json_safe(r), allow_nan=False) + "\n"
                                                      for r in records))
        atomic_write_text(path, json.dumps(_json_safe(result), indent=2, allow_nan=False))
        print(f"wrote {path} and its {len(records)} per-document records {samples_path(path).name}")
    except OSError as e:
        print(f"emoe-llm eval: error: could not write {path}: {e} (use --output)", file=sys.stderr)
        return 1
    del model, lm  # before the next mode loads its copy
    return 0
