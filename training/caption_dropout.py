"""Caption dropout: a share of the samples trains on the negative prompt instead of its caption.

Classifier-free guidance at sampling time contrasts the prediction for the prompt with the one
for the negative prompt (``" "`` like the reference, docs/diffsynth-aaa.md section 8). A model
that never trained without its caption has no good unconditional prediction, so peers drop
about one caption in ten when training from scratch. The reference drops none, which is our
default (the reference recipe stays exact).

Which rows are dropped is drawn from a generator seeded by (seed, micro-step, process) alone,
like the noise, so a resumed run drops exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import torch

from .loss import step_generator

DROPOUT_STREAM = 1  # step_generator's stream for the dropout draws: independent of the noise and timesteps (stream 0)


class CaptionDropout:
    """``dropout(text, micro_step)``: ``text (B, L, D)`` with each row replaced by ``empty`` with probability ``p``."""

    def __init__(self, probability: float, empty: torch.Tensor | None, seed: int, rank: int):
        if probability > 0 and empty is None:
            raise ValueError("caption dropout needs the negative prompt's embedding")
        self.probability, self.empty, self.seed, self.rank = probability, empty, seed, rank

    def __call__(self, text: torch.Tensor, micro_step: int) -> torch.Tensor:
        if self.probability == 0:
            return text
        generator = step_generator(self.seed, micro_step, self.rank, text.device, DROPOUT_STREAM)
        dropped = torch.rand(len(text), generator=generator, device=text.device) < self.probability
        if self.empty.device != text.device:  # moved once, not at every step
            self.empty = self.empty.to(text.device)
        return torch.where(dropped.view(-1, 1, 1), self.empty.to(text.dtype), text)
