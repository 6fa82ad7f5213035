"""Image conversions between PIL, the VAE's [-1, 1] tensors and ComfyUI's IMAGE tensors.

The PIL <-> tensor rules follow the reference pipeline (section 8 of
``docs/diffsynth-aaa.md``): cast to the compute dtype before scaling, and
truncate (not round) to uint8 on the way out, so our images match its pixels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .input_files import not_a_file_message, special_file_kind

log = logging.getLogger(__name__)


def open_rgb(path: "str | os.PathLike[str]") -> Image.Image:
    """Reads an image file as 8-bit RGB: the one way the CLI (``--image``) and the trainer read pictures.

    It gives the pixels ComfyUI's Load Image gives, so a picture encodes the same in a workflow,
    on the command line and in training: EXIF orientation applied, the first frame (Load Image
    would batch all frames of an animation), alpha dropped (Load Image returns it as a separate
    mask and keeps the colours under transparent pixels; the reference trainer's
    ``convert("RGB")`` does the same). Where Load Image clips instead of scaling (16-bit, 32-bit
    and float grayscale), the values are scaled to 8 bits.

    Raises ``InputError`` naming the file when it is missing, unreadable, not a regular file, too
    large to open safely (PIL's decompression-bomb guard) or holds non-finite values.
    """
    with image_file_errors(path), Image.open(path) as source:
        source.load()
        _log_if_large(path, source)
        top = _nominal_max(source)  # before the transpose, which drops the TIFF tags
        image = ImageOps.exif_transpose(source)
    if top is not None:
        image = _scale_to_8_bits(image, top, path)
    try:
        return image.convert("RGB")
    except ValueError as err:  # a mode PIL cannot convert, e.g. "La"
        raise InputError(f"{path}: image mode {image.mode} cannot be converted to RGB ({err})") from None


@contextlib.contextmanager
def image_file_errors(path: "str | os.PathLike[str]") -> Iterator[None]:
    """Turns what opening and decoding ``path`` with PIL can raise into one-line ``InputError`` naming the file.

    Refuses special files (FIFOs, devices) before PIL blocks on them, and silences PIL's
    DecompressionBombWarning (``open_rgb`` logs large images as one line instead).
    """
    kind = special_file_kind(path)
    if kind is not None:
        raise InputError(not_a_file_message(path, kind, "an image file"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (PermissionError, IsADirectoryError) as err:
        raise InputError(f"{path}: image cannot be read ({err.strerror})") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{path}: too large to open safely ({str(err).rstrip('.')}); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:  # PIL raises all of these for bad files
        raise InputError(f"{path}: not a readable image ({err})") from None


# Modes holding more than 8 bits per value. PIL's convert("RGB") clips them to 255 instead of
# scaling (a 16-bit grayscale picture turns almost all white), so they are scaled here first.
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _nominal_max(image: Image.Image) -> float | None:
    """The value that means white in a high-bit-depth image; ``None`` for 8-bit modes.

    Mode "I" (32-bit integers) comes from 16-bit PPM/PGM files (scaled by PIL to 0..65535) and
    from 32-bit TIFFs; only a TIFF's BitsPerSample tag says it uses the full signed 32-bit range.
    Float images are taken to hold 0..1.
    """
    if image.mode in _16_BIT_MODES:
        return 65535.0
    if image.mode == "I":
        bits = getattr(image, "tag_v2", {}).get(258, (16,))  # TIFF BitsPerSample
        return 2.0**31 - 1 if tuple(bits)[:1] == (32,) else 65535.0
    if image.mode == "F":
        return 1.0
    return None


def _scale_to_8_bits(image: Image.Image, top: float, path: "str | os.PathLike[str]") -> Image.Image:
    """Maps ``0..top`` to ``0..255`` (rounded, values outside clipped) as an 8-bit grayscale image."""
    pixels = np.asarray(image, dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise InputError(f"{path}: image holds NaN or infinite values ({image.mode} mode)")
    scaled = np.rint(np.clip(pixels * np.float32(255.0 / top), 0, 255))
    return Image.fromarray(scaled.astype(np.uint8), "L")


def _log_if_large(path: "str | os.PathLike[str]", image: Image.Image) -> None:
    """One log line instead of PIL's DecompressionBombWarning for images it still opens."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        log.warning(
            "%s: %dx%d is a very large image (%.0f megapixels, above PIL's warning limit of %.0f); loading it anyway",
            path, image.width, image.height, image.width * image.height / 1e6, limit / 1e6,
        )


# Above this many times the output's pixels, the scaled whole image is never made: a 340-byte
# 1x65535 PNG covering 256x256 would need a 256x16,776,960 one (12 GB). Only the part that
# survives the crop is resized then (PIL's ``box``), which takes memory for the output alone but
# may round some pixels one level apart, so images up to this shape mismatch keep the reference's
# resize-then-crop pixels exactly (and their cached latents stay valid).
MAX_SCALED_AREA = 16


def resize_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scales to cover ``width x height`` keeping the aspect ratio, then centre-crops (section 9)."""
    scale = max(width / image.width, height / image.height)
    scaled = (round(image.width * scale), round(image.height * scale))
    left = int(round((scaled[0] - width) / 2.0))
    top = int(round((scaled[1] - height) / 2.0))
    if scaled[0] * scaled[1] > MAX_SCALED_AREA * width * height:
        step_x, step_y = image.width / scaled[0], image.height / scaled[1]  # source pixels per scaled pixel
        box = (left * step_x, top * step_y, (left + width) * step_x, (top + height) * step_y)
        return image.resize((width, height), Image.BILINEAR, box=box)
    return image.resize(scaled, Image.BILINEAR).crop((left, top, left + width, top + height))


def pil_to_tensor(image: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RGB PIL image -> ``(1,3,H,W)`` in [-1, 1], cast to ``dtype`` before scaling as the reference does."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32)).to(dtype)
    return (pixels * (2 / 255) - 1).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """VAE output ``(B,3,H,W)`` in about [-1, 1] -> PIL images (clipped, truncated to uint8)."""
    pixels = ((images.float() + 1) * 127.5).clip(0, 255).to(device="cpu", dtype=torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


# How far a float IMAGE may stray outside 0..1 and still be taken as rounding noise (half an 8-bit step).
_RANGE_TOLERANCE = 0.5 / 255


def checked_comfy_image(images: torch.Tensor, name: str) -> torch.Tensor:
    """A ComfyUI IMAGE ``(B,H,W,3 or 4)`` as float in [0, 1], or a one-line error naming input ``name``.

    A uint8 IMAGE (0..255, from some custom nodes) is divided by 255: its meaning is
    unambiguous, whereas encoding it as is would wrap around silently. Other integer types,
    NaN/inf, values outside 0..1 and channel counts other than 3 (RGB) or 4 (alpha, dropped
    later as native VAE Encode does) are refused.
    """
    if not torch.is_tensor(images) or images.ndim != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise InputError(f"{name} must be an IMAGE of shape (batch, height, width, channels), got {shape}")
    if images.shape[0] == 0:
        raise InputError(f"{name} is an empty batch (0 images)")
    if images.shape[-1] not in (3, 4):
        raise InputError(
            f"{name} has shape {tuple(images.shape)}; its last dimension (channels) must be 3 (RGB) or 4 (RGBA, alpha is dropped)"
        )
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise InputError(f"{name} has dtype {images.dtype}; an IMAGE holds floats in 0..1 (or uint8 in 0..255)")
    images = images.float()
    finite = torch.isfinite(images)
    if not finite.all():
        raise InputError(f"{name} holds {int((~finite).sum())} NaN or infinite values; check the node that made it")
    low, high = images.aminmax()
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise InputError(
            f"{name} holds values from {low.item():.4g} to {high.item():.4g}; an IMAGE holds 0..1 "
            "(0..255 pixels must be divided by 255, -1..1 pixels mapped with (x + 1) / 2)"
        )
    return images if low >= 0 and high <= 1 else images.clamp(0, 1)  # no copy of a clean batch


def comfy_to_vae(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``(B,H,W,C)`` in [0, 1] -> VAE input ``(B,3,H,W)`` in [-1, 1] (alpha dropped).

    Made to equal ``pil_to_tensor`` bit for bit on Load Image's pictures, so a ComfyUI graph gives
    the CLI's (and the reference's) pixels:
    - scaled as 0..255 pixels are, ``p * (2/255) - 1``: ``x * 2 - 1`` differs by one float32 ulp
      on 111 of the 256 levels, and Load Image's ``p / 255`` times 255 gives ``p`` back exactly;
    - contiguous: the channels-last view that ``movedim`` returns makes the VAE's convolutions
      take other CPU kernels, which differ by about 1e-5 in the latents.
    """
    return ((images[..., :3] * 255) * (2 / 255) - 1).movedim(-1, 1).contiguous()


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
