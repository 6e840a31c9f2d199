# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then convert + ZeRO-3 fine-tune (2 CPU ranks) + export + eval a tiny Llama
#   make test   set up .venv, then run the whole test suite (incl. the slow DeepSpeed and Slurm tests)
#   make smollm2  build (once) the real SmolLM2-135M-Instruct checkpoint in ${EMOE_LLM_CACHE:-~/.cache/emoe_llm}/models/
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast gpu-wheels smollm2
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

demo: setup
	$(VENV)/bin/emoe-llm demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# the in-process tests, one worker per core (the slow ones spawn their own ranks, so `make test` runs serially)
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

# Wheels for scripts/gpu_check.sh on the GPU machine (no registry there): into .whl/ (gitignored), then checked.
gpu-wheels: setup
	$(VENV)/bin/python scripts/gpu_wheels.py fetch .whl
smollm2: setup
	PYTHON=$(VENV)/bin/python bash scripts/get_smollm2.sh
