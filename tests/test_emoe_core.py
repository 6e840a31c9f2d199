"""EMoE method: clustering, permutation, EMoEMLP, model-level conversion and validation (single process, CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from emoe_llm.emoe import (
    EMoEMLP,
    apply_emoe,
    balanced_kmeans,
    decoder_layers,
    disable_emoe,
    enable_emoe,
    expert_permutation,
    load_emoe_model,
    parse_layer_spec,
    pop_expert_load,
    random_balanced_labels,
)
from emoe_llm.tiny import tiny_llama_config


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=128, **overrides)).eval()


def tokens(seed=1, batch=2, length=12, vocab=128):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- balanced k-means ---------------------------------------------------------------------------------------------

def test_clusters_are_exactly_balanced():
    points = torch.randn(240, 16, generator=torch.Generator().manual_seed(0))
    for n_clusters in (1, 2, 8, 24, 240):
        result = balanced_kmeans(points, n_clusters, seed=0, n_init=2)
        counts = torch.bincount(result.labels, minlength=n_clusters)
        assert result.labels.shape == (240,)
        assert counts.tolist() == [240 // n_clusters] * n_clusters


def test_clustering_is_deterministic_for_a_seed():
    points = torch.randn(512, 32, generator=torch.Generator().manual_seed(3))
    a = balanced_kmeans(points, 16, seed=7)
    b = balanced_kmeans(points, 16, seed=7)
    c = balanced_kmeans(points, 16, seed=8)
    assert torch.equal(a.labels, b.labels) and a.inertia == b.inertia
    assert not torch.equal(a.labels, c.labels)  # a different seed explores a different start


def test_clustering_recovers_planted_equal_clusters():
    # 8 well separated directions, 32 noisy copies each, shuffled: the only balanced optimum is the planted split.
    gen = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(8, 64, generator=gen), dim=-1)
    truth = torch.arange(8).repeat_interleave(32)
    points = centers[truth] * 5 + 0.3 * torch.randn(256, 64, generator=gen)
    perm = torch.randperm(256, generator=gen)
    points, truth = points[perm], truth[perm]
    labels = balanced_kmeans(points, 8, seed=0).labels
    # same partition up to renaming: every found cluster maps to one true cluster
    for k in range(8):
        assert truth[labels == k].unique().numel() == 1


def test_clustering_beats_random_split_on_objective():
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(16, 32, generator=gen)
    points = centers[torch.randint(16, (512,), generator=gen)] + 0.5 * torch.randn(512, 32, generator=gen)
    x = torch.nn.functional.normalize(points, dim=-1)

    def inertia(labels):
        return sum(((x[labels == k] - x[labels == k].mean(0)) ** 2).sum() for k in range(16))

    ours = balanced_kmeans(points, 16, seed=0)
    assert abs(float(inertia(ours.labels)) - ours.inertia) < 1e-3 * ours.inertia  # reported inertia is the real one
    assert ours.inertia < 0.6 * float(inertia(random_balanced_labels(512, 16, seed=0)))


def test_swap_refinement_never_increases_inertia_and_keeps_balance():
    """The final swap refinement starts from the Lloyd result (swap_rounds=0) and may only lower its inertia, with
    every cluster still exactly n / N points, deterministically; on unstructured points it finds improving swaps."""
    from emoe_llm.emoe.clustering import _centroids, _inertia, _swap_refine

    gen = torch.Generator().manual_seed(11)
    for n, n_clusters, d in ((512, 16, 24), (600, 8, 200), (384, 64, 8)):
        points = torch.randn(n, d, generator=gen)
        base = balanced_kmeans(points, n_clusters, seed=0, n_init=1, max_iter=10, swap_rounds=0)
        refined = balanced_kmeans(points, n_clusters, seed=0, n_init=1, max_iter=10, swap_rounds=10)
        again = balanced_kmeans(points, n_clusters, seed=0, n_init=1, max_iter=10, swap_rounds=10)
        assert torch.equal(refined.labels, again.labels) and refined.swaps == again.swaps
        assert torch.bincount(refined.labels, minlength=n_clusters).tolist() == [n // n_clusters] * n_clusters
        assert refined.swaps > 0 and refined.inertia < base.inertia
        x = torch.nn.functional.normalize(points, dim=-1)
        assert refined.inertia == pytest.approx(_inertia(x, refined.labels, _centroids(x, refined.labels, n_clusters)),
                                                rel=1e-6)
        # round by round, from an arbitrary (random) balanced start: never up, always balanced
        labels = random_balanced_labels(n, n_clusters, seed=1)
        prev = _inertia(x, labels, _centroids(x, labels, n_clusters))
        for _ in range(4):
            labels, swaps = _swap_refine(x, (x * x).sum(-1), labels, n_clusters, x, max_rounds=1)
            assert torch.bincount(labels, minlength=n_clusters).tolist() == [n // n_clusters] * n_clusters
            now = _inertia(x, labels, _centroids(x, labels, n_clusters))
            assert now <= prev + 1e-9 * prev and (swaps == 0) == (now == prev)
            prev = now
    with pytest.raises(ValueError, match="swap_rounds"):
        balanced_kmeans(torch.randn(16, 4), 4, swap_rounds=-1)


def test_clustering_rejects_bad_input():
    with pytest.raises(ValueError, match="divide"):
        balanced_kmeans(torch.randn(10, 4), 3)
    with pytest.raises(ValueError, match="2-D"):
        balanced_kmeans(torch.randn(10), 2)


# --- permutation --------------------------------------------------------------------------------------------------

def test_expert_permutation_makes_experts_contiguous_and_stable():
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    perm = expert_permutation(labels, 3)
    assert perm.tolist() == [1, 3, 2, 5, 0, 4]  # expert 0 = neurons 1,3 (original order kept), then 1, then 2
    assert labels[perm].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="balanced"):
        expert_permutation(torch.tensor([0, 0, 0, 1]), 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny_llama(),
        lambda: tiny_llama(mlp_bias=True),
        lambda: MistralForCausalLM(MistralConfig(**tiny_llama_config(vocab_size=128).to_dict() | {"model_type": "mistral"})),
        lambda: Qwen2ForCausalLM(Qwen2Config(**tiny_llama_config(vocab_size=128).to_dict() | {"model_type": "qwen2"})),
    ],
    ids=["llama", "llama-mlp-bias", "mistral", "qwen2"],
)
def test_permutation_preserves_logits(make):
    torch.manual_seed(0)
    model = make().eval()
    if getattr(model.config, "mlp_bias", False):  # random non-zero biases so the test would see a bias mix-up
        with torch.no_grad():
            for block in decoder_layers(model):
                for lin in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                    lin.bias.normal_()
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
        before = decoder_layers(model)[1].mlp.gate_proj.weight.clone()
        apply_emoe(model, n_experts=8, top_k=8, layers="all", seed=0, enable=False)
        out = model(ids).logits
    assert not torch.equal(before, decoder_layers(model)[1].mlp.gate_proj.weight)  # something really moved
    assert (out - ref).abs().max().item() <= 1e-5


# --- EMoEMLP ------------------------------------------------------------------------------------------------------

def test_top_k_equal_n_is_exactly_dense():
    model = tiny_llama()
    apply_emoe(model, n_experts=16, top_k=16, layers=[0, 2], enable=False)
    dense = decoder_layers(model)[2].mlp
    emoe = EMoEMLP(dense, n_experts=16, top_k=16)
    x = torch.randn(3, 7, 64)
    assert torch.equal(emoe(x), dense(x))
    with torch.no_grad():
        ref = model(tokens()).logits
        enable_emoe(model)
        assert torch.equal(model(tokens()).logits, ref)


def test_emoe_mlp_matches_the_spec_formula():
    torch.manual_seed(0)
    mlp = tiny_llama().model.layers[0].mlp
    n, k, e = 8, 3, 256 // 8
    emoe = EMoEMLP(mlp, n_experts=n, top_k=k)
    x = torch.randn(2, 5, 64)
    g = x @ mlp.gate_proj.weight.T
    h = torch.nn.functional.silu(g) * (x @ mlp.up_proj.weight.T)
    s = g.view(2, 5, n, e).mean(-1)
    m = torch.zeros_like(s).scatter_(-1, s.topk(k, dim=-1).indices, 1.0).repeat_interleave(e, dim=-1)
    expected = (h * m) @ mlp.down_proj.weight.T
    assert torch.allclose(emoe(x), expected, atol=1e-6)
    assert emoe(x).abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_routing_accumulates_in_fp32_and_picks_the_same_experts(dtype):
    """The scores are the fp32 mean of each expert's gate values, taken without an fp32 copy of the gate output:
    the chosen experts are those of the mean over an fp32 copy, on 4,096 tokens in bf16 and fp32, and on the strided
    gate half of a fused gate/up output."""
    mlp = tiny_llama().model.layers[0].mlp
    n, k, e = 8, 2, 32
    emoe = EMoEMLP(mlp, n_experts=n, top_k=k)
    gate_up = torch.randn(4096, 2 * 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    for gate_out in (gate_up[:, :256].contiguous(), gate_up[:, :256]):  # plain; a fused layout's strided half
        reference = gate_out.float().reshape(4096, n, e).mean(-1)
        want = torch.zeros(4096, n).scatter_(-1, reference.topk(k, dim=-1).indices, 1.0)
        got = emoe.expert_mask(gate_out)
        assert got.dtype == dtype and torch.equal(got.float(), want)


def test_gradients_reach_only_selected_experts_of_a_token():
    torch.manual_seed(0)
    mlp = tiny_llama().model.layers[0].mlp
    n, k, e = 8, 2, 32
    emoe = EMoEMLP(mlp, n_experts=n, top_k=k)
    x = torch.randn(1, 1, 64, requires_grad=True)
    emoe(x).pow(2).sum().backward()
    selected = emoe.expert_mask(mlp.gate_proj(x)).view(n).bool()
    for weight, dim in ((mlp.gate_proj.weight, 0), (mlp.up_proj.weight, 0), (mlp.down_proj.weight, 1)):
        per_expert = weight.grad.abs().sum(dim=1 - dim).view(n, e).sum(-1)
        assert (per_expert[~selected] == 0).all(), "an unselected expert got gradient"
        assert (per_expert[selected] > 0).all(), "a selected expert got no gradient"
    # the router is the mean of gate rows and gets no gradient of its own: no new parameters exist at all
    assert sum(p.numel() for p in emoe.parameters()) == sum(p.numel() for p in mlp.parameters())


def test_expert_load_is_recorded_in_training_only():
    model = tiny_llama()
    apply_emoe(model, n_experts=8, top_k=2, layers=[1, 3])
    model.eval()
    model(tokens())
    assert pop_expert_load(model) == {}
    model.train()
    model(tokens(batch=3, length=10))
    load = pop_expert_load(model)
    assert sorted(load) == [1, 3]
    for fractions in load.values():
        assert fractions.shape == (8,)
        assert abs(fractions.sum().item() - 2.0) < 1e-5  # each token picks k=2 experts
    assert pop_expert_load(model) == {}  # reset after reading


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_llama()
        apply_emoe(model, n_experts=8, top_k=3, layers=[0, 1, 2, 3])
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = tokens()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, pop_expert_load(model)

    plain, load_plain = grads(False)
    ckpt, load_ckpt = grads(True)
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name
    for layer in load_plain:  # recomputation must not distort the logged load fractions
        assert torch.allclose(load_plain[layer], load_ckpt[layer])


# --- conversion API, checkpoint round trip ------------------------------------------------------------------------

def test_converted_checkpoint_loads_dense_and_as_emoe(tmp_path):
    model = tiny_llama()
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    settings = apply_emoe(model, n_experts=8, top_k=2, layers="1:2", seed=5, permute_layers="all")
    assert settings.layers == [1, 3] and settings.permuted_layers == [0, 1, 2, 3]
    model.save_pretrained(tmp_path)

    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, EMoEMLP) for m in dense.modules())
    assert dense.config.emoe["n_experts"] == 8 and dense.config.emoe["top_k"] == 2
    assert dense.config.emoe["seed"] == 5 and set(dense.config.emoe["clustering"]) == {"0", "1", "2", "3"}
    with torch.no_grad():
        assert (dense(ids).logits - ref).abs().max() <= 1e-5

    emoe = load_emoe_model(tmp_path).eval()
    assert [type(b.mlp).__name__ for b in emoe.model.layers] == ["LlamaMLP", "EMoEMLP", "LlamaMLP", "EMoEMLP"]
    with torch.no_grad():
        masked = emoe(ids).logits
        assert (masked - ref).abs().max() > 1e-3  # k < N really changes the function
        # layers may be re-chosen among the permuted ones, and k raised to N gives the dense model back
        enable_emoe(emoe, top_k=8, layers=[0, 2])
        assert (emoe(ids).logits - ref).abs().max() <= 1e-5
        disable_emoe(emoe)
        assert not any(isinstance(m, EMoEMLP) for m in emoe.modules())
    assert set(emoe.state_dict()) == set(dense.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_experts=7, top_k=2, layers=[1]), "does not divide intermediate_size=256"),
        (dict(n_experts=0, top_k=1, layers=[1]), "n_experts must be a positive integer"),
        (dict(n_experts=8, top_k=0, layers=[1]), r"top_k=0 must satisfy 1 <= top_k <= n_experts=8"),
        (dict(n_experts=8, top_k=9, layers=[1]), r"top_k=9 must satisfy"),
        (dict(n_experts=8, top_k=2, layers=[4]), "layer 4 is out of range: the model has 4 layers"),
        (dict(n_experts=8, top_k=2, layers=[-5]), "layer -5 is out of range"),
        (dict(n_experts=8, top_k=2, layers="9:2"), "start layer 9 is out of range"),
        (dict(n_experts=8, top_k=2, layers="1,x"), "comma-separated integers"),
        (dict(n_experts=8, top_k=2, layers=[]), "selects no layers|no EMoE layers"),
        (dict(n_experts=8, top_k=2, layers=[1, 3], permute_layers=[1]), r"layers \[3\] would not be clustered"),
        (dict(n_experts=8, top_k=2, layers=[1], method="spectral"), "unknown clustering method"),
    ],
)
def test_bad_settings_give_clear_errors(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        apply_emoe(model, **kwargs)


def test_unsupported_architecture_and_double_conversion_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises((ValueError, TypeError), match="not supported|no decoder 'layers'"):
        apply_emoe(gpt2, n_experts=4, top_k=2, layers=[0])
    model = tiny_llama()
    apply_emoe(model, n_experts=8, top_k=2, layers=[1])
    with pytest.raises(ValueError, match="already an EMoE model"):
        apply_emoe(model, n_experts=8, top_k=2, layers=[1])
    with pytest.raises(ValueError, match=r"layers \[2\] were not clustered"):
        enable_emoe(model, layers=[2])
    with pytest.raises(ValueError, match="no 'emoe' block"):
        enable_emoe(tiny_llama())


def test_parse_layer_spec_forms():
    assert parse_layer_spec("28:2", 32) == [28, 30]
    assert parse_layer_spec("16:4", 32) == [16, 20, 24, 28]
    assert parse_layer_spec("28,30", 32) == [28, 30]
    assert parse_layer_spec("-1,-3", 32) == [29, 31]
    assert parse_layer_spec([3, 1], 4) == [1, 3]
    assert parse_layer_spec("all", 3) == [0, 1, 2]


@pytest.mark.parametrize("n,n_clusters,d,seed", [(60, 6, 3, 0), (240, 12, 5, 1), (384, 32, 8, 2)])
def test_exact_assignment_matches_linear_sum_assignment(n, n_clusters, d, seed):
    """exact_balanced_assign is the optimal transportation solution: the same total cost as scipy's Hungarian solver
    on the cost matrix with every column repeated n / N times (exact, but n x n); the fast rounds are not always."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from emoe_llm.emoe import exact_balanced_assign
    from emoe_llm.emoe.clustering import _balanced_assign

    gen = torch.Generator().manual_seed(seed)
    cost = torch.cdist(torch.randn(n, d, generator=gen), torch.randn(n_clusters, d, generator=gen)) ** 2
    size = n // n_clusters
    rows, cols = linear_sum_assignment(np.repeat(cost.double().numpy(), size, axis=1))
    best = float(cost.double().numpy()[rows, cols // size].sum())
    labels = exact_balanced_assign(cost, size)
    assert torch.equal(torch.bincount(labels, minlength=n_clusters), torch.full((n_clusters,), size))
    assert float(cost.double().gather(1, labels[:, None]).sum()) == pytest.approx(best, rel=1e-9)
    fast = float(cost.double().gather(1, _balanced_assign(cost, size)[:, None]).sum())
    assert fast >= best - 1e-9


def test_kmeans_exact_method_is_balanced_and_no_worse_than_fast():
    from emoe_llm.emoe import cluster_labels

    points = torch.randn(512, 24, generator=torch.Generator().manual_seed(3))
    fast_labels, fast = cluster_labels(points, 16, seed=0, method="kmeans", n_init=1, max_iter=10)
    exact_labels, exact = cluster_labels(points, 16, seed=0, method="kmeans_exact", n_init=1, max_iter=10)
    assert torch.equal(torch.bincount(exact_labels, minlength=16), torch.full((16,), 32))
    assert exact["inertia"] <= fast["inertia"] * 1.01
    with pytest.raises(ValueError, match="assign must be one of"):
        balanced_kmeans(points, 16, assign="hungarian")
