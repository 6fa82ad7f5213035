"""The learning rate of every optimizer step: a warm-up, then constant, cosine or linear decay to a floor.

The rate is a pure function of the step (``LrSchedule.factor``), so a resumed run gets exactly
the rates of an uninterrupted one from nothing but the step count. The warm-up is the
reference's (``docs/diffsynth-aaa.md`` section 10: ConstantLR, lr/3 for 5 steps) or a linear
ramp; after it the rate stays at ``lr`` (the reference) or decays to ``min_lr`` at the last step.
"""

from __future__ import annotations

import dataclasses
import math

CONSTANT_WARMUP_FACTOR = 1 / 3  # torch's ConstantLR default, which the reference uses


@dataclasses.dataclass(frozen=True)
class LrSchedule:
    """``lr x factor(step)`` is the rate of optimizer step ``step`` (counted from 0)."""

    lr: float
    warmup: str  # one of config.WARMUPS
    warmup_steps: int
    decay: str  # one of config.DECAYS
    min_lr: float
    total_steps: int

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return CONSTANT_WARMUP_FACTOR if self.warmup == "constant" else (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if self.decay == "constant" or decay_steps <= 0 or self.lr == 0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)  # 1 at the last step
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        floor = self.min_lr / self.lr
        return floor + (1 - floor) * shape

    def describe(self) -> str:
        """One line for the log: what the rate does over the run."""
        warmup = (f"{self.warmup} warm-up for {self.warmup_steps} steps, then " if self.warmup_steps else "")
        if self.decay == "constant":
            return f"lr {self.lr:.2e}: {warmup}constant"
        return f"lr {self.lr:.2e}: {warmup}{self.decay} decay to {self.min_lr:.2e} at step {self.total_steps}"
