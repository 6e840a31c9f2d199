"""The CUDA paths (marked ``gpu``; skipped where torch sees no CUDA device) and, where the same logic runs on CPU, their
CPU twins, so that logic is exercised on every machine.

On a GPU machine ``scripts/gpu_check.sh RESULTS`` runs ``pytest -m gpu`` (with the carried deepspeed/datasets/
bitsandbytes wheels); by hand: ``python -m pytest -m gpu tests/test_gpu.py``.

- bf16 ZeRO-3 training through the real recipe (``python -m emoe_llm.train``, one process, NCCL), EMoE and dense;
- the masked EMoE MLP in bf16 equals fp32 within bf16 precision, forward and backward;
- balanced k-means on CUDA gives the CPU's labels for a fixed seed;
- QLoRA (4-bit base + LoRA) trains, when bitsandbytes is installed;
- packed rows under FlashAttention-2 match unpacked SDPA, when a flash-attn wheel is installed;
- the chunked LM-head loss on CUDA in bf16 matches the full loss.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emoe_llm.emoe import EMoEMLP, balanced_kmeans, random_balanced_labels
from emoe_llm.tiny import DATA_DIR, save_tiny_checkpoint, tiny_llama_config
from emoe_llm.train.launch import free_port

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: run `scripts/gpu_check.sh RESULTS_DIR` on a GPU "
                                "machine (BENCHMARKS.md, 'GPU check')")
ON_GPU = [pytest.mark.gpu, needs_cuda]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------------------
# bf16 vs fp32 masked forward / backward


@pytest.mark.parametrize("device", DEVICES)
def test_emoe_mlp_bf16_matches_fp32_forward_and_backward(device):
    """bf16 EMoE routes like fp32 for almost every token, and with the same routing its output and all gradients are
    fp32's to bf16 precision (about 0.5% relative; allowed 2%)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    dense = LlamaMLP(tiny_llama_config(hidden_size=256, intermediate_size=1024)).to(device)
    fp32 = EMoEMLP(copy.deepcopy(dense), n_experts=16, top_k=4).train()
    bf16 = EMoEMLP(copy.deepcopy(dense).to(torch.bfloat16), n_experts=16, top_k=4).train()
    x = torch.randn(4, 128, 256, device=device)
    grad_out = torch.randn(4, 128, 256, device=device)

    x16 = x.to(torch.bfloat16).requires_grad_()
    y16 = bf16(x16)
    y16.backward(grad_out.to(torch.bfloat16))
    with torch.no_grad():
        mask16 = bf16.expert_mask(bf16.gate_proj(x16))
        mask32 = fp32.expert_mask(fp32.gate_proj(x))
    same_route = (mask16.float() == mask32).all(-1).float().mean().item()
    assert same_route >= 0.97, f"bf16 routed only {same_route:.1%} of tokens like fp32"

    # The fp32 reference with bf16's routing: what remains is arithmetic precision alone.
    fp32.expert_mask = lambda gate_out: mask16.float()
    x32 = x.clone().requires_grad_()
    y32 = fp32(x32)
    y32.backward(grad_out)
    assert rel_err(y16, y32) < 2e-2
    assert rel_err(x16.grad, x32.grad) < 2e-2
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert rel_err(getattr(bf16, name).weight.grad, getattr(fp32, name).weight.grad) < 2e-2, name
    # the tolerance means something: the unmasked MLP is nowhere near
    assert rel_err(dense(x), y32) > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# clustering on CUDA vs CPU


def planted_points(n=2048, d=256, n_clusters=16, seed=0):
    """Rows with a planted balanced cluster structure (as benchmarks/clustering.py's 'structured' case)."""
    gen = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_clusters, d, generator=gen), dim=-1)
    planted = random_balanced_labels(n, n_clusters, seed=seed + 1)
    return 0.5 * centers[planted] + torch.randn(n, d, generator=gen) / d**0.5


@pytest.mark.parametrize("device", DEVICES)
def test_balanced_kmeans_labels_match_cpu_for_a_fixed_seed(device):
    """The same seed gives the CPU's labels on ``device`` (CPU twin: two CPU runs agree, i.e. the seed decides)."""
    x = planted_points()
    ref = balanced_kmeans(x, 16, seed=3, n_init=2, max_iter=20, device="cpu")
    got = balanced_kmeans(x, 16, seed=3, n_init=2, max_iter=20, device=device)
    assert got.labels.device.type == "cpu" and got.labels.dtype == torch.long
    assert torch.equal(torch.bincount(got.labels, minlength=16), torch.full((16,), 128))
    pairs = torch.unique(got.labels * 16 + ref.labels)  # one (got, ref) pair per cluster iff the partitions agree
    assert pairs.numel() == 16, f"{device} and cpu partition the rows differently"
    assert torch.equal(got.labels, ref.labels), f"same partition on {device}, but the expert order differs from cpu"
    assert got.inertia == pytest.approx(ref.inertia, rel=1e-4)
    other = balanced_kmeans(x, 16, seed=4, n_init=2, max_iter=20, device=device)
    assert other.inertia == pytest.approx(ref.inertia, rel=1e-2)  # another seed: as good (planted optimum) ...


@pytest.mark.gpu
@needs_cuda
def test_balanced_kmeans_cuda_unstructured_matches_cpu_inertia():
    """Random (structureless) rows: near-ties may flip single points between devices, the objective must not move."""
    x = torch.randn(4096, 512, generator=torch.Generator().manual_seed(5))
    ref = balanced_kmeans(x, 32, seed=0, n_init=1, max_iter=10, device="cpu")
    got = balanced_kmeans(x, 32, seed=0, n_init=1, max_iter=10, device="cuda")
    assert torch.equal(torch.bincount(got.labels, minlength=32), torch.full((32,), 128))
    assert got.inertia == pytest.approx(ref.inertia, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# the recipe: ZeRO-3 on one process (no launcher), bf16 + NCCL on a GPU


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "tiny_dense",
                                tokenizer_dir=DATA_DIR / "tokenizers" / "tiny_llama3_style")


def run_recipe(out: Path, checkpoint: Path, config: str, *overrides, ds_config: Path, timeout=600):
    """``python -m emoe_llm.train`` as a 1-rank job (the env a launcher would set), 6 steps, export at the end."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "emoe_llm.train", "--ds_config", str(ds_config), "--config", str(REPO / config),
           f"output_dir={out}", f"model.path={checkpoint}", f"data.cache_dir={out.parent / 'data_cache'}",
           "logging.progress_bar=false", "train.max_steps=6", "train.save_every_steps=0", "train.eval_every_steps=0",
           "train.eval_max_batches=1", "train.global_batch_size=4", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "event" not in r and "loss" in r]
    return log, losses


EMOE = ("configs/tiny_cpu.yaml",)  # its emoe: section (16 experts, top-4, layers 2,3) converts the dense model first
DENSE = ("configs/tiny_cpu_dense.yaml",)


@pytest.mark.parametrize("device,variant", [
    pytest.param("cuda", "emoe", marks=ON_GPU),
    pytest.param("cuda", "dense", marks=ON_GPU),
    pytest.param("cpu", "emoe", marks=pytest.mark.slow),
])
def test_recipe_zero3_one_process_trains(tmp_path, tiny_dense, device, variant):
    """The real recipe, ZeRO-3 on one rank without a launcher: bf16 + NCCL on CUDA (the shipped z3.json), fp32 + gloo
    on CPU. Loss falls, the step count is right, the run completes and exports."""
    config, *overrides = EMOE if variant == "emoe" else DENSE
    ds = REPO / "ds_configs" / "z3.json"
    if device == "cpu":  # bf16 matmuls are ~150x slower than fp32 on CPU
        fp32 = json.loads(ds.read_text())
        fp32["bf16"] = {"enabled": False}
        ds = tmp_path / "z3_fp32.json"
        ds.write_text(json.dumps(fp32))
    out = tmp_path / f"run_{variant}"
    log, losses = run_recipe(out, tiny_dense, config, *overrides, "train.lr=3e-3", ds_config=ds)
    precision = "bf16" if device == "cuda" else "fp32"
    assert f"ZeRO-3 {precision}" in log, log[-3000:]
    assert "ZeRO-3: rank 0 holds 100.0% of the parameters (1 ranks)" in log
    if variant == "emoe":
        assert "EMoE: layers [2, 3], 16 experts, top-4" in log
    assert len(losses) == 6 and all(l == l and abs(l) < 1e4 for l in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert (out / "COMPLETED").is_file() and (out / "final" / "config.json").is_file()


@pytest.mark.gpu
@needs_cuda
def test_qlora_trains_under_zero3(tmp_path, tiny_dense):
    """QLoRA (NF4 base via bitsandbytes + LoRA) through the recipe under bf16 ZeRO-3 on one GPU."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (the QLoRA path needs it)")
    out = tmp_path / "qlora"
    log, losses = run_recipe(out, tiny_dense, *DENSE, "lora.enabled=true", "lora.quantize=4bit", "train.lr=1e-2",
                             "lora.target_modules=[q_proj,v_proj,gate_proj,up_proj,down_proj]",
                             ds_config=REPO / "ds_configs" / "z3.json")
    assert "LoRA r=8" in log
    assert len(losses) == 6 and all(l == l for l in losses), losses
    assert losses[-1] < losses[0], losses
    assert (out / "COMPLETED").is_file() and (out / "final" / "adapter").is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# packed rows under FlashAttention-2 (cu_seq_lens), when a flash-attn wheel is installed; the chunked loss on CUDA

try:
    import flash_attn  # noqa: F401

    FLASH = CUDA
except ImportError:
    FLASH = False


@pytest.mark.gpu
@pytest.mark.skipif(not FLASH, reason="needs CUDA and flash-attn (carry a flash-attn wheel to the GPU check)")
def test_packed_rows_under_flash_attention_2_match_unpacked_sdpa():
    """Three documents packed into rows (no attention mask; the collator's cu_seq_lens / max_length for FA2) give
    every document the loss it has alone under SDPA, in bf16: FA2 does not attend across packed documents."""
    from transformers import LlamaForCausalLM

    from emoe_llm.data import SFTCollator

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=256, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    config.use_cache = False
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (17, 40, 9, 31)]
    # a document's first token is no target (it would be predicted across the boundary in a packed row)
    row = lambda ds: {"input_ids": [t for d in ds for t in d],  # noqa: E731
                      "labels": [t for d in ds for t in [-100, *d[1:]]],
                      "position_ids": [p for d in ds for p in range(len(d))]}

    def doc_losses(batch, attn):
        model.config._attn_implementation = attn
        inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        labels = batch["labels"].cuda()
        return F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100,
                               reduction="sum")

    with torch.no_grad():
        packed = SFTCollator(0, flash_attn_kwargs=True)([row(docs[:2]), row(docs[2:])])
        assert "cu_seq_lens_q" in packed and "attention_mask" not in packed
        got = doc_losses(packed, "flash_attention_2")
        alone = sum(doc_losses(SFTCollator(0)([row([d])]), "sdpa") for d in docs)
    assert abs(got.item() - alone.item()) / alone.item() < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_chunked_loss_on_cuda_matches_the_full_loss_in_bf16():
    """The chunked LM-head loss on CUDA in bf16: loss within bf16 rounding of F.cross_entropy on the fp32 logits,
    gradients within 2% relative."""
    from emoe_llm.train.chunked_loss import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 512, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 32000, (2048,), device="cuda")
    full = F.cross_entropy((h @ w.t()).float(), t, reduction="sum")
    gh, gw = torch.autograd.grad(full, (h, w))
    chunked = linear_cross_entropy(h, w, t).sum()
    ch, cw = torch.autograd.grad(chunked, (h, w))
    assert abs(chunked.item() - full.item()) / full.item() < 1e-3
    assert rel_err(ch, gh) < 0.02 and rel_err(cw, gw) < 0.02
