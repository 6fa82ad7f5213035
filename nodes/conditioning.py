"""Prompt encoding: text -> CONDITIONING in ComfyUI's list format ``[[embeds (1, 128, 1024), {"pooled_output": (1, 0)}]]``.

AAA Text Encode and native CLIP Text Encode on AAA CLIP Loader's CLIP (``native_clip``) give the
same list: float32 embeddings on ComfyUI's intermediate device, and the pooled output CLIP Text
Encode always writes, empty here (``no_pooled_output``).
"""

from __future__ import annotations

import logging

import torch

from ..aaa_core.errors import InputError
from ..aaa_core.limits import check_text
from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

# Rough working memory of one Qwen3-0.6B forward over 128 tokens: hidden states, attention
# and MLP activations with headroom. Tiny next to ComfyUI's 1 GB minimum inference reserve.
TEXT_ENCODE_MEMORY = 64 * 1024 * 1024


class AAATextEncode:
    CATEGORY = "AAADiT/conditioning"
    DESCRIPTION = (
        "Encodes a prompt with the Qwen3-0.6B text encoder into AAADiT conditioning (chat template, "
        "128 tokens, last hidden state). Use one for the positive and one for the negative prompt."
    )
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt embedding (1, 128, 1024) for AAA Sampler's positive or negative input.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("AAA_TEXT_ENCODER", {"tooltip": "The Qwen3 text encoder from AAA Text Encoder Loader."}),
                "text": (
                    "STRING",
                    {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt; longer prompts are cut at 128 tokens, template included."},
                ),
            }
        }

    def encode(self, text_encoder: bridge.ManagedModel, text: str):
        check_text("text", text)
        encoder = text_encoder.load(TEXT_ENCODE_MEMORY)
        embeds = conditioning_tensor(encoder.encode([text]))
        return ([[embeds, {"pooled_output": no_pooled_output(embeds)}]],)


def conditioning_tensor(embeds: torch.Tensor) -> torch.Tensor:
    """The text encoder's output as a CONDITIONING holds it: float32 on ComfyUI's intermediate device."""
    return embeds.to(device=bridge.intermediate_device(), dtype=torch.float32)


def no_pooled_output(embeds: torch.Tensor) -> torch.Tensor:
    """The pooled output of AAADiT conditioning: none, as an empty ``(B, 0)`` tensor.

    Not None, which current ComfyUI's own LLM text encoders write: the 2024 tree's Conditioning
    (Zero Out) calls ``zeros_like`` on it.
    """
    return embeds.new_zeros(embeds.shape[0], 0)


def conditioning_embeds(conditioning, name: str, width: int) -> torch.Tensor:
    """The prompt embedding ``(B, L, width)`` in a CONDITIONING, or a one-line error saying what is wrong with it."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise InputError(f"{name} conditioning is empty; connect an AAA Text Encode node")
    if len(conditioning) != 1:
        raise InputError(
            f"{name} conditioning has {len(conditioning)} entries (combined or area prompts?); "
            "AAADiT takes exactly one prompt from AAA Text Encode"
        )
    entry = conditioning[0]
    embeds = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not torch.is_tensor(embeds) or embeds.ndim != 3:
        shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
        raise InputError(f"{name} conditioning holds {shape}, not a (batch, tokens, width) prompt embedding")
    check_embeds_width(embeds, name, width)
    options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    extras = sorted(set(options) - {"pooled_output"})  # CLIP Text Encode always writes one; AAADiT takes none
    if extras:
        log.warning("AAADiT ignores these %s conditioning options: %s", name, ", ".join(extras))
    return embeds


def check_embeds_width(embeds: torch.Tensor, name: str, width: int) -> None:
    """A one-line error unless the prompt embedding is ``width`` wide (the DiT's text_dim)."""
    if embeds.shape[-1] != width:
        raise InputError(
            f"{name} conditioning is {embeds.shape[-1]} wide but this AAADiT takes {width}: "
            "it was made by another text encoder; use AAA Text Encode with the Qwen3 text encoder"
        )
