"""The Qwen3 text encoder as a native ComfyUI ``CLIP``: CLIP Text Encode on it gives AAA Text Encode's conditioning.

``comfy.sd.CLIP`` is built from a target (a tokenizer class, a model class and their parameters),
the way ComfyUI builds its own text encoders (``docs/comfyui.md`` section 4). Ours adapt
``aaa_core.text_encoder`` to the two calls CLIP makes, so the prompt follows the reference recipe
exactly (``docs/diffsynth-aaa.md`` section 7):
- ``tokenize_with_weights``: the chat-templated prompt's token ids, cut at 128 tokens. The text is
  taken literally, as the reference does: no ``(word:1.2)`` weights, no ``embedding:`` names.
- ``encode_token_weights``: those ids padded to 128 with ``<|endoftext|>``, the last hidden state
  at all 128 positions, and an empty pooled output, so CLIP Text Encode writes the same
  CONDITIONING as AAA Text Encode (``conditioning``).
The weights are the ones the loader read (its ``weight_dtype``); CLIP's ModelPatcher has ComfyUI's
memory manager move them to the GPU for each encode.
"""

from __future__ import annotations

import functools
import inspect
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import comfy.sd
import torch

from ..aaa_core.errors import InputError
from ..aaa_core.limits import check_text
from . import comfy_bridge as bridge
from .conditioning import TEXT_ENCODE_MEMORY, conditioning_tensor, no_pooled_output
from .loaders import AAATextEncoderLoader, load_qwen3

if TYPE_CHECKING:  # importing it imports transformers, which the pack does only when a node runs
    from ..aaa_core.text_encoder import Qwen3TextEncoder

log = logging.getLogger(__name__)

# The tokens' key: ComfyUI's token dicts name the encoder they are for, and no other CLIP uses this one.
TOKENS_KEY = "aaadit_qwen3"


class Qwen3PromptTokenizer:
    """ComfyUI's tokenizer interface over the reference prompt recipe (chat template, at most 128 tokens)."""

    def __init__(self, encoder: Qwen3TextEncoder, **comfy_options: Any):
        # comfy_options: embedding_directory (2024 and 0.10), tokenizer_data (0.10); the reference has no embeddings.
        self.encoder = encoder

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **options: Any) -> dict:
        """``{TOKENS_KEY: [[(id, 1.0), ...]]}``: one section of the templated prompt's ids, before padding."""
        check_text("text", text)
        ids = self.encoder.token_ids(text)
        return {TOKENS_KEY: [[(token, 1.0, 0) if return_word_ids else (token, 1.0) for token in ids]]}

    def state_dict(self) -> dict:
        """What CLIP.get_sd (0.10) saves of the tokenizer: nothing, the tokenizer files stay beside the weights."""
        return {}


class Qwen3CondStage(torch.nn.Module):
    """ComfyUI's cond-stage-model interface over a loaded ``Qwen3TextEncoder``: the module CLIP's ModelPatcher manages."""

    def __init__(self, encoder: Qwen3TextEncoder, **comfy_options: Any):
        # comfy_options: the device, dtype and model_options ComfyUI would build a model with; ours is loaded.
        super().__init__()
        self.encoder = encoder
        self.transformer = encoder.model  # a child, so the patcher moves and patches its weights
        self.dtypes = {encoder.dtype}  # 0.10 checks that the load device can cast each
        self.layer: int | None = None

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype()
        return self.encoder.dtype

    def reset_clip_options(self) -> None:
        self.layer = None

    def set_clip_options(self, options: dict) -> None:
        """Keeps CLIP Set Last Layer's ``layer``. ``execution_device`` (0.10) needs no copy: inputs go to the
        weights' device; ``projected_pooled`` concerns a pooled output, which this encoder has none of."""
        self.layer = options.get("layer", self.layer)

    def memory_estimation_function(self, tokens: dict, device: torch.device) -> int:
        """Working memory of one encode besides the weights (0.10 asks before loading)."""
        return TEXT_ENCODE_MEMORY

    def encode_token_weights(self, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (1, 128, hidden) in float32 on the intermediate device, the empty pooled output)."""
        if self.layer not in (None, -1):
            raise InputError(
                f"CLIP Set Last Layer {self.layer}: AAADiT was trained on the last hidden state; "
                "remove the node or set it to -1"
            )
        sections = tokens.get(TOKENS_KEY) if isinstance(tokens, dict) else None
        if not isinstance(sections, list) or len(sections) != 1 or len(tokens) != 1:
            found = ", ".join(map(str, tokens)) if isinstance(tokens, dict) else type(tokens).__name__
            raise InputError(
                f"the tokens ({found}) are not one prompt from AAA CLIP Loader's tokenizer; "
                "encode the prompt with CLIP Text Encode on that CLIP"
            )
        embeds = conditioning_tensor(self.encoder.encode_token_ids([[pair[0] for pair in sections[0]]]))
        return embeds, no_pooled_output(embeds)


def native_clip(encoder: Qwen3TextEncoder) -> Any:
    """``encoder`` as a ``comfy.sd.CLIP``, its weights managed by ComfyUI like its own text encoders'."""
    target = SimpleNamespace(
        clip=Qwen3CondStage,
        tokenizer=functools.partial(Qwen3PromptTokenizer, encoder),
        params={"encoder": encoder},
    )
    options = {}
    if "model_options" in inspect.signature(comfy.sd.CLIP).parameters:
        # 0.10: the dtype it reports and the device it would build on, which are the loader's.
        options["model_options"] = {"dtype": encoder.dtype, "initial_device": bridge.model_devices(bridge.TEXT_ENCODER)[1]}
    return comfy.sd.CLIP(target, **options)


class AAACLIPLoader:
    CATEGORY = "AAADiT/loaders"
    DESCRIPTION = (
        "Loads the Qwen3-0.6B text encoder (models/clip or models/text_encoders) as a native CLIP. CLIP Text Encode "
        "on it gives exactly AAA Text Encode's conditioning (chat template, 128 tokens, last hidden state), for "
        "KSampler, the custom sampler nodes and AAA Sampler."
    )
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The Qwen3 text encoder as a CLIP; connect it to CLIP Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return AAATextEncoderLoader.INPUT_TYPES()  # the same file and precision widgets

    def load(self, text_encoder_name: str, weight_dtype: str):
        encoder, path = load_qwen3(text_encoder_name, weight_dtype)
        log.info("Qwen3 text encoder %s: native CLIP, %s weights", path.name, encoder.dtype)
        return (native_clip(encoder),)
