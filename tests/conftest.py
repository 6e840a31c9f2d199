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


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` (the slow pass of ``make test``): the slow tests of one file run on one
    worker, one after another, so a module-scoped run (a trained checkpoint several tests read) is made once; both Slurm
    files share one group, so two local clusters never run at once. Without xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("slow") is None or item.get_closest_marker("xdist_group") is not None:
            continue
        group = "slurm" if item.get_closest_marker("slurm") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
