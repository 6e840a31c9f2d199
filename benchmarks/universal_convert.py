"""Seconds per GB of converting a ZeRO-3 checkpoint to DeepSpeed's universal format (resume at another world size).

    python benchmarks/universal_convert.py                     # a ~0.22B-parameter Llama, ~3.6 GB of checkpoint
    python benchmarks/universal_convert.py --layers 1 --hidden 128 --vocab 1000      # seconds (the smoke test)

A random Llama is trained one step on one gloo rank with real ZeRO-3 (fp32, torch AdamW) and saved with
``engine.save_checkpoint`` in a subprocess; the checkpoint is then converted with the recipe's own
``emoe_llm.train.checkpoint.convert_to_universal`` (``ds_to_universal`` in its own process, as a resume runs it
before the process group exists), once with one extract / merge worker and once with the recipe's default
(``universal_workers()``: one extract worker per core up to 8, half as many merge workers). The size is the
checkpoint's bytes on disk (model + optimizer states); the last line is ``universal conversion: S s/GB``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_json import add_json_args, print_config_and_exit, write_json


def save_checkpoint(out: Path, *, layers: int, hidden: int, vocab: int) -> None:
    """In this process: one ZeRO-3 step of a random Llama on one gloo rank, saved under ``out/step``."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64 or 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
          "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    ids = torch.randint(0, vocab, (1, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(out), tag="step")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--save-to", help=argparse.SUPPRESS)  # the subprocess that writes the checkpoint
    add_json_args(p)
    args = p.parse_args(argv)
    if args.print_config:
        print_config_and_exit(args)
    if args.save_to:
        save_checkpoint(Path(args.save_to), layers=args.layers, hidden=args.hidden, vocab=args.vocab)
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from emoe_llm.train.checkpoint import convert_to_universal, universal_workers

    root = Path(tempfile.mkdtemp(prefix="universal_bench_"))
    try:
        subprocess.run([sys.executable, __file__, "--save-to", str(root), "--layers", str(args.layers), "--hidden",
                        str(args.hidden), "--vocab", str(args.vocab)], check=True, capture_output=True, text=True)
        ckpt = root / "step"
        gb = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()) / 1e9
        results = {}
        for workers in ((1, 1), universal_workers()):
            shutil.rmtree(ckpt / "universal", ignore_errors=True)
            t0 = time.perf_counter()
            convert_to_universal(ckpt, workers=workers, log=lambda m: None)
            seconds = time.perf_counter() - t0
            results[f"{workers[0]}x{workers[1]}"] = {"seconds": seconds, "s_per_gb": seconds / gb}
            print(f"{workers[0]} extract / {workers[1]} merge workers: {seconds:.1f} s for {gb:.2f} GB "
                  f"({seconds / gb:.1f} s/GB)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = min(r["s_per_gb"] for r in results.values())
    write_json(args.json, {"benchmark": "universal_convert", "checkpoint_gb": gb, "results": results,
                           "s_per_gb": best, "cpus": len(os.sched_getaffinity(0))})
    print(f"universal conversion: {best:.1f} s/GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
