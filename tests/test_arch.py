"""Every family of the architecture table (emoe_llm/arch.py) on a tiny random 4-layer checkpoint built with
transformers: ``emoe-llm convert`` + ``emoe-llm verify``, k = N equals the dense model exactly, masked k < N differs,
the streamed conversion equals the in-memory one, the table's layout/activation reproduce transformers' MLP, the
planner's shapes; already-MoE and gate-less models are refused in one line with nothing written. The 2-rank ZeRO-3
fine-tunes of a fused (phi3) and a separate-layout (gemma2) family are the slow test at the end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from emoe_llm import arch, emoe
from emoe_llm.cli import main as cli_main
from emoe_llm.convert.names import mlp_tensor_names
from emoe_llm.convert.source import open_source
from emoe_llm.convert.verify import _mlp_output
from emoe_llm.plan import lora_params, shape_from_config
from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint, tiny_config
from ranks import rank_command, rank_env

REQUIRED = ["llama", "mistral", "qwen2", "gemma2", "gemma3_text", "olmo2", "phi3", "granite"]
OTHERS = [t for t in arch.SUPPORTED_MODEL_TYPES if t not in REQUIRED]
ALL = REQUIRED + OTHERS


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """{model_type: (SRC, DST)}: each family's tiny checkpoint and its CLI conversion (8 experts, top-2, layers 2,3)."""
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for model_type in ALL:
        src = save_tiny_checkpoint(root / model_type / "src", model_type=model_type, seed=1)
        dst = root / model_type / "dst"
        assert cli_main(["convert", str(src), str(dst), "--experts", "8", "--top-k", "2", "--layers", "2,3",
                         "--quiet"]) == 0
        out[model_type] = (src, dst)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_table_covers_the_required_families():
    assert set(REQUIRED) <= set(arch.SUPPORTED_MODEL_TYPES)
    assert arch.mlp_layout("phi3").fused and not arch.mlp_layout("gemma2").fused
    assert arch.mlp_layout("gemma3_text").activation({"hidden_activation": "gelu_pytorch_tanh"}) == "gelu_pytorch_tanh"
    assert arch.mlp_layout("gemma").activation({"hidden_act": "gelu"}) == "gelu_pytorch_tanh"  # legacy alias


@pytest.mark.parametrize("model_type", ALL)
def test_convert_verify_and_exact_dense_equality(converted, model_type, capsys):
    src, dst = converted[model_type]
    assert cli_main(["verify", str(src), str(dst)]) == 0
    assert "verify OK" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())["model_type"] == model_type
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    dense_src = logits(AutoModelForCausalLM.from_pretrained(src), ids)
    dense_dst = logits(AutoModelForCausalLM.from_pretrained(dst), ids)
    all_experts = logits(emoe.load_emoe_model(dst, top_k=8), ids)
    masked = logits(emoe.load_emoe_model(dst), ids)
    assert torch.equal(all_experts, dense_dst)  # k = N skips the mask: the very same computation
    torch.testing.assert_close(dense_dst, dense_src, rtol=0, atol=1e-5)  # the permutation keeps the function
    assert (masked - dense_dst).abs().max() > 1e-3  # top-2 of 8 really masks


@pytest.mark.parametrize("model_type", ["phi3", "gemma2", "olmo2"])
def test_streamed_conversion_equals_in_memory_apply_emoe(converted, model_type):
    """The converter (tensor names + neuron index from the table) and apply_emoe (modules from the table) agree
    byte for byte; for phi3 this is the fused gate_up_proj: gate row i and up row d_ff + i move together."""
    from safetensors.torch import load_file

    src, dst = converted[model_type]
    model = AutoModelForCausalLM.from_pretrained(src)
    emoe.apply_emoe(model, n_experts=8, top_k=2, layers="2,3", enable=False)
    streamed = load_file(dst / "model.safetensors")
    in_memory = model.state_dict()
    for name, tensor in streamed.items():
        assert torch.equal(tensor, in_memory[name]), name
    if model_type == "phi3":
        before = load_file(src / "model.safetensors")["model.layers.2.mlp.gate_up_proj.weight"]
        after = streamed["model.layers.2.mlp.gate_up_proj.weight"]
        d_ff = before.shape[0] // 2
        rows = {tuple(r.tolist()): i for i, r in enumerate(before[:d_ff])}
        perm = torch.tensor([rows[tuple(r.tolist())] for r in after[:d_ff]])
        assert not torch.equal(perm, torch.arange(d_ff))
        assert torch.equal(after[d_ff:], before[d_ff:][perm])  # up rows follow their gate rows


@pytest.mark.parametrize("model_type", ALL)
def test_table_layout_and_activation_reproduce_the_transformers_mlp(converted, model_type):
    """verify's float64 MLP (tensor names, fused split and activation from the table) equals the module's output."""
    src, _ = converted[model_type]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)
    x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, y = _mlp_output(open_source(src), 1, x)
    with torch.no_grad():
        want = model.model.layers[1].mlp(x.T).T
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    assert set(mlp_tensor_names(1, open_source(src))) == {"gate_up", "down"} if arch.mlp_layout(model_type).fused \
        else {"gate", "up", "down"}


def test_emoe_module_on_a_fused_mlp_scores_with_the_gate_half():
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(0)
    mlp = Phi3MLP(tiny_config("phi3"))
    wrapped = emoe.EMoEMLP(mlp, n_experts=8, top_k=2, layout=arch.mlp_layout("phi3"))
    assert set(dict(wrapped.named_parameters())) == set(dict(mlp.named_parameters()))  # same state-dict keys
    x = torch.randn(3, 64)
    gate = x @ mlp.gate_up_proj.weight[:256].T
    want_mask = wrapped.expert_mask(gate)
    hidden = (torch.nn.functional.silu(gate) * (x @ mlp.gate_up_proj.weight[256:].T)).view(3, 8, 32)
    want = (hidden * want_mask[..., None]).view(3, 256) @ mlp.down_proj.weight.T
    torch.testing.assert_close(wrapped(x), want)
    # scoring with the up half instead would pick other experts on this input
    assert not torch.equal(wrapped.expert_mask(x @ mlp.gate_up_proj.weight[256:].T), want_mask)


@pytest.mark.parametrize("model_type,why", [("mixtral", "already a mixture-of-experts"),
                                            ("qwen2_moe", "already a mixture-of-experts"),
                                            ("gpt_neox", "no gate projection")])
def test_moe_and_gateless_models_are_refused_in_one_line_with_nothing_written(tmp_path, model_type, why, capsys):
    from transformers import AutoConfig

    overrides = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts=4,
                     moe_intermediate_size=64, shared_expert_intermediate_size=64)
    config = AutoConfig.for_model(model_type, **overrides)
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code = cli_main(["convert", str(src), str(tmp_path / "dst"), "--experts", "8", "--top-k", "2", "--layers", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"model_type '{model_type}' is not supported" in err[0] and why in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no DST, no partial workspace


@pytest.mark.parametrize("model_type", ["gemma", "phi3", "gemma2"])
def test_planner_shapes_match_the_real_models(model_type):
    """Parameter count from config.json (Gemma's head_dim != hidden / heads, Phi-3's fused projections) and the LoRA
    adapter size against peft on the real module names."""
    from peft import LoraConfig, get_peft_model

    config = tiny_config(model_type, head_dim=32)  # 4 heads x 32 = 128 != hidden 64
    model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(config.to_dict(), name=model_type)
    real = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert shape.n_params() - shape.layers * 2 * shape.hidden - shape.hidden == real - norms
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    modules = arch.mlp_layout(model_type).lora_targets(targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=modules))
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora_params(shape, 4, targets) == adapters


# ---------------------------------------------------------------------------------------------------------------------
# 2-rank ZeRO-3 fine-tunes

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["phi3", "gemma2"])
def test_zero3_emoe_finetune_exports_a_plain_checkpoint_that_matches(tmp_path, model_type):
    """The issue's command (train.py's recipe, with the export probe) on a converted phi3 / gemma2: 2 steps on 2
    gloo ranks, then final/ loads in plain AutoModelForCausalLM and gives the trained model's logits."""
    from emoe_llm.emoe import enable_emoe

    tok = DATA_DIR / "tokenizers" / "tiny_llama3_style"
    src = save_tiny_checkpoint(tmp_path / "dense", model_type=model_type, tokenizer_dir=tok)
    dst = tmp_path / "emoe"
    assert cli_main(["convert", str(src), str(dst), "--experts", "8", "--top-k", "2", "--layers", "2,3",
                     "--quiet"]) == 0
    out = tmp_path / "run"
    cmd = rank_command("emoe_llm.train.probe", module=True) + [
           "--ds_config", "ds_configs/z3.json", "--config", "configs/tiny_cpu.yaml", f"model.path={dst}",
           f"model.tokenizer={tok}", "emoe.n_experts=8", "emoe.top_k=2", "emoe.layers=2,3", f"output_dir={out}",
           f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.save_every_steps=0",
           "train.eval_every_steps=0", "logging.progress_bar=false", "logging.tensorboard=false",
           "data.sources.0.max_rows=40"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500, env=rank_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == model_type
    probe = torch.load(out / "run" / "export_probe.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        dense = model(**probe["inputs"], use_cache=False).logits.float()
        enable_emoe(model)
        masked = model(**probe["inputs"], use_cache=False).logits.float()
    torch.testing.assert_close(dense, probe["dense_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, probe["logits"], rtol=0, atol=1e-5)
    assert (masked - dense).abs().max() > 1e-3
    trained = AutoModelForCausalLM.from_pretrained(dst)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("model_type", ALL)
def test_plain_logits_says_when_the_chunked_loss_equals_the_models(converted, model_type):
    """``plain_logits``: the family's logits are the LM head's output, so the chunked LM-head loss (training) equals
    the cross-entropy of the model's own logits. Where the table says no, the recipe keeps the plain loss; for the
    families whose tiny config already transforms the logits (Gemma-2's soft-cap, Cohere's scale) the chunked loss
    would indeed be wrong."""
    import torch.nn.functional as F

    from emoe_llm.train import chunked_loss

    src, _ = converted[model_type]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    full = F.cross_entropy(logits(model, ids)[:, :-1].reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1),
                           reduction="none").view(2, 11)
    plain = arch.mlp_layout(model_type).plain_logits
    assert chunked_loss.install(model, plain_logits=True)  # forced, to see what it would compute
    with torch.no_grad(), chunked_loss.targets(model, ids):
        per_token = model(input_ids=ids).logits[:, :-1]
    if plain:
        torch.testing.assert_close(per_token, full, rtol=1e-5, atol=1e-5)
    elif model_type in ("gemma2", "cohere"):
        assert not torch.allclose(per_token, full, rtol=1e-3, atol=1e-3)
