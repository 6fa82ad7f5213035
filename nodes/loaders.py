"""Loader nodes for the three model files: the AAADiT, the Qwen3-0.6B text encoder and the FLUX.2 VAE.

The DiT loader outputs a native MODEL (``native_model``), for KSampler and the other native
sampling and model-patch nodes as well as AAA Sampler. The text encoder and VAE have their own
socket types (AAA_TEXT_ENCODER, AAA_VAE) so they cannot be wired into native nodes that expect a
CLIP or VAE; AAA CLIP Loader (``native_clip``) gives the text encoder as a native CLIP. Weights
are read onto the offload device; ComfyUI's memory manager moves them to the GPU when a node
needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..aaa_core import downloads
from ..aaa_core.dit import load_dit
from ..aaa_core.vae import load_vae
from . import comfy_bridge as bridge
from . import model_files
from .native_dit import ComfyAAADiT
from .native_model import native_model

if TYPE_CHECKING:  # importing it imports transformers, which the pack does only when a node runs
    from ..aaa_core.text_encoder import Qwen3TextEncoder


def _file_tooltip(kind: str) -> str:
    source = downloads.SOURCES[kind]
    return (
        f"The {source.label} file, from ComfyUI's models/{model_files.FOLDERS[kind]} folder. "
        f"Choosing '{source.local_name}' downloads the official file from ModelScope once if it is missing."
    )


def _dtype_widget(auto: str) -> tuple:
    return (list(bridge.WEIGHT_DTYPES), {"default": "auto", "tooltip": f"Precision of the weights in memory; auto {auto}."})


class AAADiTLoader:
    CATEGORY = "AAADiT/loaders"
    DESCRIPTION = (
        "Loads an AAADiT diffusion model (models/unet or models/diffusion_models) as a native MODEL: for AAA Sampler, "
        "KSampler, SamplerCustomAdvanced, LoRA loaders and model-patch nodes."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The AAADiT model; connect it to AAA Sampler or a native sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (model_files.choices("dit"), {"tooltip": _file_tooltip("dit")}),
                "weight_dtype": _dtype_widget("follows ComfyUI's choice for your GPU (bf16 where supported, fp32 on the CPU)"),
            }
        }

    def load(self, dit_name: str, weight_dtype: str):
        load_device, offload_device = bridge.model_devices(bridge.DIT)
        weight, compute = bridge.dit_dtypes(weight_dtype, load_device)
        with model_files.naming_widget("dit_name", dit_name):
            path = model_files.resolve("dit", dit_name)
            dit = load_dit(path, dtype=weight, device=offload_device, operations=bridge.dit_operations(), model_class=ComfyAAADiT)
        return (native_model(dit, weight, compute, path),)


class AAATextEncoderLoader:
    CATEGORY = "AAADiT/loaders"
    DESCRIPTION = (
        "Loads the Qwen3-0.6B text encoder (models/clip or models/text_encoders). Its config.json and tokenizer "
        "files are used when they sit beside the weights; otherwise the packaged ones are."
    )
    RETURN_TYPES = ("AAA_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The Qwen3 text encoder; connect it to AAA Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (model_files.choices("text_encoder"), {"tooltip": _file_tooltip("text_encoder")}),
                "weight_dtype": _dtype_widget("is bf16 where your GPU supports it, else fp32 (Qwen3 is not safe in fp16)"),
            }
        }

    def load(self, text_encoder_name: str, weight_dtype: str):
        encoder, path = load_qwen3(text_encoder_name, weight_dtype)
        return (bridge.ManagedModel(encoder, encoder.model, bridge.TEXT_ENCODER, encoder.dtype, encoder.dtype, path),)


def load_qwen3(text_encoder_name: str, weight_dtype: str) -> tuple[Qwen3TextEncoder, Path]:
    """The Qwen3TextEncoder a text encoder loader's widgets choose, on the offload device, and its file."""
    from ..aaa_core.text_encoder import load_text_encoder  # imports transformers: only when a node runs

    load_device, offload_device = bridge.model_devices(bridge.TEXT_ENCODER)
    dtype = bridge.text_encoder_dtype(weight_dtype, load_device)
    with model_files.naming_widget("text_encoder_name", text_encoder_name):
        path = model_files.resolve("text_encoder", text_encoder_name)
        return load_text_encoder(path, dtype=dtype, device=offload_device), path


class AAAVAELoader:
    CATEGORY = "AAADiT/loaders"
    DESCRIPTION = "Loads the FLUX.2 VAE (models/vae) for AAA VAE Decode and AAA VAE Encode."
    RETURN_TYPES = ("AAA_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The FLUX.2 VAE; connect it to AAA VAE Decode or AAA VAE Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (model_files.choices("vae"), {"tooltip": _file_tooltip("vae")}),
                "weight_dtype": _dtype_widget("follows ComfyUI's choice for the FLUX.2 VAE on your GPU (bf16 or fp32)"),
            }
        }

    def load(self, vae_name: str, weight_dtype: str):
        load_device, offload_device = bridge.model_devices(bridge.VAE)
        dtype = bridge.vae_dtype(weight_dtype, load_device)
        with model_files.naming_widget("vae_name", vae_name):
            path = model_files.resolve("vae", vae_name)
            vae = load_vae(path, dtype=dtype, device=offload_device)
        return (bridge.ManagedModel(vae, vae, bridge.VAE, dtype, dtype, path),)
