"""Text-to-image and image-to-image generation with the three models, in plain PyTorch.

This is what the CLI and the benchmarks run; the ComfyUI nodes call the same pieces
(``sampling.sample``, ``encode_images``, ``decode_latents``) one node at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Mapping

import torch
from PIL import Image

from . import defaults, downloads
from .devices import resolve_device, resolve_dtype
from .dit import AAADiT, load_dit
from .errors import InputError
from .geometry import latent_size
from .guards import require_finite
from .images import pil_to_tensor, resize_cover, tensor_to_pil
from .limits import MAX_BATCH_SIZE, MAX_STEPS, SEED_MAX, check_finite, check_int_range, check_text
from .preflight import check_model_files, check_models_fit
from .sampling import StepCallback, make_noise, sample
from .text_encoder import Qwen3TextEncoder, load_text_encoder
from .vae import Flux2VAE, load_vae

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the output image, validated before any model is loaded."""

    prompt: str
    negative_prompt: str = defaults.NEGATIVE_PROMPT
    steps: int = defaults.STEPS
    cfg: float = defaults.CFG
    seed: int = defaults.SEED
    width: int = defaults.SIZE
    height: int = defaults.SIZE
    batch_size: int = 1
    denoise: float = 1.0
    # What errors call each field (the CLI passes its flags); not stored.
    names: dataclasses.InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, names: Mapping[str, str] | None) -> None:
        name = {field.name: field.name for field in dataclasses.fields(self)} | dict(names or {})
        check_text(name["prompt"], self.prompt)
        check_text(name["negative_prompt"], self.negative_prompt)
        check_int_range(name["steps"], self.steps, 1, MAX_STEPS)
        check_finite(name["cfg"], self.cfg)
        check_int_range(name["seed"], self.seed, 0, SEED_MAX)
        latent_size(self.width, self.height, (name["width"], name["height"]))
        check_int_range(name["batch_size"], self.batch_size, 1, MAX_BATCH_SIZE)
        check_finite(name["denoise"], self.denoise)
        if not 0.0 < self.denoise <= 1.0:
            raise InputError(f"{name['denoise']} {self.denoise}: must be in (0, 1]")

    def check_image(self, has_image: bool) -> None:
        """img2img strength needs an image to start from."""
        if self.denoise < 1.0 and not has_image:
            raise InputError(f"denoise {self.denoise} needs an input image; without one use denoise 1.0")

    def as_text(self) -> str:
        """A one-line summary stored in the PNG, so an image says how it was made."""
        return ", ".join(f"{k}: {v!r}" for k, v in dataclasses.asdict(self).items())


ProgressCallback = Callable[[int, int], None]  # (done, total); may raise to stop


def _one_at_a_time(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, vae: Flux2VAE,
                   callback: ProgressCallback | None) -> torch.Tensor:
    """Applies a VAE method per sample: memory stays that of one image, and each one reports progress."""
    outputs = []
    for i, sample_ in enumerate(batch.split(1)):
        outputs.append(fn(sample_.to(device=vae.device, dtype=vae.dtype)))
        if callback is not None:
            callback(i + 1, len(batch))
    return torch.cat(outputs)


def decode_latents(vae: Flux2VAE, latents: torch.Tensor, callback: ProgressCallback | None = None) -> torch.Tensor:
    """Latents ``(B,128,h,w)`` -> images ``(B,3,16h,16w)`` in about [-1, 1], one sample at a time.

    Images with NaN/inf pixels are refused (they would be saved as black)."""
    return require_finite(_one_at_a_time(vae.decode, latents, vae, callback), "decoded images", vae.dtype, inputs=latents)


def encode_images(vae: Flux2VAE, images: torch.Tensor, callback: ProgressCallback | None = None) -> torch.Tensor:
    """Images ``(B,3,H,W)`` in [-1, 1] -> latents ``(B,128,H/16,W/16)``, one sample at a time."""
    return _one_at_a_time(vae.encode, images, vae, callback)


class AAAPipeline:
    """The text encoder, DiT and VAE on one device in one compute dtype."""

    def __init__(self, text_encoder: Qwen3TextEncoder, dit: AAADiT, vae: Flux2VAE):
        check_models_fit(dit.config, text_encoder.model.config.hidden_size, vae.latent_channels)
        self.text_encoder = text_encoder
        self.dit = dit
        self.vae = vae

    @property
    def device(self) -> torch.device:
        return self.dit.proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    @classmethod
    def from_files(
        cls,
        dit: "str | os.PathLike[str] | None" = None,
        vae: "str | os.PathLike[str] | None" = None,
        text_encoder: "str | os.PathLike[str] | None" = None,
        device: str = "auto",
        dtype: str = "auto",
        model_dir: "str | os.PathLike[str] | None" = None,
    ) -> "AAAPipeline":
        """Loads the three models; any path left out is downloaded once into ``model_dir``.

        All missing files are reported in one error, and all three files are checked against
        each other from their headers before the first one is loaded.
        """
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        paths = downloads.resolve_model_files({"text_encoder": text_encoder, "dit": dit, "vae": vae}, model_dir)
        check_model_files(paths["dit"], paths["text_encoder"], paths["vae"])
        log.info("loading models on %s in %s", torch_device, torch_dtype)
        return cls(
            text_encoder=load_text_encoder(paths["text_encoder"], dtype=torch_dtype, device=torch_device),
            dit=load_dit(paths["dit"], dtype=torch_dtype, device=torch_device),
            vae=load_vae(paths["vae"], dtype=torch_dtype, device=torch_device),
        )

    @torch.inference_mode()
    def generate(
        self,
        settings: GenerationSettings,
        image: Image.Image | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Runs one generation; ``image`` (img2img) is resized to cover the output size."""
        settings.check_image(image is not None)
        device, dtype = self.device, self.dtype
        guided = settings.cfg != 1.0
        prompts = [settings.prompt] + ([settings.negative_prompt] if guided else [])
        embeds = self.text_encoder.encode(prompts).to(device=device, dtype=dtype)
        positive, negative = embeds[:1], (embeds[1:] if guided else None)

        latent_h, latent_w = latent_size(settings.width, settings.height)
        noise = make_noise(settings.seed, settings.batch_size, latent_h, latent_w, dtype, device)
        init_latents = None
        if image is not None:
            pixels = pil_to_tensor(resize_cover(image, settings.width, settings.height), dtype).to(device)
            init_latents = self.vae.encode(pixels).expand(settings.batch_size, -1, -1, -1)
        latents = sample(
            self.dit, noise, positive, negative, settings.steps, settings.cfg,
            denoise=settings.denoise,
            init_latents=init_latents, callback=callback,
        )
        return tensor_to_pil(decode_latents(self.vae, latents))
