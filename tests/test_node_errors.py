"""The nodes' one-line errors for values ComfyUI's widget checks let through, and their agreement
with the CLI on limits and seeds."""

from __future__ import annotations

import pytest
import torch

from aaa_core.dit import load_dit
from aaa_core.limits import MAX_BATCH_SIZE, MAX_STEPS, SEED_MAX
from aaa_core.sampling import make_noise, sample
from node_helpers import embeds, errors, one_line_error
from pack_import import NODES, node

pytestmark = pytest.mark.usefixtures("model_folders")


def test_node_widgets_offer_the_bounds_the_cli_enforces():
    sampler = NODES["AAASampler"].INPUT_TYPES()["required"]
    empty = NODES["AAAEmptyLatentImage"].INPUT_TYPES()["required"]
    assert sampler["seed"][1]["max"] == SEED_MAX and sampler["steps"][1]["max"] == MAX_STEPS
    assert empty["batch_size"][1]["max"] == MAX_BATCH_SIZE and empty["width"][1]["max"] == 8192


@pytest.mark.parametrize(
    "cfg, denoise, expected",
    [
        (float("nan"), 1.0, "cfg nan: must be a finite number"),
        (float("inf"), 1.0, "cfg inf: must be a finite number"),
        (10.0, float("nan"), "denoise nan: must be a finite number"),
    ],
)
def test_sampler_refuses_nan_and_inf_that_comfyui_lets_through(models, prompts, cfg, denoise, expected):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    with pytest.raises(errors.InputError) as excinfo:
        node("AAASampler")(models.dit, positive, negative, latent, seed=0, steps=2, cfg=cfg, denoise=denoise)
    assert one_line_error(excinfo) == expected


def test_sampler_refuses_latents_that_overflowed(models, prompts):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    with pytest.raises(errors.ComputeError) as excinfo:
        node("AAASampler")(models.dit, positive, negative, latent, seed=0, steps=2, cfg=1e38, denoise=1.0)
    assert one_line_error(excinfo) == (
        "sampled latents hold 512 NaN/inf values out of 512: cfg 1e+38 is too large: use a value between 1 and 15"
    )


def test_sampler_names_a_nan_input_latent_as_the_cause(models, prompts):
    positive, negative = prompts
    samples = torch.zeros(1, 128, 2, 2)
    samples[0, 0, 0, 0] = float("nan")
    with pytest.raises(errors.ComputeError) as excinfo:
        node("AAASampler")(models.dit, positive, negative, {"samples": samples}, seed=0, steps=2, cfg=10.0, denoise=0.5)
    assert one_line_error(excinfo).endswith(": its input latents already hold NaN/inf (made by a node or step that failed before)")


def test_sampler_wraps_seeds_past_the_last_exactly_as_the_core(models, prompts):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=16, height=16, batch_size=2)
    (result,) = node("AAASampler")(models.dit, positive, negative, latent, seed=SEED_MAX, steps=2, cfg=10.0, denoise=1.0)
    noise = make_noise(SEED_MAX, 2, 1, 1)
    assert torch.equal(noise[1:], make_noise(0, 1, 1, 1))  # image 1 uses seed 0
    with torch.inference_mode():
        expected = sample(load_dit(models.dit_path), noise, embeds(positive), embeds(negative), 2, 10.0)
    assert torch.equal(result["samples"], expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a lizard \ud83d", "text: character 9 is not valid text; pass the prompt as UTF-8"),
        ("a\0lizard", "text: character 1 is a NUL character; remove it from the prompt"),
    ],
)
def test_text_encode_refuses_text_that_is_not_text(models, text, expected):
    with pytest.raises(errors.InputError) as excinfo:
        node("AAATextEncode")(models.text_encoder, text)
    assert expected in one_line_error(excinfo)


def test_empty_latent_batch_size_is_bounded_when_called_directly():
    with pytest.raises(errors.InputError) as excinfo:
        node("AAAEmptyLatentImage")(width=16, height=16, batch_size=MAX_BATCH_SIZE + 1)
    assert one_line_error(excinfo) == "batch_size 4097: must be between 1 and 4096"
