"""The latent geometry AAADiT works in: FLUX.2 latents and Qwen3 prompt states, defined once.

An image of ``W x H`` pixels becomes ``LATENT_CHANNELS`` channels at ``H/16 x W/16`` (the
FLUX.2 VAE downsamples by 8, then 2x2-patchifies 32 channels into 128; docs/diffsynth-aaa.md
section 6), one DiT token per latent cell; a prompt becomes ``TEXT_TOKENS`` states (section 7).
"""

from __future__ import annotations

from .errors import InputError
from .limits import MAX_RESOLUTION

LATENT_CHANNELS = 128
DOWNSCALE = 16  # pixels per latent cell: FLUX.2 VAE /8, then 2x2 patchify
TEXT_TOKENS = 128  # section 7: padding="max_length", truncation=True, max_length=128


def latent_size(width: int, height: int, names: tuple[str, str] = ("width", "height")) -> tuple[int, int]:
    """Latent (height, width) for an image size; both sides must be positive multiples of 16 up to
    ``MAX_RESOLUTION``. ``names`` are what errors call the two sides (e.g. CLI flags)."""
    for name, value in zip(names, (width, height)):
        if value > MAX_RESOLUTION:
            raise InputError(f"{name} {value} is above the maximum of {MAX_RESOLUTION}")
        if value < DOWNSCALE or value % DOWNSCALE:
            raise InputError(f"{name} {value} is not a positive multiple of {DOWNSCALE}; try {max(DOWNSCALE, round(value / DOWNSCALE) * DOWNSCALE)}")
    return height // DOWNSCALE, width // DOWNSCALE


def image_tokens(width: int, height: int) -> int:
    """DiT image tokens of a ``width x height`` picture: one per latent cell."""
    return (height // DOWNSCALE) * (width // DOWNSCALE)
