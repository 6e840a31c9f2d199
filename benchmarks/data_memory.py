"""Peak RSS and rows/s of `emoe-llm data` on a JSON-lines file larger than it should ever hold in memory.

    python benchmarks/data_memory.py                  # a 2 GB alpaca-style .jsonl in /tmp (deleted afterwards)
    python benchmarks/data_memory.py --size-gb 0.05   # quick look

The file is generated (seeded random words; alpaca: instruction ~40 words + response ~250; text: ~290 words), then
`emoe-llm data` reads, validates, tokenizes (cached), shuffles and packs it exactly as training does. Peak RSS is ru_maxrss of the command's
processes (the largest single one: with data.num_proc > 1 the tokenizer workers are separate processes). The last
line prints peak RSS as a fraction of the file size and rows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import add_json_args, print_config_and_exit, write_json  # noqa: E402
PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'RC', r)")


def write_jsonl(path: Path, size_bytes: int, fmt: str, seed: int = 0) -> int:
    rng = random.Random(seed)
    words = [rng.choice("abcdefghijklmnopqrstuvwxyz") * rng.randint(1, 3) + w for w in
             "the model data train expert layer token batch node memory time loss step rank shard".split()
             for _ in range(20)]
    rows, written = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        block = []
        while written < size_bytes:
            if fmt == "alpaca":
                rec = {"instruction": " ".join(rng.choices(words, k=40)), "input": "",
                       "output": " ".join(rng.choices(words, k=250))}
            else:
                rec = {"text": " ".join(rng.choices(words, k=290))}
            line = json.dumps(rec) + "\n"
            block.append(line)
            written += len(line)
            rows += 1
            if len(block) == 10_000:
                f.write("".join(block))
                block = []
        f.write("".join(block))
    return rows


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss_parts(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f) if k in ("RssAnon", "RssFile")}
    except OSError:
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp", help="where the file and the cache go (needs ~3x the size free)")
    ap.add_argument("--tokenizer", default=str(REPO / "data" / "tokenizers" / "tiny_llama3_style"))
    ap.add_argument("--format", default="alpaca", choices=["alpaca", "text"],
                    help="alpaca rows (chat template, prompt masking) or plain-text rows (cheaper to tokenize)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    add_json_args(ap)
    args = ap.parse_args()
    if args.print_config:
        print_config_and_exit(args)

    size = int(args.size_gb * 1e9)
    free = shutil.disk_usage(args.dir).free
    if free < 3 * size:
        sys.exit(f"{args.dir}: {free / 1e9:.1f} GB free, need ~{3 * size / 1e9:.1f} GB (file + Arrow cache)")
    work = Path(tempfile.mkdtemp(prefix="emoe-data-bench-", dir=args.dir))
    try:
        src = work / "big.jsonl"
        t0 = time.time()
        rows = write_jsonl(src, size, args.format)
        file_bytes = src.stat().st_size
        print(f"wrote {src}: {file_bytes / 1e9:.2f} GB, {rows} rows in {time.time() - t0:.0f} s", flush=True)
        cmd = [sys.executable, "-m", "emoe_llm.cli", "data", "--source", str(src), "--tokenizer", args.tokenizer,
               "--template", "llama3", "--max-seq-len", str(args.max_seq_len), "--packing",
               "--cache-dir", str(work / "cache"), "--show", "0", "--json"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        t0 = time.time()
        peaks = {"RssAnon": 0, "RssFile": 0}
        with open(work / "out.txt", "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS, *cmd], env=env, stdout=f,
                                    stderr=subprocess.DEVNULL, text=True)
            while proc.poll() is None:  # private (anonymous) vs memory-mapped file pages of the data process(es)
                for pid in _descendants(proc.pid):
                    for key, kb in _rss_parts(pid).items():
                        peaks[key] = max(peaks[key], kb * 1024)
                time.sleep(0.2)
        wall = time.time() - t0
        stdout = (work / "out.txt").read_text()
        tail = [ln for ln in stdout.splitlines() if ln.startswith("PEAK_RSS_KB")]
        if not tail or tail[-1].split()[3] != "0":
            sys.exit(f"emoe-llm data failed:\n{stdout[-3000:]}")
        peak = int(tail[-1].split()[1]) * 1024
        stats = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"machine: {os.uname().nodename}, {os.cpu_count()} CPUs; {when}")
        print(f"documents {stats['documents']}, packed rows {stats['rows']}, tokens {stats['tokens']}, "
              f"wall {wall:.0f} s")
        print(f"peak RSS {peak / 2**30:.2f} GiB (ru_maxrss: counts the memory-mapped Arrow pages it touched, which the "
              f"kernel can drop); of it, private memory peaked at {peaks['RssAnon'] / 2**30:.2f} GiB and mapped "
              f"file pages at {peaks['RssFile'] / 2**30:.2f} GiB (sampled every 0.2 s)")
        write_json(args.json, {
            "benchmark": "data_memory",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "print_config")},
            "file_bytes": file_bytes, "rows": rows, "wall_s": round(wall, 2), "peak_rss_bytes": peak,
            "peak_private_bytes": peaks["RssAnon"], "peak_mapped_bytes": peaks["RssFile"],
            "rows_per_s": rows / wall, "data_stats": {k: stats.get(k) for k in ("documents", "rows", "tokens")},
        })
        print(f"peak private memory {peaks['RssAnon'] / 2**30:.2f} GiB = {peaks['RssAnon'] / file_bytes:.3f} x the "
              f"{file_bytes / 1e9:.2f} GB file; peak RSS {peak / file_bytes:.3f} x; {rows / wall:,.0f} rows/s "
              f"({file_bytes / 1e6 / wall:.2f} MB/s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
