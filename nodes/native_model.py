"""AAADiT as a native ComfyUI ``MODEL``: a ``BaseModel`` subclass inside a ``ModelPatcher``.

That is what KSampler, SamplerCustomAdvanced, the guiders, LoRA loaders, model-patch nodes and
AAA Sampler take. The network is ``native_dit.ComfyAAADiT`` (velocity prediction, fed
``1000 * sigma``), the model sampling is rectified flow on the FLUX.2 curve, and the latent format
is FLUX.2's. Features that only newer ComfyUI trees have (``ModelType.FLOW``,
``latent_formats.Flux2``) are used when present; otherwise the pack's own equivalents stand in, so
the 2024 tree works too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import torch

from ..aaa_core.dit import AAADiT
from ..aaa_core.errors import InputError
from ..aaa_core.geometry import LATENT_CHANNELS, TEXT_TOKENS
from ..aaa_core.guards import require_finite
from ..aaa_core.lora import NATIVE_PREFIX, Update, comfy_tensors
from . import comfy_bridge as bridge
from .conditioning import check_prompt_embedding
from .native_dit import FlowMatchingSampling, flux2_shift, forward_memory

log = logging.getLogger(__name__)

# The 2024 tree has no rectified-flow model type: build as EPS, then swap the sampling.
_FLOW = getattr(comfy.model_base.ModelType, "FLOW", None)


class FLUX2LatentFormat(comfy.latent_formats.LatentFormat):
    """FLUX.2 latents for trees that lack ComfyUI's own (no preview colours there)."""

    latent_channels = LATENT_CHANNELS


class AAADiTModelConfig(comfy.supported_models_base.BASE):
    """What ComfyUI reads about the model family: sampling settings, latent format, dtypes."""

    unet_config = {"disable_unet_model_creation": True}  # the network is loaded by the pack
    unet_extra_config = {}
    latent_format = getattr(comfy.latent_formats, "Flux2", FLUX2LatentFormat)  # ComfyUI's gives previews
    sampling_settings = {"shift": flux2_shift(), "multiplier": 1000.0}
    supported_inference_dtypes = bridge.DIT_SUPPORTED_DTYPES

    def __init__(self, dtype: torch.dtype, compute_dtype: torch.dtype):
        super().__init__(dict(self.unet_config))
        self.set_inference_dtype(dtype, compute_dtype if compute_dtype != dtype else None)


class AAADiTModel(comfy.model_base.BaseModel):
    """The native model around a loaded ``ComfyAAADiT``."""

    def __init__(self, dit: AAADiT, model_config: AAADiTModelConfig, device: torch.device | None = None):
        model_type = _FLOW if _FLOW is not None else comfy.model_base.ModelType.EPS
        super().__init__(model_config, model_type, device=device)
        self.diffusion_model = dit
        if _FLOW is None:
            self.model_sampling = FlowMatchingSampling(model_config)

    def extra_conds(self, **kwargs) -> dict:
        """ComfyUI's conds, after checking the prompt is AAA Text Encode's for this DiT (else a one-line error).

        Every native sampler (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced)
        calls this once per conditioning entry before the first step; ``kwargs`` holds the entry's
        options and ``cross_attn``, its embedding.
        """
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            name = kwargs.get("prompt_type") or "the"
            check_prompt_embedding(cross_attn, kwargs, name, self.diffusion_model.config.text_dim)
        return super().extra_conds(**kwargs)

    def process_latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        """Every native sampler's result passes here: NaN/inf is a one-line error, as in AAA Sampler."""
        return super().process_latent_out(require_finite(latent, "sampled latents", self.manual_cast_dtype or self.get_dtype()))

    def memory_required(self, input_shape, cond_shapes=None) -> float:
        """Bytes one forward over a batch of ``input_shape`` (B, C, H, W) needs besides the weights."""
        text_len = TEXT_TOKENS
        cross_attn = (cond_shapes or {}).get("c_crossattn")
        if cross_attn:
            text_len = max(shape[1] for shape in cross_attn)
        batch, _, height, width = input_shape[:4]
        dtype = self.manual_cast_dtype or self.get_dtype()
        return forward_memory(self.diffusion_model.config, batch, height, width, text_len, dtype)


def native_model(dit: AAADiT, weight_dtype: torch.dtype, compute_dtype: torch.dtype, path: "str | os.PathLike[str]") -> Any:
    """The loaded DiT as a ``MODEL``: a ModelPatcher around an ``AAADiTModel``."""
    load_device, offload_device = bridge.model_devices(bridge.DIT)
    model = AAADiTModel(dit, AAADiTModelConfig(weight_dtype, compute_dtype), device=offload_device)
    log.info("AAADiT %s: native MODEL, %s weights computing in %s", Path(path).name, weight_dtype, compute_dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def aaadit_of(model: Any) -> AAADiT:
    """The AAADiT inside a native MODEL, else a one-line error naming what the MODEL holds."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, AAADiT):
        name = type(diffusion_model if diffusion_model is not None else model).__name__
        raise InputError(f"model holds a {name}, not an AAADiT; load it with AAA DiT Loader")
    return diffusion_model


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype a native MODEL computes in: its manual-cast dtype where the weights are stored in another."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


def load_patched(model: Any, memory_required: int = 0) -> AAADiT:
    """Has ComfyUI's memory manager load the MODEL with its patches (LoRA, merges) applied; returns its AAADiT."""
    mm.load_models_gpu([model], memory_required=int(memory_required))
    return aaadit_of(model)


def with_lora(model: Any, updates: dict[str, Update], strength: float, source: str) -> Any:
    """A new MODEL with the LoRA applied; ``model`` itself is left unchanged.

    The LoRA becomes weight patches through ComfyUI's own LoRA loading (under the keys every
    release maps for this model, ``aaa_core.lora.comfy_tensors``), so it stacks with other patches
    and unloads cleanly; a parameter this ComfyUI cannot patch is a one-line error.
    """
    patched, _ = comfy.sd.load_lora_for_models(model, None, comfy_tensors(updates), strength, 0)
    unpatched = sorted(name for name in updates if NATIVE_PREFIX + name not in patched.patches)
    if unpatched:
        raise InputError(f"{source}: this ComfyUI cannot patch {unpatched[0]} of AAADiT; update ComfyUI to apply this LoRA")
    return patched
