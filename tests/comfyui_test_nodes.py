"""Nodes that exist only for the tests: loaded into the harness's ComfyUI beside the pack.

``AAATestForeignConditioning`` makes CONDITIONING as another text encoder would, so the executor
tests can feed it to the native samplers: by default what native CLIP Text Encode gives with
ComfyUI's Anima encoder (native Load CLIP on Qwen3-0.6B), an embedding of ``(1, n_tokens, width)``
with ``attention_mask``, ``t5xxl_ids`` and ``t5xxl_weights`` beside ``pooled_output``.
"""

from __future__ import annotations

import torch

ANIMA_KEYS = "attention_mask,t5xxl_ids,t5xxl_weights"


class AAATestForeignConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "shape": ("STRING", {"default": "1,3,1024"}),  # the embedding's shape, comma-separated
                "keys": ("STRING", {"default": ANIMA_KEYS}),  # encoder keys beside pooled_output
            }
        }

    def make(self, shape: str, keys: str):
        dims = [int(size) for size in shape.split(",")]
        tokens = dims[1] if len(dims) > 2 else 1
        made = {
            "attention_mask": torch.ones(1, tokens, dtype=torch.long),
            "t5xxl_ids": torch.ones(tokens, dtype=torch.int),
            "t5xxl_weights": torch.ones(tokens),
        }
        options = {"pooled_output": None, **{key: made[key] for key in keys.split(",") if key}}
        return ([[torch.randn(*dims, generator=torch.Generator().manual_seed(0)), options]],)


NODE_CLASS_MAPPINGS = {"AAATestForeignConditioning": AAATestForeignConditioning}
