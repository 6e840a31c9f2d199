# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then convert + ZeRO-3 fine-tune (2 CPU ranks) + export + eval a tiny Llama
#   make test   set up .venv, then run the whole test suite: in-process tests on 2 xdist workers, then the slow
#               DeepSpeed and Slurm tests, a test file per worker on 2 workers
#   make smollm2  build (once) the real SmolLM2-135M-Instruct checkpoint in ${EMOE_LLM_CACHE:-~/.cache/emoe_llm}/models/
VENV ?= .venv
PYTEST_ARGS ?=
# The venv's tools first, as in an activated venv: DeepSpeed JIT-builds its CPU op with the first `ninja` on PATH, and
# a system ninja (1.11) beside the venv's (1.13, a DeepSpeed dependency) rebuilds the op from scratch (~1.5 min of both
# cores) every time the other one built it last.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-fast gpu-wheels smollm2
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

demo: setup
	$(VENV)/bin/emoe-llm demo

# Two passes over the whole suite: the in-process tests on one pytest-xdist worker per core, then the `slow` ones
# (each spawns DeepSpeed ranks or Slurm daemons) on SLOW_WORKERS workers, a test file per worker at a time (a file's
# module-scoped runs are made once; tests/conftest.py puts the longest files first): the ranks spend much of their
# time starting up, importing and waiting on each other, so two files at once keep the cores busy. Both passes always
# run; the exit status is the first failing one's (5, "nothing selected", counts as a pass).
SLOW_WORKERS ?= 2
test: setup
	@rc=0; \
	$(VENV)/bin/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS) || { s=$$?; [ $$s -eq 5 ] || rc=$$s; }; \
	$(VENV)/bin/python -m pytest -m slow -n $(SLOW_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) || \
	  { s=$$?; [ $$s -eq 5 ] || [ $$rc -ne 0 ] || rc=$$s; }; \
	exit $$rc

# the first pass of `make test` alone
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

# Wheels for scripts/gpu_check.sh on the GPU machine (no registry there): into .whl/ (gitignored), then checked.
gpu-wheels: setup
	$(VENV)/bin/python scripts/gpu_wheels.py fetch .whl
smollm2: setup
	PYTHON=$(VENV)/bin/python bash scripts/get_smollm2.sh
