"""Image conversions between PIL, the VAE's [-1, 1] tensors and ComfyUI's IMAGE tensors.

The PIL <-> tensor rules follow the reference pipeline (section 8 of
``docs/diffsynth-aaa.md``): cast to the compute dtype before scaling, and
truncate (not round) to uint8 on the way out, so our images match its pixels.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError


def open_rgb(path: "str | os.PathLike[str]") -> Image.Image:
    """Opens an image as RGB, honouring EXIF rotation and compositing transparency on white.

    ``convert("RGB")`` alone would turn transparent pixels black (the reference's behaviour,
    which hurts transparent PNG artwork such as the Pokemon data set).
    """
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None
    image = ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scales to cover ``width x height`` keeping the aspect ratio, then centre-crops (section 9)."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left = int(round((resized.width - width) / 2.0))
    top = int(round((resized.height - height) / 2.0))
    return resized.crop((left, top, left + width, top + height))


def pil_to_tensor(image: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RGB PIL image -> ``(1,3,H,W)`` in [-1, 1], cast to ``dtype`` before scaling as the reference does."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32)).to(dtype)
    return (pixels * (2 / 255) - 1).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """VAE output ``(B,3,H,W)`` in about [-1, 1] -> PIL images (clipped, truncated to uint8)."""
    pixels = ((images.float() + 1) * 127.5).clip(0, 255).to(device="cpu", dtype=torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def comfy_to_vae(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``(B,H,W,C)`` in [0, 1] -> VAE input ``(B,3,H,W)`` in [-1, 1] (alpha dropped)."""
    return images[..., :3].movedim(-1, 1) * 2 - 1


def vae_to_comfy(images: torch.Tensor) -> torch.Tensor:
    """VAE output ``(B,3,H,W)`` -> ComfyUI IMAGE ``(B,H,W,3)`` float32 in [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1)


def center_crop_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crops ComfyUI IMAGE ``(B,H,W,C)`` so both sides are multiples of ``multiple`` (a view, no copy).

    The same rule as ComfyUI's VAEEncode (``vae_encode_crop_pixels``): keep ``side // multiple``
    cells and drop the remainder evenly from both edges, the odd pixel from the far edge.
    """
    if images.ndim != 4:
        raise InputError(f"expected an IMAGE of shape (batch, height, width, channels), got {tuple(images.shape)}")
    for dim, name in ((1, "height"), (2, "width")):
        size = images.shape[dim]
        if size < multiple:
            raise InputError(f"image {name} {size} is smaller than {multiple} pixels; the VAE needs at least {multiple}")
        keep = size // multiple * multiple
        images = images.narrow(dim, (size - keep) // 2, keep)
    return images
