"""The JSON side of scripts/gpu_check.sh: the machine's environment, pytest's junit XML as JSON, and the summary.

    python scripts/gpu_check_report.py env OUT.json                 # python, torch, CUDA, GPU, package versions
    python scripts/gpu_check_report.py junit IN.xml OUT.json        # pytest -m gpu results, one entry per test
    python scripts/gpu_check_report.py summary RESULTS_DIR          # logs/steps.jsonl + step JSONs -> summary.json

The summary names every step (command, time cap, exit status, seconds) and the headline figures against the issue's
targets: EMoE/dense step <= 1.03 at 7B widths, MFU >= 50% at 1B widths, clustering seconds per 30B layer.
Exit status of ``summary``: 0 when every step exited 0, else 1.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

PACKAGES = ["torch", "transformers", "deepspeed", "datasets", "bitsandbytes", "peft", "accelerate", "safetensors",
            "tokenizers", "pyarrow", "fsspec", "huggingface-hub", "pydantic", "numpy", "triton", "pytest"]
STEP_FILES = {"pytest_gpu": "pytest_gpu.json", "step_overhead": "step_overhead.json",
              "train_throughput": "train_throughput.json", "clustering": "clustering.json"}


def write(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def environment() -> dict:
    import torch

    env = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
           "python": platform.python_version(), "python_executable": sys.executable, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "packages": {}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30,
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    for name in PACKAGES:
        try:
            env["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env["packages"][name] = None
    return env


def junit_to_json(xml_path: Path) -> dict:
    """pytest's --junitxml -> {"counts": {...}, "tests": [{"id", "outcome", "seconds", "message"}]}."""
    root = ET.parse(xml_path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "")[:2000]
                if tag != "skipped" and el.text:
                    message = f"{message}\n{el.text[-4000:]}".strip()
                break
        name = case.get("name")
        classname = case.get("classname", "")
        tests.append({"id": f"{classname.replace('.', '/')}.py::{name}" if classname else name, "outcome": outcome,
                      "seconds": float(case.get("time", 0.0)), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    counts["total"] = len(tests)
    return {"counts": counts, "tests": tests}


def headline(name: str, data: dict) -> dict:
    """The figures of one step against the issue's targets."""
    if name == "pytest_gpu":
        return dict(data["counts"])
    if name == "step_overhead":
        r = data["step_ratio"]["emoe-paper"]
        return {"emoe_dense_step_ratio": r["median"], "min": r["min"], "max": r["max"], "target": data["target"],
                "meets_target": data["meets_target"], "all_layers_ratio": data["step_ratio"]["emoe-all"]["median"],
                "ffn_layer_ratio": (data.get("ffn_layer_ratio") or {}).get("median")}
    if name == "train_throughput":
        v = data["variants"]
        return {"tokens_per_s": {k: x["tokens_per_s"] for k, x in v.items()},
                "mfu": {k: x["mfu"] for k, x in v.items()}, "peak_tflops": data["peak_tflops"],
                "peak_source": data["peak_source"],
                "mfu_at_extra_peak": {k: x["mfu_at_extra_peak"] for k, x in v.items()},
                "extra_peak_tflops": data["extra_peak_tflops"], "emoe_dense_step_ratio": data["step_ratio"]["median"],
                "mfu_target": data["mfu_target"],
                "meets_target": all(x["mfu"] is not None and x["mfu"] >= data["mfu_target"] for x in v.values())}
    if name == "clustering":
        return {"problem": data["headline"]["problem"], "device": data["headline"]["device"],
                "seconds_per_layer": data["headline"]["seconds_per_layer"],
                "all": {p: {s: r["seconds"] for s, r in rows.items() if s.startswith("ours@")}
                        for p, rows in data["results"].items()}}
    return {}


def summarize(results: Path) -> tuple[dict, bool]:
    steps = []
    steps_file = results / "logs" / "steps.jsonl"
    if steps_file.is_file():
        steps = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    env_file = results / "env.json"
    summary = {"environment": json.loads(env_file.read_text()) if env_file.is_file() else None, "steps": [],
               "figures": {}}
    ok = bool(steps)
    for step in steps:
        entry = dict(step)
        entry["timed_out"] = step["rc"] in (124, 137)
        ok &= step["rc"] == 0
        out = results / STEP_FILES.get(step["name"], f"{step['name']}.json")
        if step["name"] in STEP_FILES:
            if out.is_file():
                try:
                    summary["figures"][step["name"]] = headline(step["name"], json.loads(out.read_text()))
                except (KeyError, TypeError, ValueError) as e:
                    entry["problem"] = f"{out.name}: unexpected content ({type(e).__name__}: {e})"
                    ok = False
            else:
                entry["problem"] = f"{out.name} was not written"
                ok = False
        summary["steps"].append(entry)
    summary["total_seconds"] = sum(s["seconds"] for s in steps)
    summary["ok"] = ok
    return summary, ok


def print_summary(summary: dict) -> None:
    print(f"{'step':<18} {'rc':>4} {'seconds':>8} {'cap':>5}  result")
    for s in summary["steps"]:
        fig = summary["figures"].get(s["name"], {})
        text = s.get("problem") or ("TIMED OUT" if s["timed_out"] else "") or json.dumps(fig, default=str)[:150]
        print(f"{s['name']:<18} {s['rc']:>4} {s['seconds']:>8.1f} {s['cap']:>5}  {text}")
    print(f"total {summary['total_seconds']:.0f} s; {'all steps ok' if summary['ok'] else 'SOME STEPS FAILED'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["env"] and len(argv) == 2:
        write(Path(argv[1]), environment())
        return 0
    if argv[:1] == ["junit"] and len(argv) == 3:
        write(Path(argv[2]), junit_to_json(Path(argv[1])))
        return 0
    if argv[:1] == ["summary"] and len(argv) == 2:
        results = Path(argv[1])
        summary, ok = summarize(results)
        write(results / "summary.json", summary)
        print_summary(summary)
        return 0 if ok else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
