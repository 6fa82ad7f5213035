"""Node inputs a workflow or an API prompt can deliver that used to fail deep inside torch: empty
latents, steps below the widget minimum, a text input that is not a string, a LATENT batch_index
that is not whole numbers. Each is one line naming the input and what it must be. (Conditioning of
the wrong rank: test_conditioning_guard.py; IMAGEs that are not 0..1: test_images.py.)"""

from __future__ import annotations

import pytest
import torch

from node_helpers import errors, one_line_error
from pack_import import node

pytestmark = pytest.mark.usefixtures("model_folders")

EMPTY = "no images or no pixels; AAADiT takes at least one latent of at least 1x1 (16x16 pixels)"


@pytest.mark.parametrize("shape", [(0, 128, 2, 2), (1, 128, 0, 0), (1, 128, 2, 0)])
def test_empty_latents_are_refused_by_sampler_and_decoder(models, prompts, shape):
    """torch.cat of no noise, or a 0x0 convolution, was a RuntimeError with a traceback."""
    positive, negative = prompts
    latent = {"samples": torch.zeros(shape)}
    with pytest.raises(errors.InputError) as excinfo:
        node("AAASampler")(models.dit, positive, negative, latent, seed=0, steps=2, cfg=5.0, denoise=1.0)
    assert one_line_error(excinfo) == f"latent_image has shape {shape}: {EMPTY}"
    with pytest.raises(errors.InputError) as excinfo:
        node("AAAVAEDecode")(latent, models.vae)
    assert one_line_error(excinfo) == f"samples has shape {shape}: {EMPTY}"


@pytest.mark.parametrize("steps", [0, -1])
def test_sampler_steps_below_one_name_the_widget(models, prompts, steps):
    positive, negative = prompts
    (latent,) = node("AAAEmptyLatentImage")(width=32, height=32, batch_size=1)
    with pytest.raises(errors.InputError) as excinfo:
        node("AAASampler")(models.dit, positive, negative, latent, seed=0, steps=steps, cfg=5.0, denoise=1.0)
    assert one_line_error(excinfo) == f"steps {steps}: must be between 1 and 10000"


@pytest.mark.parametrize("steps, denoise, expected", [
    (0, 1.0, "steps must be at least 1, got 0"),
    (2, float("nan"), "denoise must be in (0, 1], got nan"),
])
def test_sigmas_node_bad_values_are_one_line(steps, denoise, expected):
    with pytest.raises(errors.InputError) as excinfo:
        node("AAAFlux2Sigmas")(steps, 32, 32, denoise)
    assert one_line_error(excinfo) == expected


@pytest.mark.parametrize("text, kind", [(None, "NoneType"), (5, "int"), (["a"], "list")])
def test_text_encode_refuses_a_text_that_is_not_a_string(models, text, kind):
    with pytest.raises(errors.InputError) as excinfo:
        node("AAATextEncode")(models.text_encoder, text)
    assert one_line_error(excinfo) == f"text must be a string, got {kind}"


@pytest.mark.parametrize("batch_index", [[1.5], [0.0], [-1], "0", [True]])
def test_batch_index_that_is_not_whole_numbers_is_one_line(models, prompts, batch_index):
    """A float batch_index reached torch.manual_seed as a RuntimeError."""
    latent = {"samples": torch.zeros(1, 128, 2, 2), "batch_index": batch_index}
    expected = f"latent_image has batch_index {batch_index!r}; it must list whole numbers >= 0"
    with pytest.raises(errors.InputError) as excinfo:
        node("AAASampler")(models.dit, *prompts, latent, seed=0, steps=2, cfg=5.0, denoise=1.0)
    assert one_line_error(excinfo).startswith(expected)
    (noise,) = node("AAAReferenceNoise")(noise_seed=0)
    with pytest.raises(errors.InputError) as excinfo:
        noise.generate_noise(latent)
    assert one_line_error(excinfo).startswith(expected)
