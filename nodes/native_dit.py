"""AAADiT and its flow-matching noise schedule behind ComfyUI's interfaces, in plain torch.

ComfyUI calls a native model's network as ``net(x, timesteps, context=..., **extra)`` and asks a
"model sampling" object for sigmas, timesteps and how to noise and denoise. Neither needs
ComfyUI itself, so both live here and the pack's own sampler uses the same network object.
"""

from __future__ import annotations

import math

import torch

from ..aaa_core.dit import AAADiT, AAADiTConfig
from ..aaa_core.errors import InputError
from ..aaa_core import defaults
from ..aaa_core.geometry import LATENT_CHANNELS, image_tokens
from ..aaa_core.scheduler import NUM_TRAIN_TIMESTEPS, empirical_mu

# The FLUX.2 curve sigma = e^mu / (e^mu + 1/t - 1) at the resolution the model was trained at
# (256x256: 16x16 latent tokens) and the reference's 30 steps. KSampler's schedulers read their
# sigmas from this curve; the AAA FLUX.2 Sigmas node gives the exact curve for any size and count.
DEFAULT_MU = empirical_mu(image_tokens(defaults.SIZE, defaults.SIZE), defaults.STEPS)


class ComfyAAADiT(AAADiT):
    """AAADiT called the way ComfyUI calls a diffusion model; the weights and keys are AAADiT's."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, **extra) -> torch.Tensor:
        """Velocity for latents ``x``; ``timesteps`` = 1000*sigma; ``context`` = the prompt embeddings.

        The timestep is rounded to the compute dtype first, as the reference feeds it. Extra
        inputs (``control``, ``transformer_options``) have no meaning for this model.
        """
        if context is None:
            raise InputError("AAADiT got no prompt embedding; connect AAA Text Encode conditioning")
        if x.ndim != 4 or x.shape[1] != self.config.latent_channels:
            # Any native sampler can hand us any LATENT: name the mismatch here, not as a shape error deep inside.
            raise InputError(
                f"latent_image holds {tuple(x.shape)}, but this AAADiT takes (batch, {self.config.latent_channels}, H/16, W/16) "
                "FLUX.2 latents; make them with AAA Empty Latent Image or AAA VAE Encode"
            )
        return super().forward(x, context, timesteps.to(x.dtype))

    def velocity(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """AAADiT's own argument order, for ``aaa_core.sampling.sample``."""
        return self(latents, timestep, context=prompt_embeds)


def flux2_shift(mu: float = DEFAULT_MU) -> float:
    """The FLUX.2 curve as a discrete-flow shift: e^mu*t / (1 + (e^mu - 1)*t) is the same function of t."""
    return math.exp(mu)


class FlowMatchingSampling(torch.nn.Module):
    """Rectified-flow model sampling for ComfyUI trees without one (the 2024 tree has no FLOW type).

    ``x_t = sigma*noise + (1 - sigma)*x0``, the network predicts ``v = noise - x0`` and sees
    ``multiplier * sigma``; sigmas follow ``shift*t / (1 + (shift - 1)*t)``. Same interface and
    numbers as ComfyUI's own discrete-flow sampling where that exists.
    """

    def __init__(self, model_config=None):
        super().__init__()
        settings = getattr(model_config, "sampling_settings", None) or {}
        self.set_parameters(shift=settings.get("shift", flux2_shift()), multiplier=settings.get("multiplier", NUM_TRAIN_TIMESTEPS))

    def set_parameters(self, shift: float = 1.0, timesteps: int = NUM_TRAIN_TIMESTEPS, multiplier: float = NUM_TRAIN_TIMESTEPS) -> None:
        self.shift, self.multiplier = shift, multiplier
        grid = torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps
        self.register_buffer("sigmas", self.sigma(grid * multiplier))  # ascending, the last is 1

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep / self.multiplier
        return self.shift * t / (1 + (self.shift - 1) * t)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        return self.shift * t / (1 + (self.shift - 1) * t)

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        return model_input - model_output * _per_sample(sigma, model_output)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False) -> torch.Tensor:
        sigma = _per_sample(sigma, noise)
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent / (1.0 - _per_sample(sigma, latent))


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample sigma shaped to broadcast over ``like`` (B, C, H, W)."""
    sigma = torch.as_tensor(sigma, device=like.device)
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1)) if sigma.ndim else sigma


def forward_memory(config: AAADiTConfig, batch: int, height: int, width: int, text_len: int, dtype: torch.dtype) -> int:
    """Bytes of activations one DiT forward over ``batch`` latents of ``height x width`` needs, for ComfyUI's memory manager.

    Inference frees each block's activations before the next, so the peak is one block's: per
    token the residual stream, q/k/v/out, the MLP hidden and the gates, about
    (8 + 2 * ff_mult) * dim values, plus the inputs, with headroom for the allocator.
    """
    tokens = height * width + text_len
    activations = batch * tokens * config.dim * (8 + 2 * config.ff_mult)
    inputs = batch * tokens * max(config.text_dim, LATENT_CHANNELS)
    return int((activations + inputs) * dtype.itemsize * 1.5)
