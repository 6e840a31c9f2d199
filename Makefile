# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then convert + ZeRO-3 fine-tune (2 CPU ranks) + export + eval a tiny Llama
#   make test   set up .venv, then run the tests: the in-process ones and the demo's ZeRO-3 run, on 2 xdist workers
#               (make test-slow: the multi-process DeepSpeed, SmolLM2 and Slurm tests; make test-all: both, as CI)
#   make smollm2  build (once) the real SmolLM2-135M-Instruct checkpoint in ${EMOE_LLM_CACHE:-~/.cache/emoe_llm}/models/
VENV ?= .venv
PYTEST_ARGS ?=
# The venv's tools first, as in an activated venv: DeepSpeed JIT-builds its CPU op with the first `ninja` on PATH, and
# a system ninja (1.11) beside the venv's (1.13, a DeepSpeed dependency) rebuilds the op from scratch (~1.5 min of both
# cores) every time the other one built it last.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-slow test-all gpu-wheels smollm2
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

demo: setup
	$(VENV)/bin/emoe-llm demo

# Two tiers, both run by CI (.ci/run):
#   make test       what a developer runs: every in-process test plus the `smoke` run (the demo: convert + ZeRO-3 on
#                   2 CPU ranks + export + eval), on one pytest-xdist worker per core. About 7.5 min on a clean
#                   clone, set-up included (README).
#   make test-slow  the other `slow` tests: DeepSpeed rank groups, the real SmolLM2, a real Slurm cluster, the study,
#                   whole benchmark/GPU-check scripts (~45 CPU-minutes: ~25 min on 2 cores). SLOW_WORKERS workers, a
#                   test file per worker at a time (a file's module-scoped runs are made once; tests/conftest.py puts
#                   the longest files first): the ranks spend much of their time starting up and waiting on each
#                   other, so two files at once keep the cores busy.
#   make test-all   both; the exit status is the first failing tier's (5, "nothing selected", counts as a pass).
SLOW_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest
test: setup
	$(PYTEST) -m "not slow or smoke" -n 2 $(PYTEST_ARGS)

test-slow: setup
	@$(PYTEST) -m "slow and not smoke" -n $(SLOW_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) || \
	  { s=$$?; [ $$s -eq 5 ] || exit $$s; }

test-all: setup
	@rc=0; $(MAKE) --no-print-directory test || rc=$$?; $(MAKE) --no-print-directory test-slow || \
	  { s=$$?; [ $$rc -ne 0 ] || rc=$$s; }; exit $$rc

# Wheels for scripts/gpu_check.sh on the GPU machine (no registry there): into .whl/ (gitignored), then checked.
gpu-wheels: setup
	$(VENV)/bin/python scripts/gpu_wheels.py fetch .whl
smollm2: setup
	PYTHON=$(VENV)/bin/python bash scripts/get_smollm2.sh
