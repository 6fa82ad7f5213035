"""The native CLIP's tokenizer and cond-stage model on the tiny text encoder, called the way comfy.sd.CLIP calls them.

The whole CLIP inside ComfyUI's executor is tested in ``test_native_clip_in_comfyui.py``; these
are the same calls in this process, fast, plus the inputs ComfyUI's own nodes could hand them.
"""

from __future__ import annotations

import pytest
import torch

from pack_import import node, pack_module

native_clip = pack_module("nodes.native_clip")
InputError = pack_module("aaa_core.errors").InputError
LONG = "a very long description of a pokemon, " * 40


@pytest.fixture(scope="module")
def parts(models):
    encoder = models.text_encoder.model
    return native_clip.Qwen3PromptTokenizer(encoder, embedding_directory=None), native_clip.Qwen3CondStage(encoder, device="cpu")


@pytest.mark.parametrize("text", ["a green lizard pokemon", "", LONG])
def test_tokenize_then_encode_equals_aaa_text_encode(parts, models, text):
    tokenizer, cond_stage = parts
    tokens = tokenizer.tokenize_with_weights(text)
    assert list(tokens) == [native_clip.TOKENS_KEY] and len(tokens[native_clip.TOKENS_KEY]) == 1
    assert len(tokens[native_clip.TOKENS_KEY][0]) <= 128  # unpadded, cut at 128
    cond, pooled = cond_stage.encode_token_weights(tokens)
    ((expected, options),) = node("AAATextEncode")(models.text_encoder, text)[0]
    assert torch.equal(cond, expected) and pooled.shape == options["pooled_output"].shape == (1, 0)


def test_word_ids_are_a_third_element(parts):
    tokenizer, _ = parts
    plain = tokenizer.tokenize_with_weights("a cat")[native_clip.TOKENS_KEY][0]
    with_ids = tokenizer.tokenize_with_weights("a cat", return_word_ids=True)[native_clip.TOKENS_KEY][0]
    assert [pair + (0,) for pair in plain] == with_ids


def test_clip_set_last_layer_other_than_the_last_is_one_line(parts):
    tokenizer, cond_stage = parts
    tokens = tokenizer.tokenize_with_weights("a cat")
    cond_stage.set_clip_options({"layer": -1})  # the last layer: what AAADiT was trained on
    cond_stage.encode_token_weights(tokens)
    cond_stage.set_clip_options({"layer": -2})
    with pytest.raises(InputError, match="CLIP Set Last Layer -2: AAADiT was trained on the last hidden state") as err:
        cond_stage.encode_token_weights(tokens)
    assert "\n" not in str(err.value)
    cond_stage.reset_clip_options()
    cond_stage.encode_token_weights(tokens)


@pytest.mark.parametrize("tokens", [{"l": [[(49406, 1.0)]]}, {native_clip.TOKENS_KEY: [[(1, 1.0)], [(2, 1.0)]]}, [(1, 1.0)]])
def test_tokens_from_another_tokenizer_are_one_line(parts, tokens):
    _, cond_stage = parts
    with pytest.raises(InputError, match="not one prompt from AAA CLIP Loader's tokenizer"):
        cond_stage.encode_token_weights(tokens)


def test_more_than_128_tokens_are_refused(parts):
    _, cond_stage = parts
    with pytest.raises(InputError, match="a prompt has 129 tokens; AAADiT's text encoder takes at most 128"):
        cond_stage.encode_token_weights({native_clip.TOKENS_KEY: [[(1, 1.0)] * 129]})
