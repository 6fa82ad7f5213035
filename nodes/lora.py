"""AAA LoRA Loader: applies a LoRA file for AAADiT, in any layout ComfyUI reads for it, to a MODEL.

The layouts and their maths are ``aaa_core.lora``'s. Besides what LoraLoaderModelOnly reads, this
node reads PEFT files without a prefix (or with ``transformer.``) and PEFT files on the 2024
release, and checks every key and value, so a LoRA for another model is a one-line error instead
of a silent no-op.
"""

from __future__ import annotations

from ..aaa_core.checkpoint import read_safetensors
from ..aaa_core.errors import InputError
from ..aaa_core.lora import check_strength, parameter_shapes, read_lora
from . import comfy_bridge as bridge
from .native_model import aaadit_of, with_lora

LORA_FOLDER = "loras"


class AAALoraLoader:
    CATEGORY = "AAADiT/loaders"
    DESCRIPTION = (
        "Applies a LoRA (models/loras) to an AAADiT MODEL: kohya, PEFT/diffusers (any common prefix), ComfyUI's "
        "own SaveLoRA files (LoRA pairs plus .diff/.diff_b), LoHa, LoKr and full weight diffs."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied, for AAA Sampler or a native sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The AAADiT model from AAA DiT Loader."}),
                "lora_name": (bridge.list_model_files(LORA_FOLDER), {"tooltip": "The LoRA file, from ComfyUI's models/loras folder."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": "How strongly the LoRA changes the model; 0 leaves it as it is."}),
            }
        }

    def load(self, model, lora_name: str, strength_model: float):
        dit = aaadit_of(model)
        path = bridge.model_file_path(LORA_FOLDER, lora_name)
        if path is None:
            raise InputError(f"LoRA {lora_name!r} is not in the models/{LORA_FOLDER} folder")
        strength = check_strength(strength_model, path.name)
        lora, _ = read_safetensors(path)
        return (with_lora(model, read_lora(lora, parameter_shapes(dit), path.name), strength, path.name),)
