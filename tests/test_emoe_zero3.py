"""EMoE under real DeepSpeed ZeRO-3 with 2 CPU ranks matches a single-process reference (forward, backward, step)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from emoe_llm.emoe import apply_emoe, enable_emoe, pop_expert_load
from emoe_llm.tiny import tiny_llama_config
from ranks import rank_command, rank_env

WORKER = Path(__file__).parent / "dist" / "emoe_zero3_worker.py"


def run_two_ranks(tmp_path, checkpoint, batches, *extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    cmd = rank_command(WORKER, "--checkpoint", str(checkpoint), "--batches", str(batches), "--out", str(out), *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=rank_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, load_file(out / "params.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("emoe_ckpt")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    apply_emoe(model, n_experts=8, top_k=2, layers=[1, 3], seed=0)
    model.save_pretrained(path)
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 128, (1, 16), generator=gen).tolist() for _ in range(2)]
    (path / "batches.json").write_text(json.dumps(batches))
    return path


def reference(checkpoint, checkpointing=False):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    enable_emoe(model)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = json.loads((checkpoint / "batches.json").read_text())
    losses = [model(input_ids=torch.tensor(b), labels=torch.tensor(b)).loss for b in batches]
    # DeepSpeed averages the ranks' gradients: the gradient of the mean of the per-rank losses.
    (sum(losses) / len(losses)).backward()
    load = pop_expert_load(model)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    return [l.item() for l in losses], dict(model.named_parameters()), load


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_emoe_zero3_two_ranks_matches_single_process(tmp_path, converted, checkpointing):
    extra = ["--checkpointing"] if checkpointing else []
    ranks, params = run_two_ranks(tmp_path, converted, converted / "batches.json", *extra)
    ref_losses, ref_params, ref_load = reference(converted, checkpointing)

    assert all(r["world"] == 2 and r["partitioned"] for r in ranks), "zero.Init did not partition the weights"
    assert all(r["emoe_layers"] == [1, 3] for r in ranks)
    for r, ref in zip(ranks, ref_losses):
        assert abs(r["loss"] - ref) < 1e-5
    assert set(params) == set(ref_params)
    moved = 0
    for name, p in params.items():
        assert torch.allclose(p, ref_params[name].detach(), atol=1e-5), name
        moved += int(not torch.equal(p, load_file(converted / "model.safetensors")[name]))
    assert moved > 0  # the step really updated weights
    # each rank logged the load of its own batch; the reference saw both batches
    for layer in ("1", "3"):
        mean_rank_load = torch.tensor([r["load"][layer] for r in ranks]).mean(0)
        assert torch.allclose(mean_rank_load, ref_load[int(layer)], atol=1e-6)
