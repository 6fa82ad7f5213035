"""AAA LoRA Loader: applies a LoRA for AAADiT in any of the common key layouts to a MODEL.

ComfyUI's own LoraLoaderModelOnly reads the kohya layout on every release and the PEFT layout
with a ``diffusion_model.`` prefix on current ones; this node also reads PEFT files without that
prefix (or with ``transformer.``) and PEFT files on the 2024 release, and checks every key
against the model so a LoRA for another model is a one-line error instead of a silent no-op.
"""

from __future__ import annotations

from ..aaa_core.checkpoint import read_safetensors
from ..aaa_core.errors import InputError
from ..aaa_core.lora import linear_weight_shapes, read_lora
from . import comfy_bridge as bridge
from .native_model import aaadit_of, with_lora

LORA_FOLDER = "loras"


class AAALoraLoader:
    CATEGORY = "AAADiT/loaders"
    DESCRIPTION = (
        "Applies a LoRA (models/loras) to an AAADiT MODEL: PEFT/diffusers keys (blocks.N.to_q.lora_A.weight, "
        "any common prefix) or kohya keys (lora_unet_blocks_N_to_q.lora_down.weight with alpha)."
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
        lora, _ = read_safetensors(path)
        return (with_lora(model, read_lora(lora, linear_weight_shapes(dit), path.name), strength_model),)
