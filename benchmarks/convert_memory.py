"""Peak memory and speed of ``emoe-llm convert`` on a synthetic checkpoint with the real Llama-30B widths.

    python benchmarks/convert_memory.py                      # 3 layers, convert 2, 0.6 GiB shards, bf16
    python benchmarks/convert_memory.py --layers 4 --convert 4 --n-init 3 --max-iter 30   # paper-grade clustering
    python benchmarks/convert_memory.py --readers            # also: our reader vs safetensors.safe_open

``--readers`` is the measured reason convert/safetensors_io.py reads shards itself: every tensor of the checkpoint is
streamed through a fresh process, once with the package's reader (``iter_tensor_bytes``, what copy-through does) and
once with ``safetensors.safe_open`` + ``get_tensor`` per tensor (one handle per shard, as a converter built on it
would hold), and each process's peak RSS is printed.

The checkpoint (hidden 6656, d_ff 17920, 52 heads, bf16; small vocab, which does not change the per-layer bound) is
streamed to disk with the package's own ShardWriter in ~0.6 GiB shards, arranged so that one converted layer's MLP
straddles two shards. The conversion then runs in a fresh subprocess, whose peak RSS (VmHWM, the kernel's high-water
mark: every resident page, mmapped ones included) is compared with the bytes of one layer's three MLP tensors. The
claim under test: peak RSS <= 2 x MLP bytes + a constant, whatever the number of layers.

Where the memory goes: copy-through holds one 64 MB chunk; writing a permuted tensor holds it twice (read +
index_select); the peak is the clustering of one layer (``emoe.cluster_labels``): the stored gate_proj weight plus
its fp32 normalised copy plus the element-wise temporaries of the k-means (n x d fp32 each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from emoe_llm.convert.safetensors_io import OutputEntry, ShardWriter

HIDDEN, D_FF, HEADS = 6656, 17920, 52  # Llama-30B (LLaMA-1 33B) widths


def tensor_specs(n_layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order HF writes them (sorted names within a layer)."""
    specs = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "mlp.down_proj.weight", (HIDDEN, D_FF)),
            (p + "mlp.gate_proj.weight", (D_FF, HIDDEN)),
            (p + "mlp.up_proj.weight", (D_FF, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ] + [(p + f"self_attn.{x}_proj.weight", (HIDDEN, HIDDEN)) for x in "koqv"]
    return specs + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab, HIDDEN))]


def write_synthetic_checkpoint(path: Path, *, n_layers: int, vocab: int, shard_bytes: int, seed: int = 0) -> dict:
    """Write the checkpoint tensor by tensor (never more than one tensor in memory); returns the weight map."""
    path.mkdir(parents=True)
    specs = tensor_specs(n_layers, vocab)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:  # greedy like save_pretrained(max_shard_size=...)
        nbytes = torch.Size(shape).numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, group in enumerate(shards, start=1):
        shard = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with ShardWriter(path / shard, [OutputEntry(n, "BF16", s) for n, s in group]) as writer:
            for name in writer.order:
                shape = dict(group)[name]
                t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
                writer.write_tensor(name, t.to(torch.bfloat16))
                weight_map[name] = shard
                del t
    total = sum(torch.Size(s).numel() * 2 for _, s in specs)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": D_FF, "num_hidden_layers": n_layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": vocab, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return weight_map


# VmHWM (peak RSS of this process image) rather than getrusage's maxrss, which would include the parent's RSS at fork.
CHILD = r"""
import json, sys
import psutil
from emoe_llm.convert import convert_checkpoint   # imports torch: part of the constant
from emoe_llm.convert.convert import peak_rss_bytes
baseline = psutil.Process().memory_info().rss
args = json.loads(sys.argv[1])
summary = convert_checkpoint(args.pop("src"), args.pop("dst"), progress=False, **args)
summary["baseline_rss_bytes"] = baseline
summary["peak_rss_bytes"] = peak_rss_bytes()
print(json.dumps(summary))
"""


VERIFY_CHILD = r"""
import json, sys, time
import psutil
from emoe_llm.convert import verify_checkpoint
from emoe_llm.convert.convert import peak_rss_bytes
baseline = psutil.Process().memory_info().rss
start = time.perf_counter()
report = verify_checkpoint(sys.argv[1], sys.argv[2], check_logits=False)
print(json.dumps({"ok": report["ok"], "failures": report["failures"], "seconds": time.perf_counter() - start,
                  "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}))
"""


READER_CHILD = r"""
import json, sys, zlib
import psutil
from safetensors import safe_open
from emoe_llm.convert.convert import peak_rss_bytes
from emoe_llm.convert.safetensors_io import iter_tensor_bytes, read_header, tensor_bytes
baseline = psutil.Process().memory_info().rss
reader, shards = sys.argv[1], sys.argv[2:]
crc, copied = 0, 0
for shard in shards:  # every byte read (CRC-32 over it), nothing kept: the copy-through of the unchanged tensors
    if reader == "ours":
        infos, _ = read_header(shard)
        for info in infos.values():
            for chunk in iter_tensor_bytes(info):
                crc, copied = zlib.crc32(chunk, crc), copied + len(chunk)
    else:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                data = tensor_bytes(t)
                crc, copied = zlib.crc32(data, crc), copied + len(data)
                del data
                del t
print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes(), "copied": copied, "crc32": crc}))
"""


def compare_readers(src: Path) -> None:
    """Peak RSS of reading every tensor with our reader vs safe_open, each in a fresh process."""
    shards = sorted(str(p) for p in src.glob("*.safetensors"))
    largest = max(Path(s).stat().st_size for s in shards)
    gib = 2**30
    results = {r: run_child(READER_CHILD, r, *shards) for r in ("ours", "safe_open")}
    assert results["ours"]["crc32"] == results["safe_open"]["crc32"]  # the same bytes, all of them
    print(f"readers: every tensor byte of {len(shards)} shards (largest {largest / gib:.2f} GiB) through CRC-32 "
          f"({results['ours']['copied'] / gib:.2f} GiB), nothing kept")
    for reader, r in results.items():
        above = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
        print(f"  {reader:9s} peak RSS {r['peak_rss_bytes'] / gib:.3f} GiB = imports {r['baseline_rss_bytes'] / gib:.3f}"
              f" + {above / gib:.3f} GiB ({above / largest:.2f} x the largest shard)")


def run_child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers in the synthetic checkpoint")
    parser.add_argument("--convert", type=int, default=2, help="how many layers to cluster+permute")
    parser.add_argument("--experts", type=int, default=256, help="N (the paper uses 256 for 30B)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--shard-gib", type=float, default=0.6, help="max shard size (0.6 splits layer 0's MLP)")
    parser.add_argument("--n-init", type=int, default=1, help="k-means restarts (memory does not depend on it)")
    parser.add_argument("--max-iter", type=int, default=10, help="k-means iterations per restart")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verify", action="store_true", help="also time `verify` (streamed, no logits) and its RSS")
    parser.add_argument("--readers", action="store_true",
                        help="also compare peak RSS of reading the checkpoint with our reader vs safe_open")
    parser.add_argument("--workdir", help="where to write SRC/DST (default: a temp dir, removed at the end)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="emoe-convert-bench-"))
    src, dst = work / "src", work / "dst"
    try:
        t0 = time.perf_counter()
        weight_map = write_synthetic_checkpoint(src, n_layers=args.layers, vocab=args.vocab,
                                                shard_bytes=int(args.shard_gib * 2**30))
        split = [i for i in range(args.layers)
                 if len({weight_map[f"model.layers.{i}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}) > 1]
        if not split:
            sys.exit("no layer's MLP straddles two shards; change --shard-gib")
        others = [i for i in reversed(range(args.layers)) if i != split[0]]
        layers = sorted([split[0], *others[: args.convert - 1]])
        print(f"synthetic Llama-30B-width checkpoint: {args.layers} layers, {len(set(weight_map.values()))} shards, "
              f"{sum(p.stat().st_size for p in src.glob('*.safetensors')) / 2**30:.2f} GiB, written in "
              f"{time.perf_counter() - t0:.0f} s; converting layers {layers} (layer {split[0]}'s MLP spans 2 shards)",
              flush=True)

        child_args = dict(src=str(src), dst=str(dst), n_experts=args.experts, top_k=args.experts // 4,
                          layers=",".join(map(str, layers)), n_init=args.n_init, max_iter=args.max_iter,
                          device=args.device)
        summary = run_child(CHILD, json.dumps(child_args))
        verify = run_child(VERIFY_CHILD, str(src), str(dst)) if args.verify else None
        if args.readers:
            compare_readers(src)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    mlp_bytes = 3 * D_FF * HIDDEN * 2
    peak, base = summary["peak_rss_bytes"], summary["baseline_rss_bytes"]
    cluster_s = [v["seconds"] for v in summary["emoe"]["clustering"].values()]
    gib = 2**30
    if verify is not None:
        print(f"verify (streamed: structure, byte-compare of copied tensors, per-layer MLP outputs): "
              f"{'OK' if verify['ok'] else 'FAILED ' + str(verify['failures'])} in {verify['seconds']:.1f} s, "
              f"peak RSS {verify['peak_rss_bytes'] / gib:.3f} GiB ("
              f"{(verify['peak_rss_bytes'] - verify['baseline_rss_bytes']) / mlp_bytes:.2f} x MLP bytes above imports)")
    print(f"one layer's MLP tensors (bf16): {mlp_bytes / gib:.3f} GiB")
    print(f"bytes read {summary['bytes_read'] / gib:.2f} GiB, written {summary['bytes_written'] / gib:.2f} GiB")
    print(f"conversion: {summary['seconds']:.1f} s total; clustering {sum(cluster_s) / len(cluster_s):.1f} s/layer "
          f"(n_init={args.n_init}, max_iter={args.max_iter}, N={args.experts}, {args.device}); writing "
          f"{summary['write_seconds']:.1f} s ({summary['bytes_written'] / gib / summary['write_seconds']:.2f} GiB/s); "
          f"{summary['seconds'] / len(cluster_s):.1f} s per converted layer including I/O")
    print(f"peak RSS {peak / gib:.3f} GiB = constant {base / gib:.3f} GiB (python+torch imports) "
          f"+ {(peak - base) / gib:.3f} GiB working set")
    ratio = (peak - base) / mlp_bytes
    print(f"peak RSS / MLP bytes = {peak / mlp_bytes:.2f}; (peak RSS - constant) / MLP bytes = {ratio:.2f} "
          f"({'within' if ratio <= 2 else 'EXCEEDS'} the bound of 2)")


if __name__ == "__main__":
    main()
