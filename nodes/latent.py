"""Latent nodes: an empty FLUX.2 latent, and VAE decode/encode between IMAGE and LATENT.

Our LATENT is exactly ComfyUI's native FLUX.2 latent space ({"samples": (B, 128, H/16, W/16)},
BatchNorm-normalised, float32, on the intermediate device), so native latent nodes and, in
current ComfyUI, the native FLUX.2 VAE Decode/Encode work on it too.
"""

from __future__ import annotations

import logging
import numbers
import reprlib

import torch

from ..aaa_core import images
from ..aaa_core.errors import InputError
from ..aaa_core.limits import MAX_BATCH_SIZE, MAX_RESOLUTION, check_int_range
from ..aaa_core.defaults import SIZE
from ..aaa_core.geometry import DOWNSCALE, LATENT_CHANNELS, latent_size
from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

# VAE working memory per image pixel and byte of dtype: ComfyUI's own estimate for the FLUX.2 VAE
# (comfy/sd.py, VAE.memory_used_decode/encode, AutoencoderKL with batch_norm_latent).
DECODE_BYTES_PER_PIXEL = 2178
ENCODE_BYTES_PER_PIXEL = 1767
_OTHER_LATENTS = {4: "Stable Diffusion 1.x/SDXL", 16: "FLUX.1/SD3", 32: "unpatchified FLUX.2"}


def latent_samples(latent, name: str) -> torch.Tensor:
    """The ``samples`` of a LATENT if it is in AAADiT's space, else a one-line error saying what it is."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples):
        raise InputError(f"{name} is not a LATENT (a dict with 'samples')")
    if samples.ndim != 4:
        raise InputError(
            f"{name} has shape {tuple(samples.shape)} (a video or audio latent?); AAADiT takes image "
            f"latents of shape (batch, {LATENT_CHANNELS}, height/{DOWNSCALE}, width/{DOWNSCALE})"
        )
    if samples.numel() == 0:  # else torch.cat or a convolution fails deep inside sampling or decoding
        raise InputError(
            f"{name} has shape {tuple(samples.shape)}: no images or no pixels; AAADiT takes at least one latent "
            f"of at least 1x1 (16x16 pixels)"
        )
    channels = samples.shape[1]
    if channels != LATENT_CHANNELS:
        guess = f" (a {_OTHER_LATENTS[channels]} latent?)" if channels in _OTHER_LATENTS else ""
        raise InputError(
            f"{name} has {channels} channels{guess}; AAADiT works on {LATENT_CHANNELS}-channel FLUX.2 latents "
            "at 1/16 size: use AAA Empty Latent Image or AAA VAE Encode"
        )
    return samples


def batch_indices(latent: dict, name: str) -> list[int] | None:
    """A LATENT's ``batch_index`` (each image's index in the batch it came from, set by Latent From
    Batch), None when it has none, else a one-line error: it picks each image's noise seed."""
    indices = latent.get("batch_index")
    if indices is None:
        return None
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(index, numbers.Integral) and not isinstance(index, bool) and index >= 0 for index in indices
    ):
        raise InputError(
            f"{name} has batch_index {reprlib.repr(indices)}; it must list whole numbers >= 0, each image's index "
            "in its batch, as Latent From Batch sets it"
        )
    return [int(index) for index in indices]


class AAAEmptyLatentImage:
    CATEGORY = "AAADiT/latent"
    DESCRIPTION = "An all-zero FLUX.2 latent batch (128 channels at 1/16 size) that sets the image size for text-to-image."
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Empty latents for AAA Sampler (denoise 1.0).",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": SIZE, "min": DOWNSCALE, "max": MAX_RESOLUTION, "step": DOWNSCALE}
        return {
            "required": {
                "width": ("INT", {**size, "tooltip": "Image width in pixels, a multiple of 16; the model was trained at 256."}),
                "height": ("INT", {**size, "tooltip": "Image height in pixels, a multiple of 16; the model was trained at 256."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH_SIZE, "tooltip": "Images per run; image i uses seed + i."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        # Taking width/height here makes ComfyUI skip its own min/max checks for them, so all
        # checks happen here; API prompts can send sizes the widget's step would not allow.
        try:
            latent_size(width, height)
        except InputError as err:
            return str(err)
        return True

    def generate(self, width: int, height: int, batch_size: int):
        latent_h, latent_w = latent_size(width, height)
        check_int_range("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        samples = torch.zeros(batch_size, LATENT_CHANNELS, latent_h, latent_w, device=bridge.intermediate_device())
        return ({"samples": samples},)


class AAAVAEDecode:
    CATEGORY = "AAADiT/latent"
    DESCRIPTION = "Decodes FLUX.2 latents to images with the FLUX.2 VAE, one image at a time (progress and Cancel per image)."
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images (batch, height, width, 3) in 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "FLUX.2 latents, e.g. from AAA Sampler."}),
                "vae": ("AAA_VAE", {"tooltip": "The FLUX.2 VAE from AAA VAE Loader."}),
            }
        }

    def decode(self, samples, vae: bridge.ManagedModel):
        from ..aaa_core.pipeline import decode_latents

        latents = latent_samples(samples, "samples")
        height, width = latents.shape[-2] * DOWNSCALE, latents.shape[-1] * DOWNSCALE
        model = vae.load(DECODE_BYTES_PER_PIXEL * height * width * vae.weight_dtype.itemsize)
        decoded = decode_latents(model, latents, _progress(len(latents), "AAA VAE Decode"))
        pixels = images.vae_to_comfy(decoded).to(bridge.intermediate_device()).contiguous()
        return (pixels,)


class AAAVAEEncode:
    CATEGORY = "AAADiT/latent"
    DESCRIPTION = (
        "Encodes images to FLUX.2 latents with the FLUX.2 VAE (for image-to-image), one image at a time. "
        "Sides that are not multiples of 16 are centre-cropped, as ComfyUI's VAE Encode does."
    )
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("FLUX.2 latents of the images; use with AAA Sampler at denoise below 1.0.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The images to encode, e.g. from Load Image."}),
                "vae": ("AAA_VAE", {"tooltip": "The FLUX.2 VAE from AAA VAE Loader."}),
            }
        }

    def encode(self, pixels: torch.Tensor, vae: bridge.ManagedModel):
        from ..aaa_core.pipeline import encode_images

        factor = vae.model.downscale_factor
        pixels = images.checked_comfy_image(pixels, "pixels")
        cropped = images.center_crop_to_multiple(pixels, factor)
        if cropped.shape != pixels.shape:
            log.info(
                "AAA VAE Encode: centre-cropped %dx%d to %dx%d (a multiple of %d)",
                pixels.shape[2], pixels.shape[1], cropped.shape[2], cropped.shape[1], factor,
            )
        model = vae.load(ENCODE_BYTES_PER_PIXEL * cropped.shape[1] * cropped.shape[2] * vae.weight_dtype.itemsize)
        latents = encode_images(model, images.comfy_to_vae(cropped), _progress(len(cropped), "AAA VAE Encode"))
        return ({"samples": latents.to(device=bridge.intermediate_device(), dtype=torch.float32)},)


def _progress(total: int, label: str):
    """A per-image callback for the core's decode/encode loops: ticks the bar, stops on Cancel."""
    bar = bridge.progress_bar(total, label, "image")

    def on_image(done: int, total: int) -> None:
        bridge.throw_if_interrupted()
        bar.update_absolute(done, total)

    return on_image
