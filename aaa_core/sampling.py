"""Seeded noise and the Euler flow-matching sampler with batched classifier-free guidance.

Numerics follow the reference pipeline (``docs/diffsynth-aaa.md`` section 8):
noise drawn on a seeded CPU generator directly in the compute dtype, sigmas in float32, the
DiT fed ``1000 * sigma`` cast to the compute dtype, ``uncond + cfg * (cond - uncond)``, and
Euler steps ``x + v * (sigma_next - sigma)``. The difference: the conditional and
unconditional passes run as one batched forward instead of two batch-1 passes.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .errors import InputError
from .geometry import LATENT_CHANNELS
from .guards import require_finite
from .limits import SEED_MAX
from .scheduler import flux2_sigmas, sigmas_to_timesteps

class VelocityModel(Protocol):
    def __call__(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...


# Called after each step with (steps done, total steps, predicted clean latents).
# It may raise to stop sampling (ComfyUI's interrupt does exactly that).
StepCallback = Callable[[int, int, torch.Tensor], None]


def batch_seed(seed: int, index: int) -> int:
    """The noise seed of image ``index`` of a batch: ``seed + index``, wrapping past 2**64 - 1 to 0."""
    return (seed + index) % (SEED_MAX + 1)


def make_noise(
    seed: int,
    batch_size: int,
    latent_height: int,
    latent_width: int,
    dtype: torch.dtype = torch.float32,
    device: "str | torch.device" = "cpu",
) -> torch.Tensor:
    """Gaussian noise ``(B,128,h,w)``; sample ``i`` uses seed ``batch_seed(seed, i)``.

    Each sample is drawn on its own CPU generator in ``dtype`` (not drawn in float32 and cast),
    exactly as the reference draws its batch-1 noise, so image ``i`` of a batch is the image
    the reference gives for seed ``seed + i``, on every device.
    """
    shape = (1, LATENT_CHANNELS, latent_height, latent_width)
    samples = [
        torch.randn(shape, generator=torch.Generator("cpu").manual_seed(batch_seed(seed, i)), dtype=dtype)
        for i in range(batch_size)
    ]
    return torch.cat(samples).to(device)


def noise_latents(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching interpolation ``(1 - sigma) * x0 + sigma * noise`` (img2img start, training input)."""
    return (1 - sigma) * clean + sigma * noise


def sample(
    model: VelocityModel,
    noise: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    steps: int,
    cfg: float,
    denoise: float = 1.0,
    init_latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Runs Euler sampling and returns clean latents ``(B,128,h,w)`` in ``noise``'s dtype.

    Latents that overflowed to NaN/inf are refused here with a one-line error naming the likely
    cause, so no caller decodes them into a black image.

    ``positive``/``negative`` are prompt embeddings ``(B or 1, L, D)``; ``negative`` is unused
    when ``cfg == 1``. With ``init_latents`` (img2img) sampling starts from those latents noised
    to the first sigma of a ``denoise``-shortened schedule.
    """
    batch, _, height, width = noise.shape
    if init_latents is None and denoise < 1.0:
        raise InputError("denoise below 1.0 needs an input image (init latents) to start from")
    sigmas = flux2_sigmas(steps, denoise, image_seq_len=height * width)
    timesteps = sigmas_to_timesteps(sigmas)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # the last step lands on sigma 0

    latents = noise if init_latents is None else noise_latents(init_latents.to(noise), noise, sigmas[0])
    guided = cfg != 1.0
    if guided and negative is None:
        raise InputError("cfg is not 1.0, so a negative prompt embedding is needed")
    context = _batch_prompts(positive, negative if guided else None, batch, noise)

    for i in range(steps):
        timestep = timesteps[i].reshape(1).to(device=noise.device, dtype=noise.dtype)
        if guided:
            cond, uncond = model(torch.cat([latents, latents]), context, timestep).chunk(2)
            velocity = uncond + cfg * (cond - uncond)
        else:
            velocity = model(latents, context, timestep)
        step_size = sigmas[i + 1] - sigmas[i]
        if callback is not None:
            callback(i + 1, steps, latents - sigmas[i] * velocity)
        latents = latents + velocity * step_size
    return require_finite(latents, "sampled latents", noise.dtype, cfg, inputs=init_latents)


def _batch_prompts(positive: torch.Tensor, negative: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Expands prompt embeddings to the batch and stacks ``[positive; negative]`` for one forward."""
    parts = [positive] if negative is None else [positive, negative]
    expanded = []
    for part in parts:
        if part.shape[0] not in (1, batch):
            raise InputError(f"prompt batch {part.shape[0]} does not match latent batch {batch}")
        expanded.append(part.to(device=like.device, dtype=like.dtype).expand(batch, -1, -1))
    return torch.cat(expanded)
