"""``emoe-llm demo``: the whole pipeline on a tiny embedded Llama, on CPU, in a few minutes.

    1. build a tiny 4-layer Llama (random init) with the shipped 2k-vocab tokenizer    -> runs/demo/tiny_dense
    2. convert it to EMoE (balanced k-means, 16 experts, top-4, layers 2,3)          -> runs/demo/tiny_emoe
    3. fine-tune it on the shipped Alpaca demo set with DeepSpeed ZeRO-3 on 2 ranks   -> runs/demo/train
       (``deepspeed --num_gpus 2 -m emoe_llm.train --ds_config ds_configs/z3.json --config configs/tiny_cpu.yaml``)
    4. check the exported final/ with plain transformers against the ZeRO-3 model's logits
    5. ``emoe-llm eval`` (lm-evaluation-harness): MMLU 5-shot on a few subjects of the shipped val split and the
       held-out alpaca NLL, a few documents each, scored dense (the paper's protocol; --mode emoe for masked)

The model is random and tiny, so MMLU is at chance level: the demo shows the machinery, not the method's gains.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from emoe_llm.checks import nonnegative_int, positive_int
from emoe_llm.tiny import DATA_DIR, REPO_ROOT
from emoe_llm.train.launch import free_port, launcher_executable

DEFAULT_SUBJECTS = "abstract_algebra,anatomy,high_school_geography,marketing"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="demo dir (default runs/demo; rebuilt on each run)")
    parser.add_argument("--nproc", type=positive_int, default=2, help="ranks (default 2)")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: the recipe's, 24)")
    parser.add_argument("--mode", choices=("emoe", "dense"), default="emoe", help="train EMoE or the dense baseline")
    parser.add_argument("--ds-config", default=str(REPO_ROOT / "ds_configs" / "z3.json"))
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("--subjects", default=DEFAULT_SUBJECTS, help="MMLU subjects to evaluate")
    parser.add_argument("--limit", type=nonnegative_int, default=10, help="documents per eval task (0 = all)")
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def train_command(args, out: Path, emoe_dir: Path) -> list[str]:
    port = str(free_port())
    if args.launcher == "deepspeed":
        launch = [launcher_executable("deepspeed"), "--num_gpus", str(args.nproc), "--master_port", port,
                  "--module", "emoe_llm.train.probe"]  # the recipe + run/export_probe.pt (checked below)
    else:
        launch = [launcher_executable("torchrun"), "--nproc_per_node", str(args.nproc), "--master_port", port,
                  "-m", "emoe_llm.train.probe"]
    overrides = [f"model.path={emoe_dir}", f"output_dir={out / 'train'}", "resume=none", f"model.mode={args.mode}",
                 f"data.sources.0.path={DATA_DIR / 'instruct' / 'alpaca_en_demo.json'}",
                 "logging.progress_bar=false"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    return [*launch, "--ds_config", args.ds_config, "--config", args.config, *overrides]


def run(args: argparse.Namespace) -> int:
    import torch

    from emoe_llm.convert.prepare import prepare_emoe_checkpoint
    from emoe_llm.tiny import save_tiny_checkpoint
    from emoe_llm.train.config import load_config

    t0 = time.perf_counter()
    out = Path(args.output).resolve()
    dense_dir, emoe_dir, train_dir = out / "tiny_dense", out / "tiny_emoe", out / "train"
    for d in (dense_dir, emoe_dir, train_dir):
        shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. tiny model + EMoE conversion
    save_tiny_checkpoint(dense_dir, tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    spec = load_config(args.config).emoe  # the recipe's emoe: section, as the training run will check it
    summary = prepare_emoe_checkpoint(dense_dir, emoe_dir, **spec.conversion(), progress=False, log=lambda m: None)
    _say(f"built {dense_dir} and converted it to EMoE ({spec.n_experts} experts, top-{spec.top_k}, layers "
         f"{spec.layers}) in {summary['summary']['seconds']:.1f}s -> {emoe_dir}")

    # 3. ZeRO-3 training on N ranks
    cmd = train_command(args, out, emoe_dir)
    _say("training: " + " ".join(cmd))
    log_path = out / "train.log"
    t_start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if "[emoe-llm]" in line or "Error" in line or "Traceback" in line:
                print("  " + line.rstrip()[line.find("[emoe-llm]"):] if "[emoe-llm]" in line else "  " + line.rstrip(),
                      flush=True)
        rc = proc.wait()
    if rc != 0 or not (train_dir / "COMPLETED").exists():
        tail = log_path.read_text().splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        _say(f"training failed (exit {rc}); full log: {log_path}")
        return rc or 1
    t_train = time.perf_counter() - t_start

    # 4. export check: plain transformers vs the ZeRO-3 model's logits
    from transformers import AutoModelForCausalLM

    from emoe_llm.emoe import enable_emoe
    from emoe_llm.train.probe import LOGIT_TOLERANCE, to_device

    final = train_dir / "final"
    probe = torch.load(train_dir / "run" / "export_probe.pt", weights_only=False)
    # on the device and in the dtype the ZeRO-3 model ran (a bf16 GPU model is not compared with an fp32 CPU rerun)
    device = torch.device(probe.get("device", "cpu"))
    tolerance = LOGIT_TOLERANCE.get(probe.get("dtype", "torch.float32"), 1e-3)
    plain = AutoModelForCausalLM.from_pretrained(final).to(device)  # the exported dtype (the run's)
    inputs = to_device(probe["inputs"], device)
    with torch.no_grad():
        dense_logits = plain(**inputs, use_cache=False).logits.float().cpu()
        if args.mode == "emoe":
            enable_emoe(plain)
        mode_logits = plain(**inputs, use_cache=False).logits.float().cpu()
    d_dense = (dense_logits - probe["dense_logits"]).abs().max().item()
    d_mode = (mode_logits - probe["logits"]).abs().max().item()

    # 5. the eval command: lm-evaluation-harness on the export, scored dense as the paper's evaluation scores it
    from emoe_llm.cli import main as cli_main

    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()]
    tasks = [f"emoe_mmlu_{x}" for x in subjects] + ["emoe_nll_alpaca_heldout"]
    eval_json = out / "eval.json"
    rc = cli_main(["eval", str(final), "--tasks", ",".join(tasks), "--device", "cpu", "--no-progress",
                   "--output", str(eval_json), *(["--limit", str(args.limit)] if args.limit else [])])
    if rc:
        _say(f"emoe-llm eval failed (exit {rc})")
        return rc
    evaluation = json.loads(eval_json.read_text())
    mmlu_n = {t: evaluation["n-samples"][t]["effective"] for t in tasks[:-1]}
    mmlu_acc = sum(evaluation["results"][t]["acc,none"] * n for t, n in mmlu_n.items()) / sum(mmlu_n.values())
    nll = evaluation["results"]["emoe_nll_alpaca_heldout"]["nll_per_token,none"]

    records = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = {}
    for r in records:
        if "loss" in r and "step" in r and "event" not in r:
            steps[r["step"]] = r
    first, last = steps[min(steps)], steps[max(steps)]
    final_eval = [r for r in records if r.get("event") == "final_eval"]
    print()
    print("=" * 78)
    ranks = "GPU" if device.type == "cuda" else "CPU"
    print(f"EMoE-LLM demo ({args.mode}, ZeRO-3, {args.nproc} {ranks} ranks) finished in "
          f"{time.perf_counter() - t0:.0f}s "
          f"(training {t_train:.0f}s)")
    print(f"  train loss      {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})")
    if final_eval:
        print(f"  held-out loss   {final_eval[-1]['eval_loss']:.3f} (ppl {final_eval[-1]['eval_ppl']:.1f})")
    if "expert_load_max_over_mean" in last:
        print(f"  expert load     max/mean per EMoE layer: {last['expert_load_max_over_mean']}")
    print(f"  export          {final}  (plain AutoModelForCausalLM; max |logit diff| vs the ZeRO-3 model: "
          f"{d_mode:.2e} {args.mode}, {d_dense:.2e} dense; tolerance {tolerance:g} on {device.type})")
    print(f"  MMLU val 5-shot {100 * mmlu_acc:.1f}% on {sum(mmlu_n.values())} questions "
          f"({len(mmlu_n)} subjects; random tiny model => chance level)")
    print(f"  held-out NLL    {nll:.3f} nats/token (emoe_nll_alpaca_heldout, "
          f"{evaluation['n-samples']['emoe_nll_alpaca_heldout']['effective']} rows)")
    print(f"  eval            {eval_json}  (emoe-llm eval, mode {evaluation['mode']}: the paper's protocol; "
          f"--mode emoe scores it masked; lm-evaluation-harness {evaluation['lm_eval_version']})")
    print(f"  run dir         {train_dir}  (metrics.jsonl, tb/, run/, checkpoints/, final/)")
    try:
        from emoe_llm.eval.plot_run import plot_run

        print(f"  plots           {', '.join(str(p) for p in plot_run(train_dir))}")
    except ImportError as e:  # matplotlib is an optional extra
        print(f"  plots           skipped: {e}")
    print("=" * 78)
    ok = d_mode < tolerance and d_dense < tolerance and last["loss"] < first["loss"]
    if not ok:
        _say("CHECK FAILED: loss did not decrease or the export does not match the trained model")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="emoe-llm demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
