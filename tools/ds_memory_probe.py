"""Phase-by-phase RSS of a DeepSpeed ZeRO-3 CPU run: how BENCHMARKS.md section 5 found the planner's missing terms.

Run the recipe through this module instead of ``emoe_llm.train``; it prints ``MEMPROBE`` lines and changes nothing
else (a diagnostic, not part of the package):

    PYTHONPATH=tools:. deepspeed --num_gpus 2 --module ds_memory_probe --ds_config DS.json --config RECIPE.yaml k=v ...

For ``forward``, ``backward`` and ``step`` of each optimizer step it prints the RSS at the start and the phase's peak:
the kernel's VmHWM, reset at the start through ``/proc/self/clear_refs``. For the second step, rank 0 also prints the
step's DeepSpeed stage-3 stages (norm, ``_prepare_sub_group`` = the flat fp32 gradient, ``_optimizer_step``, ...)
with their peak above the RSS before them, and the live CPU tensors (found with ``gc``, deduplicated by storage) at
the start of each phase. ``MEMPROBE_TRIM=1`` calls glibc's ``malloc_trim(0)`` after each phase and prints the RSS
again, which shows how much freed memory glibc was keeping. It wraps private DeepSpeed methods (0.19.8 names); a
missing one is skipped with a note.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
import time

import torch

RANK = os.environ.get("RANK", "0")
PAGE = os.sysconf("SC_PAGE_SIZE")
T0 = time.time()
TRIM = os.environ.get("MEMPROBE_TRIM") == "1"
STEP = {"n": 0}


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**30


def hwm() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 2**20


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def log(tag: str) -> None:
    print(f"MEMPROBE r{RANK} t={time.time() - T0:7.1f} {tag:<42} rss={rss():.3f} hwm={hwm():.3f} GiB", flush=True)


def live_tensors() -> tuple[float, list]:
    """(GiB of live CPU tensor storage, the 8 largest storages in MiB)."""
    seen = {}
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o) and o.device.type == "cpu":
                st = o.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - meta/sparse/odd tensors
            pass
    return sum(seen.values()) / 2**30, [round(b / 2**20, 1) for b in sorted(seen.values(), reverse=True)[:8]]


def wrap_phase(cls, name: str) -> None:
    orig = getattr(cls, name)

    def probe(self, *a, **k):
        log(f"step{STEP['n']} {name} start")
        if RANK == "0" and STEP["n"] == 1:
            gib, big = live_tensors()
            print(f"MEMPROBE r0 live CPU tensors at {name} start: {gib:.3f} GiB, largest (MiB) {big}", flush=True)
        reset_hwm()
        out = orig(self, *a, **k)
        log(f"step{STEP['n']} {name} end (hwm = phase peak)")
        if TRIM:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            log(f"step{STEP['n']} {name} after malloc_trim")
        if name == "step":
            STEP["n"] += 1
        return out

    setattr(cls, name, probe)


def wrap_stage(cls, name: str) -> None:
    orig = getattr(cls, name, None)
    if orig is None:
        print(f"MEMPROBE note: {cls.__name__}.{name} not found (another DeepSpeed version); not probed", flush=True)
        return

    def probe(self, *a, **k):
        if RANK != "0" or STEP["n"] != 1:
            return orig(self, *a, **k)
        before = rss()
        reset_hwm()
        out = orig(self, *a, **k)
        arg = a[0] if a and isinstance(a[0], int) else ""
        print(f"MEMPROBE r0   {name} {arg}: peak +{hwm() - before:.3f} GiB, after {rss() - before:+.3f} GiB",
              flush=True)
        return out

    setattr(cls, name, probe)


def main() -> int:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Z3

    from emoe_llm.train import recipe

    for name in ("forward", "backward", "step"):
        wrap_phase(DeepSpeedEngine, name)
    for name in ("_partition_all_parameters", "_get_norm_groups", "_prepare_sub_group", "unscale_and_clip_grads",
                 "_optimizer_step", "_reassign_or_swap_out_partitioned_parameters", "_release_sub_group",
                 "_post_step"):
        wrap_stage(Z3, name)
    build = recipe.build_engine

    def probed_build(*a, **k):
        log("before build_engine")
        out = build(*a, **k)
        log("after build_engine")
        opt = out[0].optimizer
        if RANK == "0" and hasattr(opt, "fp32_partitioned_groups_flat"):
            aliased = [x.data_ptr() == y.data_ptr() for x, y in zip(opt.fp16_partitioned_groups_flat,
                                                                    opt.fp32_partitioned_groups_flat)]
            print(f"MEMPROBE sub-groups (elements): {[int(x) for x in opt.fp16_partitioned_groups_flat_numel]}; "
                  f"fp32 master aliases the partition: {aliased}; reduce_bucket_size {opt.reduce_bucket_size}",
                  flush=True)
        return out

    recipe.build_engine = probed_build
    return recipe.cli()


if __name__ == "__main__":
    sys.exit(main())
