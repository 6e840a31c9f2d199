#!/usr/bin/env bash
# Create/refresh the project virtualenv: torch first (CPU wheel by default), then the package with its
# dev extras, then DeepSpeed with --no-build-isolation (it must build against the torch already installed).
#   TORCH_SPEC   default "torch==2.13.0" (the CPU wheel); on a GPU box e.g. "torch==2.13.0 --index-url <cuda index>"
#   EXTRAS       default "dev" (the test tools, plus wandb for logging.wandb's offline test); add "gpu" for flash-attn
#                on CUDA machines (bitsandbytes and zstandard are regular dependencies)
#   DS_BUILD_CPU_ADAM=1  compile DeepSpeedCPUAdam (ds_configs/z3_offload.json) into the DeepSpeed install now, instead
#                of a JIT build on first use on every node (minutes, and each node's build cache); needs a compiler
set -euo pipefail
VENV=${1:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry extra pip flags on purpose
"$PY" -m pip install -q $TORCH_SPEC
"$PY" -m pip install -q -e ".[$EXTRAS]"
# >= 0.19.3: LoRA + ZeRO-3 + non-reentrant activation checkpointing is broken before it (pyproject.toml)
"$PY" -m pip install -q --no-build-isolation "deepspeed>=0.19.3"
if [ "${DS_BUILD_CPU_ADAM:-0}" = "1" ]; then
  # DeepSpeed compiles the ops named by DS_BUILD_* when it is built; a cached wheel skips that, so rebuild it once
  DS_BUILD_CPU_ADAM=1 "$PY" -m pip install -q --no-build-isolation --no-cache-dir --force-reinstall --no-deps \
    "deepspeed>=0.19.3"
  "$PY" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False); \
print('DeepSpeedCPUAdam: prebuilt')"
fi
"$PY" -c "import torch, transformers, deepspeed; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
# DeepSpeed JIT-builds its CPU communication op (~1 min) the first time a process joins a group. Build it here, once:
# a run or test killed mid-build (a timeout) leaves torch's build lock behind, and every later run waits on it forever.
# With the venv's ninja (first on PATH), the one every run uses: another ninja would find nothing to reuse.
PATH="$(cd "$VENV" && pwd)/bin:$PATH" "$PY" -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); \
b is None or b.load(verbose=False); print('DeepSpeed CPU comm op:', 'built' if b else 'not used on this accelerator')"
touch "$VENV/.installed"
