"""Fixtures shared by test files."""

import pytest

from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint


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


# The slow files that take longest, first: `make test` hands the slow tests out a file per worker (--dist loadfile
# --no-loadscope-reorder: in collection order, not most-tests-first), so the long ones start at once and the short
# ones fill in around them.
LONGEST_FIRST = ("test_slurm", "test_study", "test_train_zero3", "test_train_elastic", "test_real_smollm2")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__ if item.module is not None else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order inside a file is kept
