"""Check `emoe-llm plan` against the peak memory of a real 2-rank ZeRO-3 CPU run (fp32, gloo).

    python benchmarks/plan_check.py                         # the tiny embedded Llama
    python benchmarks/plan_check.py --model ~/.cache/emoe_llm/models/smollm2-135m-instruct --experts 16 --layers 28,29

What is compared, per rank: the peak RSS of the busiest training process once the model is built and partitioned
(the kernel's VmHWM, reset when the engine is built and read every 0.1 s; this is what the planner models, since on
a GPU the loading happens in CPU RAM) against the planner's per-GPU total for the same recipe with precision fp32,
device cpu, 2 ranks on one node, and a runtime overhead equal to the measured RSS of a process that has only imported
the training stack, loaded the tokenizer and joined a gloo group (the CPU analogue of the CUDA context). The whole-run
peak (ru_maxrss, incl. loading and the on-the-fly conversion on rank 0) is printed too. The last line prints both
figures and their ratio; the planner is meant to be within 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'RC', r)")

BASELINE = """
import os, torch, torch.distributed as dist, deepspeed, transformers, datasets, peft  # noqa: F401
import emoe_llm.train.recipe, emoe_llm.data  # noqa: F401
tokenizer = emoe_llm.data.load_tokenizer(os.environ["TOKENIZER"])
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
deepspeed.init_distributed(dist_backend="gloo")
dist.barrier()
import resource
print("SELF_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # not its children (a JIT op build)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gib(cmd: list[str], env: dict, log: Path) -> float:
    with open(log, "w") as f:
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], env=env, stdout=subprocess.PIPE, stderr=f,
                             text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")][-1].split()
    if line[3] != "0":
        sys.exit(f"command failed (rc {line[3]}): {' '.join(cmd)}; log: {log}\n{out.stdout[-3000:]}")
    return int(line[1]) / 2**20


def _vm_hwm(pid: int) -> int:
    """VmHWM (peak RSS) of a process in bytes, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/PID/clear_refs). False only if a
    live process refused it (a process that has already exited does not matter)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return not Path(f"/proc/{pid}").exists()


def training_peak_rss_gib(cmd: list[str], env: dict, log: Path, marker: str = "M params (") -> tuple[float, float]:
    """(peak RSS of any rank over the whole run, peak RSS of any rank once the model is built and partitioned).

    The second is what the planner models (on a GPU, loading happens in CPU RAM). When the engine is built, each
    process's kernel peak-RSS counter (VmHWM) is reset, and it is read every 0.1 s until the process exits, so the
    peak is exact, short spikes included (the optimizer step's lasts about a second); where /proc/PID/clear_refs
    cannot be written it falls back to sampling the RSS every 0.1 s. The first is exact (ru_maxrss)."""
    import threading

    import psutil

    state = {"loaded": False, "peak": 0, "stop": False, "hwm": {}, "reset": set(), "exact": True}

    def sample(pid):
        root = psutil.Process(pid)
        while not state["stop"]:
            try:
                procs = root.children(recursive=True)
                rss = max((p.memory_info().rss for p in procs), default=0)
            except psutil.Error:
                procs, rss = [], 0
            if not state["loaded"] and marker in log.read_text(errors="replace"):
                state["loaded"] = True
                state["at_load"] = rss
            if state["loaded"]:
                state["peak"] = max(state["peak"], rss)
                for p in procs:
                    if p.pid not in state["reset"]:
                        state["exact"] &= _reset_hwm(p.pid)
                        state["reset"].add(p.pid)
                    hwm = _vm_hwm(p.pid)
                    if hwm:
                        state["hwm"][p.pid] = max(state["hwm"].get(p.pid, 0), hwm)
            time.sleep(0.1)

    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS, *cmd], env=env, stdout=f, stderr=subprocess.STDOUT,
                                text=True)
        th = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        th.start()
        proc.wait()
        state["stop"] = True
        th.join()
    line = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("PEAK_RSS_KB")][-1].split()
    if line[3] != "0":
        sys.exit(f"command failed (rc {line[3]}): {' '.join(cmd)}; log: {log}")
    print(f"RSS of the busiest rank when the engine was built (before step 1): {state.get('at_load', 0) / 2**30:.3f} "
          f"GiB")
    sampled = state["peak"] / 2**30
    if state["exact"] and state["hwm"]:
        peak = max(state["hwm"].values()) / 2**30
        print(f"peak RSS per rank while training: {peak:.3f} GiB (VmHWM, reset when the engine was built); RSS "
              f"sampled every 0.1 s saw {sampled:.3f} GiB")
    else:
        peak = sampled
        print(f"peak RSS per rank while training: {peak:.3f} GiB (sampled every 0.1 s: could not reset VmHWM)")
    return int(line[1]) / 2**20, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="dense HF checkpoint (default: the tiny embedded Llama)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", default="2,3")
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="emoe-plan-check-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PORT": str(free_port())}
    model = args.model
    if model is None:
        from emoe_llm.tiny import save_tiny_checkpoint

        model = str(save_tiny_checkpoint(work / "tiny", tokenizer_dir=REPO / "data" / "tokenizers" / "llama3"))
    ds = json.loads((REPO / "ds_configs" / "z3.json").read_text())
    ds["bf16"]["enabled"] = False  # fp32: bf16 matmuls on CPU are ~150x slower
    (work / "ds.json").write_text(json.dumps(ds))

    env["TOKENIZER"] = model
    out = subprocess.run([sys.executable, "-c", BASELINE], env=env, capture_output=True, text=True)
    (work / "baseline.log").write_text(out.stdout + out.stderr)
    baseline = int([ln for ln in out.stdout.splitlines() if ln.startswith("SELF_RSS_KB")][-1].split()[1]) / 2**20
    overrides = [f"model.path={model}", f"output_dir={work / 'run'}", "resume=none", "model.mode=emoe",
                 f"emoe.n_experts={args.experts}", f"emoe.top_k={args.top_k}", f"emoe.layers='{args.layers}'",
                 f"data.sources.0.path={REPO / 'data' / 'instruct' / 'alpaca_en_demo.json'}",
                 f"data.max_seq_len={args.seq_len}", "data.packing=true", "data.eval_fraction=0",
                 f"train.micro_batch_size={args.micro}", f"train.global_batch_size={args.micro * 2}",
                 f"train.max_steps={args.steps}", "train.save_every_steps=0", "train.eval_every_steps=0",
                 "train.export=false", "logging.progress_bar=false", "logging.tensorboard=false"]
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "emoe_llm.train",
           "--ds_config", str(work / "ds.json"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *overrides]
    overall, measured = training_peak_rss_gib(cmd, env, work / "train.log")

    from emoe_llm.plan import add_arguments, load_shape, make_plan, setup_from_recipe, Setup

    ap2 = argparse.ArgumentParser()
    add_arguments(ap2)
    pargs = ap2.parse_args(["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--ds-config", str(work / "ds.json"),
                            *overrides])
    s = Setup(nodes=1, gpus_per_node=2, gpu_mem_gb=1e6, runtime_overhead_gb=baseline, device="cpu")
    s, _, emoe = setup_from_recipe(pargs, s)
    plan = make_plan(load_shape(model, emoe_override=emoe), s)
    est = plan.total_bytes / 2**30
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} CPUs; model {model}; {plan.n_params / 1e6:.1f}M params")
    for k, v in plan.per_gpu.items():
        print(f"  plan {k:<36}{v / 2**30:8.3f} GiB")
    print(f"baseline (imports + tokenizer + gloo group) {baseline:.3f} GiB; model-dependent: measured "
          f"{measured - baseline:.3f} "
          f"GiB, planned {est - baseline:.3f} GiB")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs: {work}")
    print(f"peak RSS per rank over the whole run (incl. loading/conversion): {overall:.3f} GiB")
    print(f"peak RSS per rank while training: measured {measured:.3f} GiB, planned {est:.3f} GiB, planned/measured "
          f"{est / measured:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
