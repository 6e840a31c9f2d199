"""Noticing a run that stopped learning while it still "trains".

A learning rate far too high (``train.lr=1e6 train.max_grad_norm=0`` on the tiny model) drives the weights to where
every prediction is uniform: the loss sits at ln(vocab) and the gradient norm is exactly 0 from then on, and the
run used to complete and export as if it had trained. ``StallWatch`` sees either sign for ``train.stall_steps``
steps in a row and says so once (the log, a ``"stalled"`` event in metrics.jsonl that ``emoe-llm plot`` marks);
the run goes on, since a flat stretch can be legitimate and stopping is the user's call.
"""

from __future__ import annotations

import math

UNIFORM_TOLERANCE = 1e-4  # within 0.01% of ln(vocab): uniform predictions (a random init is ~0.03% off, and noisy)


class StallWatch:
    def __init__(self, steps: int, vocab_size: int | None):
        self.steps = steps
        self.uniform_loss = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
        self.zero_grad = 0
        self.uniform = 0
        self.warned = False

    def update(self, *, step: int, loss: float, grad_norm: float) -> dict | None:
        """After an optimizer step: the ``stalled`` event to log, once, when either count reaches ``steps``."""
        if self.steps <= 0 or self.warned:
            return None
        self.zero_grad = self.zero_grad + 1 if grad_norm == 0.0 else 0
        near = self.uniform_loss is not None and abs(loss - self.uniform_loss) <= UNIFORM_TOLERANCE * self.uniform_loss
        self.uniform = self.uniform + 1 if near else 0
        if self.zero_grad < self.steps and self.uniform < self.steps:
            return None
        self.warned = True
        if self.zero_grad >= self.steps:
            why = f"the gradient norm has been exactly 0 for {self.zero_grad} steps"
        else:
            why = (f"the loss has stayed at ln(vocab) = {self.uniform_loss:.4f} (uniform predictions) for "
                   f"{self.uniform} steps")
        since = step - max(self.zero_grad, self.uniform) + 1
        return {"event": "stalled", "step": step, "since_step": since,
                "message": f"training stopped learning: {why} (since step {since}); lower train.lr or check "
                           f"train.max_grad_norm and the data (train.stall_steps sets how long to wait; 0 = never)"}
