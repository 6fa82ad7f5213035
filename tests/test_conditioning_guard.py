"""The AAADiT MODEL refuses conditioning that AAA Text Encode did not make, in one line naming the fix.

Runs KSampler's sampling core (``comfy.sample.sample``, what KSampler and KSamplerAdvanced call)
and AAA Sampler in the ComfyUI imported in-process; the executor tests in
``test_native_model_in_comfyui.py`` run the same cases through the native sampler nodes. The
foreign conditioning is built as ComfyUI's CLIP Text Encode builds it: Anima's text encoder (native
Load CLIP on Qwen3-0.6B) gives ``(1, n_tokens, width)`` with ``attention_mask``, ``t5xxl_ids`` and
``t5xxl_weights`` beside ``pooled_output``.
"""

from __future__ import annotations

import pytest
import torch

from node_helpers import embeds, errors, one_line_error
from pack_import import node

import comfy.sample  # noqa: E402  (on sys.path once the pack is imported)

pytestmark = pytest.mark.usefixtures("model_folders")

FIX = "encode the prompt with CLIP Text Encode on AAA CLIP Loader's CLIP"
WIDTH = 32  # the tiny DiT's text_dim


def anima_style(tokens: int = 3, width: int = WIDTH) -> list:
    """What native CLIP Text Encode gives with Anima's Qwen3-0.6B encoder, at ``width``."""
    return [[torch.randn(1, tokens, width), {
        "pooled_output": None,
        "attention_mask": torch.ones(1, tokens, dtype=torch.long),
        "t5xxl_ids": torch.ones(tokens, dtype=torch.int),
        "t5xxl_weights": torch.ones(tokens),
    }]]


def ksampler(models, positive, negative, latent: torch.Tensor | None = None, denoise: float = 1.0) -> torch.Tensor:
    """Two euler steps of KSampler's core on our MODEL."""
    latent = torch.zeros(1, 128, 2, 2) if latent is None else latent
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(models.dit, noise, 2, 4.0, "euler", "normal", positive, negative, latent, denoise=denoise, seed=0)


CASES = [
    (anima_style(), "conditioning has 3 tokens but AAADiT prompts have 128: this conditioning comes from another text encoder"),
    (anima_style(tokens=128), "conditioning carries attention_mask, t5xxl_ids, t5xxl_weights, which AAA Text Encode never makes"),
    ([[torch.randn(1, 128, 48), {}]], "conditioning is 48 wide but this AAADiT takes 32: this conditioning comes from another text encoder"),
    ([[torch.randn(1, WIDTH), {}]], "conditioning holds (1, 32), not a (batch, tokens, width) prompt embedding"),
]


@pytest.mark.parametrize("foreign, expected", CASES)
def test_ksampler_refuses_foreign_conditioning_in_one_line(models, prompts, foreign, expected):
    positive, negative = prompts
    with pytest.raises(errors.InputError) as excinfo:
        ksampler(models, foreign, negative)
    message = one_line_error(excinfo)
    assert message.startswith(f"positive {expected}") and FIX in message


@pytest.mark.parametrize("foreign, expected", CASES)
def test_aaa_sampler_refuses_foreign_conditioning_in_one_line(models, prompts, foreign, expected):
    positive, _ = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    with pytest.raises(errors.InputError) as excinfo:
        node("AAASampler")(models.dit, positive, foreign, latent, seed=0, steps=2, cfg=4.0, denoise=1.0)
    message = one_line_error(excinfo)
    assert message.startswith(f"negative {expected}") and FIX in message


def test_what_native_clip_text_encode_adds_to_our_embedding_is_accepted(models, prompts):
    """AAA Text Encode's embedding with the pooled_output every CLIP Text Encode adds, and Conditioning
    Concat's 256 tokens, sample like the plain embedding (no pooled input in AAADiT)."""
    positive, negative = prompts
    plain = ksampler(models, positive, negative)
    with_pooled = ksampler(models, [[embeds(positive), {"pooled_output": None}]], [[embeds(negative), {"pooled_output": torch.zeros(1, WIDTH)}]])
    assert torch.equal(with_pooled, plain) and torch.isfinite(plain).all()
    concatenated = [[torch.cat([embeds(positive)] * 2, dim=1), {}]]
    assert torch.isfinite(ksampler(models, concatenated, negative)).all()


def test_native_sampling_refuses_non_finite_latents_like_aaa_sampler(models, prompts):
    latent = torch.zeros(1, 128, 2, 2)
    latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(errors.ComputeError) as excinfo:
        ksampler(models, *prompts, latent=latent, denoise=0.5)
    assert one_line_error(excinfo).startswith("sampled latents hold 512 NaN/inf values out of 512: ")
