"""The AAADiT sampler node: Euler flow-matching with classifier-free guidance, text-to-image or image-to-image.

A self-contained sampler (``docs/comfyui.md`` section 5): it takes the AAADiT's native MODEL,
loads it with its patches (LoRA, merges) through ComfyUI's memory manager, and runs
``aaa_core.sampling.sample`` with seeded noise from ``aaa_core.sampling.make_noise``, so for the
same seed it gives exactly what the CLI gives.
"""

from __future__ import annotations

import logging

import torch

from ..aaa_core import defaults
from ..aaa_core.errors import InputError
from ..aaa_core.limits import MAX_STEPS, SEED_MAX, check_finite, check_int_range
from ..aaa_core.preflight import check_models_fit
from ..aaa_core.sampling import batch_seed, make_noise, sample
from . import comfy_bridge as bridge
from .conditioning import conditioning_embeds
from .latent import batch_indices, latent_samples
from .native_dit import forward_memory
from .native_model import aaadit_of, compute_dtype, load_patched

log = logging.getLogger(__name__)


class AAASampler:
    CATEGORY = "AAADiT/sampling"
    DESCRIPTION = (
        "Generates FLUX.2 latents with AAADiT. denoise 1.0: text-to-image at the latent's size. denoise below 1.0: "
        "image-to-image starting from the latent's content (e.g. AAA VAE Encode)."
    )
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The generated latents; decode them with AAA VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The AAADiT model from AAA DiT Loader (LoRA and weight patches apply)."}),
                "positive": ("CONDITIONING", {"tooltip": "What to draw: AAA Text Encode output."}),
                "negative": ("CONDITIONING", {"tooltip": "What to steer away from (the reference uses a single space); unused at cfg 1.0."}),
                "latent_image": ("LATENT", {"tooltip": "Sets size and batch (text-to-image), or the image to start from (denoise below 1.0)."}),
                "seed": ("INT", {"default": defaults.SEED, "min": 0, "max": SEED_MAX, "tooltip": "Noise seed; image i of a batch uses seed + i, as the CLI does."}),
                "steps": ("INT", {"default": defaults.STEPS, "min": 1, "max": MAX_STEPS, "tooltip": "Euler steps actually run (also with denoise below 1.0)."}),
                "cfg": ("FLOAT", {"default": defaults.CFG, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "Classifier-free guidance scale; 10 is the reference, 1.0 skips the negative pass."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "1.0 draws from pure noise; lower keeps more of the input latent (image-to-image strength)."}),
            }
        }

    def sample(self, model, positive, negative, latent_image, seed: int, steps: int, cfg: float, denoise: float):
        config = aaadit_of(model).config
        samples = latent_samples(latent_image, "latent_image")
        width = config.text_dim
        positive = conditioning_embeds(positive, "positive", width)
        negative = conditioning_embeds(negative, "negative", width)
        check_models_fit(config, positive.shape[-1], samples.shape[1], "model", "the positive conditioning", "latent_image")
        if positive.shape[1] != negative.shape[1]:
            raise InputError(f"positive has {positive.shape[1]} tokens but negative {negative.shape[1]}; encode both with AAA Text Encode")
        # ComfyUI's min/max widget checks let NaN through (every comparison with it is false).
        check_int_range("steps", steps, 1, MAX_STEPS)
        check_finite("cfg", cfg)
        check_finite("denoise", denoise)
        if not 0.0 <= denoise <= 1.0:
            raise InputError(f"denoise must be between 0 and 1, got {denoise}")
        result = dict(latent_image)  # a new dict: keeps the other keys, never changes the input
        if denoise == 0.0:  # nothing to do, as in ComfyUI's KSampler
            result["samples"] = samples.clone()
            return (result,)

        batch, _, height, width = samples.shape
        rows = batch * (2 if cfg != 1.0 else 1)  # CFG runs both prompts as one batch
        device, dtype = model.load_device, compute_dtype(model)
        dit = load_patched(model, forward_memory(config, rows, height, width, positive.shape[1], dtype))
        if "noise_mask" in latent_image:
            log.warning("AAA Sampler: the latent's noise_mask is ignored (no inpainting); the whole image is sampled")
        noise = reference_noise(seed, latent_image, dtype, device)
        latents = sample(
            dit.velocity, noise, positive.to(device), negative.to(device) if cfg != 1.0 else None, steps, cfg,
            denoise=denoise,
            init_latents=samples.to(device) if denoise < 1.0 else None,
            callback=_step_callback(steps, device),
        )
        result["samples"] = latents.to(device=bridge.intermediate_device(), dtype=torch.float32)
        return (result,)


def reference_noise(seed: int, latent_image: dict, dtype: torch.dtype = torch.float32, device: "str | torch.device" = "cpu") -> torch.Tensor:
    """The reference's noise for a LATENT: image i uses seed + i (``batch_seed``, as the CLI), drawn in ``dtype``.

    After Latent From Batch, ComfyUI's ``batch_index`` keeps each image's own seed.
    """
    batch, _, height, width = latent_image["samples"].shape
    offsets = batch_indices(latent_image, "latent_image")
    if not offsets or len(offsets) != batch:
        offsets = range(batch)
    return torch.cat([make_noise(batch_seed(seed, k), 1, height, width, dtype, device) for k in offsets])


def _step_callback(steps: int, device: torch.device):
    """Per step: stop if Cancel was pressed, tick the progress bar, send a latent preview if ComfyUI makes them."""
    bar = bridge.progress_bar(steps, "AAA Sampler", "step")
    previewer = bridge.latent_previewer(device)

    def on_step(done: int, total: int, x0: torch.Tensor) -> None:
        bridge.throw_if_interrupted()
        bar.update_absolute(done, total, previewer(x0) if previewer is not None else None)

    return on_step

