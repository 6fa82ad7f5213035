"""Nodes that make native custom sampling reproduce the reference: its noise and its FLUX.2 sigmas.

With SamplerCustomAdvanced + CFGGuider + KSamplerSelect(euler), AAA Reference Noise and AAA
FLUX.2 Sigmas give AAA Sampler's latents. The sigmas node also serves trees without ComfyUI's
own ``Flux2Scheduler`` (the 2024 tree), e.g. with SamplerCustom.
"""

from __future__ import annotations

import torch

from ..aaa_core.limits import MAX_RESOLUTION, MAX_STEPS, SEED_MAX
from ..aaa_core import defaults
from ..aaa_core.geometry import DOWNSCALE, latent_size
from ..aaa_core.scheduler import flux2_sigmas
from .latent import latent_samples
from .sampling import reference_noise


class ReferenceNoise:
    """The ``NOISE`` interface (``seed``, ``generate_noise``) drawing the reference's noise: image i uses seed + i."""

    def __init__(self, seed: int):
        self.seed = seed

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        """Float32 CPU noise shaped like the latent (ComfyUI's samplers keep latents in float32)."""
        latent_samples(input_latent, "latent_image")
        return reference_noise(self.seed, input_latent)


class AAAReferenceNoise:
    CATEGORY = "AAADiT/sampling"
    DESCRIPTION = (
        "Noise for SamplerCustomAdvanced drawn exactly as AAA Sampler and the reference draw it (image i of a batch "
        "uses seed + i), so native custom sampling can reproduce AAA Sampler's image."
    )
    RETURN_TYPES = ("NOISE",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's noise input.",)
    FUNCTION = "get_noise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "noise_seed": ("INT", {"default": defaults.SEED, "min": 0, "max": SEED_MAX, "tooltip": "The seed AAA Sampler would use."}),
            }
        }

    def get_noise(self, noise_seed: int):
        return (ReferenceNoise(noise_seed),)


class AAAFlux2Sigmas:
    CATEGORY = "AAADiT/sampling"
    DESCRIPTION = (
        "The FLUX.2 flow-matching sigmas AAA Sampler uses for this size and step count (the same curve as ComfyUI's "
        "Flux2Scheduler), ending at 0. denoise below 1.0 starts lower on the curve, for image-to-image."
    )
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's or SamplerCustom's sigmas input.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("INT", {"default": defaults.STEPS, "min": 1, "max": MAX_STEPS, "tooltip": "Sampling steps."}),
                "width": ("INT", {"default": defaults.SIZE, "min": DOWNSCALE, "max": MAX_RESOLUTION, "step": DOWNSCALE, "tooltip": f"Image width in pixels (a multiple of {DOWNSCALE})."}),
                "height": ("INT", {"default": defaults.SIZE, "min": DOWNSCALE, "max": MAX_RESOLUTION, "step": DOWNSCALE, "tooltip": f"Image height in pixels (a multiple of {DOWNSCALE})."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "1.0 starts from pure noise."}),
            }
        }

    def get_sigmas(self, steps: int, width: int, height: int, denoise: float):
        rows, cols = latent_size(width, height)
        sigmas = flux2_sigmas(steps, denoise, image_seq_len=rows * cols)
        return (torch.cat([sigmas, sigmas.new_zeros(1)]),)
