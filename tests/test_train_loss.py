"""train.loss_norm: token and sequence normalisation are exact against one big batch -- over gradient accumulation,
over 2 gloo ranks (gradients averaged as DeepSpeed does), with padding and with packed rows -- and ``sequence`` is
the official objective: the mean over documents of each document's mean token loss."""

from __future__ import annotations

import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from emoe_llm.data import SFTCollator
from emoe_llm.tiny import tiny_llama_config
from emoe_llm.train import chunked_loss
from emoe_llm.train.loss import count_sequences, sequence_ce_sum, sequence_ids
from emoe_llm.train.recipe import train_step

VOCAB = 96


def _doc(gen, n, n_prompt):
    ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
    return ids, [-100] * n_prompt + ids[n_prompt:]


def _rows(packed: bool, seed: int = 0) -> list[dict]:
    """8 rows of documents with very different answer lengths (so token and sequence means differ)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(8):
        docs = [_doc(gen, 6 + 7 * ((r + j) % 4), 3 + j) for j in range(3 if packed else 1)]
        ids = [t for d in docs for t in d[0]]
        labels = [t for d in docs for t in d[1]]
        pos = [p for d in docs for p in range(len(d[0]))]
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, attn_implementation="eager")).float()


class _Engine:
    """DeepSpeed's interface as train_step uses it; on several ranks the gradients are averaged at the end, like
    DeepSpeed's data-parallel reduction."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False
        loss.backward()

    def step(self):
        pass


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _step(rows, *, micro, loss_norm, world=1, chunked=False):
    model = _model()
    if chunked:
        assert chunked_loss.install(model, plain_logits=True)
    collate = SFTCollator(pad_token_id=0)
    batches = [collate(rows[i:i + micro]) for i in range(0, len(rows), micro)]
    out = train_step(_Engine(model), batches, device=torch.device("cpu"), world=world, loss_norm=loss_norm)
    grads = _grads(model)
    if world > 1:
        dist.all_reduce(grads)
        grads /= world
    return out, grads


@pytest.fixture(scope="module")
def one_rank():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield


@functools.lru_cache(maxsize=None)
def _reference_for(packed, loss_norm):
    return _reference(_rows(packed), loss_norm)


def _reference(rows, loss_norm):
    """Every document on its own (no packing, no padding): the objective by definition."""
    model = _model()
    per_doc = []
    for row in rows:
        pos = torch.tensor(row["position_ids"])
        starts = [i for i, p in enumerate(pos.tolist()) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            ids = torch.tensor([row["input_ids"][a:b]])
            labels = torch.tensor([row["labels"][a:b]])
            logits = model(input_ids=ids).logits
            ce = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
            mask = labels[0, 1:] != -100
            per_doc.append((ce[mask].sum(), int(mask.sum())))
    if loss_norm == "token":
        loss = sum(s for s, _ in per_doc) / sum(n for _, n in per_doc)
    else:
        loss = sum(s / n for s, n in per_doc) / len(per_doc)
    loss.backward()
    return float(loss.detach()), _grads(model), len(per_doc)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("loss_norm", ["token", "sequence"])
def test_loss_norm_is_exact_against_one_big_batch(one_rank, packed, loss_norm, chunked, monkeypatch):
    """Also with the chunked LM-head loss (several token chunks and vocabulary blocks per micro-batch)."""
    monkeypatch.setattr(chunked_loss, "TOKEN_CHUNK", 7)
    monkeypatch.setattr(chunked_loss, "VOCAB_BLOCK", 40)  # 96 = 40 + 40 + 16
    rows = _rows(packed)
    ref_loss, ref_grads, n_docs = _reference_for(packed, loss_norm)
    for micro in (8, 2, 1):  # one big batch, accumulation of 4, of 8 (different padding in every split)
        out, grads = _step(rows, micro=micro, loss_norm=loss_norm, chunked=chunked)
        assert out["loss"] == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
        if loss_norm == "sequence":
            assert out["sequences"] == n_docs
    other = "sequence" if loss_norm == "token" else "token"
    assert _reference_for(packed, other)[0] != pytest.approx(ref_loss, rel=1e-3)  # the two objectives really differ


def test_sequence_ids_follow_packing_and_padding():
    collate = SFTCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, -100, 9], "position_ids": [0, 1, 0, 1, 2]},
                     {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}])
    assert sequence_ids(batch["position_ids"]).tolist() == [[0, 0, 1, 1, 1], [2, 2, 3, 3, 3]]  # padding: own segment
    assert count_sequences(batch) == 3  # the padding segment has no targets
    logits = torch.randn(2, 5, 12)
    labels = batch["labels"]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 12), labels[:, 1:].reshape(-1), ignore_index=-100,
                         reduction="none").view(2, 4)
    expected = ce[0, 0] + ce[0, 3] + ce[1, 0]  # one target in each of the three documents
    torch.testing.assert_close(sequence_ce_sum(logits, labels, batch["position_ids"]), expected)


def _rank_main(rank, port, packed, loss_norm, queue):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rows = _rows(packed)
    out, grads = _step(rows[rank::2], micro=2, loss_norm=loss_norm, world=2)
    if rank == 0:
        queue.put((out["loss"], grads))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loss_norm", ["token", "sequence"])
def test_loss_norm_is_exact_over_two_ranks(loss_norm):
    """2 gloo ranks x accumulation 2, packed rows: the averaged gradient is that of the single big batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, True, loss_norm, queue)) for r in range(2)]
    for p in procs:
        p.start()
    loss, grads = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref_loss, ref_grads, _ = _reference_for(True, loss_norm)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("token_chunk,vocab_block", [(5, 7), (64, 1000), (1, 50)])
def test_linear_cross_entropy_matches_the_materialised_logits(token_chunk, vocab_block):
    """Loss per token and the gradients of hidden and weight equal F.cross_entropy on h @ W.T in fp32, with ignored
    targets, chunks that do not divide the sizes, and an upstream gradient that differs per token."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 11, 16, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(50, 16, generator=gen).mul(0.5).requires_grad_()
    t = torch.randint(0, 50, (3, 11), generator=gen)
    t[0, :4] = -100
    t[2, -1] = -100
    up = torch.rand(3, 11, generator=gen)
    ref = F.cross_entropy((h @ w.t()).float().reshape(-1, 50), t.reshape(-1), ignore_index=-100,
                          reduction="none").view(3, 11)
    (ref * up).sum().backward()
    ref_h, ref_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = chunked_loss.linear_cross_entropy(h, w, t, token_chunk=token_chunk, vocab_block=vocab_block)
    (got * up).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got[0, :4].abs().max() == 0 and got[2, -1] == 0
    torch.testing.assert_close(h.grad, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_frozen_head_and_bf16():
    """A frozen head (LoRA) gets no gradient; in bf16 the loss follows the bf16 logits within bf16 rounding."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 32, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(300, 32, generator=gen).mul(0.2).bfloat16()
    t = torch.randint(0, 300, (2, 9), generator=gen)
    got = chunked_loss.linear_cross_entropy(h, w, t, token_chunk=4, vocab_block=64)
    assert got.dtype == torch.float32
    ref = F.cross_entropy((h @ w.t()).float().reshape(-1, 300), t.reshape(-1), reduction="none").view(2, 9)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-3, atol=1e-3)
    got.sum().backward()
    assert w.grad is None and h.grad is not None and h.grad.dtype == torch.bfloat16


def test_chunked_head_returns_logits_outside_a_training_step():
    """Installed on a model, the head returns ordinary logits (eval, probe, generation) unless targets are set."""
    model = _model()
    ids = torch.randint(1, VOCAB, (2, 6))
    plain = model(input_ids=ids).logits
    assert chunked_loss.install(model, plain_logits=True) and chunked_loss.installed(model)
    torch.testing.assert_close(model(input_ids=ids).logits, plain)
    labels = ids.clone()
    labels[:, :2] = -100
    with chunked_loss.targets(model, labels):
        per_token = model(input_ids=ids).logits
    assert per_token.shape == (2, 6) and per_token[:, -1].abs().max() == 0
    ref = F.cross_entropy(plain[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="none").view(2, 5)
    torch.testing.assert_close(per_token[:, :-1], ref)
    assert model(input_ids=ids).logits.shape == (2, 6, VOCAB)  # targets cleared on exit
    assert not chunked_loss.install(LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)), plain_logits=False)
