"""The two places where emoe-llm's EMoE departs from the official code, measured on a real checkpoint (docs/method.md).

1. Routing precision. Expert scores here are the mean of the expert's gate outputs in fp32; the official code
   computes them in bf16 (the model runs in bf16 under FSDP mixed precision). Two measurements on the SmolLM2 fixture,
   converted as the SmolLM2 study converts it (N experts, top-k, the EMoE layers):
   - scores: the same fp32 MLP inputs (captured from an fp32 forward), the gate projection and the mean done in
     bf16 as the official code does them, against ours: the share of tokens whose top-k expert set differs;
   - model: the whole model in bf16 (inputs drift through the earlier layers too) against the fp32 model, on fewer
     tokens (bf16 matmuls are slow on CPU).
2. Clustering effort. Our defaults are 3 k-means++ restarts x 30 Lloyd iterations (+ the swap refinement); the
   official k-means-constrained call uses 10 restarts x up to 1,000 iterations. The inertia of each on the EMoE
   layers, and the seconds.

    python benchmarks/emoe_protocol.py                             # SmolLM2 from scripts/get_smollm2.sh
    python benchmarks/emoe_protocol.py --model DIR --experts 16 --top-k 4 --layers 26,28 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emoe_llm.emoe import apply_emoe, balanced_kmeans  # noqa: E402
from emoe_llm.emoe.mlp import EMoEMLP  # noqa: E402


def smollm2_dir() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts" / "get_smollm2.sh")], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def corpus_tokens(tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the shipped held-out instructions (rows 900.. of alpaca_en_demo.json)."""
    rows = json.loads((REPO / "data" / "instruct" / "alpaca_en_demo.json").read_text())[900:]
    text = "\n\n".join(f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens in the held-out rows; ask for fewer (--tokens)")
    return torch.tensor(ids).view(-1, 256) if n % 256 == 0 else torch.tensor([ids])


def mlp_inputs(model, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The inputs of the EMoE layers' MLPs in a forward over ``ids`` (hooks; the model's own dtype)."""
    seen, hooks = {}, []
    for i in layers:
        mlp = model.model.layers[i].mlp
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0].detach())))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return {i: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for i, v in seen.items()}


def top_sets(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(tokens, N) scores -> (tokens, N) 0/1 top-k membership."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def routing(model, ids, layers, k) -> dict:
    """Per layer: fp32 (ours, the module's own mask) vs bf16 score arithmetic on the same inputs."""
    out = {}
    for i, x in mlp_inputs(model, ids, layers).items():
        mlp = model.model.layers[i].mlp
        assert isinstance(mlp, EMoEMLP)
        gate = mlp.gate_proj.weight
        ours = mlp.expert_mask(x.float() @ gate.float().T).bool()
        g16 = x.bfloat16() @ gate.bfloat16().T
        official = top_sets(g16.view(-1, mlp.n_experts, mlp.expert_size).mean(-1), k)  # the mean in bf16 as well
        differ = (ours != official).any(-1)
        out[i] = {"tokens": int(x.shape[0]), "tokens_routed_differently": int(differ.sum()),
                  "share": float(differ.float().mean()),
                  "experts_swapped_per_differing_token": float((ours != official).sum(-1)[differ].float().mean() / 2)
                  if differ.any() else 0.0}
    return out


def whole_model_bf16(model, ids, layers, k) -> dict:
    """Per layer: the top-k sets of the fp32 model vs the same model cast to bf16, inputs and all."""
    fp32 = {i: model.model.layers[i].mlp for i in layers}
    sets32 = {i: top_sets((x.float() @ fp32[i].gate_proj.weight.float().T)
                          .view(-1, fp32[i].n_experts, fp32[i].expert_size).mean(-1), k)
              for i, x in mlp_inputs(model, ids, layers).items()}
    model16 = model.to(torch.bfloat16)
    out = {}
    for i, x in mlp_inputs(model16, ids, layers).items():
        mlp = model16.model.layers[i].mlp
        g16 = x @ mlp.gate_proj.weight.T  # bf16 inputs (drifted through layers 0..i-1) and bf16 weights
        sets16 = top_sets(g16.view(-1, mlp.n_experts, mlp.expert_size).mean(-1), k)
        differ = (sets32[i] != sets16).any(-1)
        out[i] = {"tokens": int(x.shape[0]), "tokens_routed_differently": int(differ.sum()),
                  "share": float(differ.float().mean())}
    model.to(torch.float32)
    return out


def clustering(model, layers: list[int], experts: list[int]) -> list[dict]:
    rows = []
    for i in layers:
        gate = model.model.layers[i].mlp.gate_proj.weight.detach().float()
        for n in experts:
            ours = balanced_kmeans(gate, n, seed=0)                              # 3 x 30 + swap refinement
            official = balanced_kmeans(gate, n, seed=0, n_init=10, max_iter=1000)  # the official effort
            rows.append({"layer": i, "experts": n, "inertia_3x30": ours.inertia, "inertia_10x1000": official.inertia,
                         "ratio": ours.inertia / official.inertia,
                         "iterations_3x30": ours.iterations, "iterations_10x1000": official.iterations,
                         "seconds_3x30": ours.stats()["seconds"], "seconds_10x1000": official.stats()["seconds"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a dense HF checkpoint dir (default: the SmolLM2 fixture)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", default="26,28")
    p.add_argument("--tokens", type=int, default=2048, help="tokens for the score-precision measurement")
    p.add_argument("--model-tokens", type=int, default=256, help="tokens for the whole-model bf16 measurement")
    p.add_argument("--cluster-experts", default="16,64", help="N values for the clustering comparison")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or smollm2_dir()
    layers = [int(x) for x in args.layers.split(",")]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    result = {"model": args.model or "SmolLM2-135M-Instruct (scripts/get_smollm2.sh)", "experts": args.experts, "top_k": args.top_k, "layers": layers,
              "clustering": clustering(model, layers, [int(n) for n in args.cluster_experts.split(",")])}
    apply_emoe(model, n_experts=args.experts, top_k=args.top_k, layers=layers)
    result["routing_scores_bf16"] = routing(model, corpus_tokens(tok, args.tokens), layers, args.top_k)
    result["routing_model_bf16"] = whole_model_bf16(model, corpus_tokens(tok, args.model_tokens), layers, args.top_k)
    result.update(seconds=round(time.perf_counter() - t0, 1), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  command="python benchmarks/emoe_protocol.py " + " ".join(argv or sys.argv[1:]))
    for row in result["clustering"]:
        print(f"clustering layer {row['layer']} N={row['experts']}: inertia 3x30 {row['inertia_3x30']:.3f}, "
              f"10x1000 {row['inertia_10x1000']:.3f}, ratio 3x30/10x1000 {row['ratio']:.5f}, Lloyd iterations "
              f"{row['iterations_3x30']} vs {row['iterations_10x1000']} "
              f"({row['seconds_3x30']:.1f} s vs {row['seconds_10x1000']:.1f} s)")
    for kind in ("routing_scores_bf16", "routing_model_bf16"):
        for i, r in result[kind].items():
            print(f"{kind} layer {i}: {r['tokens_routed_differently']}/{r['tokens']} tokens "
                  f"({100 * r['share']:.2f}%) get another top-{args.top_k} expert set than fp32")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
