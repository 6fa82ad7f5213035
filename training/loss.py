"""The reference's flow-matching loss, on real batches with one timestep per sample.

Per sample (``docs/diffsynth-aaa.md`` sections 2.3-2.5 and 3): a grid index i drawn
uniformly from the 1000-entry FLUX.2 training grid (mu 0.8), ``x_t = (1 - sigma_i) x0 + sigma_i eps``,
the DiT predicts the velocity at timestep ``1000 sigma_i``, the target is ``eps - x0``, and the
loss is the mean squared error times the grid's Gaussian weight ``w_i``. The batch loss is the
mean over samples, so batch 1 gives exactly the reference's number.

One deliberate difference, behind ``reference_timesteps``: the reference casts the timestep to
bf16 before looking sigma and the weight up again (section 13, item 1), so only 384 of the 1000
grid entries are reachable and indices 0-4 all become pure noise with weight 0. By default we
use the drawn grid entry as is; the option reproduces the reference exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from aaa_core.scheduler import TrainingSchedule


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """A generator for micro-step ``micro_step`` on process ``rank``, a pure function of the four.

    Seeding per step (not one stream for the run) makes noise and timesteps independent of
    what happened before, so a resumed run draws exactly what an uninterrupted one would.
    ``stream`` numbers independent draws of the same step (0: the noise and timesteps).
    """
    entropy = [seed, micro_step, rank] + ([stream] if stream else [])  # stream 0 keeps the seeds of earlier runs
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_noise(latents: torch.Tensor, num_timesteps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform grid indices ``(B,)`` and Gaussian noise like ``latents`` (float32), from ``generator``."""
    indices = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    return indices, noise


def flow_matching_loss(
    model: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    indices: torch.Tensor,
    noise: torch.Tensor,
    schedule: TrainingSchedule,
    reference_timesteps: bool = False,
) -> torch.Tensor:
    """Weighted per-sample losses ``(B,)`` in float32; ``.mean()`` is the training loss.

    ``latents (B,C,h,w)`` are the clean VAE latents x0, ``indices (B,)`` grid indices, ``noise``
    like ``latents``. The DiT runs in ``latents``' dtype (float32 under autocast, or bf16 for
    pure-bf16 training).
    """
    timesteps = schedule.timesteps.to(latents.device)[indices]
    if reference_timesteps:
        # The reference's `timesteps[id].to(bfloat16)`, then nearest-grid lookups of sigma and weight.
        timesteps = timesteps.to(torch.bfloat16).float()
        indices = schedule.nearest_index(timesteps)
    sigmas = schedule.sigmas.to(latents.device)[indices].view(-1, 1, 1, 1)
    weights = schedule.weights.to(latents.device)[indices]
    noise = noise.to(latents.dtype)
    noisy = ((1 - sigmas) * latents + sigmas * noise).to(latents.dtype)
    target = noise - latents
    prediction = model(noisy, prompt_embeds.to(latents.dtype), timesteps)
    mse = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    return mse * weights
