"""Next-token cross-entropy straight from the LM head's input, without the (tokens, vocab) logits.

The plain loss materialises the logits (4 x 4,096 tokens x 128,256 vocab is 4.2 GB in bf16), casts them to fp32
(8.4 GB), and autograd keeps the fp32 log-softmax and builds two fp32 gradients of the same size: most of a 7B step's
activation memory. Here (the idea of Liger's fused linear cross-entropy and torchtune's chunked output, written in
plain torch) the LM head and the loss are one autograd function:

    forward   per chunk of tokens: logits = h_c @ W.T (compute dtype) -> fp32 -> logsumexp and the target's logit;
              only the per-token losses and logsumexps (fp32, one number per token) are kept
    backward  per block of vocabulary rows: the block's logits are recomputed, softmax - one_hot scaled by each
              token's incoming gradient, then grad_h += g @ W_b and grad_W[b] = g.T @ h

Blocks of the *vocabulary* in backward, so the weight gradient is written block by block in its own dtype (a token-
chunk loop would need a whole fp32 accumulator the size of the weight). The extra work is one more logits matmul
(forward + recompute), as with activation checkpointing. The function returns per-token losses (0 where the target
is ignored), so token and sequence normalisation (``loss.py``) apply to it unchanged.

``install`` wraps the model's LM head (an ``nn.Linear`` without bias) so that, while ``targets`` are set, its forward
returns these per-token losses in place of the logits. The head keeps its parameter and is still called as a module,
so ZeRO-3's hooks gather the weight for the forward and again for the backward and reduce its gradient as usual.
Families whose logits are not the head's output as it is (a soft-cap or a scale after the head: ``arch``'s
``plain_logits``) keep the plain loss.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

IGNORE_INDEX = -100
TOKEN_CHUNK = 512  # forward: a (512, vocab) fp32 tile is 0.26 GB at a 128k vocab (+ logsumexp's temporary)
VOCAB_BLOCK = 4096  # backward: a (tokens, 4,096) fp32 tile; 4 x 4,096 tokens -> 0.27 GB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_chunk, vocab_block):
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, token_chunk):
            logits = (hidden[s:s + token_chunk] @ weight.t()).float()  # the compute dtype's logits, as lm_head's
            lse[s:s + token_chunk] = torch.logsumexp(logits, dim=-1)
            target_logit[s:s + token_chunk] = logits.gather(1, safe[s:s + token_chunk, None]).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.vocab_block = vocab_block
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        scale = (grad_loss.float() * valid)[:, None]  # (n, 1): d loss_total / d loss_t, 0 for ignored targets
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None  # LoRA: a frozen head gets no gradient at all
        for v in range(0, weight.shape[0], ctx.vocab_block):
            w_block = weight[v:v + ctx.vocab_block]
            g = (hidden @ w_block.t()).float().sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary
            # - one_hot(target) for the tokens whose target is in this block (a scatter: no host sync)
            local = safe - v
            inside = (local >= 0) & (local < w_block.shape[0])
            g.scatter_add_(1, local.clamp(0, w_block.shape[0] - 1)[:, None], -inside.to(g.dtype)[:, None])
            g = g.mul_(scale).to(weight.dtype)  # the logits' gradient in their dtype, as autograd would have it
            if need_h:
                grad_h += (g @ w_block).float()
            if need_w:
                grad_w[v:v + ctx.vocab_block] = g.t() @ hidden
            del g
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         token_chunk: int = TOKEN_CHUNK, vocab_block: int = VOCAB_BLOCK) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``targets`` (IGNORE_INDEX: loss 0), in fp32.
    (..., H), (V, H), (...) -> (...); equal to ``F.cross_entropy(logits.float(), targets, reduction="none")`` on the
    materialised logits, in value and in gradients."""
    shape = targets.shape
    out = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                    token_chunk, vocab_block)
    return out.view(shape)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets of each position: position t predicts labels[:, t + 1]; the last predicts
    nothing."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def install(model, *, plain_logits: bool) -> bool:
    """Wrap the output embedding of ``model`` (a transformers CausalLM, peft-wrapped or not) so that ``targets``
    makes its forward return per-token losses. False (nothing changed) when the head is not a bias-free Linear or
    the family transforms the logits after the head."""
    head = model.get_output_embeddings()
    if not plain_logits or not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    if getattr(head, "_emoe_chunked_loss", False):
        return True
    logits_forward = head.forward

    def forward(hidden):
        if head._emoe_targets is None:
            return logits_forward(hidden)
        return linear_cross_entropy(hidden, head.weight, head._emoe_targets, token_chunk=TOKEN_CHUNK,
                                    vocab_block=VOCAB_BLOCK)

    head.forward = forward
    head._emoe_targets = None
    head._emoe_chunked_loss = True
    return True


def installed(model) -> bool:
    return getattr(model.get_output_embeddings(), "_emoe_chunked_loss", False)


@contextlib.contextmanager
def targets(model, labels: torch.Tensor):
    """Inside the block, the model's forward returns per-token losses (B, T) as ``logits`` (``install`` first)."""
    head = model.get_output_embeddings()
    head._emoe_targets = shifted_targets(labels)
    try:
        yield
    finally:
        head._emoe_targets = None
