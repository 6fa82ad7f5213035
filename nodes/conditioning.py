"""Prompt encoding: text -> CONDITIONING in ComfyUI's list format ``[[embeds (1, 128, 1024), {"pooled_output": (1, 0)}]]``.

AAA Text Encode and native CLIP Text Encode on AAA CLIP Loader's CLIP (``native_clip``) give the
same list: float32 embeddings on ComfyUI's intermediate device, and the pooled output CLIP Text
Encode always writes, empty here (``no_pooled_output``).
"""

from __future__ import annotations

import logging

import torch

from ..aaa_core.errors import InputError
from ..aaa_core.geometry import TEXT_TOKENS
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


# Keys ComfyUI's text encoders put beside their embedding (comfy/sd1_clip.py, comfy/text_encoders/):
# attention masks, Anima's T5 token ids and weights, the second encoders of HiDream and HunyuanImage,
# ACE's lyrics. AAA Text Encode puts none of them.
ENCODER_KEYS = ("attention_mask", "t5xxl_ids", "t5xxl_weights", "conditioning_llama3", "conditioning_byt5small", "conditioning_lyrics")
# Added by every native CLIP Text Encode (None for most encoders); AAADiT has no pooled input.
POOLED_KEY = "pooled_output"
FIX = "encode the prompt with CLIP Text Encode on AAA CLIP Loader's CLIP, or with AAA Text Encode"


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
    options = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
    check_prompt_embedding(embeds, options, name, width)
    ignored = sorted(key for key in options if key != POOLED_KEY)
    if ignored:
        log.warning("AAADiT ignores these %s conditioning options: %s", name, ", ".join(ignored))
    return embeds


def check_prompt_embedding(embeds, options: dict, name: str, width: int) -> None:
    """A one-line error naming the fix unless ``embeds`` and ``options`` are what AAA Text Encode makes for this DiT.

    AAA Text Encode's CONDITIONING is ``[[embeds, {}]]``: ``embeds`` is ``(batch, 128, text_dim)``,
    the Qwen3 last hidden state at all 128 padded positions. Accepted, in AAA Sampler and in every
    native sampler (``native_model.AAADiTModel.extra_conds``):
    - a tensor of rank 3 whose width is the DiT's ``text_dim``;
    - whose token count is 128 or a multiple of it (Conditioning Concat joins whole prompts);
    - whose options hold none of ``ENCODER_KEYS``; ``pooled_output`` (any value) and ComfyUI's
      encoder-independent options (area, strength, timestep range, mask, hooks, ControlNet) may be there.
    Another encoder's conditioning (Anima's from native Load CLIP: ``(1, n_tokens, 1024)`` plus
    attention_mask / t5xxl_ids) fails the token count or the keys.
    """
    foreign = f"this conditioning comes from another text encoder: {FIX}"
    if not torch.is_tensor(embeds) or embeds.ndim != 3:
        shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
        raise InputError(f"{name} conditioning holds {shape}, not a (batch, tokens, width) prompt embedding; {FIX}")
    if embeds.shape[-1] != width:
        raise InputError(f"{name} conditioning is {embeds.shape[-1]} wide but this AAADiT takes {width}: {foreign}")
    tokens = embeds.shape[1]
    if tokens == 0 or tokens % TEXT_TOKENS:
        raise InputError(f"{name} conditioning has {tokens} tokens but AAADiT prompts have {TEXT_TOKENS}: {foreign}")
    keys = sorted(key for key in ENCODER_KEYS if key in options)
    if keys:
        raise InputError(f"{name} conditioning carries {', '.join(keys)}, which AAA Text Encode never makes: {foreign}")
