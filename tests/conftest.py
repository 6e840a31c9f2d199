"""Fixtures shared by test files, and the order `make test-slow` runs the files in."""

import os

# One pytest-xdist worker per core (`make test`: -n 2 on 2 cores): each worker, and every process it starts, gets its
# share of the cores as OpenMP threads. Left at the default, each of them runs a thread per core, and the threads of
# two workers plus a test's DeepSpeed ranks fight over the same cores (the in-process tests took 4.2 min instead of
# 2.8). Set before torch is imported; a value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_eval_checkpoints(tmp_path_factory):
    """A tiny dense checkpoint and its EMoE conversion (16 experts, top-4, layers 2,3), both never trained."""
    from transformers import AutoModelForCausalLM

    from emoe_llm.data import load_tokenizer
    from emoe_llm.emoe import apply_emoe

    root = tmp_path_factory.mktemp("tiny_eval")
    dense = save_tiny_checkpoint(root / "dense", tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")
    model = AutoModelForCausalLM.from_pretrained(dense)
    apply_emoe(model, n_experts=16, top_k=4, layers="2,3")
    model.save_pretrained(root / "emoe")
    load_tokenizer(dense).save_pretrained(root / "emoe")
    return {"dense": dense, "emoe": root / "emoe"}


# The slow files that take longest, first: `make test-slow` hands the slow tests out a file per worker (--dist loadfile
# --no-loadscope-reorder: in collection order, not most-tests-first), so the long ones start at once and the short
# ones fill in around them. In `make test` the smoke run (about a minute) goes first for the same reason.
LONGEST_FIRST = ("test_slurm", "test_study", "test_train_zero3", "test_train_elastic", "test_real_smollm2")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        if item.get_closest_marker("smoke") is not None:
            return -1
        name = item.module.__name__ if item.module is not None else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order inside a file is kept
