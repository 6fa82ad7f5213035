"""The "FLUX.2" flow-matching schedule: inference sigmas and the training grid with its loss weights.

Formulas and constants come from ``docs/diffsynth-aaa.md`` section 2. Sigma is
the noise level (1 = pure noise); the DiT sees ``timestep = 1000 * sigma``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .errors import InputError

NUM_TRAIN_TIMESTEPS = 1000
TRAINING_MU = 0.8  # section 2.1: the reference's fixed training shift (PR #1226)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The resolution- and step-dependent shift of FLUX.2 inference (section 2.1)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def flux2_sigmas(num_steps: int, denoise: float = 1.0, image_seq_len: int | None = None) -> torch.Tensor:
    """``num_steps`` descending float32 sigmas; the sampler steps from the last one to 0.

    ``image_seq_len`` = (H/16)*(W/16) selects the inference shift; ``None`` uses the training
    shift 0.8. ``denoise`` < 1 starts lower on the same curve (img2img). The arithmetic order
    matches the reference so the values agree bit for bit.
    """
    if num_steps < 1:
        raise InputError(f"steps must be at least 1, got {num_steps}")
    if not 0.0 < denoise <= 1.0:
        raise InputError(f"denoise must be in (0, 1], got {denoise}")
    sigma_min, sigma_max = 1 / num_steps, 1.0
    sigma_start = sigma_min + (sigma_max - sigma_min) * denoise
    sigmas = torch.linspace(sigma_start, sigma_min, num_steps)
    mu = TRAINING_MU if image_seq_len is None else empirical_mu(image_seq_len, num_steps)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The DiT's time input: 1000 * sigma."""
    return sigmas * NUM_TRAIN_TIMESTEPS


@dataclasses.dataclass(frozen=True)
class TrainingSchedule:
    """The 1000-entry training grid (mu 0.8) with the reference's Gaussian "bsmntw" loss weights.

    The reference samples a grid index uniformly (section 2.5): the emphasis on mid-to-high
    noise comes from the shifted grid plus the weights, not from a sampling density.
    """

    sigmas: torch.Tensor  # (1000,) descending, float32
    weights: torch.Tensor  # (1000,) mean 1, zero at sigma = 1

    @classmethod
    def flux2(cls) -> "TrainingSchedule":
        sigmas = flux2_sigmas(NUM_TRAIN_TIMESTEPS)
        x = sigmas_to_timesteps(sigmas)
        y = torch.exp(-2 * ((x - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)  # section 2.3
        y = y - y.min()
        return cls(sigmas=sigmas, weights=y * (NUM_TRAIN_TIMESTEPS / y.sum()))

    @property
    def timesteps(self) -> torch.Tensor:
        return sigmas_to_timesteps(self.sigmas)

    def sample_indices(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform grid indices, one per sample (the reference draws one per step)."""
        return torch.randint(0, len(self.sigmas), (batch_size,), generator=generator)

    def nearest_index(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Grid index nearest to each timestep, as the reference's ``argmin |timesteps - t|``."""
        grid = self.timesteps.to(timesteps.device)
        return (grid[None, :] - timesteps.float().reshape(-1, 1)).abs().argmin(dim=1)
